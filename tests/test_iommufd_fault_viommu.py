"""IOMMU_FAULT_QUEUE_ALLOC and its fd, faults on HWPTs, and the vIOMMU commands
(VIOMMU_ALLOC, VDEVICE_ALLOC, VEVENTQ_ALLOC, HW_QUEUE_ALLOC) up to where the model's scope
ends: each check in the kernel's order with its errno."""

from __future__ import annotations

import errno as E
import os
import select
import struct
from collections.abc import Callable
from typing import Any

import pytest
from test_iommufd_util import DIRTY, K4, U64_MAX, Iommufd, errno_of, sized

from vfiomig.uapi import iommufd as u

FAULT_VALID = u.IOMMU_HWPT_FAULT_ID_VALID
NEST = u.IOMMU_HWPT_ALLOC_NEST_PARENT
ARM = u.IOMMU_VIOMMU_TYPE_ARM_SMMUV3
TOP = U64_MAX
OVF = E.EOVERFLOW


class World:
    """/dev/iommu with an IOAS, a bound device, a nesting-parent HWPT and a plain one, and an
    ACCESS (an emulated device's id)."""

    def __init__(self, vendor: str = "smmuv3") -> None:
        self.f = f = Iommufd(vendor=vendor)
        self.k = f.k
        self.ioas = f.ioas_alloc()
        self.dev = f.dev()
        self.dev_devid = self.dev.devid
        self.parent = f.hwpt_alloc(self.dev.devid, self.ioas, NEST)
        self.plain = f.hwpt_alloc(self.dev.devid, self.ioas, DIRTY)
        self.access = f.dev("mtty").devid

    def e(self, req: int, cmd: Any) -> int:
        return self.f.err(req, cmd)

    def fault_alloc(self) -> tuple[int, int]:
        c = sized(u.iommu_fault_alloc)
        self.f.ioctl(u.IOMMU_FAULT_QUEUE_ALLOC, c)
        return int(c.out_fault_id), int(c.out_fault_fd)


def _raw(cls: type[Any], size: int, tail: bytes = b"", **fields: Any) -> bytearray:
    return bytearray(bytes(cls(size=size, **fields))) + bytearray(tail)


Case = tuple[str, Callable[[World], int], int]


def framing(req: int, cls: type[Any], min_size: int) -> list[Case]:
    """main.c iommufd_fops_ioctl: size below the table's min size EINVAL, a non-zero byte
    past the struct E2BIG (copy_struct_from_user)."""
    size = len(bytes(cls()))
    return [
        (f"size {min_size - 1}", lambda w: w.e(req, _raw(cls, min_size - 1)), E.EINVAL),
        ("non-zero tail", lambda w: w.e(req, _raw(cls, size + 8, b"\0" * 7 + b"\1")), E.E2BIG),
    ]


def _cmd(req: int, cls: type[Any], **fields: Any) -> Callable[[World], int]:
    def run(w: World) -> int:
        vals = {k: getattr(w, v) if isinstance(v, str) else v for k, v in fields.items()}
        return w.e(req, sized(cls, **vals))

    return run


def _viommu(**kw: Any) -> Callable[[World], int]:
    fields: dict[str, Any] = {"type": ARM, "dev_id": "dev_devid", "hwpt_id": "parent"}
    return _cmd(u.IOMMU_VIOMMU_ALLOC, u.iommu_viommu_alloc, **{**fields, **kw})


def _vdevice(**kw: Any) -> Callable[[World], int]:
    fields: dict[str, Any] = {"viommu_id": 1, "dev_id": "dev_devid", "virt_id": 3}
    return _cmd(u.IOMMU_VDEVICE_ALLOC, u.iommu_vdevice_alloc, **{**fields, **kw})


def _veventq(**kw: Any) -> Callable[[World], int]:
    fields: dict[str, Any] = {"viommu_id": 1, "type": u.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3}
    fields["veventq_depth"] = 8
    return _cmd(u.IOMMU_VEVENTQ_ALLOC, u.iommu_veventq_alloc, **{**fields, **kw})


def _hw_queue(**kw: Any) -> Callable[[World], int]:
    fields: dict[str, Any] = {"viommu_id": 1, "type": u.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV}
    fields.update(nesting_parent_iova=1 << 32, length=K4)
    return _cmd(u.IOMMU_HW_QUEUE_ALLOC, u.iommu_hw_queue_alloc, **{**fields, **kw})


CASES: list[Case] = [
    # -- eventq.c iommufd_fault_alloc (min size: offsetofend(out_fault_fd) = 16) ------------
    *framing(u.IOMMU_FAULT_QUEUE_ALLOC, u.iommu_fault_alloc, 16),
    ("fault: flags", _cmd(u.IOMMU_FAULT_QUEUE_ALLOC, u.iommu_fault_alloc, flags=1), E.EOPNOTSUPP),
    ("fault: allocated", _cmd(u.IOMMU_FAULT_QUEUE_ALLOC, u.iommu_fault_alloc), 0),
    # -- viommu.c iommufd_viommu_alloc_ioctl (min size: offsetofend(out_viommu_id) = 24) -------
    *framing(u.IOMMU_VIOMMU_ALLOC, u.iommu_viommu_alloc, 24),
    ("viommu: flags", _viommu(flags=1), E.EOPNOTSUPP),
    ("viommu: DEFAULT type", _viommu(type=u.IOMMU_VIOMMU_TYPE_DEFAULT), E.EOPNOTSUPP),
    ("viommu: flags before the device", _viommu(flags=1, dev_id=999), E.EOPNOTSUPP),
    ("viommu: device missing", _viommu(dev_id=999), E.ENOENT),
    ("viommu: dev_id of an IOAS", _viommu(dev_id="ioas"), E.ENOENT),
    ("viommu: dev_id of an ACCESS", _viommu(dev_id="access"), E.ENOENT),
    # the driver (ops->get_viommu_size) answers before hwpt_id is looked at
    ("viommu: no vIOMMU support (nest parent)", _viommu(), E.EOPNOTSUPP),
    ("viommu: no support before a plain HWPT", _viommu(hwpt_id="plain"), E.EOPNOTSUPP),
    ("viommu: no support before a missing HWPT", _viommu(hwpt_id=999), E.EOPNOTSUPP),
    ("viommu: TEGRA241 type", _viommu(type=u.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV), E.EOPNOTSUPP),
    ("viommu: unknown type", _viommu(type=77), E.EOPNOTSUPP),
    # -- viommu.c iommufd_vdevice_alloc_ioctl (min size: offsetofend(virt_id) = 24) ---------
    *framing(u.IOMMU_VDEVICE_ALLOC, u.iommu_vdevice_alloc, 24),
    ("vdevice: vIOMMU missing", _vdevice(viommu_id=999), E.ENOENT),
    ("vdevice: viommu_id of an IOAS", _vdevice(viommu_id="ioas"), E.ENOENT),
    ("vdevice: viommu_id of a HWPT", _vdevice(viommu_id="parent"), E.ENOENT),
    ("vdevice: the vIOMMU before the device", _vdevice(viommu_id="ioas", dev_id=999), E.ENOENT),
    ("vdevice: largest virt_id (<= ULONG_MAX)", _vdevice(virt_id=U64_MAX), E.ENOENT),
    # -- eventq.c iommufd_veventq_alloc (min size: offsetofend(out_veventq_fd) = 28) --------
    *framing(u.IOMMU_VEVENTQ_ALLOC, u.iommu_veventq_alloc, 28),
    ("veventq: flags", _veventq(flags=1), E.EOPNOTSUPP),
    ("veventq: __reserved", _veventq(__reserved=1), E.EOPNOTSUPP),
    ("veventq: DEFAULT type", _veventq(type=u.IOMMU_VEVENTQ_TYPE_DEFAULT), E.EOPNOTSUPP),
    ("veventq: type before depth", _veventq(type=0, veventq_depth=0), E.EOPNOTSUPP),
    ("veventq: depth 0", _veventq(veventq_depth=0), E.EINVAL),
    ("veventq: depth before the vIOMMU", _veventq(veventq_depth=0, viommu_id=999), E.EINVAL),
    ("veventq: vIOMMU missing", _veventq(viommu_id=999), E.ENOENT),
    ("veventq: viommu_id of a HWPT", _veventq(viommu_id="parent"), E.ENOENT),
    # -- viommu.c iommufd_hw_queue_alloc_ioctl (min size: offsetofend(length) = 40) ---------
    *framing(u.IOMMU_HW_QUEUE_ALLOC, u.iommu_hw_queue_alloc, 40),
    ("hw_queue: flags", _hw_queue(flags=1), E.EOPNOTSUPP),
    ("hw_queue: DEFAULT type", _hw_queue(type=u.IOMMU_HW_QUEUE_TYPE_DEFAULT), E.EOPNOTSUPP),
    ("hw_queue: type before length", _hw_queue(type=0, length=0), E.EOPNOTSUPP),
    ("hw_queue: length 0", _hw_queue(length=0), E.EINVAL),
    ("hw_queue: iova + length - 1 overflows", _hw_queue(nesting_parent_iova=TOP, length=2), OVF),
    ("hw_queue: last byte U64_MAX is fine", _hw_queue(nesting_parent_iova=TOP, length=1), E.ENOENT),
    ("hw_queue: overflow first", _hw_queue(nesting_parent_iova=TOP, length=2, viommu_id=9), OVF),
    ("hw_queue: vIOMMU missing", _hw_queue(viommu_id=999), E.ENOENT),
    ("hw_queue: viommu_id of an IOAS", _hw_queue(viommu_id="ioas"), E.ENOENT),
]


@pytest.mark.parametrize("vendor", ["smmuv3", "vtd", "amd"])
@pytest.mark.parametrize("fn,want", [pytest.param(fn, want, id=name) for name, fn, want in CASES])
def test_checks(vendor: str, fn: Callable[[World], int], want: int) -> None:
    assert fn(World(vendor)) == want


# -- the FAULT fd ----------------------------------------------------------------------------


def test_fault_fd() -> None:
    """eventq.c iommufd_fault_fops_{read,write}, iommufd_eventq_fops_poll; nonseekable."""
    w = World()
    fault_id, fd = w.fault_alloc()
    k = w.k
    assert k.read(fd, 40) == b"" and k.read(fd, 0) == b""  # nothing delivered
    assert errno_of(k.read, fd, 39) == E.ESPIPE  # whole iommu_hwpt_pgfault records only
    assert errno_of(k.write, fd, b"\0" * 7) == E.ESPIPE  # whole page responses only
    assert k.write(fd, b"") == 0
    ok = struct.pack("<II", 1, u.IOMMUFD_PAGE_RESP_SUCCESS)
    assert errno_of(k.write, fd, ok) == E.EINVAL  # no such cookie
    assert errno_of(k.write, fd, struct.pack("<II", 1, 7)) == E.EINVAL  # bad code
    assert k.poll(fd) == select.POLLOUT  # writable, nothing to read
    assert errno_of(k.lseek, fd, 0, os.SEEK_SET) == E.ESPIPE
    assert errno_of(k.pread, fd, 40, 0) == E.ESPIPE


def test_fault_lifetime() -> None:
    """The fd holds the FAULT (iommufd_eventq_init: a user): IOMMU_DESTROY is EBUSY until
    it is closed."""
    w = World()
    fault_id, fd = w.fault_alloc()
    destroy = sized(u.iommu_destroy, id=fault_id)
    assert w.e(u.IOMMU_DESTROY, destroy) == E.EBUSY
    w.k.close(fd)
    assert w.e(u.IOMMU_DESTROY, destroy) == 0
    assert w.e(u.IOMMU_DESTROY, destroy) == E.ENOENT


def _hwpt_with_fault(w: World, fault_id: int, flags: int = FAULT_VALID) -> Any:
    h = sized(u.iommu_hwpt_alloc, flags=flags, dev_id=w.dev.devid, pt_id=w.ioas)
    h.fault_id = fault_id
    return h


@pytest.mark.parametrize("vendor", ["smmuv3", "vtd", "amd"])
def test_hwpt_with_a_fault(vendor: str) -> None:
    """hw_pagetable.c iommufd_hwpt_alloc: FAULT_ID_VALID takes a FAULT (iommufd_get_fault,
    ENOENT for anything else), after the domain was made. Attaching a device to it makes
    the driver enable I/O page faults: VT-d refuses a device without PRI (ENODEV), SMMUv3
    and AMD attach it without."""
    w = World(vendor)
    fault_id, fd = w.fault_alloc()
    assert w.e(u.IOMMU_HWPT_ALLOC, _hwpt_with_fault(w, 999)) == E.ENOENT
    assert w.e(u.IOMMU_HWPT_ALLOC, _hwpt_with_fault(w, w.ioas)) == E.ENOENT  # wrong type
    nest = _hwpt_with_fault(w, fault_id, FAULT_VALID | NEST)
    assert w.e(u.IOMMU_HWPT_ALLOC, nest) == E.EOPNOTSUPP  # a nest parent takes no faults
    h = _hwpt_with_fault(w, fault_id)
    w.f.ioctl(u.IOMMU_HWPT_ALLOC, h)
    hwpt = int(h.out_hwpt_id)
    dev2 = w.f.dev()
    assert errno_of(dev2.attach, hwpt) == (E.ENODEV if vendor == "vtd" else 0)
    destroy_fault = sized(u.iommu_destroy, id=fault_id)
    w.k.close(fd)
    assert w.e(u.IOMMU_DESTROY, destroy_fault) == E.EBUSY  # the HWPT holds it
    if vendor != "vtd":
        dev2.detach()
    w.f.destroy(hwpt)
    assert w.e(u.IOMMU_DESTROY, destroy_fault) == 0


def test_fault_fd_keeps_the_iommufd() -> None:
    """iommufd_eventq_init takes a reference on the iommufd file: closing /dev/iommu first
    leaves the FAULT alive until its fd goes."""
    f = Iommufd()
    c = sized(u.iommu_fault_alloc)
    f.ioctl(u.IOMMU_FAULT_QUEUE_ALLOC, c)
    ictx = f.k.fdt.files[f.fd].ictx  # below the uAPI
    f.k.close(f.fd)
    assert ictx.objects  # not released: the fault fd holds the file
    f.k.close(int(c.out_fault_fd))
    assert not ictx.objects


def test_fault_alloc_needs_a_free_fd() -> None:
    """get_unused_fd_flags fails (EMFILE): the FAULT is taken back."""
    f = Iommufd()
    f.k.fdt.limit = max(f.k.fdt.files) + 1
    assert f.err(u.IOMMU_FAULT_QUEUE_ALLOC, sized(u.iommu_fault_alloc)) == E.EMFILE
    assert not f.k.fdt.files[f.fd].ictx.objects
    bad = bytearray(8)
    bad[0] = 16  # size 16, but the buffer ends at 8: the copy-in faults first
    assert f.err(u.IOMMU_FAULT_QUEUE_ALLOC, bad) == E.EFAULT
