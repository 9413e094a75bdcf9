"""Ground truth: the one interface through which the simulation looks below the uAPI.

The migration itself reaches the kernel only through vfiomig.host. Checking its result needs
what no uAPI shows: a device's internal state and the bytes it holds. Everything that reads
model internals for verification goes through ``GroundTruth``, so the places that do are
few and named.
"""

from __future__ import annotations

from typing import Any


class GroundTruth:
    """Read-only views of one ModelKernel's devices."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def hw(self, path: str) -> Any:
        """The hardware side of a device (its DMA engine), for device workloads."""
        return self.kernel.device(path)

    def device_state(self, path: str) -> Any:
        """What the device's driver transfers across a migration, comparable with ==."""
        hw = self.kernel.device(path)
        if hasattr(hw, "migratable_state"):  # hisi_acc: registers, table bases, VF state
            return hw.migratable_state()
        if hasattr(hw, "state"):  # reference: its whole state
            return hw.state()
        return None

    def device_digest(self, path: str) -> str:
        hw = self.kernel.device(path)
        return str(hw.digest()) if hasattr(hw, "digest") else repr(self.device_state(path))

    def mig_state(self, path: str) -> int:
        return int(self.kernel._vfio_device(path).mig_state)
