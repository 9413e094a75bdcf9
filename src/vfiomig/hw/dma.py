"""DMA as a device model does it: the IOMMU translates, then the bytes move.

A write given as an int is a length only: it has the IOMMU side effects (permission check,
dirty bits, IOTLB) and moves no bytes, which is how workloads dirty unbacked memory of very
large guests. Byte transfers need backed memory; asking for bytes from an unbacked region is
a modelling error (UnbackedDma, a ValueError), checked before the IOMMU sees the access.
"""

from __future__ import annotations

import numpy as np

from vfiomig.hw.iommu import Domain, IommuFault
from vfiomig.hw.memory import Memory


class UnbackedDma(ValueError):
    """Bytes asked of memory that has none (an unbacked region): a limit of the model."""


def dma_write(
    domain: Domain, mem: Memory, dev: object, iova: int, data: bytes | memoryview | int
) -> None:
    """Device write of `data` (or of an int length, dirty side effect only) at `iova`."""
    if isinstance(data, int):
        domain.dma(dev, iova, data, write=True)
        return
    _check_backed(domain, mem, iova, len(data), write=True)
    src = np.frombuffer(data, dtype=np.uint8)
    off = 0
    for uva, n in domain.dma(dev, iova, len(data), write=True):
        mem.view(uva, n)[:] = src[off : off + n]
        off += n


def dma_read(domain: Domain, mem: Memory, dev: object, iova: int, length: int) -> bytes:
    """Device read of `length` bytes at `iova`."""
    _check_backed(domain, mem, iova, length, write=False)
    return b"".join(mem.read(uva, n) for uva, n in domain.dma(dev, iova, length, write=False))


def _check_backed(domain: Domain, mem: Memory, iova: int, length: int, write: bool) -> None:
    """Refuse byte DMA into unbacked memory before anything happens. A translation fault is
    left for domain.dma to raise and record."""
    try:
        segs = domain.translate(iova, length, write=write)
    except IommuFault:
        return
    for uva, n in segs:
        if not mem.region(uva, n).backed:
            raise UnbackedDma(
                f"DMA {'write' if write else 'read'} of bytes at IOVA {iova:#x} reaches "
                f"unbacked memory at {uva:#x}: pass a length (int) to dirty it without bytes"
            )
