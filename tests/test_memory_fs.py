"""User memory, the fd table and copy_{from,to}_user: the plumbing every ioctl goes through."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest

from vfiomig.hw.memory import GUARD, Memory
from vfiomig.kernel.fs import FdTable, File
from vfiomig.kernel.uaccess import UserArg


class S(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("val", ctypes.c_uint64)]


def test_mmap_regions_are_disjoint_and_faulting_outside() -> None:
    mm = Memory()
    a = mm.mmap(4096)
    b = mm.mmap(10000)
    assert a.end + GUARD <= b.addr  # a guard gap: running off one buffer faults
    assert b.length == 12288  # page-rounded
    mm.write(a.addr + 10, b"hello")
    assert mm.read(a.addr + 10, 5) == b"hello"
    assert a.data is not None and bytes(a.data[10:15]) == b"hello"
    for addr, n in [(0, 1), (a.addr - 1, 1), (a.end - 2, 3), (a.end, 1)]:
        with pytest.raises(OSError) as e:
            mm.read(addr, n)
        assert e.value.errno == errno.EFAULT


def test_unbacked_region_has_no_bytes() -> None:
    mm = Memory()
    r = mm.mmap(1 << 40, backed=False)
    assert r.data is None and mm.contains(r.addr, 1 << 40)
    with pytest.raises(OSError) as e:
        mm.read(r.addr, 8)
    assert e.value.errno == errno.EFAULT


def test_view_is_writable_numpy() -> None:
    mm = Memory()
    r = mm.mmap(8192)
    mm.view(r.addr + 4096, 8)[:] = np.arange(8, dtype=np.uint8)
    assert mm.read(r.addr + 4096, 8) == bytes(range(8))


def test_fd_table_lowest_free_and_release_on_last_close() -> None:
    released: list[int] = []

    class F(File):
        def __init__(self, tag: int) -> None:
            super().__init__()
            self.tag = tag

        def release(self) -> None:
            released.append(self.tag)

    t = FdTable(limit=6)
    fds = [t.install(F(i)) for i in range(3)]
    assert fds == [3, 4, 5]
    with pytest.raises(OSError) as e:
        t.install(F(9))
    assert e.value.errno == errno.EMFILE
    t.close(4)
    assert released == [1]
    assert t.install(F(3)) == 4  # lowest free number is reused
    with pytest.raises(OSError) as e:
        t.close(4242)
    assert e.value.errno == errno.EBADF


def test_userarg_bounds_and_copy_struct() -> None:
    buf = bytearray(24)
    arg = UserArg(buf)
    with pytest.raises(OSError) as e:
        arg.read(20, 8)
    assert e.value.errno == errno.EFAULT
    # size-first framing: too small EINVAL, zero tail accepted, non-zero tail E2BIG
    s = S(size=16, flags=1, val=7)
    buf[:16] = bytes(s)
    with pytest.raises(OSError) as e:
        arg.copy_struct(S, 8, 16)
    assert e.value.errno == errno.EINVAL
    assert arg.copy_struct(S, 24, 16).val == 7
    buf[20] = 1
    with pytest.raises(OSError) as e:
        arg.copy_struct(S, 24, 16)
    assert e.value.errno == errno.E2BIG
    # a struct shorter than the kernel's reads zero-extended
    buf2 = bytearray(bytes(S(size=12, flags=3, val=0xFFFFFFFFFFFF))[:12])
    got = UserArg(buf2).copy_struct(S, 12, 8)
    assert (got.flags, got.val) == (3, 0xFFFFFFFF)


def test_userarg_rejects_non_buffers() -> None:
    for bad in (None, 3.5, "text"):
        with pytest.raises(OSError) as e:
            UserArg(bad)
        assert e.value.errno == errno.EFAULT
    s = S()
    UserArg(s).put(S(size=1, flags=2, val=3))
    assert (s.size, s.flags, s.val) == (1, 2, 3)


def test_userarg_accepts_ctypes_simple_types() -> None:
    fd = ctypes.c_int32(7)
    arg = UserArg(fd)
    assert arg.u32(0) == 7
    arg.write(0, (9).to_bytes(4, "little"))
    assert fd.value == 9


def test_userarg_reads_bytes_but_writes_do_not_reach_them() -> None:
    raw = bytes(S(size=16, flags=5, val=1))
    arg = UserArg(raw)
    assert arg.get(S).flags == 5
    arg.put(S(size=16, flags=6, val=1))
    assert S.from_buffer_copy(raw).flags == 5
