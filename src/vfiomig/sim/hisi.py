"""The hisi_acc ZIP VF's workload: a guest driver (hw.hisi_zip.GuestZip) posting compression
jobs into queues in guest memory at ``jobs`` per second, the VF's engine compressing them by
DMA through the IOMMU, and the guest reaping and checking completions."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw import hisi_zip as z
from vfiomig.sim.devices import DeviceLoad
from vfiomig.vmm.guest_ram import PAGE, GuestRam

WINDOW = 2 << 20  # GuestZip's queues and buffers (1260 KiB with its defaults)
DRAIN_ROUNDS = 64  # engine/reap rounds allowed to finish outstanding jobs at the end


class LoggedWindow(z.GuestRam):
    """The guest driver's view of its window: its CPU stores go through KVM's dirty log."""

    def __init__(self, data: npt.NDArray[np.uint8], iova: int, ram: GuestRam, page: int) -> None:
        super().__init__(data, iova)
        self.ram = ram
        self.page = page  # guest RAM page of data[0]

    def _mark(self, iova: int, n: int) -> None:
        off = iova - self.iova
        if n > 0:
            self.ram.cpu_stored(self.page + off // PAGE, self.page + (off + n - 1) // PAGE)

    def write(self, iova: int, data: bytes) -> None:
        super().write(iova, data)
        self._mark(iova, len(data))

    def zero(self, iova: int, n: int) -> None:
        super().zero(iova, n)
        self._mark(iova, n)


class HisiZipLoad(DeviceLoad):
    kind = "hisi_acc"

    def __init__(
        self, hw: Any, iova: int, ram: GuestRam, offset: int, jobs: int, seed: int
    ) -> None:
        self.hw = hw
        self.jobs = jobs
        self.offset = offset  # bytes into the device window (the bottom of guest RAM)
        self.rng = np.random.default_rng(seed)
        self.carry = 0.0
        self.gz = z.GuestZip(hw, self._window(ram, iova))

    def _window(self, ram: GuestRam, iova: int) -> LoggedWindow:
        data = ram.window().buf.array[self.offset : self.offset + WINDOW]
        return LoggedWindow(data, iova, ram, self.offset // PAGE)

    def advance(self, dt: float, vcpus: bool) -> None:
        if vcpus and self.jobs and dt > 0:
            want = self.jobs * dt + self.carry
            n = int(want)
            self.carry = want - n
            if n:
                self.gz.post(n, self.rng)
        self.hw.engine_step()  # the engine runs on its own; a paused QM does nothing
        if vcpus:
            self.gz.reap()

    def state(self) -> dict[str, Any]:
        return self.gz.state()

    def check(self) -> list[str]:
        """Every job posted so far completes exactly once with output that decompresses
        to its input (the guest drains its queue first)."""
        for _ in range(DRAIN_ROUNDS):
            if not self.gz.outstanding:
                break
            self.hw.engine_step()
            self.gz.reap()
        problems = list(self.gz.problems(idle=True))
        if self.jobs and not self.gz.completed:
            problems.append("no ZIP job completed")
        return problems

    def move(self, hw: Any, state: dict[str, Any], iova_base: int, memory: Any) -> None:
        self.hw = hw
        self.gz = z.GuestZip.restore(state, hw, self._window(memory, iova_base))
