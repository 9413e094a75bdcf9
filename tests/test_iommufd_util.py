"""Helpers for the iommufd tests: a C-like client of /dev/iommu and of VFIO device cdevs.

Everything goes through ModelKernel.ioctl with the uAPI structs, as a C program would.
`Dev.hw` / `Dev.vdev` look below the uAPI (ground truth) and are named so where used.
This module holds no tests itself (beyond a self-check of the helpers).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.kernel import ModelKernel
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

K4 = 1 << 12
M2 = 1 << 21
G1 = 1 << 30
U64_MAX = (1 << 64) - 1
RW = u.IOMMU_IOAS_MAP_READABLE | u.IOMMU_IOAS_MAP_WRITEABLE
FIXED = u.IOMMU_IOAS_MAP_FIXED_IOVA
DIRTY = u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
NO_CLEAR = u.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
BASE = 1 << 32  # an IOVA clear of every vendor's reserved MSI window


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    """0 if fn succeeds, else the errno of the OSError it raises."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return int(e.errno or -1)
    return 0


def sized(cls: type[Any], **fields: Any) -> Any:
    """An iommufd command struct with .size set."""
    return cls(size=ctypes.sizeof(cls), **fields)


class Dev:
    """A VFIO device cdev, bound to an iommufd."""

    def __init__(self, fd_: Iommufd, kind: str = "reference", bind: bool = True, **opts: Any):
        self.ifd = fd_
        self.k = fd_.k
        self.path = self.k.add_device(kind, **opts)
        self.fd = self.k.open(self.path)
        self.devid = 0
        if bind:
            b = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
            b.iommufd = fd_.fd
            self.k.ioctl(self.fd, v.VFIO_DEVICE_BIND_IOMMUFD, b)
            self.devid = int(b.out_devid)

    def attach(self, pt_id: int, flags: int = 0, argsz: int | None = None) -> int:
        at = v.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(v.vfio_device_attach_iommufd_pt) if argsz is None else argsz,
            flags=flags,
            pt_id=pt_id,
        )
        self.k.ioctl(self.fd, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, at)
        return int(at.pt_id)

    def detach(self, flags: int = 0, argsz: int | None = None) -> None:
        de = v.vfio_device_detach_iommufd_pt(
            argsz=ctypes.sizeof(v.vfio_device_detach_iommufd_pt) if argsz is None else argsz,
            flags=flags,
        )
        self.k.ioctl(self.fd, v.VFIO_DEVICE_DETACH_IOMMUFD_PT, de)

    def close(self) -> None:
        self.k.close(self.fd)

    # below the uAPI
    @property
    def hw(self) -> Any:
        return self.k.device(self.path)

    @property
    def vdev(self) -> Any:
        return self.k.devices[self.path]


class Iommufd:
    """One open /dev/iommu and the commands on it."""

    def __init__(self, k: ModelKernel | None = None, vendor: str = "smmuv3") -> None:
        self.k = k if k is not None else ModelKernel(vendor)
        self.fd = self.k.open("/dev/iommu")

    def ioctl(self, req: int, cmd: Any) -> int:
        return self.k.ioctl(self.fd, req, cmd)

    def err(self, req: int, cmd: Any) -> int:
        return errno_of(self.k.ioctl, self.fd, req, cmd)

    # -- memory ------------------------------------------------------------------------

    def buf(self, length: int, backed: bool = True) -> tuple[int, npt.NDArray[np.uint8] | None]:
        return self.k.mmap(length, backed=backed)

    # -- objects -----------------------------------------------------------------------

    def ioas_alloc(self) -> int:
        a = sized(u.iommu_ioas_alloc)
        self.ioctl(u.IOMMU_IOAS_ALLOC, a)
        return int(a.out_ioas_id)

    def destroy(self, oid: int) -> None:
        self.ioctl(u.IOMMU_DESTROY, sized(u.iommu_destroy, id=oid))

    def map_cmd(
        self, ioas: int, uva: int, length: int, iova: int | None = None, flags: int = RW
    ) -> Any:
        if iova is not None:
            flags |= FIXED
        return sized(
            u.iommu_ioas_map,
            flags=flags,
            ioas_id=ioas,
            user_va=uva,
            length=length,
            iova=iova or 0,
        )

    def map(
        self, ioas: int, uva: int, length: int, iova: int | None = None, flags: int = RW
    ) -> int:
        m = self.map_cmd(ioas, uva, length, iova, flags)
        self.ioctl(u.IOMMU_IOAS_MAP, m)
        return int(m.iova)

    def unmap(self, ioas: int, iova: int, length: int) -> int:
        c = sized(u.iommu_ioas_unmap, ioas_id=ioas, iova=iova, length=length)
        self.ioctl(u.IOMMU_IOAS_UNMAP, c)
        return int(c.length)

    def copy(
        self,
        dst: int,
        src: int,
        src_iova: int,
        length: int,
        dst_iova: int | None = None,
        flags: int = RW,
    ) -> int:
        if dst_iova is not None:
            flags |= FIXED
        c = sized(
            u.iommu_ioas_copy,
            flags=flags,
            dst_ioas_id=dst,
            src_ioas_id=src,
            length=length,
            dst_iova=dst_iova or 0,
            src_iova=src_iova,
        )
        self.ioctl(u.IOMMU_IOAS_COPY, c)
        return int(c.dst_iova)

    def iova_ranges(self, ioas: int, cap: int = 16) -> tuple[int, list[tuple[int, int]], int]:
        """(total number of ranges, the ranges written, iova_alignment)."""
        addr, mem = self.buf(max(K4, 16 * cap))
        assert mem is not None
        c = sized(u.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=cap, allowed_iovas=addr)
        self.ioctl(u.IOMMU_IOAS_IOVA_RANGES, c)
        raw = np.frombuffer(mem[: 16 * min(cap, c.num_iovas)].tobytes(), dtype="<u8")
        ranges = [(int(raw[2 * i]), int(raw[2 * i + 1])) for i in range(raw.size // 2)]
        return int(c.num_iovas), ranges, int(c.out_iova_alignment)

    def allow(self, ioas: int, ranges: list[tuple[int, int]]) -> None:
        addr, mem = self.buf(max(K4, 16 * len(ranges)))
        raw = b"".join(
            int(s).to_bytes(8, "little") + int(e).to_bytes(8, "little") for s, e in ranges
        )
        self.k.mm.write(addr, raw) if raw else None
        c = sized(u.iommu_ioas_allow_iovas, ioas_id=ioas, num_iovas=len(ranges), allowed_iovas=addr)
        self.ioctl(u.IOMMU_IOAS_ALLOW_IOVAS, c)

    def option(self, option_id: int, op: int, object_id: int = 0, val64: int = 0) -> int:
        c = sized(u.iommu_option, option_id=option_id, op=op, object_id=object_id, val64=val64)
        self.ioctl(u.IOMMU_OPTION, c)
        return int(c.val64)

    def huge_pages(self, ioas: int, on: bool) -> None:
        self.option(u.IOMMU_OPTION_HUGE_PAGES, u.IOMMU_OPTION_OP_SET, ioas, int(on))

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0) -> int:
        h = sized(u.iommu_hwpt_alloc, flags=flags, dev_id=dev_id, pt_id=pt_id)
        self.ioctl(u.IOMMU_HWPT_ALLOC, h)
        return int(h.out_hwpt_id)

    def set_dirty(self, hwpt: int, enable: bool) -> None:
        c = sized(u.iommu_hwpt_set_dirty_tracking, flags=int(enable), hwpt_id=hwpt)
        self.ioctl(u.IOMMU_HWPT_SET_DIRTY_TRACKING, c)

    def dirty_cmd(
        self, hwpt: int, iova: int, length: int, page_size: int, data: int, flags: int = 0
    ) -> Any:
        return sized(
            u.iommu_hwpt_get_dirty_bitmap,
            hwpt_id=hwpt,
            flags=flags,
            iova=iova,
            length=length,
            page_size=page_size,
            data=data,
        )

    def get_dirty(
        self, hwpt: int, iova: int, length: int, page_size: int, data: int, flags: int = 0
    ) -> None:
        self.ioctl(
            u.IOMMU_HWPT_GET_DIRTY_BITMAP,
            self.dirty_cmd(hwpt, iova, length, page_size, data, flags),
        )

    def hw_info(self, dev_id: int, data: int = 0, data_len: int = 0, flags: int = 0) -> Any:
        c = sized(u.iommu_hw_info, dev_id=dev_id, data_uptr=data, data_len=data_len, flags=flags)
        self.ioctl(u.IOMMU_GET_HW_INFO, c)
        return c

    def dev(self, kind: str = "reference", bind: bool = True, **opts: Any) -> Dev:
        return Dev(self, kind, bind, **opts)


def bits(mem: npt.NDArray[np.uint8], off: int, nbits: int) -> npt.NDArray[np.uint8]:
    """The first nbits bits (LSB first) of the bitmap at byte `off` of mem, as 0/1."""
    nbytes = (nbits + 7) // 8
    return np.unpackbits(mem[off : off + nbytes], bitorder="little")[:nbits]


def test_helpers_roundtrip() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    addr, _ = f.buf(4 * K4)
    assert f.map(ioas, addr, 4 * K4, BASE) == BASE
    assert f.unmap(ioas, BASE, 4 * K4) == 4 * K4
