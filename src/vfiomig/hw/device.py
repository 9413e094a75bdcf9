"""The hardware side of a PCI function that does DMA through the IOMMU.

Every modelled device's hardware object derives from DmaDevice. The kernel's iommufd (or type1)
attach sets `domain`; from then on the device's DMA is translated, permission-checked and
dirty-tracked by that IO page table (vfiomig.hw.iommu). A DMA the IOMMU refuses writes nothing,
is recorded in `faults` and raises IommuFault.
"""

from __future__ import annotations

from vfiomig.hw.dma import dma_read, dma_write
from vfiomig.hw.iommu import Domain, IommuFault
from vfiomig.hw.memory import Memory


class DmaDevice:
    def __init__(self, mem: Memory, name: str) -> None:
        self.mem = mem
        self.name = name
        self.domain: Domain | None = None  # set by the kernel on attach, None when detached
        self.faults: list[tuple[int, bool, str]] = []  # (iova, write, reason)

    def _domain(self, iova: int, write: bool) -> Domain:
        if self.domain is None:
            # No translation at all: on real hardware the IOMMU blocks the transaction.
            raise IommuFault(iova, write, "no domain attached")
        return self.domain

    def dma_write(self, iova: int, data: bytes | memoryview | int) -> None:
        """A DMA write of `data` (or of an int length, for unbacked memory) at `iova`."""
        try:
            dma_write(self._domain(iova, True), self.mem, self, iova, data)
        except IommuFault as fault:
            self.faults.append((fault.iova, True, fault.reason))
            raise
        self.on_dma_write(iova, data if isinstance(data, int) else len(data))

    def dma_read(self, iova: int, length: int) -> bytes:
        try:
            return dma_read(self._domain(iova, False), self.mem, self, iova, length)
        except IommuFault as fault:
            self.faults.append((fault.iova, False, fault.reason))
            raise

    def on_dma_write(self, iova: int, length: int) -> None:
        """Hook for device-side dirty logging (a device's own DMA log sees its writes)."""
