"""Nothing but OSError leaves a ModelKernel syscall, whatever the caller passes.

The fixed interface says errors are OSError with the errno the real syscall gives and that
nothing else escapes, for any input. These tests feed the syscall surface (open, ioctl,
read, write, lseek, pread, poll, mmap, munmap, close) wrong types, huge and negative
numbers, closed fds and buffers that are no pointer at all, on a machine with every device
kind set up far enough (bound, attached, in a container, with a live data fd) that the
calls reach deep into the drivers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

import numpy as np
import pytest
from conftest import GET, SET, Dev, errno_of, ioas_map
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiomig.hw.memory import TASK_SIZE_MAX
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.vfio_fsm import PRE_COPY
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

KINDS = ("mtty", "hisi_acc", "reference")


def _requests() -> list[int]:
    """Every ioctl request number of the two uAPI headers (type ';')."""
    reqs = set()
    for mod in (v, u):
        for name, val in vars(mod).items():
            if name.isupper() and isinstance(val, int) and (val >> 8) & 0xFF == ord(";"):
                reqs.add(val)
    return sorted(reqs)


REQUESTS = _requests()


class Machine:
    """A machine with one device of every kind, each reachable on every path."""

    def __init__(self, iommu: str = "smmuv3") -> None:
        k = self.k = ModelKernel(iommu=iommu)
        self.mem, _ = k.mmap(1 << 22)
        self.big, _ = k.mmap(1 << 30, backed=False)
        self.iommufd = k.open("/dev/iommu")
        self.ioas = ioas_map(k, self.iommufd, self.mem, 1 << 22, 1 << 30)
        self.ids = [self.ioas]
        # one device of each kind, bound to the iommufd and attached to the IOAS
        devs = [Dev(k, kind, iommufd=self.iommufd) for kind in KINDS]
        for d in devs:
            self.ids += [d.devid, d.attach(self.ioas)]
        self.paths = [d.path for d in devs]
        self.cdevs = [d.fd for d in devs]
        # the reference device in PRE_COPY: a live saving data fd
        self.data_fd = devs[2].set_state(PRE_COPY)
        # a legacy container with the group of a second reference device, type1 set
        path = k.add_device("reference")
        self.paths.append(path)
        self.container = k.open("/dev/vfio/vfio")
        self.group = k.open(k.group_of(path))
        k.ioctl(self.group, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(self.container))
        k.ioctl(self.container, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
        name = os.path.basename(path).encode() + b"\0"
        self.group_dev = k.ioctl(self.group, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(name))

    @property
    def open_fds(self) -> list[int]:
        return sorted(self.k.fdt.files)


# -- the calls that used to escape ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("iommu_dirty", [False, True])
def test_add_device_takes_iommu_dirty_for_every_kind(kind: str, iommu_dirty: bool) -> None:
    """The fixed interface: add_device(kind, iommu_dirty=..., **options) for any kind."""
    k = ModelKernel()
    path = k.add_device(kind, iommu_dirty=iommu_dirty)
    assert path == "/dev/vfio/devices/vfio0"
    # an mdev has no IOMMU of its own: only a physical device carries the flag
    assert k.devices[path].iommu_dirty is (iommu_dirty and kind != "mtty")


def _released() -> memoryview:
    mv = memoryview(bytearray(32))
    mv.release()
    return mv


HOSTILE = [
    # (what, call(machine) -> None, errno)
    ("write None", lambda m: m.k.write(m.cdevs[0], None), errno.EFAULT),
    ("write str", lambda m: m.k.write(m.data_fd, "text"), errno.EBADF),  # saving fd: O_RDONLY
    ("write str to a writable fd", lambda m: m.k.write(m.cdevs[0], "text"), errno.EFAULT),
    ("write list", lambda m: m.k.write(m.cdevs[0], [1, 300]), errno.EFAULT),
    ("write int", lambda m: m.k.write(m.cdevs[0], 1 << 70), errno.EFAULT),
    ("write released memoryview", lambda m: m.k.write(m.cdevs[0], _released()), errno.EFAULT),
    ("poll str events", lambda m: m.k.poll(m.cdevs[0], "x"), errno.EINVAL),
    ("poll closed fd", lambda m: m.k.poll(999, "x"), errno.EBADF),
    ("mmap 2^64 backed", lambda m: m.k.mmap(1 << 64), errno.ENOMEM),
    ("mmap past the address space", lambda m: m.k.mmap(1 << 100, backed=False), errno.ENOMEM),
    ("mmap to the end of user space", lambda m: m.k.mmap(TASK_SIZE_MAX, False), errno.ENOMEM),
    ("open a list", lambda m: m.k.open([1]), errno.EFAULT),
    ("open None", lambda m: m.k.open(None), errno.EFAULT),
    ("open str flags", lambda m: m.k.open(m.paths[0], "x"), errno.EINVAL),
    ("open float flags", lambda m: m.k.open("/dev/iommu", 1.5), errno.EINVAL),
    (
        "ioctl strided numpy buffer",
        lambda m: m.k.ioctl(m.iommufd, u.IOMMU_IOAS_ALLOC, np.zeros(8)[::2]),
        errno.EFAULT,
    ),
    (
        "ioctl strided memoryview",
        lambda m: m.k.ioctl(m.cdevs[0], v.VFIO_DEVICE_GET_INFO, memoryview(bytearray(64))[::2]),
        errno.EFAULT,
    ),
    (
        "ioctl released memoryview",
        lambda m: m.k.ioctl(m.container, v.VFIO_IOMMU_GET_INFO, _released()),
        errno.EFAULT,
    ),
]


@pytest.mark.parametrize("what,call,expect", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_argument_is_an_errno(what: str, call: Any, expect: int) -> None:
    m = Machine()
    assert errno_of(call, m) == expect


def test_open_takes_bytes_and_stops_at_nul() -> None:
    k = ModelKernel()
    k.close(k.open(b"/dev/iommu"))
    k.close(k.open("/dev/iommu\0garbage"))


def test_mmap_still_gives_a_1tib_unbacked_guest_after_the_limit() -> None:
    k = ModelKernel()
    addr, mem = k.mmap(1 << 40, backed=False)
    assert mem is None and addr + (1 << 40) <= TASK_SIZE_MAX
    assert errno_of(k.mmap, 1 << 47, False) == errno.ENOMEM
    addr2, mem2 = k.mmap(4096)  # a failed mmap leaves the address space usable
    assert mem2 is not None and mem2.size == 4096 and addr2 > addr


# -- random calls with random arguments ---------------------------------------------------

_NUMS = st.sampled_from(
    [0, 1, 2, 3, 4, 7, 8, 16, 24, 0x1000, 0x1001, 1 << 21, 1 << 30, 1 << 31, (1 << 32) - 1]
    + [1 << 32, 1 << 48, 1 << 63, U64_MAX - 0xFFF, U64_MAX, 1 << 64, 1 << 100, -1, -(1 << 70)]
)
_JUNK = st.sampled_from([None, "3", 3.5, [1], {}, b"", object(), True, np.zeros(4)[::2]])


def _words(draw: st.DrawFn, m: Machine, n: int) -> bytes:
    """n u32/u64 words from the machine's own numbers (fds, object ids, user addresses),
    the request's own size, and edge values."""
    out = b""
    while len(out) < n:
        pick = draw(st.integers(0, 5))
        if pick == 0:
            val = draw(st.sampled_from(m.open_fds + m.ids + [99]))
        elif pick == 1:
            val = draw(st.sampled_from([m.mem, m.mem + 0xFF1, m.big, 0x10, m.mem + (1 << 22) - 8]))
        elif pick == 2:
            val = draw(st.sampled_from([0, 1 << 30, (1 << 30) + 0x1000, 1 << 21, 0x1000]))
        else:
            val = draw(_NUMS)
        fmt = draw(st.sampled_from(["<I", "<Q"]))
        out += struct.pack(fmt, val & ((1 << (8 * struct.calcsize(fmt))) - 1))
    return out[:n]


@st.composite
def _ioctl_arg(draw: st.DrawFn, m: Machine) -> object:
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(_NUMS)
    if shape == 1:
        return draw(_JUNK)
    size = draw(st.sampled_from([0, 3, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 128]))
    raw = bytearray(_words(draw, m, size))
    if size >= 4 and draw(st.booleans()):
        struct.pack_into("<I", raw, 0, size)  # argsz / size right
    if size >= 8 and draw(st.booleans()):  # a plausible VFIO_DEVICE_FEATURE op
        op = draw(st.sampled_from([GET, SET, GET | v.VFIO_DEVICE_FEATURE_PROBE, GET | SET, 0]))
        struct.pack_into("<I", raw, 4, op | draw(st.integers(0, 13)))
    return bytes(raw) if shape == 2 else raw


@st.composite
def _call(draw: st.DrawFn, m: Machine) -> tuple[str, tuple[object, ...]]:
    fd = draw(st.one_of(st.sampled_from(m.open_fds), _NUMS, _JUNK))
    name = draw(
        st.sampled_from(
            ["ioctl"] * 6 + ["read", "write", "close", "open", "lseek", "pread", "poll", "mmap"]
        )
    )
    if name == "ioctl":
        req = draw(st.one_of(st.sampled_from(REQUESTS), _NUMS, _JUNK))
        return name, (fd, req, draw(_ioctl_arg(m)))
    if name == "read":
        return name, (fd, draw(st.one_of(_NUMS, _JUNK)))
    if name == "write":
        return name, (fd, draw(st.one_of(st.binary(max_size=200), _NUMS, _JUNK)))
    if name == "open":
        paths = m.paths + ["/dev/iommu", "/dev/vfio/vfio", "/dev/vfio/0", "/dev/nope"]
        return name, (draw(st.one_of(st.sampled_from(paths), _JUNK)), draw(st.one_of(_NUMS, _JUNK)))
    if name in ("lseek", "pread"):
        return name, (fd, draw(st.one_of(_NUMS, _JUNK)), draw(st.one_of(_NUMS, _JUNK)))
    if name == "poll":
        return name, (fd, draw(st.one_of(_NUMS, _JUNK)))
    if name == "mmap":
        return name, (draw(st.one_of(_NUMS, _JUNK)), draw(st.booleans()))
    return name, (fd,)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), iommu=st.sampled_from(["smmuv3", "vtd", "amd"]))
def test_random_syscalls_raise_only_oserror(data: st.DataObject, iommu: str) -> None:
    m = Machine(iommu)
    for _ in range(data.draw(st.integers(1, 40), label="calls")):
        name, args = data.draw(_call(m), label="call")
        try:
            getattr(m.k, name)(*args)
        except OSError:
            pass  # the only way a syscall may fail
    for fd in m.open_fds:  # and closing everything is clean
        m.k.close(fd)
    assert not m.k.fdt.files


@pytest.mark.parametrize("path", ["/dev/vfio/devices/vfio9", [1], None])
def test_setup_calls_name_a_missing_device_with_value_error(path: Any) -> None:
    """device() and group_of() are the machine's wiring, not syscalls: an unknown path,
    even an unhashable one, is ValueError."""
    k = ModelKernel()
    with pytest.raises(ValueError):
        k.device(path)
    with pytest.raises(ValueError):
        k.group_of(path)
