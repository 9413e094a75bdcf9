"""Every ioctl number of the real 7.2 include/uapi/linux/iommufd.h answers on /dev/iommu as
the kernel's table does (drivers/iommu/iommufd/main.c iommufd_ioctl_ops): none is ENOTTY,
each has the table's min size (offsetofend of the struct's last mandatory member), and the
size-first framing holds for all. The list comes from the header text, so an ioctl added
to the header cannot be missed. Then hostile arguments for the commands added with it
(MAP_FILE, CHANGE_PROCESS, FAULT_QUEUE_ALLOC, the vIOMMU ones) and for the memfd syscalls:
only OSError comes out."""

from __future__ import annotations

import ctypes
import errno as E
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_iommufd_util import DIRTY, K4, RW, Iommufd, errno_of, sized

from vfiomig.kernel.iommufd.main import IOCTL_OPS, load_ops
from vfiomig.uapi import iommufd as u
from vfiomig.uapi.ioctl import _IO, _IOC_NR

# main.c iommufd_ioctl_ops: IOCTL_OP(ioctl, fn, struct, last) -> min_size = offsetofend(last)
MAIN_C_TABLE: dict[str, tuple[type[ctypes.Structure], str]] = {
    "IOMMU_DESTROY": (u.iommu_destroy, "id"),
    "IOMMU_FAULT_QUEUE_ALLOC": (u.iommu_fault_alloc, "out_fault_fd"),
    "IOMMU_GET_HW_INFO": (u.iommu_hw_info, "__reserved"),
    "IOMMU_HW_QUEUE_ALLOC": (u.iommu_hw_queue_alloc, "length"),
    "IOMMU_HWPT_ALLOC": (u.iommu_hwpt_alloc, "__reserved"),
    "IOMMU_HWPT_GET_DIRTY_BITMAP": (u.iommu_hwpt_get_dirty_bitmap, "data"),
    "IOMMU_HWPT_INVALIDATE": (u.iommu_hwpt_invalidate, "__reserved"),
    "IOMMU_HWPT_SET_DIRTY_TRACKING": (u.iommu_hwpt_set_dirty_tracking, "__reserved"),
    "IOMMU_IOAS_ALLOC": (u.iommu_ioas_alloc, "out_ioas_id"),
    "IOMMU_IOAS_ALLOW_IOVAS": (u.iommu_ioas_allow_iovas, "allowed_iovas"),
    "IOMMU_IOAS_CHANGE_PROCESS": (u.iommu_ioas_change_process, "__reserved"),
    "IOMMU_IOAS_COPY": (u.iommu_ioas_copy, "src_iova"),
    "IOMMU_IOAS_IOVA_RANGES": (u.iommu_ioas_iova_ranges, "out_iova_alignment"),
    "IOMMU_IOAS_MAP": (u.iommu_ioas_map, "iova"),
    "IOMMU_IOAS_MAP_FILE": (u.iommu_ioas_map_file, "iova"),
    "IOMMU_IOAS_UNMAP": (u.iommu_ioas_unmap, "length"),
    "IOMMU_OPTION": (u.iommu_option, "val64"),
    "IOMMU_VDEVICE_ALLOC": (u.iommu_vdevice_alloc, "virt_id"),
    "IOMMU_VEVENTQ_ALLOC": (u.iommu_veventq_alloc, "out_veventq_fd"),
    "IOMMU_VFIO_IOAS": (u.iommu_vfio_ioas, "__reserved"),
    "IOMMU_VIOMMU_ALLOC": (u.iommu_viommu_alloc, "out_viommu_id"),
}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):  # as test_uapi_abi: CI must not skip the header's check
        pytest.fail(reason)
    pytest.skip(reason)


def _header_text() -> str:
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        _unavailable("the ziglang package (Linux uAPI headers) is not installed")
    path = Path(spec.origin).parent / "lib/libc/include/any-linux-any/linux/iommufd.h"
    if not path.is_file():
        _unavailable(f"{path} is missing")
    return path.read_text()


def header_ioctls(text: str) -> dict[str, int]:
    """name -> request number of every `#define IOMMU_* _IO(IOMMUFD_TYPE, IOMMUFD_CMD_*)`,
    the command numbers computed from the header's own anonymous enum."""
    text = text.replace("\\\n", " ")  # continued #define lines
    enum = re.search(r"enum\s*\{([^}]*IOMMUFD_CMD_BASE[^}]*)\}", text)
    assert enum is not None, "no IOMMUFD_CMD_* enum in the header"
    cmds: dict[str, int] = {}
    nxt = 0
    for item in re.sub(r"/\*.*?\*/", "", enum.group(1), flags=re.S).split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = (p.strip() for p in item.partition("="))
        if value:
            nxt = cmds[value] if value in cmds else int(value, 0)
        cmds[name] = nxt
        nxt += 1
    out = {}
    for m in re.finditer(r"#define\s+(IOMMU_\w+)\s+_IO\(\s*IOMMUFD_TYPE\s*,\s*(\w+)\s*\)", text):
        out[m.group(1)] = _IO(ord(";"), cmds[m.group(2)])
    return out


@pytest.fixture(scope="module")
def ioctls() -> dict[str, int]:
    return header_ioctls(_header_text())


def test_the_header_is_what_the_model_knows(ioctls: dict[str, int]) -> None:
    assert len(ioctls) >= 21
    assert set(ioctls) == set(MAIN_C_TABLE)  # a new ioctl needs a row here and a handler
    for name, num in ioctls.items():
        assert getattr(u, name) == num, name  # the mirror's numbers are the header's


def test_every_ioctl_has_the_tables_min_size(ioctls: dict[str, int]) -> None:
    load_ops()
    for name, num in ioctls.items():
        op = IOCTL_OPS.get(_IOC_NR(num))
        assert op is not None and op.ioctl_num == num, f"{name} is not in the ioctl table"
        cls, last = MAIN_C_TABLE[name]
        field = getattr(cls, last)
        assert op.min_size == field.offset + field.size, name
        assert op.struct is cls, name


def _arg(size: int, length: int = 128, tail: int = 0) -> bytearray:
    buf = bytearray(length)
    buf[:4] = size.to_bytes(4, "little")
    buf[-1] = tail
    return buf


@pytest.mark.parametrize("vendor", ["smmuv3", "vtd"])
def test_no_ioctl_of_the_header_is_enotty(ioctls: dict[str, int], vendor: str) -> None:
    """A zeroed command of any size the kernel takes never answers ENOTTY; one byte short of
    the table's min size is EINVAL, a non-zero byte past the struct E2BIG, for each."""
    load_ops()
    f = Iommufd(vendor=vendor)
    dev = f.dev()
    ioas = f.ioas_alloc()
    f.hwpt_alloc(dev.devid, ioas, DIRTY)
    for name, num in ioctls.items():
        op = IOCTL_OPS[_IOC_NR(num)]
        assert f.err(num, _arg(128)) != E.ENOTTY, name
        assert f.err(num, _arg(op.min_size)) != E.ENOTTY, name
        assert f.err(num, _arg(op.min_size - 1)) == E.EINVAL, name
        assert f.err(num, _arg(128, tail=1)) == E.E2BIG, name


# -- hostile arguments -----------------------------------------------------------------------

NEW = [
    (u.IOMMU_IOAS_MAP_FILE, u.iommu_ioas_map_file),
    (u.IOMMU_IOAS_CHANGE_PROCESS, u.iommu_ioas_change_process),
    (u.IOMMU_FAULT_QUEUE_ALLOC, u.iommu_fault_alloc),
    (u.IOMMU_VIOMMU_ALLOC, u.iommu_viommu_alloc),
    (u.IOMMU_VDEVICE_ALLOC, u.iommu_vdevice_alloc),
    (u.IOMMU_VEVENTQ_ALLOC, u.iommu_veventq_alloc),
    (u.IOMMU_HW_QUEUE_ALLOC, u.iommu_hw_queue_alloc),
    (u.IOMMU_HWPT_ALLOC, u.iommu_hwpt_alloc),  # FAULT_ID_VALID now takes FAULT objects
]

_FIELD_VALUES = st.one_of(
    st.integers(0, 16),
    st.sampled_from([255, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, K4, 1 << 32]),
    st.integers(0, (1 << 64) - 1),
)


class Fuzz:
    """A machine with objects of every kind the new commands name, and a memfd."""

    def __init__(self, vendor: str) -> None:
        self.f = f = Iommufd(vendor=vendor)
        self.k = f.k
        self.ioas = f.ioas_alloc()
        dev = f.dev()
        f.dev("mtty")
        f.hwpt_alloc(dev.devid, self.ioas, DIRTY)
        f.hwpt_alloc(dev.devid, self.ioas, u.IOMMU_HWPT_ALLOC_NEST_PARENT)
        dev.attach(self.ioas)
        c = sized(u.iommu_fault_alloc)
        f.ioctl(u.IOMMU_FAULT_QUEUE_ALLOC, c)
        self.memfd = self.k.memfd_create("ram")
        self.k.ftruncate(self.memfd, 16 * K4)
        m = sized(u.iommu_ioas_map_file, flags=RW, ioas_id=self.ioas, fd=self.memfd, length=K4)
        f.ioctl(u.IOMMU_IOAS_MAP_FILE, m)


def _struct(cls: type[ctypes.Structure], fields: dict[str, int]) -> Any:
    c = cls()
    for name, _ in cls._fields_:
        if name in fields:
            ctype = getattr(cls, name)
            setattr(c, name, fields[name] & ((1 << (8 * ctype.size)) - 1))
    return c


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    vendor=st.sampled_from(["smmuv3", "vtd", "amd"]),
    which=st.integers(0, len(NEW) - 1),
    fields=st.dictionaries(
        st.sampled_from(
            ["size", "flags", "ioas_id", "fd", "start", "length", "iova", "__reserved",
             "type", "dev_id", "hwpt_id", "pt_id", "viommu_id", "virt_id", "veventq_depth",
             "nesting_parent_iova", "index", "fault_id", "data_len", "data_type"]
        ),
        _FIELD_VALUES,
        max_size=8,
    ),
    sized_right=st.booleans(),
    extra=st.binary(max_size=24),
)
def test_hostile_commands_only_raise_oserror(
    vendor: str, which: int, fields: dict[str, int], sized_right: bool, extra: bytes
) -> None:
    w = Fuzz(vendor)
    req, cls = NEW[which]
    c = _struct(cls, fields)
    if sized_right or "size" not in fields:
        c.size = ctypes.sizeof(cls) + len(extra)
    errno_of(w.f.ioctl, req, bytearray(bytes(c)) + bytearray(extra))  # OSError or success
    # what is left behind still tears down cleanly
    w.k.close(w.f.fd)


@settings(max_examples=120, deadline=None)
@given(
    name=st.one_of(st.text(max_size=300), st.binary(max_size=300), st.none(), st.integers()),
    flags=st.one_of(st.integers(-1, 1 << 33), st.none()),
    fd=st.integers(-2, 8),
    length=st.one_of(st.integers(-K4, 1 << 64), st.none()),
    offset=st.one_of(st.integers(-K4, 1 << 64), st.sampled_from([0, K4, 1 << 62])),
)
def test_hostile_memfd_syscalls_only_raise_oserror(
    name: Any, flags: Any, fd: int, length: Any, offset: Any
) -> None:
    k = Iommufd().k
    errno_of(k.memfd_create, name, flags)
    memfd = k.memfd_create("ram")
    k.ftruncate(memfd, 4 * K4)
    for target in (fd, memfd):
        errno_of(k.ftruncate, target, length)
        if isinstance(length, int) and length < 1 << 30:
            errno_of(k.mmap, length, fd=target, offset=offset)
        errno_of(k.read, target, 64)
        errno_of(k.lseek, target, offset if isinstance(offset, int) else 0, 0)
