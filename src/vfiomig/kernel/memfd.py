"""memfd: an anonymous shmem file (mm/memfd.c memfd_create, mm/shmem.c), kept minimal.

What the model needs of it is what QEMU does with guest RAM: memfd_create, ftruncate to the
RAM size, mmap(MAP_SHARED) for the CPU, IOMMU_IOAS_MAP_FILE for the devices. So a memfd has
a size (i_size), read / write / lseek at its file position, and page views: numpy arrays
over its bytes that every user shares, a process mapping (ModelKernel.mmap(fd=...)) as much
as iommufd's pinned pages (io_pagetable.IoptPages.pin_file). A device's DMA into the pinned
pages is seen through the process mapping, and the other way round.

The bytes live in a memfd of the host (tmpfs pages, allocated when touched: a 1 TiB guest
costs nothing until written). Views are host mappings of it; the host file never shrinks
below what a view covers, so no host SIGBUS can happen. Departures, all about shrinking and
the end of the file:

* ftruncate down zeroes the cut bytes, also under views; Linux drops the pages from the
  file, so pinned pages keep their old bytes (detached) and a mapping faults (SIGBUS).
* A mapping past the end of the file reads zeros where Linux raises SIGBUS.
* No seals (F_ADD_SEALS), no MFD_HUGETLB (the model kernel has no CONFIG_HUGETLBFS: ENOSYS),
  no SEEK_DATA / SEEK_HOLE.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from errno import EFAULT, EINVAL, ENOMEM, ENOSYS
from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File

# include/uapi/linux/memfd.h
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_NOEXEC_SEAL = 0x0008
MFD_EXEC = 0x0010
MFD_HUGE_SHIFT = 26
MFD_HUGE_MASK = 0x3F
# mm/memfd.c
MFD_ALL_FLAGS = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB | MFD_NOEXEC_SEAL | MFD_EXEC
MFD_NAME_PREFIX = "memfd:"
NAME_MAX = 255
MFD_NAME_MAX_LEN = NAME_MAX - len(MFD_NAME_PREFIX)
# include/linux/fs.h: MAX_LFS_FILESIZE on 64-bit (shmem's s_maxbytes)
MAX_LFS_FILESIZE = (1 << 63) - 1


def _host_file() -> int:
    """A host memfd for the bytes (a temporary file where the host has no memfd_create)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("vfiomig-memfd", os.MFD_CLOEXEC)
    f = tempfile.TemporaryFile()  # pragma: no cover - non-Linux hosts
    return os.dup(f.fileno())  # pragma: no cover


class MemfdFile(File):
    """struct file of a memfd: shmem_file_operations (read, write, llseek, mmap)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = MFD_NAME_PREFIX + name
        self.size = 0  # i_size
        self.pos = 0  # f_pos
        self._fd = _host_file()
        self._host_size = 0  # >= size and >= the end of every view

    # -- file operations -------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """shmem_file_read_iter: up to the end of the file, from f_pos."""
        n = max(0, min(n, self.size - self.pos))
        data = os.pread(self._fd, n, self.pos) if n else b""
        data = data.ljust(n, b"\0")
        self.pos += n
        return data

    def write(self, data: bytes) -> int:
        """shmem_file_write_iter (generic_perform_write): at f_pos, growing the file."""
        end = self.pos + len(data)
        if end > MAX_LFS_FILESIZE:
            raise err(EINVAL)
        if data:
            self._grow_host(end)
            os.pwrite(self._fd, data, self.pos)
        self.pos = end
        self.size = max(self.size, end)
        return len(data)

    def llseek(self, offset: int, whence: int) -> int:
        """shmem_file_llseek -> generic_file_llseek_size (SEEK_SET / SEEK_CUR / SEEK_END)."""
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self.pos + offset
        elif whence == os.SEEK_END:
            new = self.size + offset
        else:
            raise err(EINVAL)
        if not 0 <= new <= MAX_LFS_FILESIZE:
            raise err(EINVAL)
        self.pos = new
        return new

    def release(self) -> None:
        """The last reference went (fds, mappings' and pinned pages' get_file)."""
        os.close(self._fd)

    # -- truncate and pages ----------------------------------------------------------

    def truncate(self, length: int) -> None:
        """shmem_setattr(ATTR_SIZE): the new i_size. Shrinking drops the cut bytes (read back
        as zeros after growing again): the host file is cut and restored, which zeroes them
        in every view without touching a page."""
        if length < self.size and length < self._host_size:
            os.ftruncate(self._fd, length)
            os.ftruncate(self._fd, self._host_size)
        self._grow_host(length)
        self.size = length

    def _grow_host(self, end: int) -> None:
        if end > self._host_size:
            os.ftruncate(self._fd, end)
            self._host_size = end

    def pages(self, offset: int, length: int) -> npt.NDArray[np.uint8]:
        """A writable numpy array over the file's bytes [offset, offset + length): shared by
        every view of the same bytes. offset and length are page multiples, length > 0.
        What the host cannot map is ENOMEM."""
        try:
            self._grow_host(offset + length)
            m = mmap.mmap(self._fd, length, mmap.MAP_SHARED, offset=offset)
        except (OSError, ValueError, OverflowError):
            raise err(ENOMEM) from None
        return np.frombuffer(m, dtype=np.uint8)


def memfd_create(name: Any, flags: Any) -> MemfdFile:
    """mm/memfd.c memfd_create: sanitize_flags, then alloc_name, then the file."""
    if not isinstance(flags, int) or not 0 <= flags < 1 << 32:
        raise err(EINVAL)
    # sanitize_flags
    if not flags & MFD_HUGETLB:
        if flags & ~MFD_ALL_FLAGS:
            raise err(EINVAL)
    elif flags & ~(MFD_ALL_FLAGS | (MFD_HUGE_MASK << MFD_HUGE_SHIFT)):
        raise err(EINVAL)
    if flags & MFD_EXEC and flags & MFD_NOEXEC_SEAL:
        raise err(EINVAL)
    # alloc_name: strncpy_from_user up to MFD_NAME_MAX_LEN + 1 bytes
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    if not isinstance(name, bytes | bytearray):
        raise err(EFAULT)  # not a pointer to a string
    raw = bytes(name).split(b"\0", 1)[0]
    if len(raw) > MFD_NAME_MAX_LEN:
        raise err(EINVAL)
    if flags & MFD_HUGETLB:
        # alloc_file -> hugetlb_file_setup: the model kernel is built without
        # CONFIG_HUGETLBFS, whose stub answers -ENOSYS (include/linux/hugetlb.h).
        raise err(ENOSYS)
    return MemfdFile(raw.decode("utf-8", "surrogateescape"))


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
