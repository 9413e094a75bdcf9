"""The user-memory seam: UserPtr (an ioctl arg that is an address) and ProcessMemory (a real
process's memory, here this test process's own, through process_vm_readv / writev)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from vfiomig.hw.memory import PAGE_SIZE, Memory
from vfiomig.hw.process_memory import ProcessMemory
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.uaccess import UserPtr
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _errno(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return int(e.errno or -1)
    return 0


# ------------------------------------------------------------------ UserPtr, in-process Memory


def test_userptr_ioctl_reads_and_writes_the_struct_in_memory() -> None:
    k = ModelKernel()
    fd = k.open("/dev/iommu")
    addr, data = k.mmap(PAGE_SIZE)
    assert data is not None
    cmd = u.iommu_ioas_alloc(size=ctypes.sizeof(u.iommu_ioas_alloc))
    data[: len(bytes(cmd))] = np.frombuffer(bytes(cmd), np.uint8)
    assert k.ioctl(fd, u.IOMMU_IOAS_ALLOC, UserPtr(k.mm, addr)) == 0
    out = u.iommu_ioas_alloc.from_buffer_copy(k.mm.read(addr, ctypes.sizeof(cmd)))
    assert out.out_ioas_id != 0
    # a struct running off its mapping, and a wild pointer: EFAULT, as in the kernel
    tail = addr + PAGE_SIZE - 4
    k.mm.write(tail, bytes(cmd)[:4])
    assert _errno(k.ioctl, fd, u.IOMMU_IOAS_ALLOC, UserPtr(k.mm, tail)) == errno.EFAULT
    assert _errno(k.ioctl, fd, u.IOMMU_IOAS_ALLOC, UserPtr(k.mm, 0x10)) == errno.EFAULT


def test_userptr_strndup_stops_at_the_nul_before_unmapped_memory() -> None:
    """VFIO_GROUP_GET_DEVICE_FD's name may end right at the end of its mapping."""
    k = ModelKernel()
    path = k.add_device("reference")
    addr, _ = k.mmap(PAGE_SIZE)
    name = b"vfio-model-0\0"
    where = addr + PAGE_SIZE - len(name)
    k.mm.write(where, name)
    assert UserPtr(k.mm, where).strndup(PAGE_SIZE) == "vfio-model-0"
    assert _errno(UserPtr(k.mm, where + len(name) - 1 - 3).strndup, 2) == errno.EINVAL
    k.mm.write(addr + PAGE_SIZE - 3, b"abc")  # no NUL before the end of the mapping
    assert _errno(UserPtr(k.mm, addr + PAGE_SIZE - 3).strndup, 64) == errno.EFAULT
    group = k.open(k.group_of(path))
    assert _errno(k.ioctl, group, v.VFIO_GROUP_GET_DEVICE_FD, UserPtr(k.mm, 8)) == errno.EFAULT


# ------------------------------------------------------------------ ProcessMemory on this process


@pytest.fixture
def pages() -> Iterator[int]:
    """Four pages of this process: [0] and [1] read-write, [2] unmapped, [3] read-only."""
    prot_rw = mmap.PROT_READ | mmap.PROT_WRITE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    base = _libc.mmap(None, 4 * PAGE_SIZE, prot_rw, flags, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    ctypes.memset(base, 0x11, 4 * PAGE_SIZE)
    assert _libc.munmap(base + 2 * PAGE_SIZE, PAGE_SIZE) == 0
    assert _libc.mprotect(base + 3 * PAGE_SIZE, PAGE_SIZE, mmap.PROT_READ) == 0
    yield base
    _libc.munmap(base, 2 * PAGE_SIZE)
    _libc.munmap(base + 3 * PAGE_SIZE, PAGE_SIZE)


def _mem() -> ProcessMemory:
    m = ProcessMemory()
    m.begin(os.getpid())
    return m


def test_read_write_and_efault(pages: int) -> None:
    m = _mem()
    m.write(pages + 100, b"hello")
    assert ctypes.string_at(pages + 100, 5) == b"hello"
    assert m.read(pages + 98, 8) == b"\x11\x11hello\x11"
    # running into the unmapped page is a short count for process_vm_readv: EFAULT
    assert _errno(m.read, pages + 2 * PAGE_SIZE - 8, 16) == errno.EFAULT
    assert _errno(m.read, pages + 2 * PAGE_SIZE, 1) == errno.EFAULT
    assert _errno(m.write, pages + 2 * PAGE_SIZE - 2, b"xyz") == errno.EFAULT
    assert _errno(m.write, pages + 3 * PAGE_SIZE, b"x") == errno.EFAULT  # read-only
    assert m.read(pages + 3 * PAGE_SIZE, 2) == b"\x11\x11"
    assert _errno(m.read, -1, 4) == errno.EFAULT
    assert _errno(m.read, 1 << 60, 4) == errno.EFAULT
    assert m.end()


def test_mapped_regions_from_proc_maps(pages: int) -> None:
    m = _mem()
    assert m.contains(pages, 2 * PAGE_SIZE)
    assert not m.contains(pages, 3 * PAGE_SIZE)  # runs into the hole
    assert m.contains(pages + 3 * PAGE_SIZE, PAGE_SIZE)  # read-only is mapped
    r = m.region(pages + 10, 10)
    assert r.elsewhere and r.backed and r.data is None
    assert r.addr <= pages and r.end == pages + 2 * PAGE_SIZE
    # regions are the writable runs: the read-only page is none
    assert _errno(m.region, pages + 3 * PAGE_SIZE, 1) == errno.EFAULT
    ends = [x.end for x in m.regions_in(pages, pages + 4 * PAGE_SIZE)]
    assert pages + 2 * PAGE_SIZE in ends and pages + 4 * PAGE_SIZE not in ends
    assert m.end()


def test_views_write_back_only_what_changed(pages: int) -> None:
    m = _mem()
    view = m.view(pages, 64)
    assert view.tobytes() == b"\x11" * 64
    view[3] = 0xAB
    view[10:12] = 0xCD
    # a store by "another thread" to bytes the view did not change must survive
    ctypes.memset(pages + 20, 0x77, 4)
    assert m.read(pages, 4) == b"\x11\x11\x11\xab"  # reads see the view's changes
    m.write(pages + 11, b"\x01")  # and views see direct writes
    assert view[11] == 1
    view[40] = 0x42
    assert m.end()
    got = ctypes.string_at(pages, 64)
    assert got[3] == 0xAB and got[10:12] == b"\xcd\x01" and got[40] == 0x42
    assert got[20:24] == b"\x77" * 4 and got[0] == 0x11


def test_views_need_writable_memory(pages: int) -> None:
    m = _mem()
    assert _errno(m.view, pages + 3 * PAGE_SIZE, 8) == errno.EFAULT  # read-only
    assert _errno(m.view, pages + 2 * PAGE_SIZE - 4, 8) == errno.EFAULT  # into the hole
    assert m.view(pages, 0).size == 0
    assert _errno(m.mmap, PAGE_SIZE) == errno.ENODEV
    assert m.end()


def test_a_process_that_is_gone_is_efault() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    m = ProcessMemory()
    m.begin(pid)
    assert _errno(m.read, 0x10000, 4) == errno.EFAULT
    assert not m.contains(0x10000, 4)
    assert m.end()


def test_the_in_process_memory_is_unchanged() -> None:
    """Region.backed is what the kernel asks; in-process regions keep their bytes in data."""
    mem = Memory()
    r = mem.mmap(PAGE_SIZE)
    assert r.backed and not r.elsewhere and r.data is not None
    assert not mem.mmap(PAGE_SIZE, backed=False).backed
