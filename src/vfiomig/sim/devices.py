"""What passthrough devices do while the guest runs: each kind's workload.

Device workloads act on the device's hardware side (its DMA engine, through the IOMMU), so
their writes reach guest RAM, and dirty it, only through the IOMMU, as on a real machine.
They live in the guest's device window (real bytes in either RAM mode).

  reference   writes receive buffers: a ring in the device window, ``rate`` bytes per
              second in order (DMA through the IOMMU), and changes ``churn`` chunks of its
              own state per second (its PRE_COPY dirty data)
  hisi_acc    a ZIP VF: the guest posts ``jobs`` compression jobs per second in queues in
              guest memory; the engine reads inputs and writes outputs and completions by
              DMA (see hw.hisi_zip)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vfiomig.hw.hisi_qm import PCI_DEVICE_ID_HUAWEI_ZIP_VF
from vfiomig.vmm.guest_ram import PAGE

REF_RING = 2 << 20  # bytes of the reference device's receive ring
DEFAULTS: dict[str, dict[str, Any]] = {
    "reference": {"rate": 16 << 20, "churn": 8},
    "hisi_acc": {"jobs": 2000},
}
# Model options a migrate device gets unless given: the hisi_acc VF is a ZIP VF (its engine
# compresses; SEC/HPRE VFs have no engine in the model).
# The reference device stands for an mlx5-like function whose state is "typically on the
# order of 100s of MB" (hw/vfio/migration.c): 32 MiB of PRE_COPY state by default.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "hisi_acc": {"dev_id": PCI_DEVICE_ID_HUAWEI_ZIP_VF},
    "reference": {"state_size": 32 << 20},
}
WORKLOAD_KEYS = {kind: frozenset(d) for kind, d in DEFAULTS.items()}


class DeviceLoad:
    """A device's workload on one host; ``iova`` maps a guest RAM offset to its IOVA."""

    kind = "none"

    def advance(self, dt: float, vcpus: bool) -> None:
        """Run for ``dt`` seconds (``vcpus``: whether the guest's CPUs run)."""

    def state(self) -> dict[str, Any]:
        """The guest driver's variables (carried with the vCPU state)."""
        return {}

    def check(self) -> list[str]:
        """What is wrong with the work so far, as the guest sees it (empty if nothing)."""
        return []

    def move(self, hw: Any, state: dict[str, Any], iova_base: int, memory: Any) -> None:
        """Continue on a destination device (after a completed migration)."""


class ReferenceLoad(DeviceLoad):
    kind = "reference"

    def __init__(self, hw: Any, iova_base: int, rate: int, churn: int, seed: int) -> None:
        self.hw = hw
        self.iova = iova_base
        self.rate = rate
        self.churn = churn
        self.pos = 0
        self.carry = 0.0
        self.churn_carry = 0.0
        self.rng = np.random.default_rng(seed)
        self.written = 0
        self.buf = np.zeros(REF_RING // 8, dtype="<u8")  # what the device writes, reused

    def advance(self, dt: float, vcpus: bool) -> None:
        if not self.hw.running or dt <= 0:
            return
        want = self.rate * dt + self.carry
        n = int(want) // PAGE * PAGE
        self.carry = want - n
        n = min(n, REF_RING)
        while n:
            k = min(n, REF_RING - self.pos)
            self.buf[: k // 8] = self.written // PAGE + 1
            self.hw.dma_write(self.iova + self.pos, self.buf[: k // 8].view(np.uint8).data)
            self.written += k
            self.pos = (self.pos + k) % REF_RING
            n -= k
        c = self.churn * dt + self.churn_carry
        self.churn_carry = c - int(c)
        if int(c):
            self.hw.run(int(c))

    def state(self) -> dict[str, Any]:
        return {"pos": self.pos, "written": self.written}

    def move(self, hw: Any, state: dict[str, Any], iova_base: int, memory: Any) -> None:
        self.hw, self.iova = hw, iova_base
        self.pos, self.written = int(state["pos"]), int(state["written"])
