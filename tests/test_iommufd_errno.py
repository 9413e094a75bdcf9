"""Every errno rule of kernel-uapi.md §5 (and its §11 refinements) as one parametrized case.

Each case builds what it needs on a fresh `World` (a machine with /dev/iommu open, an IOAS
with 16 pages mapped at BASE with 4 KiB IOPTEs, a bound device attached to a dirty HWPT,
and a bitmap buffer), makes one call and compares the errno (0 = success). Where the
kernel source disagrees with the spec, the source wins and the case says so.
"""

from __future__ import annotations

import ctypes
import errno as E
from collections.abc import Callable
from typing import Any

import pytest
from test_iommufd_util import (
    BASE,
    DIRTY,
    FIXED,
    K4,
    NO_CLEAR,
    RW,
    U64_MAX,
    Iommufd,
    errno_of,
    sized,
)

from vfiomig.kernel.iommufd.main import IOCTL_OPS
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v
from vfiomig.uapi.ioctl import _IO, _IOWR

ULONG_MAX = U64_MAX
X86_MSI = 0xFEE0_0000
ARM_MSI = 0x0800_0000


class World:
    def __init__(self, vendor: str = "smmuv3") -> None:
        self.f = f = Iommufd(vendor=vendor)
        self.k = f.k
        self.ioas = f.ioas_alloc()
        f.huge_pages(self.ioas, False)
        self.mem, _ = f.buf(16 * K4)
        f.map(self.ioas, self.mem, 16 * K4, BASE)
        self.dev = f.dev()
        self.hwpt = f.hwpt_alloc(self.dev.devid, self.ioas, DIRTY)
        self.dev.attach(self.hwpt)
        self.bitmap, _ = f.buf(K4)
        self.other, _ = f.buf(16 * K4)  # more user memory

    def e(self, req: int, cmd: Any) -> int:
        return self.f.err(req, cmd)

    def cmd(self, req: int, cls: Any, defaults: dict[str, Any], kw: dict[str, Any]) -> int:
        """The errno of `req` with a `cls` command: the case's fields over the defaults."""
        return self.e(req, sized(cls, **{**defaults, **kw}))

    def map(self, **kw: Any) -> int:
        defaults = {
            "flags": RW | FIXED,
            "ioas_id": self.ioas,
            "user_va": self.other,
            "length": K4,
            "iova": BASE + 64 * K4,
        }
        return self.cmd(u.IOMMU_IOAS_MAP, u.iommu_ioas_map, defaults, kw)

    def copy(self, **kw: Any) -> int:
        defaults = {
            "flags": RW | FIXED,
            "dst_ioas_id": self.ioas,
            "src_ioas_id": self.ioas,
            "length": K4,
            "dst_iova": BASE + 64 * K4,
            "src_iova": BASE,
        }
        return self.cmd(u.IOMMU_IOAS_COPY, u.iommu_ioas_copy, defaults, kw)

    def unmap(self, **kw: Any) -> int:
        defaults = {"ioas_id": self.ioas, "iova": BASE, "length": 16 * K4}
        return self.cmd(u.IOMMU_IOAS_UNMAP, u.iommu_ioas_unmap, defaults, kw)

    def dirty(self, **kw: Any) -> int:
        defaults = {
            "hwpt_id": self.hwpt,
            "iova": BASE,
            "length": 16 * K4,
            "page_size": K4,
            "data": self.bitmap,
        }
        return self.cmd(u.IOMMU_HWPT_GET_DIRTY_BITMAP, u.iommu_hwpt_get_dirty_bitmap, defaults, kw)

    def set_dirty(self, **kw: Any) -> int:
        defaults = {"flags": 1, "hwpt_id": self.hwpt}
        return self.cmd(
            u.IOMMU_HWPT_SET_DIRTY_TRACKING, u.iommu_hwpt_set_dirty_tracking, defaults, kw
        )

    def hwpt_alloc(self, **kw: Any) -> int:
        defaults = {"dev_id": self.dev.devid, "pt_id": self.ioas}
        return self.cmd(u.IOMMU_HWPT_ALLOC, u.iommu_hwpt_alloc, defaults, kw)

    def hw_info(self, **kw: Any) -> int:
        return self.cmd(u.IOMMU_GET_HW_INFO, u.iommu_hw_info, {"dev_id": self.dev.devid}, kw)

    def option(self, **kw: Any) -> int:
        defaults = {
            "option_id": u.IOMMU_OPTION_HUGE_PAGES,
            "op": u.IOMMU_OPTION_OP_GET,
            "object_id": self.ioas,
        }
        return self.cmd(u.IOMMU_OPTION, u.iommu_option, defaults, kw)

    def ranges(self, **kw: Any) -> int:
        defaults = {"ioas_id": self.ioas, "num_iovas": 4, "allowed_iovas": self.other}
        return self.cmd(u.IOMMU_IOAS_IOVA_RANGES, u.iommu_ioas_iova_ranges, defaults, kw)

    def allow(self, ranges: list[tuple[int, int]], **kw: Any) -> int:
        raw = b"".join(s.to_bytes(8, "little") + e.to_bytes(8, "little") for s, e in ranges)
        if raw:
            self.k.mm.write(self.other, raw)
        defaults = {"ioas_id": self.ioas, "num_iovas": len(ranges), "allowed_iovas": self.other}
        return self.cmd(u.IOMMU_IOAS_ALLOW_IOVAS, u.iommu_ioas_allow_iovas, defaults, kw)

    def bind_e(self, fd: int, **kw: Any) -> int:
        b = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
        b.iommufd = self.f.fd
        for key, val in kw.items():
            setattr(b, key, val)
        return errno_of(self.k.ioctl, fd, v.VFIO_DEVICE_BIND_IOMMUFD, b)

    def new_fd(self, **opts: Any) -> int:
        return self.k.open(self.k.add_device("reference", **opts))

    def attach_e(self, pt_id: int, flags: int = 0, argsz: int = 16, dev: Any = None) -> int:
        d = self.dev if dev is None else dev
        return errno_of(d.attach, pt_id, flags, argsz)

    def compat(self, req: int, arg: Any) -> int:
        return errno_of(self.k.ioctl, self.f.fd, req, arg)


def _buf(struct_: Any, extra: bytes) -> bytearray:
    return bytearray(bytes(struct_) + extra)


def _short(w: World) -> int:
    """A buffer of 3 bytes: reading `size` faults."""
    return w.e(u.IOMMU_DESTROY, bytearray(3))


def _no_access_alloc(w: World) -> int:
    d = w.f.dev()
    w.dev.attach(w.ioas)  # leave the dirty HWPT
    return errno_of(w.f.hwpt_alloc, d.devid, w.ioas, DIRTY)


def _resv_conflict_attach(w: World) -> int:
    ioas = w.f.ioas_alloc()
    w.f.map(ioas, w.other, K4, ARM_MSI)  # no domain yet: the SW MSI window is free
    return errno_of(w.f.dev().attach, ioas)


def _aperture_conflict(w: World) -> int:
    ioas = w.f.ioas_alloc()
    w.f.map(ioas, w.other, K4, 1 << 50)  # beyond the SMMUv3's 48-bit aperture
    return errno_of(w.f.hwpt_alloc, w.dev.devid, ioas, 0)


def _unaligned_area_alloc(w: World) -> int:
    ioas = w.f.ioas_alloc()
    w.f.map(ioas, w.other, 100, BASE)  # fine while the IOAS has no domain (alignment 1)
    return errno_of(w.f.hwpt_alloc, w.dev.devid, ioas, 0)


def _unpinnable_alloc(w: World) -> int:
    ioas = w.f.ioas_alloc()
    w.f.map(ioas, 1 << 31, K4, BASE)  # not user memory: accepted lazily without domains
    return errno_of(w.f.hwpt_alloc, w.dev.devid, ioas, 0)


def _group_fd(w: World) -> int:
    """A device fd obtained through the legacy group path."""
    path = w.k.add_device("reference")
    g = w.k.open(w.k.group_of(path))
    c = w.k.open("/dev/vfio/vfio")
    w.k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    w.k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    name = ctypes.create_string_buffer(path.rsplit("/", 1)[1].encode())
    return w.k.ioctl(g, v.VFIO_GROUP_GET_DEVICE_FD, name)


def _destroy(w: World, oid: int) -> int:
    return w.e(u.IOMMU_DESTROY, sized(u.iommu_destroy, id=oid))


def _destroy_access(w: World) -> int:
    fd = w.k.open(w.k.add_device("mtty"))
    b = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd), iommufd=w.f.fd)
    w.k.ioctl(fd, v.VFIO_DEVICE_BIND_IOMMUFD, b)
    return _destroy(w, b.out_devid)


def _rlimit_set(w: World, val: int, fresh: bool = True, root: bool = True) -> int:
    f = Iommufd() if fresh else w.f
    f.k.cap_sys_resource = root  # type: ignore[attr-defined]
    cmd = sized(
        u.iommu_option, option_id=u.IOMMU_OPTION_RLIMIT_MODE, op=u.IOMMU_OPTION_OP_SET, val64=val
    )
    return f.err(u.IOMMU_OPTION, cmd)


def _compat_unmap(w: World, flags: int, iova: int, size: int, argsz: int = 24) -> int:
    un = v.vfio_iommu_type1_dma_unmap(argsz=argsz, flags=flags, iova=iova, size=size)
    return w.compat(v.VFIO_IOMMU_UNMAP_DMA, un)


def _compat_partial_huge(w: World) -> int:
    ioas = w.f.ioas_alloc()
    w.f.map(ioas, w.other, 16 * K4, BASE)
    w.dev.attach(ioas)
    w.e(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, ioas_id=ioas, op=u.IOMMU_VFIO_IOAS_SET))
    return _compat_unmap(w, 0, BASE, K4)


def _set_compat(w: World) -> None:
    w.e(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, ioas_id=w.ioas, op=u.IOMMU_VFIO_IOAS_SET))


def _with_compat(fn: Callable[[World], int]) -> Callable[[World], int]:
    def run(w: World) -> int:
        _set_compat(w)
        return fn(w)

    return run


CASES: list[tuple[str, Callable[[World], int], int]] = [
    # -- §5.2 framing -------------------------------------------------------------------
    (
        "nr below the table -> compat -> ENOTTY",
        lambda w: w.compat(_IO(0x3B, 0x7F), bytearray(8)),
        E.ENOTTY,
    ),
    ("nr above the table -> ENOTTY", lambda w: w.compat(_IO(0x3B, 0xFF), bytearray(8)), E.ENOTTY),
    (
        "nr in table, cmd mismatch -> ENOTTY",
        lambda w: w.e(_IOWR(0x3B, 0x80, 8), sized(u.iommu_destroy, id=w.ioas)),
        E.ENOTTY,
    ),
    ("size read faults -> EFAULT", _short, E.EFAULT),
    ("non-pointer arg -> EFAULT", lambda w: w.e(u.IOMMU_DESTROY, 0), E.EFAULT),
    (
        "bad pointer with a wrong cmd number: EFAULT before ENOTTY",
        lambda w: w.e(_IOWR(0x3B, 0x80, 8), bytearray(2)),
        E.EFAULT,
    ),
    (
        "size > struct, non-zero tail -> E2BIG",
        lambda w: w.e(u.IOMMU_DESTROY, _buf(u.iommu_destroy(size=12, id=w.ioas), b"\x01\0\0\0")),
        E.E2BIG,
    ),
    (
        "size > struct, zero tail accepted",
        lambda w: w.e(u.IOMMU_DESTROY, _buf(u.iommu_destroy(size=12, id=999), bytes(4))),
        E.ENOENT,
    ),
    ("DESTROY unknown id -> ENOENT", lambda w: _destroy(w, 0), E.ENOENT),
    ("DESTROY IOAS with a HWPT -> EBUSY", lambda w: _destroy(w, w.ioas), E.EBUSY),
    ("DESTROY HWPT with a device -> EBUSY", lambda w: _destroy(w, w.hwpt), E.EBUSY),
    ("DESTROY DEVICE (driver holds it) -> EBUSY", lambda w: _destroy(w, w.dev.devid), E.EBUSY),
    ("DESTROY ACCESS (driver holds it) -> EBUSY", _destroy_access, E.EBUSY),
    ("DESTROY free IOAS -> 0", lambda w: _destroy(w, w.f.ioas_alloc()), 0),
    # -- §5.3 BIND / ATTACH / DETACH ----------------------------------------------------
    (
        "BIND non-pointer -> EFAULT",
        lambda w: errno_of(w.k.ioctl, w.new_fd(), v.VFIO_DEVICE_BIND_IOMMUFD, 0),
        E.EFAULT,
    ),
    ("BIND argsz < 16 -> EINVAL", lambda w: w.bind_e(w.new_fd(), argsz=15), E.EINVAL),
    ("BIND unknown flags -> EINVAL", lambda w: w.bind_e(w.new_fd(), flags=2), E.EINVAL),
    ("BIND iommufd < 0 -> EINVAL", lambda w: w.bind_e(w.new_fd(), iommufd=-1), E.EINVAL),
    ("BIND second bind -> EINVAL", lambda w: w.bind_e(w.dev.fd), E.EINVAL),
    ("BIND fd from the legacy group path -> EINVAL", lambda w: w.bind_e(_group_fd(w)), E.EINVAL),
    ("BIND fd not open -> EBADF", lambda w: w.bind_e(w.new_fd(), iommufd=999), E.EBADF),
    (
        "BIND fd not an iommufd -> EBADFD",
        lambda w: w.bind_e(w.new_fd(), iommufd=w.dev.fd),
        E.EBADFD,
    ),
    ("BIND token on a device without -> EINVAL", lambda w: w.bind_e(w.new_fd(), flags=1), E.EINVAL),
    (
        "BIND non-zero past 24 -> E2BIG",
        lambda w: errno_of(
            w.k.ioctl,
            w.new_fd(),
            v.VFIO_DEVICE_BIND_IOMMUFD,
            _buf(v.vfio_device_bind_iommufd(argsz=28, iommufd=w.f.fd), b"\x01\0\0\0"),
        ),
        E.E2BIG,
    ),
    (
        "ATTACH before BIND -> EINVAL",
        lambda w: errno_of(w.f.dev(bind=False).attach, w.ioas),
        E.EINVAL,
    ),
    (
        "ATTACH non-pointer -> EFAULT",
        lambda w: errno_of(w.k.ioctl, w.dev.fd, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0),
        E.EFAULT,
    ),
    ("ATTACH argsz < 12 -> EINVAL", lambda w: w.attach_e(w.ioas, argsz=11), E.EINVAL),
    ("ATTACH unknown flags -> EINVAL", lambda w: w.attach_e(w.ioas, flags=2), E.EINVAL),
    (
        "ATTACH PASID without driver support -> EOPNOTSUPP",
        lambda w: w.attach_e(w.ioas, flags=1),
        E.EOPNOTSUPP,
    ),
    ("ATTACH unknown pt_id -> ENOENT", lambda w: w.attach_e(999), E.ENOENT),
    ("ATTACH pt_id of a DEVICE -> EINVAL", lambda w: w.attach_e(w.dev.devid), E.EINVAL),
    (
        "ATTACH dirty HWPT, device IOMMU cannot track -> EINVAL",
        lambda w: w.attach_e(w.hwpt, dev=w.f.dev(iommu_dirty=False)),
        E.EINVAL,
    ),
    ("ATTACH reserved-region conflict -> EADDRINUSE", _resv_conflict_attach, E.EADDRINUSE),
    ("ATTACH second time = replace -> 0", lambda w: w.attach_e(w.ioas), 0),
    (
        "ATTACH emulated device to a HWPT id -> ENOENT (an ACCESS takes only an IOAS)",
        lambda w: w.attach_e(w.hwpt, dev=w.f.dev("mtty")),
        E.ENOENT,
    ),
    ("DETACH argsz < 8 -> EINVAL", lambda w: errno_of(w.dev.detach, 0, 7), E.EINVAL),
    ("DETACH unknown flags -> EINVAL", lambda w: errno_of(w.dev.detach, 2), E.EINVAL),
    (
        "DETACH PASID without driver support -> EOPNOTSUPP",
        lambda w: errno_of(w.dev.detach, 1),
        E.EOPNOTSUPP,
    ),
    ("DETACH when not attached -> 0", lambda w: errno_of(w.f.dev().detach), 0),
    # -- §5.4 IOAS_ALLOC / IOVA_RANGES / ALLOW_IOVAS ------------------------------------
    (
        "IOAS_ALLOC flags -> EOPNOTSUPP",
        lambda w: w.e(u.IOMMU_IOAS_ALLOC, sized(u.iommu_ioas_alloc, flags=1)),
        E.EOPNOTSUPP,
    ),
    ("IOVA_RANGES __reserved -> EOPNOTSUPP", lambda w: w.ranges(__reserved=1), E.EOPNOTSUPP),
    ("IOVA_RANGES bad id -> ENOENT", lambda w: w.ranges(ioas_id=w.hwpt), E.ENOENT),
    ("IOVA_RANGES too many -> EMSGSIZE", lambda w: w.ranges(num_iovas=0), E.EMSGSIZE),
    ("IOVA_RANGES bad pointer -> EFAULT", lambda w: w.ranges(allowed_iovas=16), E.EFAULT),
    (
        "ALLOW __reserved -> EOPNOTSUPP",
        lambda w: w.allow([(BASE, BASE + K4)], __reserved=1),
        E.EOPNOTSUPP,
    ),
    ("ALLOW bad id -> ENOENT", lambda w: w.allow([], ioas_id=999), E.ENOENT),
    ("ALLOW start == last -> EINVAL", lambda w: w.allow([(BASE, BASE)]), E.EINVAL),
    ("ALLOW start > last -> EINVAL", lambda w: w.allow([(BASE + K4, BASE)]), E.EINVAL),
    (
        "ALLOW overlapping ranges -> EINVAL",
        lambda w: w.allow([(BASE, BASE + 2 * K4), (BASE + K4, BASE + 8 * K4)]),
        E.EINVAL,
    ),
    (
        "ALLOW intersects reserved -> EADDRINUSE",
        lambda w: w.allow([(ARM_MSI - K4, ARM_MSI + K4)]),
        E.EADDRINUSE,
    ),
    ("ALLOW bad pointer -> EFAULT", lambda w: w.allow([], num_iovas=1, allowed_iovas=16), E.EFAULT),
    ("ALLOW num 0 clears -> 0", lambda w: w.allow([]), 0),
    # -- §5.4 IOAS_MAP ------------------------------------------------------------------
    ("MAP unknown flags -> EOPNOTSUPP", lambda w: w.map(flags=RW | 8), E.EOPNOTSUPP),
    ("MAP __reserved -> EOPNOTSUPP", lambda w: w.map(__reserved=1), E.EOPNOTSUPP),
    ("MAP iova >= ULONG_MAX -> EOVERFLOW", lambda w: w.map(iova=ULONG_MAX), E.EOVERFLOW),
    ("MAP length >= ULONG_MAX -> EOVERFLOW", lambda w: w.map(length=ULONG_MAX), E.EOVERFLOW),
    ("MAP neither READ nor WRITE -> EINVAL", lambda w: w.map(flags=FIXED), E.EINVAL),
    ("MAP bad ioas -> ENOENT", lambda w: w.map(ioas_id=w.hwpt), E.ENOENT),
    ("MAP length 0 -> EINVAL", lambda w: w.map(length=0), E.EINVAL),
    ("MAP length % iova_alignment -> EINVAL", lambda w: w.map(length=K4 + 512), E.EINVAL),
    (
        "MAP FIXED iova % iova_alignment -> EINVAL",
        lambda w: w.map(iova=BASE + 64 * K4 + 512),
        E.EINVAL,
    ),
    (
        "MAP FIXED iova + length - 1 overflows -> EOVERFLOW",
        lambda w: w.map(iova=ULONG_MAX - K4 + 1, length=2 * K4),
        E.EOVERFLOW,
    ),
    ("MAP FIXED into a reserved region -> EINVAL", lambda w: w.map(iova=ARM_MSI), E.EINVAL),
    ("MAP FIXED outside the aperture -> EINVAL", lambda w: w.map(iova=1 << 50), E.EINVAL),
    ("MAP FIXED over an existing area -> EEXIST", lambda w: w.map(iova=BASE + 8 * K4), E.EEXIST),
    (
        "MAP auto: derived alignment < iova_alignment -> EINVAL",
        lambda w: w.map(flags=RW, user_va=w.other + 2048),
        E.EINVAL,
    ),
    (
        "MAP auto: no hole -> ENOSPC",
        lambda w: (w.allow([(BASE + 64 * K4, BASE + 65 * K4 - 1)]), w.map(flags=RW, length=2 * K4))[
            1
        ],
        E.ENOSPC,
    ),
    (
        "MAP auto: length >= ULONG_MAX/2 -> EOVERFLOW",
        lambda w: w.map(flags=RW, length=1 << 63, user_va=0),
        E.EOVERFLOW,
    ),
    (
        "MAP user memory unmappable (with a domain) -> EFAULT",
        lambda w: w.map(user_va=1 << 31),
        E.EFAULT,
    ),
    (
        "MAP user_va + length wraps -> EOVERFLOW",
        lambda w: w.map(user_va=ULONG_MAX - K4 + 1, length=2 * K4),
        E.EOVERFLOW,
    ),
    (
        "MAP FIXED ignores the allowed list -> 0",
        lambda w: (w.allow([(BASE + 512 * K4, BASE + 600 * K4)]), w.map())[1],
        0,
    ),
    (
        "MAP user_va page offset vs iova_alignment (no domain: alignment 1) -> 0",
        lambda w: (lambda i: w.map(ioas_id=i, user_va=w.other + 100, length=100, iova=BASE + 100))(
            w.f.ioas_alloc()
        ),
        0,
    ),
    # -- §5.4 IOAS_COPY -----------------------------------------------------------------
    ("COPY unknown flags -> EOPNOTSUPP", lambda w: w.copy(flags=RW | 8), E.EOPNOTSUPP),
    ("COPY length >= ULONG_MAX -> EOVERFLOW", lambda w: w.copy(length=ULONG_MAX), E.EOVERFLOW),
    ("COPY src_iova >= ULONG_MAX -> EOVERFLOW", lambda w: w.copy(src_iova=ULONG_MAX), E.EOVERFLOW),
    ("COPY dst_iova >= ULONG_MAX -> EOVERFLOW", lambda w: w.copy(dst_iova=ULONG_MAX), E.EOVERFLOW),
    ("COPY neither READ nor WRITE -> EINVAL", lambda w: w.copy(flags=FIXED), E.EINVAL),
    ("COPY length 0 -> EINVAL", lambda w: w.copy(length=0), E.EINVAL),
    ("COPY bad src ioas -> ENOENT", lambda w: w.copy(src_ioas_id=999), E.ENOENT),
    (
        "COPY src not contiguously mapped -> ENOENT",
        lambda w: w.copy(src_iova=BASE + 15 * K4, length=2 * K4),
        E.ENOENT,
    ),
    ("COPY bad dst ioas (after the source) -> ENOENT", lambda w: w.copy(dst_ioas_id=999), E.ENOENT),
    (
        "COPY WRITEABLE from read-only source -> EPERM",
        lambda w: (
            w.f.map(w.ioas, w.other, K4, BASE + 32 * K4, u.IOMMU_IOAS_MAP_READABLE),
            w.copy(src_iova=BASE + 32 * K4),
        )[1],
        E.EPERM,
    ),
    (
        "COPY dst checks come before EPERM -> EEXIST",
        lambda w: (
            w.f.map(w.ioas, w.other, K4, BASE + 32 * K4, u.IOMMU_IOAS_MAP_READABLE),
            w.copy(src_iova=BASE + 32 * K4, dst_iova=BASE),
        )[1],
        E.EEXIST,
    ),
    ("COPY -> 0", lambda w: w.copy(), 0),
    # -- §5.4 IOAS_UNMAP ----------------------------------------------------------------
    (
        "UNMAP bad ioas first, even for unmap-all -> ENOENT",
        lambda w: w.unmap(ioas_id=999, iova=0, length=U64_MAX),
        E.ENOENT,
    ),
    (
        "UNMAP all of an empty IOAS -> 0",
        lambda w: w.unmap(ioas_id=w.f.ioas_alloc(), iova=0, length=U64_MAX),
        0,
    ),
    (
        "UNMAP iova >= ULONG_MAX -> EOVERFLOW",
        lambda w: w.unmap(iova=ULONG_MAX, length=K4),
        E.EOVERFLOW,
    ),
    (
        "UNMAP length >= ULONG_MAX (iova != 0) -> EOVERFLOW",
        lambda w: w.unmap(iova=K4, length=ULONG_MAX),
        E.EOVERFLOW,
    ),
    ("UNMAP length 0 -> EINVAL", lambda w: w.unmap(length=0), E.EINVAL),
    (
        "UNMAP iova + length - 1 overflows -> EOVERFLOW",
        lambda w: w.unmap(iova=ULONG_MAX - K4, length=2 * K4),
        E.EOVERFLOW,
    ),
    ("UNMAP area partly inside -> ENOENT", lambda w: w.unmap(length=8 * K4), E.ENOENT),
    (
        "UNMAP nothing mapped in range -> ENOENT",
        lambda w: w.unmap(iova=BASE + 64 * K4, length=K4),
        E.ENOENT,
    ),
    ("UNMAP superset of the area -> 0", lambda w: w.unmap(iova=BASE - K4, length=32 * K4), 0),
    # -- §5.4 IOMMU_OPTION --------------------------------------------------------------
    ("OPTION __reserved -> EOPNOTSUPP", lambda w: w.option(__reserved=1), E.EOPNOTSUPP),
    ("OPTION unknown option -> EOPNOTSUPP", lambda w: w.option(option_id=7), E.EOPNOTSUPP),
    ("OPTION unknown op -> EOPNOTSUPP", lambda w: w.option(op=5), E.EOPNOTSUPP),
    ("OPTION HUGE_PAGES bad object -> ENOENT", lambda w: w.option(object_id=w.hwpt), E.ENOENT),
    (
        "OPTION HUGE_PAGES val 2 -> EINVAL",
        lambda w: w.option(op=u.IOMMU_OPTION_OP_SET, val64=2),
        E.EINVAL,
    ),
    (
        "OPTION HUGE_PAGES off with domain mappings -> EINVAL",
        lambda w: (
            w.option(op=u.IOMMU_OPTION_OP_SET, val64=1),
            w.option(op=u.IOMMU_OPTION_OP_SET, val64=0),
        )[1],
        E.EINVAL,
    ),
    (
        "OPTION RLIMIT_MODE object_id != 0 -> EOPNOTSUPP",
        lambda w: w.option(option_id=u.IOMMU_OPTION_RLIMIT_MODE, object_id=1),
        E.EOPNOTSUPP,
    ),
    (
        "OPTION RLIMIT_MODE SET without CAP_SYS_RESOURCE -> EPERM",
        lambda w: _rlimit_set(w, 1, root=False),
        E.EPERM,
    ),
    (
        "OPTION RLIMIT_MODE SET with objects -> EBUSY",
        lambda w: _rlimit_set(w, 1, fresh=False),
        E.EBUSY,
    ),
    ("OPTION RLIMIT_MODE SET 2 -> EINVAL", lambda w: _rlimit_set(w, 2), E.EINVAL),
    ("OPTION RLIMIT_MODE SET 1 -> 0", lambda w: _rlimit_set(w, 1), 0),
    # -- §5.5 IOMMU_GET_HW_INFO ---------------------------------------------------------
    ("HW_INFO unknown flags -> EOPNOTSUPP", lambda w: w.hw_info(flags=2), E.EOPNOTSUPP),
    (
        "HW_INFO __reserved -> EOPNOTSUPP",
        lambda w: w.hw_info(__reserved=(ctypes.c_uint8 * 3)(0, 1, 0)),
        E.EOPNOTSUPP,
    ),
    ("HW_INFO bad dev_id -> ENOENT", lambda w: w.hw_info(dev_id=w.ioas), E.ENOENT),
    (
        "HW_INFO requested type refused -> EOPNOTSUPP",
        lambda w: w.hw_info(flags=1, in_data_type=u.IOMMU_HW_INFO_TYPE_INTEL_VTD),
        E.EOPNOTSUPP,
    ),
    (
        "HW_INFO requested own type -> 0",
        lambda w: w.hw_info(flags=1, in_data_type=u.IOMMU_HW_INFO_TYPE_ARM_SMMUV3),
        0,
    ),
    ("HW_INFO copy fault -> EFAULT", lambda w: w.hw_info(data_uptr=16, data_len=8), E.EFAULT),
    # -- §5.6 IOMMU_HWPT_ALLOC ----------------------------------------------------------
    ("HWPT_ALLOC __reserved -> EOPNOTSUPP", lambda w: w.hwpt_alloc(__reserved=1), E.EOPNOTSUPP),
    ("HWPT_ALLOC type NONE with data_len -> EINVAL", lambda w: w.hwpt_alloc(data_len=8), E.EINVAL),
    ("HWPT_ALLOC type set, data_len 0 -> EINVAL", lambda w: w.hwpt_alloc(data_type=1), E.EINVAL),
    (
        "HWPT_ALLOC dev_id not a DEVICE -> ENOENT",
        lambda w: w.hwpt_alloc(dev_id=w.ioas, pt_id=w.dev.devid),
        E.ENOENT,
    ),
    (
        "HWPT_ALLOC pt_id missing -> EINVAL (not ENOENT)",
        lambda w: w.hwpt_alloc(pt_id=999),
        E.EINVAL,
    ),
    ("HWPT_ALLOC pt_id of a DEVICE -> EINVAL", lambda w: w.hwpt_alloc(pt_id=w.dev.devid), E.EINVAL),
    ("HWPT_ALLOC unknown flags -> EOPNOTSUPP", lambda w: w.hwpt_alloc(flags=1 << 7), E.EOPNOTSUPP),
    ("HWPT_ALLOC DIRTY, device can track -> 0", _no_access_alloc, 0),
    (
        "HWPT_ALLOC DIRTY, device cannot track -> EOPNOTSUPP",
        lambda w: errno_of(w.f.hwpt_alloc, w.f.dev(iommu_dirty=False).devid, w.ioas, DIRTY),
        E.EOPNOTSUPP,
    ),
    (
        "HWPT_ALLOC SMMUv3 NEST_PARENT|DIRTY -> EOPNOTSUPP (driver)",
        lambda w: w.hwpt_alloc(flags=DIRTY | 1),
        E.EOPNOTSUPP,
    ),
    (
        "HWPT_ALLOC user data for a paging domain -> EOPNOTSUPP (driver)",
        lambda w: w.hwpt_alloc(data_type=1, data_len=8, data_uptr=w.other),
        E.EOPNOTSUPP,
    ),
    ("HWPT_ALLOC area outside the aperture -> EADDRINUSE", _aperture_conflict, E.EADDRINUSE),
    ("HWPT_ALLOC area not page aligned -> EADDRINUSE", _unaligned_area_alloc, E.EADDRINUSE),
    ("HWPT_ALLOC fill pins unmappable memory -> EFAULT", _unpinnable_alloc, E.EFAULT),
    (
        "HWPT_ALLOC nested under an auto HWPT -> EINVAL (vtd)",
        lambda w: (
            lambda ww: ww.hwpt_alloc(
                pt_id=ww.dev.attach(ww.ioas), data_type=1, data_len=8, data_uptr=ww.other
            )
        )(World("vtd")),
        E.EINVAL,
    ),
    (
        "HWPT_ALLOC nested with data_len 0 -> EOPNOTSUPP",
        lambda w: w.hwpt_alloc(pt_id=w.hwpt),
        E.EOPNOTSUPP,
    ),
    (
        "HWPT_ALLOC FAULT_ID_VALID|NEST_PARENT -> EOPNOTSUPP (before the fault lookup)",
        lambda w: w.hwpt_alloc(
            flags=u.IOMMU_HWPT_FAULT_ID_VALID | u.IOMMU_HWPT_ALLOC_NEST_PARENT, fault_id=999
        ),
        E.EOPNOTSUPP,
    ),
    (
        "HWPT_ALLOC FAULT_ID_VALID, no such fault -> ENOENT",
        lambda w: w.hwpt_alloc(flags=u.IOMMU_HWPT_FAULT_ID_VALID, fault_id=999),
        E.ENOENT,
    ),
    ("HWPT_ALLOC -> 0", lambda w: w.hwpt_alloc(), 0),
    # -- §5.7 SET_DIRTY_TRACKING --------------------------------------------------------
    ("SET_DIRTY unknown flags -> EOPNOTSUPP", lambda w: w.set_dirty(flags=2), E.EOPNOTSUPP),
    ("SET_DIRTY not a HWPT_PAGING -> ENOENT", lambda w: w.set_dirty(hwpt_id=w.ioas), E.ENOENT),
    (
        "SET_DIRTY no dirty ops -> EOPNOTSUPP",
        lambda w: w.set_dirty(hwpt_id=w.dev.attach(w.ioas)),
        E.EOPNOTSUPP,
    ),
    ("SET_DIRTY __reserved is not checked -> 0", lambda w: w.set_dirty(__reserved=7), 0),
    # -- §5.8 GET_DIRTY_BITMAP ----------------------------------------------------------
    ("GET_DIRTY unknown flags -> EOPNOTSUPP", lambda w: w.dirty(flags=2), E.EOPNOTSUPP),
    ("GET_DIRTY __reserved -> EOPNOTSUPP", lambda w: w.dirty(__reserved=1), E.EOPNOTSUPP),
    ("GET_DIRTY not a HWPT_PAGING -> ENOENT", lambda w: w.dirty(hwpt_id=w.ioas), E.ENOENT),
    (
        "GET_DIRTY iova + length - 1 overflows -> EOVERFLOW",
        lambda w: w.dirty(iova=U64_MAX - K4 + 1, length=2 * K4),
        E.EOVERFLOW,
    ),
    ("GET_DIRTY length 0 with iova != 0 -> EOVERFLOW", lambda w: w.dirty(length=0), E.EOVERFLOW),
    (
        "GET_DIRTY iova not iova_alignment aligned -> EINVAL",
        lambda w: w.dirty(iova=BASE + 512),
        E.EINVAL,
    ),
    (
        "GET_DIRTY end not iova_alignment aligned -> EINVAL",
        lambda w: w.dirty(length=K4 + 512),
        E.EINVAL,
    ),
    ("GET_DIRTY page_size 0 -> EINVAL", lambda w: w.dirty(page_size=0), E.EINVAL),
    (
        "GET_DIRTY iova not page_size aligned -> EINVAL",
        lambda w: w.dirty(iova=BASE + K4, page_size=2 * K4),
        E.EINVAL,
    ),
    (
        "GET_DIRTY end not page_size aligned -> EINVAL",
        lambda w: w.dirty(length=3 * K4, page_size=2 * K4),
        E.EINVAL,
    ),
    (
        "GET_DIRTY non power-of-two page_size (mask test) -> 0",
        lambda w: w.dirty(length=16 * K4, page_size=3 * K4),
        0,
    ),
    (
        "GET_DIRTY no dirty ops -> EOPNOTSUPP",
        lambda w: w.dirty(hwpt_id=w.dev.attach(w.ioas)),
        E.EOPNOTSUPP,
    ),
    ("GET_DIRTY range not mapped -> 0", lambda w: w.dirty(iova=BASE + 1024 * K4), 0),
    ("GET_DIRTY faulting bitmap -> 0", lambda w: w.dirty(data=16), 0),
    ("GET_DIRTY iova 0, length 0 -> 0", lambda w: w.dirty(iova=0, length=0), 0),
    ("GET_DIRTY NO_CLEAR -> 0", lambda w: w.dirty(flags=NO_CLEAR), 0),
    # -- §5.9 the VFIO compat container on /dev/iommu -----------------------------------
    (
        "compat GET_API_VERSION -> 0 (VFIO_API_VERSION)",
        lambda w: w.compat(v.VFIO_GET_API_VERSION, 0),
        0,
    ),
    (
        "compat DIRTY_PAGES -> ENOTTY",
        lambda w: w.compat(v.VFIO_IOMMU_DIRTY_PAGES, bytearray(16)),
        E.ENOTTY,
    ),
    (
        "compat UNMAP without a compat IOAS -> ENODEV",
        lambda w: _compat_unmap(w, 0, BASE, K4),
        E.ENODEV,
    ),
    (
        "compat UNMAP argsz short -> EINVAL",
        _with_compat(lambda w: _compat_unmap(w, 0, BASE, K4, argsz=23)),
        E.EINVAL,
    ),
    (
        "compat UNMAP GET_DIRTY_BITMAP -> EINVAL",
        _with_compat(
            lambda w: _compat_unmap(w, v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, BASE, 16 * K4)
        ),
        E.EINVAL,
    ),
    (
        "compat UNMAP ALL with iova/size -> EINVAL",
        _with_compat(lambda w: _compat_unmap(w, v.VFIO_DMA_UNMAP_FLAG_ALL, BASE, K4)),
        E.EINVAL,
    ),
    (
        "compat UNMAP empty range -> 0 (6.18+)",
        _with_compat(lambda w: _compat_unmap(w, 0, BASE + 64 * K4, K4)),
        0,
    ),
    ("compat UNMAP partial area, huge pages on -> ENOENT", _compat_partial_huge, E.ENOENT),
    (
        "compat UNMAP partial area, huge pages off: cut (type1 v1) -> 0",
        _with_compat(lambda w: _compat_unmap(w, 0, BASE, K4)),
        0,
    ),
    (
        "compat MAP argsz short -> EINVAL",
        _with_compat(
            lambda w: w.compat(
                v.VFIO_IOMMU_MAP_DMA,
                v.vfio_iommu_type1_dma_map(
                    argsz=31, flags=3, vaddr=w.other, iova=BASE + 64 * K4, size=K4
                ),
            )
        ),
        E.EINVAL,
    ),
    (
        "compat SET_IOMMU without a compat IOAS -> ENODEV",
        lambda w: w.compat(v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU),
        E.ENODEV,
    ),
    (
        "compat SET_IOMMU bad type -> EINVAL",
        _with_compat(lambda w: w.compat(v.VFIO_SET_IOMMU, 7)),
        E.EINVAL,
    ),
    (
        "IOMMU_VFIO_IOAS GET without compat IOAS -> ENODEV",
        lambda w: w.e(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, op=u.IOMMU_VFIO_IOAS_GET)),
        E.ENODEV,
    ),
    (
        "IOMMU_VFIO_IOAS SET bad id -> ENOENT",
        lambda w: w.e(
            u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, ioas_id=w.hwpt, op=u.IOMMU_VFIO_IOAS_SET)
        ),
        E.ENOENT,
    ),
    (
        "IOMMU_VFIO_IOAS unknown op -> EOPNOTSUPP",
        lambda w: w.e(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, op=3)),
        E.EOPNOTSUPP,
    ),
    (
        "IOMMU_HWPT_INVALIDATE on a paging HWPT -> EINVAL",
        lambda w: w.e(u.IOMMU_HWPT_INVALIDATE, sized(u.iommu_hwpt_invalidate, hwpt_id=w.hwpt)),
        E.EINVAL,
    ),
]


@pytest.mark.parametrize("name,case,expected", CASES, ids=[c[0] for c in CASES])
def test_errno(name: str, case: Callable[[World], int], expected: int) -> None:
    assert case(World()) == expected


# The minimum sizes of §5.2, checked on every registered command the way the selftest's
# cmd_length does: min_size - 1 is EINVAL, sizeof + 1 with a non-zero byte is E2BIG, and
# sizeof + 1 with a zero byte answers as sizeof does.
MIN_SIZES = {
    u.IOMMU_DESTROY: (u.iommu_destroy, 8),
    u.IOMMU_IOAS_ALLOC: (u.iommu_ioas_alloc, 12),
    u.IOMMU_IOAS_IOVA_RANGES: (u.iommu_ioas_iova_ranges, 32),
    u.IOMMU_IOAS_ALLOW_IOVAS: (u.iommu_ioas_allow_iovas, 24),
    u.IOMMU_IOAS_MAP: (u.iommu_ioas_map, 40),
    u.IOMMU_IOAS_COPY: (u.iommu_ioas_copy, 40),
    u.IOMMU_IOAS_UNMAP: (u.iommu_ioas_unmap, 24),
    u.IOMMU_OPTION: (u.iommu_option, 24),
    u.IOMMU_VFIO_IOAS: (u.iommu_vfio_ioas, 12),
    u.IOMMU_HWPT_ALLOC: (u.iommu_hwpt_alloc, 24),
    u.IOMMU_GET_HW_INFO: (u.iommu_hw_info, 32),
    u.IOMMU_HWPT_SET_DIRTY_TRACKING: (u.iommu_hwpt_set_dirty_tracking, 16),
    u.IOMMU_HWPT_GET_DIRTY_BITMAP: (u.iommu_hwpt_get_dirty_bitmap, 48),
    u.IOMMU_HWPT_INVALIDATE: (u.iommu_hwpt_invalidate, 32),
}


@pytest.mark.parametrize("req", list(MIN_SIZES), ids=[MIN_SIZES[r][0].__name__ for r in MIN_SIZES])
def test_cmd_length(req: int) -> None:
    struct_, min_size = MIN_SIZES[req]
    from vfiomig.uapi.ioctl import _IOC_NR

    assert IOCTL_OPS[_IOC_NR(req)].min_size == min_size
    w = World()
    full = ctypes.sizeof(struct_)
    buf = bytearray(full + 1)
    buf[0:4] = (min_size - 1).to_bytes(4, "little")
    buf[full] = 0xFF
    assert w.e(req, buf) == E.EINVAL
    buf[0:4] = (full + 1).to_bytes(4, "little")
    assert w.e(req, buf) == E.E2BIG
    exact = bytearray(full)
    exact[0:4] = full.to_bytes(4, "little")
    rc = w.e(req, exact)
    buf[full] = 0
    assert w.e(req, buf) == rc


# IOMMU_IOAS_MAP's checks in the kernel's order, each case breaking every later rule too so
# that only the order decides: drivers/iommu/iommufd/ioas.c iommufd_ioas_map (flags and
# __reserved: EOPNOTSUPP; iova or length >= ULONG_MAX: EOVERFLOW; neither READABLE nor
# WRITEABLE: EINVAL; then iommufd_get_ioas: ENOENT), then pages.c iopt_alloc_user_pages
# (user_va + length wraps: EOVERFLOW; then iopt_alloc_pages: length 0 or above
# SIZE_MAX - PAGE_SIZE: EINVAL), then io_pagetable.c iopt_alloc_area_pages (length not a
# multiple of iova_alignment: EINVAL) and iopt_check_iova (fixed IOVA misaligned: EINVAL;
# over an existing area: EEXIST).
MAP_ORDER = [
    (
        "unknown flag before EOVERFLOW, no access, bad ioas",
        {"flags": FIXED | 8, "iova": ULONG_MAX, "length": ULONG_MAX, "ioas_id": 0},
        E.EOPNOTSUPP,
    ),
    ("__reserved before EOVERFLOW", {"__reserved": 1, "iova": ULONG_MAX}, E.EOPNOTSUPP),
    (
        "iova >= ULONG_MAX before no access, bad ioas, length 0",
        {"flags": FIXED, "iova": ULONG_MAX, "length": 0, "ioas_id": 0},
        E.EOVERFLOW,
    ),
    (
        "length >= ULONG_MAX before no access",
        {"flags": FIXED, "length": ULONG_MAX, "ioas_id": 0},
        E.EOVERFLOW,
    ),
    ("no access before bad ioas, length 0", {"flags": FIXED, "ioas_id": 0, "length": 0}, E.EINVAL),
    ("bad ioas before length 0 (iopt)", {"ioas_id": 0, "length": 0}, E.ENOENT),
    (
        "bad ioas before user_va + length wrapping (iopt)",
        {"ioas_id": 0, "user_va": ULONG_MAX - K4 + 1, "length": 2 * K4},
        E.ENOENT,
    ),
    (
        "user_va + length wraps before length > SIZE_MAX - PAGE_SIZE",
        {"user_va": 2 * K4, "length": ULONG_MAX - K4 + 1},
        E.EOVERFLOW,
    ),
    (
        "length > SIZE_MAX - PAGE_SIZE, no wrap: EINVAL before the fixed IOVA's EEXIST",
        {"user_va": 0, "length": ULONG_MAX - K4 + 1, "iova": BASE},
        E.EINVAL,
    ),
    (
        "misaligned length before the fixed IOVA's EEXIST",
        {"length": K4 + 512, "iova": BASE},
        E.EINVAL,
    ),
    ("misaligned fixed IOVA before EEXIST", {"iova": BASE + 512}, E.EINVAL),
    ("then a fixed IOVA over an area", {"iova": BASE + K4}, E.EEXIST),
]


@pytest.mark.parametrize("name,fields,expected", MAP_ORDER, ids=[c[0] for c in MAP_ORDER])
def test_ioas_map_checks_in_kernel_order(
    name: str, fields: dict[str, int], expected: int
) -> None:
    assert World().map(**fields) == expected
