"""Memory of the modelled machine: the process's user mappings, which are also what DMA reaches.

iommufd and type1 pin user pages and install their physical addresses in the IO page table.
The model needs no separate physical address space: an IOPTE holds the *user virtual address*
it was pinned from, and DMA reads and writes land in the same bytes the process sees.

A region is either backed (a numpy uint8 array) or unbacked: address space without bytes,
for simulating guests of hundreds of GiB or 1 TiB where only dirty state matters.
Any access outside a region, or a byte access to an unbacked region, is EFAULT.

Some regions share their bytes with a file (`map_data`): a shared mapping of a memfd at a user
address, and the kernel's own mapping of file pages iommufd pinned (IOAS_MAP_FILE), placed
at KERNEL_BASE and above, past TASK_SIZE_MAX, where no user pointer reaches (access_ok).
"""

from __future__ import annotations

import bisect
import errno
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# Where the model's mmap() hands out addresses: a canonical x86-64 user address, away from 0
# so that a NULL or small pointer is always EFAULT, as it is in a real process.
MMAP_BASE = 0x7F00_0000_0000
# Unmapped guard gap left between regions, so running off the end of one buffer faults.
GUARD = 1 << 21
# The top of the process's address space (TASK_SIZE_MAX): arm64's 48-bit VA. x86-64's 4-level
# 2^47 - 4 KiB would be too small for a 1 TiB guest placed above MMAP_BASE plus its buffers.
TASK_SIZE_MAX = 1 << 48
# Where pinned file pages get their addresses (the kernel's direct map, for the model): above
# user space, so an IOPTE's address for them is never a user pointer. 1 GiB apart, with the
# file offset's phase in a 1 GiB block kept, so huge IOPTEs are possible as over user memory.
KERNEL_BASE = TASK_SIZE_MAX
KERNEL_ALIGN = 1 << 30


def efault() -> OSError:
    return OSError(errno.EFAULT, os.strerror(errno.EFAULT))


def enomem() -> OSError:
    return OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))


@dataclass
class Region:
    addr: int
    length: int
    data: npt.NDArray[np.uint8] | None  # None: unbacked, or bytes that live elsewhere
    # The bytes live in another process (hw/process_memory.py, a C program under
    # `vfiomig run`): `data` is None and they are reached only through the Memory's
    # view/read/write, never through `data`.
    elsewhere: bool = False

    @property
    def end(self) -> int:
        return self.addr + self.length

    @property
    def backed(self) -> bool:
        """Whether bytes exist behind this region (here in `data`, or elsewhere)."""
        return self.data is not None or self.elsewhere


class Memory:
    """The user address space of the one modelled process.

    What the kernel uses of it is region / regions_in / contains (what is mapped: a pin
    check), view / read / write (the bytes). hw/process_memory.py's ProcessMemory gives
    the same interface over a real process's memory.
    """

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._next = MMAP_BASE
        self._knext = KERNEL_BASE

    def mmap(self, length: int, backed: bool = True) -> Region:
        """A new region; EINVAL for length <= 0, ENOMEM when it does not fit below
        TASK_SIZE_MAX or the host cannot hold its bytes (as mmap(2) answers)."""
        if length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        size = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        # 2 MiB-align every region so huge IOPTEs are possible over it (stands for THP/hugetlb).
        addr = (self._next + GUARD - 1) & ~(GUARD - 1)
        if addr + size > TASK_SIZE_MAX:
            raise enomem()
        try:
            data = np.zeros(size, dtype=np.uint8) if backed else None
        except (MemoryError, ValueError):  # numpy cannot allocate the bytes
            raise enomem() from None
        region = Region(addr, size, data)
        i = bisect.bisect(self._starts, addr)
        self._regions.insert(i, region)
        self._starts.insert(i, addr)
        self._next = addr + size + GUARD
        return region

    def map_data(
        self, data: npt.NDArray[np.uint8], phase: int = 0, *, kernel: bool = False
    ) -> Region:
        """A region whose bytes are `data` itself (shared, not copied): a shared mapping of a
        file. The address keeps `phase` (the file offset) modulo the alignment, 2 MiB at a
        user address like mmap, 1 GiB at a kernel one (kernel=True). ENOMEM as mmap."""
        align = KERNEL_ALIGN if kernel else GUARD
        cursor = self._knext if kernel else self._next
        addr = ((cursor + align - 1) & ~(align - 1)) + phase % align
        size = len(data)
        if not kernel and addr + size > TASK_SIZE_MAX:
            raise enomem()
        region = Region(addr, size, data)
        i = bisect.bisect(self._starts, addr)
        self._regions.insert(i, region)
        self._starts.insert(i, addr)
        if kernel:
            self._knext = addr + size + GUARD
        else:
            self._next = addr + size + GUARD
        return region

    def munmap(self, addr: int) -> None:
        i = bisect.bisect(self._starts, addr) - 1
        if i < 0 or self._regions[i].addr != addr:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        del self._regions[i]
        del self._starts[i]

    def region(self, addr: int, length: int) -> Region:
        """The one region holding [addr, addr+length), else EFAULT."""
        if addr < 0 or length < 0:
            raise efault()
        i = bisect.bisect(self._starts, addr) - 1
        if i < 0:
            raise efault()
        r = self._regions[i]
        if addr + length > r.end:
            raise efault()
        return r

    def regions_in(self, addr: int, end: int) -> list[Region]:
        """The regions overlapping [addr, end), in address order."""
        i = max(bisect.bisect(self._starts, addr) - 1, 0)
        j = bisect.bisect_left(self._starts, end)
        return [r for r in self._regions[i:j] if r.end > addr]

    def contains(self, addr: int, length: int) -> bool:
        try:
            self.region(addr, length)
        except OSError:
            return False
        return True

    def view(self, addr: int, length: int) -> npt.NDArray[np.uint8]:
        """A writable numpy view of backed bytes (for vectorized bitmap writes)."""
        r = self.region(addr, length)
        if r.data is None:
            raise efault()
        off = addr - r.addr
        return r.data[off : off + length]

    def read(self, addr: int, length: int) -> bytes:
        return self.view(addr, length).tobytes()

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = np.frombuffer(data, dtype=np.uint8)
