"""Every ioctl number of the real 7.2 include/uapi/linux/vfio.h on a device fd of each kind
answers as the kernel does: ENOTTY only where the device genuinely has no such ioctl (the
reason is in DEVICE_FD_MEANING). The list comes from the header text, so a new ioctl cannot
be missed. Then hostile arguments for the device ioctls, features and region access added
with it: only OSError comes out."""

from __future__ import annotations

import ctypes
import errno as E
import importlib.util
import os
import re
import struct
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from conftest import GET, PROBE, SET, Dev, errno_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiomig.kernel import ModelKernel
from vfiomig.uapi import vfio as v
from vfiomig.uapi.ioctl import _IO

KINDS = ("reference", "hisi_acc", "mtty")
PCI = {"reference", "hisi_acc"}
ALL = set(KINDS)

# The kernel dispatches on the number alone; several header names share one (the container
# and SPAPR ioctls reuse device numbers). Per number: the kinds whose device fd answers it,
# and why the others say ENOTTY (vfio_pci_core_ioctl's / mtty_ioctl's default).
DEVICE_FD_MEANING: dict[int, tuple[set[str], str]] = {
    0: (set(), "VFIO_GET_API_VERSION: a container ioctl"),
    1: (set(), "VFIO_CHECK_EXTENSION: a container ioctl"),
    2: (set(), "VFIO_SET_IOMMU: a container ioctl"),
    3: (set(), "VFIO_GROUP_GET_STATUS: a group ioctl"),
    4: (set(), "VFIO_GROUP_SET_CONTAINER: a group ioctl"),
    5: (set(), "VFIO_GROUP_UNSET_CONTAINER: a group ioctl"),
    6: (set(), "VFIO_GROUP_GET_DEVICE_FD: a group ioctl"),
    7: (ALL, "VFIO_DEVICE_GET_INFO"),
    8: (ALL, "VFIO_DEVICE_GET_REGION_INFO (the core, vfio_get_region_info)"),
    9: (ALL, "VFIO_DEVICE_GET_IRQ_INFO"),
    10: (ALL, "VFIO_DEVICE_SET_IRQS"),
    11: (ALL, "VFIO_DEVICE_RESET"),
    12: (PCI, "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: an mdev has no hot reset"),
    13: (PCI, "VFIO_DEVICE_PCI_HOT_RESET: an mdev has no hot reset"),
    14: (set(), "VFIO_DEVICE_QUERY_GFX_PLANE: display mdevs only (i915 GVT-g, mbochs, mdpy)"),
    15: (set(), "VFIO_DEVICE_GET_GFX_DMABUF: display mdevs only"),
    16: (PCI, "VFIO_DEVICE_IOEVENTFD: vfio-pci's; mtty has none"),
    17: (ALL, "VFIO_DEVICE_FEATURE (the core)"),
    18: (ALL, "VFIO_DEVICE_BIND_IOMMUFD (the core)"),
    19: (ALL, "VFIO_DEVICE_ATTACH_IOMMUFD_PT (cdev fds)"),
    20: (ALL, "VFIO_DEVICE_DETACH_IOMMUFD_PT (cdev fds)"),
    21: (set(), "VFIO_MIG_GET_PRECOPY_INFO: a saving data fd's ioctl"),
}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def header_ioctls() -> dict[str, int]:
    """name -> request number of every `#define VFIO_* _IO(VFIO_TYPE, VFIO_BASE + n)`."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        _unavailable("the ziglang package (Linux uAPI headers) is not installed")
    path = Path(spec.origin).parent / "lib/libc/include/any-linux-any/linux/vfio.h"
    if not path.is_file():
        _unavailable(f"{path} is missing")
    text = path.read_text()
    base = re.search(r"#define\s+VFIO_BASE\s+(\d+)", text)
    assert base is not None
    out = {}
    pat = r"#define\s+(VFIO_\w+)\s+_IO\(\s*VFIO_TYPE\s*,\s*VFIO_BASE\s*\+\s*(\d+)\s*\)"
    for m in re.finditer(pat, text):
        out[m.group(1)] = _IO(ord(";"), int(base.group(1)) + int(m.group(2)))
    return out


@pytest.fixture(scope="module")
def ioctls() -> dict[str, int]:
    return header_ioctls()


def test_every_number_of_the_header_is_classified(ioctls: dict[str, int]) -> None:
    assert len(ioctls) >= 34  # 22 numbers, some shared with container / SPAPR names
    for name, num in ioctls.items():
        assert getattr(v, name) == num, name  # the mirror agrees with the header
        assert (num & 0xFF) - 100 in DEVICE_FD_MEANING, f"{name}: classify its number"


def _args() -> list[Any]:
    """A zeroed buffer; one whose argsz is its size and whose flags name GET MIGRATION
    (so VFIO_DEVICE_FEATURE reaches a feature every kind has); a value argument."""
    sized = bytearray(256)
    sized[:8] = struct.pack("<II", 256, GET | v.VFIO_DEVICE_FEATURE_MIGRATION)
    return [bytearray(256), sized, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_cdev_fd_answers_every_header_ioctl(ioctls: dict[str, int], kind: str) -> None:
    for name, num in sorted(ioctls.items(), key=lambda kv: kv[1]):
        kinds, why = DEVICE_FD_MEANING[(num & 0xFF) - 100]
        for arg in _args():
            d = Dev(ModelKernel(), kind)
            if kind == "mtty":  # mtty's IRQ ioctls are bounded by GET_INFO's answer
                d.k.ioctl(d.fd, v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=16))
            got = errno_of(d.k.ioctl, d.fd, num, arg)
            if kind in kinds:
                assert got != E.ENOTTY, f"{kind} {name}: {why}"
            else:
                assert got == E.ENOTTY, f"{kind} {name} answered {got}: {why}"


def test_group_device_fd_answers_every_header_ioctl(ioctls: dict[str, int]) -> None:
    """A device fd from VFIO_GROUP_GET_DEVICE_FD: as the cdev fd, except ATTACH / DETACH,
    which only cdev fds have (vfio_device_fops_unl_ioctl's `!df->group` switch)."""
    for name, num in ioctls.items():
        nr = (num & 0xFF) - 100
        kinds, why = DEVICE_FD_MEANING[nr]
        k = ModelKernel()
        path = k.add_device("reference")
        container = k.open("/dev/vfio/vfio")
        group = k.open(k.group_of(path))
        k.ioctl(group, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container))
        k.ioctl(container, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
        dfd = k.ioctl(group, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(b"vfio0\0"))
        got = errno_of(k.ioctl, dfd, num, _args()[1])
        if "reference" in kinds and nr not in (19, 20):
            assert got != E.ENOTTY, f"{name}: {why}"
        else:
            assert got == E.ENOTTY, f"{name} answered {got}: {why}"


# -- hostile arguments -----------------------------------------------------------------------

NEW_CMDS = [
    v.VFIO_DEVICE_GET_REGION_INFO,
    v.VFIO_DEVICE_GET_IRQ_INFO,
    v.VFIO_DEVICE_SET_IRQS,
    v.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    v.VFIO_DEVICE_PCI_HOT_RESET,
    v.VFIO_DEVICE_IOEVENTFD,
    v.VFIO_DEVICE_FEATURE,
    v.VFIO_DEVICE_RESET,
    v.VFIO_DEVICE_GET_INFO,
]
_NUMS = st.sampled_from(
    [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 20, 24, 28, 32, 40, 0xFF, 0x1000, 0x7FFF, 0x8000]
    + [0xFFFF, 1 << 31, (1 << 32) - 1, -1, -2]
)
_OFFSETS = st.sampled_from(
    [i << 40 for i in range(10)]
    + [(2 << 40) + 0x7FFC, (2 << 40) + 0x8000, (7 << 40) + 0xFC, (7 << 40) + 0x1000]
    + [(0 << 40) + 0x1FFE, (0 << 40) + 0x10000, 1 << 63, (1 << 64) - 8]
)
_JUNK = st.sampled_from([None, "3", 3.5, [1], b"", object(), np.zeros(4)[::2]])


class Machine:
    """One device of each kind bound to one iommufd, some eventfds, a group fd."""

    def __init__(self) -> None:
        k = self.k = ModelKernel()
        self.iommufd = k.open("/dev/iommu")
        self.devs = [Dev(k, kind, iommufd=self.iommufd) for kind in KINDS]
        k.ioctl(self.devs[2].fd, v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=16))
        self.efds = [k.eventfd(0), k.eventfd(1, 1)]
        self.group = k.open(k.group_of(k.add_device("reference")))

    def fds(self) -> list[int]:
        return sorted(self.k.fdt.files) + [99, -1]


@st.composite
def _arg(draw: st.DrawFn, m: Machine, cmd: int) -> object:
    shape = draw(st.integers(0, 7))
    if shape == 0:
        return draw(st.one_of(_NUMS, _JUNK))
    size = draw(st.sampled_from([0, 4, 8, 11, 12, 16, 19, 20, 24, 28, 32, 40, 48, 64]))
    words = []
    for _ in range(size // 4 + 1):
        pick = draw(st.integers(0, 3))
        val = draw(st.sampled_from(m.fds())) if pick == 0 else draw(_NUMS)
        words.append(struct.pack("<I", val & 0xFFFFFFFF))
    raw = bytearray(b"".join(words)[:size])
    if size >= 4 and draw(st.booleans()):
        struct.pack_into("<I", raw, 0, size)
    if cmd == v.VFIO_DEVICE_FEATURE and size >= 8:
        op = draw(st.sampled_from([GET, SET, GET | PROBE, SET | PROBE, GET | SET]))
        struct.pack_into("<I", raw, 4, op | draw(st.sampled_from([0, 3, 4, 5, 10, 11])))
    elif cmd == v.VFIO_DEVICE_SET_IRQS and size >= 8 and draw(st.booleans()):
        struct.pack_into("<I", raw, 4, draw(st.integers(0, 0x3F)))
    elif cmd == v.VFIO_DEVICE_IOEVENTFD and size >= 24 and draw(st.booleans()):
        struct.pack_into("<Q", raw, 8, draw(_OFFSETS) & ((1 << 64) - 1))
    return raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_device_calls_raise_only_oserror(data: st.DataObject) -> None:
    m = Machine()
    k = m.k
    for _ in range(data.draw(st.integers(1, 25), label="calls")):
        d = data.draw(st.sampled_from(m.devs), label="device")
        what = data.draw(st.sampled_from(["ioctl"] * 4 + ["pread", "pwrite", "read", "mmap"]))
        try:
            if what == "ioctl":
                cmd = data.draw(st.sampled_from(NEW_CMDS), label="cmd")
                k.ioctl(d.fd, cmd, data.draw(_arg(m, cmd), label="arg"))
            elif what == "pread":
                k.pread(d.fd, data.draw(st.one_of(_NUMS, _JUNK)), data.draw(_OFFSETS))
            elif what == "pwrite":
                k.pwrite(d.fd, data.draw(st.binary(max_size=24)), data.draw(_OFFSETS))
            elif what == "read":
                k.read(d.fd, data.draw(st.one_of(_NUMS, _JUNK)))
            else:
                k.mmap(data.draw(_NUMS), fd=d.fd, offset=data.draw(_OFFSETS))
        except OSError:
            pass  # the only way a syscall may fail
        if data.draw(st.booleans()):  # signal an eventfd: virqfds (ioeventfd, unmask) run
            k.write(data.draw(st.sampled_from(m.efds)), struct.pack("<Q", 1))
    for fd in sorted(k.fdt.files):
        k.close(fd)
    assert not k.fdt.files
