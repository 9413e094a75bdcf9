"""iommufd from userspace: ``Iommufd`` (/dev/iommu), ``Ioas`` and ``Hwpt`` objects.

Named after drivers/iommu/iommufd: an open /dev/iommu holds objects with integer ids; an IOAS
is a set of IOVA -> user memory mappings; a HWPT (hw_pagetable) is an IO page table built from
one IOAS, and when allocated with dirty tracking it can report which pages a device wrote::

    with Iommufd(transport) as ictx, VfioDevice(transport, path) as dev:
        dev_id = dev.bind(ictx)
        ioas = ictx.ioas_alloc()
        hwpt = ictx.hwpt_alloc(dev_id, ioas, dirty_tracking=True)
        dev.attach(hwpt)
        iova = ioas.map(guest_ram, iova=0)
        hwpt.set_dirty_tracking(True)
        ...
        for iova, length in hwpt.get_dirty_bitmap(0, guest_ram.length).ranges(): ...
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from errno import EMSGSIZE, ENOENT
from typing import Any

from vfiomig.host.bitmap import (
    DirtyBitmap,
    check_bitmap_size,
    granule,
    iova_bitmap_bytes,
)
from vfiomig.host.cstruct import fill
from vfiomig.host.errors import (
    ClosedError,
    HwptError,
    IoasError,
    IommufdError,
    OpenError,
    VfioError,
    call,
)
from vfiomig.host.memory import Scratch, UserBuffer, user_range
from vfiomig.host.resource import Resource
from vfiomig.host.transport import IOMMUFD_PATH, Transport
from vfiomig.uapi import iommufd as u

U64_MAX = (1 << 64) - 1

HW_INFO_TYPES: dict[int, str] = {
    u.IOMMU_HW_INFO_TYPE_NONE: "none",
    u.IOMMU_HW_INFO_TYPE_INTEL_VTD: "intel-vtd",
    u.IOMMU_HW_INFO_TYPE_ARM_SMMUV3: "arm-smmuv3",
    u.IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV: "tegra241-cmdqv",
    u.IOMMU_HW_INFO_TYPE_AMD: "amd",
}


def _struct(cls: type[Any], op: str, /, **fields: Any) -> Any:
    """An iommufd command: ``size`` set, every field checked to fit (ArgumentError)."""
    return fill(cls, op, size=ctypes.sizeof(cls), **fields)


@dataclass(frozen=True)
class HwInfo:
    """IOMMU_GET_HW_INFO: the IOMMU behind one bound device."""

    data_type: int
    capabilities: int
    max_pasid_log2: int
    data: bytes

    @property
    def type_name(self) -> str:
        return HW_INFO_TYPES.get(self.data_type, f"type{self.data_type}")

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.capabilities & u.IOMMU_HW_CAP_DIRTY_TRACKING)


@dataclass(frozen=True)
class IovaRanges:
    """IOMMU_IOAS_IOVA_RANGES: usable IOVA ranges (inclusive ``(start, last)``) and the
    alignment every map must respect."""

    ranges: tuple[tuple[int, int], ...]
    alignment: int


class Iommufd(Resource):
    """An open /dev/iommu (an ``iommufd_ctx``); a context manager that closes it.

    Closing destroys every object the context still holds, as the kernel does: their
    handles refuse use from then on (ClosedError).
    """

    _owns_fd = True

    def __init__(self, transport: Transport, path: str = IOMMUFD_PATH) -> None:
        self.transport = transport
        self.path = path
        self.fd = call(OpenError, f"open({path})", transport.open, path, os.O_RDWR)
        self.scratch = Scratch(transport.mmap)
        # id -> the live handle for it, so that destroy(id) retires that handle too
        self._handles: weakref.WeakValueDictionary[int, _Object] = weakref.WeakValueDictionary()

    def ioctl(self, request: int, arg: Any, op: str, cls: type[VfioError] = IommufdError) -> int:
        self._check_open(op)
        return call(cls, op, self.transport.ioctl, self.fd, request, arg)

    def _adopt(self, obj: _Object) -> None:
        self._handles[obj.id] = obj

    def _own(self, pt: Any, op: str) -> int:
        """The object id of ``pt``: an int as given, or a live handle of this iommufd."""
        if isinstance(pt, _Object):
            pt._check_open(op)
            if pt.ictx is not self:
                raise ValueError(f"{op}: {pt!r} belongs to another iommufd")
            return pt.id
        return pt

    # -- objects ------------------------------------------------------------------------

    def ioas_alloc(self) -> Ioas:
        cmd = _struct(u.iommu_ioas_alloc, "IOMMU_IOAS_ALLOC")
        self.ioctl(u.IOMMU_IOAS_ALLOC, cmd, "IOMMU_IOAS_ALLOC", IoasError)
        return Ioas(self, int(cmd.out_ioas_id))

    def hwpt_alloc(
        self,
        dev_id: int,
        pt: Ioas | int,
        *,
        dirty_tracking: bool = False,
        flags: int = 0,
    ) -> Hwpt:
        """IOMMU_HWPT_ALLOC of a paging HWPT for ``dev_id`` over the IOAS ``pt``."""
        pt_id = self._own(pt, "IOMMU_HWPT_ALLOC")
        if dirty_tracking:
            flags |= u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        cmd = _struct(
            u.iommu_hwpt_alloc, "IOMMU_HWPT_ALLOC", flags=flags, dev_id=dev_id, pt_id=pt_id
        )
        self.ioctl(u.IOMMU_HWPT_ALLOC, cmd, _flag_op("IOMMU_HWPT_ALLOC", flags), HwptError)
        return Hwpt(self, int(cmd.out_hwpt_id))

    def destroy(self, obj_id: int) -> None:
        """IOMMU_DESTROY of an id; a handle of this iommufd for it is retired with it."""
        cmd = _struct(u.iommu_destroy, "IOMMU_DESTROY", id=obj_id)
        self.ioctl(u.IOMMU_DESTROY, cmd, f"IOMMU_DESTROY({obj_id})")
        handle = self._handles.pop(int(cmd.id), None)
        if handle is not None:
            handle.closed = True

    def hw_info(self, dev_id: int, data_len: int = 256) -> HwInfo:
        """IOMMU_GET_HW_INFO for a bound device (its id from ``VfioDevice.bind``)."""
        op = "IOMMU_GET_HW_INFO"
        self._check_open(op)
        _struct(u.iommu_hw_info, op, dev_id=dev_id, data_len=data_len)  # before any mmap
        buf = self.scratch.get("hw_info", data_len)
        cmd = _struct(u.iommu_hw_info, op, dev_id=dev_id, data_len=data_len, data_uptr=buf.addr)
        self.ioctl(u.IOMMU_GET_HW_INFO, cmd, op)
        n = min(int(cmd.data_len), data_len)
        return HwInfo(
            data_type=int(cmd.out_data_type),
            capabilities=int(cmd.out_capabilities),
            max_pasid_log2=int(cmd.out_max_pasid_log2),
            data=buf.read(0, n),
        )

    def mmap(self, length: int, *, backed: bool = True) -> UserBuffer:
        """User memory on the same transport (to map into an IOAS)."""
        return call(VfioError, f"mmap({length!r})", self.transport.mmap, length, backed=backed)

    # -- lifetime -----------------------------------------------------------------------

    def _release(self) -> None:
        self.scratch.close()
        call(IommufdError, "close(iommufd)", self.transport.close, self.fd)

    def __repr__(self) -> str:
        return f"Iommufd({self.path!r}, fd={self.fd}{', closed' if self.closed else ''})"


class _Object(Resource):
    """An iommufd object: an id inside one Iommufd; ``destroy()`` / context manager.

    Once destroyed (or its iommufd closed) the handle refuses every operation with
    ClosedError: the id may already name a new object. A destroy the kernel refuses (EBUSY:
    a device or HWPT still uses it) leaves the handle usable, and can be retried."""

    _retry_release = True
    _closed_errno = ENOENT

    def __init__(self, ictx: Iommufd, obj_id: int) -> None:
        self.ictx = ictx
        self.id = obj_id
        ictx._adopt(self)

    def destroy(self) -> None:
        """IOMMU_DESTROY; a no-op once destroyed or after the iommufd was closed."""
        self.close()

    def _release(self) -> None:
        if not self.ictx.closed:  # closing the iommufd destroyed everything already
            self.ictx.destroy(self.id)

    def _check_open(self, op: str) -> None:
        if self.closed:
            raise ClosedError(ENOENT, op, f"{self!r} was destroyed")
        if self.ictx.closed:
            raise ClosedError(ENOENT, op, f"{self!r}: its iommufd is closed")

    def _ioctl(self, request: int, arg: Any, op: str, cls: type[VfioError]) -> int:
        self._check_open(op)
        return self.ictx.ioctl(request, arg, op, cls)

    def __repr__(self) -> str:
        gone = ", destroyed" if self.closed or self.ictx.closed else ""
        return f"{type(self).__name__}(id={self.id}{gone})"


class Ioas(_Object):
    """An IO address space: IOVA -> user memory mappings shared by its HWPTs."""

    def map(
        self,
        user: UserBuffer | int,
        length: int | None = None,
        *,
        iova: int | None = None,
        readable: bool = True,
        writeable: bool = True,
    ) -> int:
        """IOMMU_IOAS_MAP; returns the IOVA (chosen by the kernel when ``iova`` is None)."""
        self._check_open("IOMMU_IOAS_MAP")
        user_va, length = user_range(user, length, "length", "IOMMU_IOAS_MAP")
        cmd = _struct(
            u.iommu_ioas_map,
            "IOMMU_IOAS_MAP",
            flags=_map_flags(readable, writeable, fixed=iova is not None),
            ioas_id=self.id,
            user_va=user_va,
            length=length,
            iova=0 if iova is None else iova,
        )
        where = f"iova={cmd.iova:#x}" if iova is not None else "auto"
        op = f"IOMMU_IOAS_MAP({where}, {cmd.length:#x})"
        self._ioctl(u.IOMMU_IOAS_MAP, cmd, op, IoasError)
        return int(cmd.iova)

    def unmap(self, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP of whole areas inside ``[iova, iova+length)``; bytes unmapped."""
        return self._unmap(iova, length, "IOMMU_IOAS_UNMAP")

    def unmap_all(self) -> int:
        return self._unmap(0, U64_MAX, "IOMMU_IOAS_UNMAP(all)")

    def _unmap(self, iova: int, length: int, op: str) -> int:
        cmd = _struct(u.iommu_ioas_unmap, op, ioas_id=self.id, iova=iova, length=length)
        if op == "IOMMU_IOAS_UNMAP":
            op = f"IOMMU_IOAS_UNMAP({cmd.iova:#x}, {cmd.length:#x})"
        self._ioctl(u.IOMMU_IOAS_UNMAP, cmd, op, IoasError)
        return int(cmd.length)

    def copy(
        self,
        src_iova: int,
        length: int,
        *,
        dst: Ioas | None = None,
        dst_iova: int | None = None,
        readable: bool = True,
        writeable: bool = True,
    ) -> int:
        """IOMMU_IOAS_COPY of mapped pages of this IOAS into ``dst`` (default: this IOAS)."""
        self._check_open("IOMMU_IOAS_COPY")
        cmd = _struct(
            u.iommu_ioas_copy,
            "IOMMU_IOAS_COPY",
            flags=_map_flags(readable, writeable, fixed=dst_iova is not None),
            dst_ioas_id=self.ictx._own(dst if dst is not None else self, "IOMMU_IOAS_COPY"),
            src_ioas_id=self.id,
            length=length,
            dst_iova=0 if dst_iova is None else dst_iova,
            src_iova=src_iova,
        )
        op = f"IOMMU_IOAS_COPY({cmd.src_iova:#x}, {cmd.length:#x})"
        self._ioctl(u.IOMMU_IOAS_COPY, cmd, op, IoasError)
        return int(cmd.dst_iova)

    def iova_ranges(self) -> IovaRanges:
        """IOMMU_IOAS_IOVA_RANGES (grows its buffer and asks again on EMSGSIZE)."""
        op = "IOMMU_IOAS_IOVA_RANGES"
        self._check_open(op)
        rsize = ctypes.sizeof(u.iommu_iova_range)
        capacity = 8
        for _ in range(8):
            buf = self.ictx.scratch.get("iova_ranges", capacity * rsize)
            cmd = _struct(
                u.iommu_ioas_iova_ranges,
                op,
                ioas_id=self.id,
                num_iovas=capacity,
                allowed_iovas=buf.addr,
            )
            try:
                self._ioctl(u.IOMMU_IOAS_IOVA_RANGES, cmd, op, IoasError)
            except IoasError as e:
                if e.errno == EMSGSIZE and cmd.num_iovas > capacity:
                    capacity = int(cmd.num_iovas)
                    continue
                raise
            n = int(cmd.num_iovas)
            arr = (u.iommu_iova_range * n).from_buffer_copy(buf.read(0, n * rsize))
            return IovaRanges(
                tuple((int(r.start), int(r.last)) for r in arr), int(cmd.out_iova_alignment)
            )
        raise IoasError(EMSGSIZE, "IOMMU_IOAS_IOVA_RANGES", "the range list kept growing")

    def allow_iovas(self, ranges: Sequence[tuple[int, int]]) -> None:
        """IOMMU_IOAS_ALLOW_IOVAS: restrict automatic IOVAs to these inclusive ranges."""
        op = "IOMMU_IOAS_ALLOW_IOVAS"
        self._check_open(op)
        items = [
            fill(u.iommu_iova_range, op, start=s, last=last) for s, last in _pairs(ranges, op)
        ]
        _struct(u.iommu_ioas_allow_iovas, op, num_iovas=len(items))  # before any mmap
        arr = (u.iommu_iova_range * len(items))(*items)
        buf = self.ictx.scratch.get("allow_iovas", ctypes.sizeof(arr))
        if items:
            buf.write(bytes(arr))
        cmd = _struct(
            u.iommu_ioas_allow_iovas,
            op,
            ioas_id=self.id,
            num_iovas=len(items),
            allowed_iovas=buf.addr if items else 0,
        )
        self._ioctl(u.IOMMU_IOAS_ALLOW_IOVAS, cmd, op, IoasError)

    def set_huge_pages(self, enable: bool) -> None:
        """IOMMU_OPTION HUGE_PAGES: off forces 4 KiB IOPTEs (4 KiB dirty granularity)."""
        self._huge_pages_option(u.IOMMU_OPTION_OP_SET, "SET", int(enable))

    def huge_pages(self) -> bool:
        return bool(self._huge_pages_option(u.IOMMU_OPTION_OP_GET, "GET"))

    def _huge_pages_option(self, op: int, name: str, val64: int = 0) -> int:
        what = f"IOMMU_OPTION(HUGE_PAGES, {name})"
        cmd = _struct(
            u.iommu_option,
            what,
            option_id=u.IOMMU_OPTION_HUGE_PAGES,
            op=op,
            object_id=self.id,
            val64=val64,
        )
        self._ioctl(u.IOMMU_OPTION, cmd, what, IoasError)
        return int(cmd.val64)


class Hwpt(_Object):
    """A paging HW page table (``hwpt_paging``); dirty tracking when allocated with it."""

    def set_dirty_tracking(self, enable: bool) -> None:
        """IOMMU_HWPT_SET_DIRTY_TRACKING; enabling clears every dirty bit first."""
        flags = u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0
        op = f"IOMMU_HWPT_SET_DIRTY_TRACKING({'enable' if enable else 'disable'})"
        cmd = _struct(u.iommu_hwpt_set_dirty_tracking, op, flags=flags, hwpt_id=self.id)
        self._ioctl(u.IOMMU_HWPT_SET_DIRTY_TRACKING, cmd, op, HwptError)

    def get_dirty_bitmap(
        self, iova: int, length: int, page_size: int = 4096, *, no_clear: bool = False
    ) -> DirtyBitmap:
        """IOMMU_HWPT_GET_DIRTY_BITMAP of ``[iova, iova+length)`` (read-and-clear unless
        ``no_clear``). The kernel swallows walk errors: unmapped holes report clean.

        The buffer is sized as the kernel uses it (iova_bitmap_alloc: u64 words up to the
        bit of ``length - 1`` at ``__ffs(page_size)``), and the result's page size is that
        granule: a ``page_size`` that is not a power of two acts through its lowest bit."""
        op = "IOMMU_HWPT_GET_DIRTY_BITMAP"
        self._check_open(op)
        flags = u.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR if no_clear else 0
        cmd = _struct(
            u.iommu_hwpt_get_dirty_bitmap,
            op,
            hwpt_id=self.id,
            flags=flags,
            iova=iova,
            length=length,
            page_size=page_size,
        )
        iova, length, page_size = int(cmd.iova), int(cmd.length), int(cmd.page_size)
        # Requests iommufd_check_iova_range refuses before it touches the bitmap: the end
        # past 2^64 (EOVERFLOW), page_size 0, iova or end off the page_size mask (EINVAL).
        end = (iova + ((length - 1) & U64_MAX) + 1) & U64_MAX
        rejected = (
            iova + ((length - 1) & U64_MAX) > U64_MAX
            or page_size == 0
            or bool((iova | end) & (page_size - 1))
        )
        nbytes = 8 if rejected else iova_bitmap_bytes(length, page_size)
        check_bitmap_size(nbytes, length, page_size, rejected=rejected)
        buf = self.ictx.scratch.get("dirty_bitmap", nbytes)
        cmd.data = buf.addr
        op = f"{op}({iova:#x}, {length:#x}, {page_size:#x}"
        op += ", NO_CLEAR)" if no_clear else ")"
        self._ioctl(u.IOMMU_HWPT_GET_DIRTY_BITMAP, cmd, op, HwptError)
        return DirtyBitmap.from_words(iova, length, granule(page_size), buf.words(nbytes))


def _pairs(ranges: Sequence[tuple[int, int]], op: str) -> list[tuple[Any, Any]]:
    """``ranges`` as a list of 2-tuples (TypeError for anything else)."""
    out = []
    for r in ranges:
        try:
            a, b = r
        except (TypeError, ValueError):
            raise TypeError(f"{op}: each range must be a (start, last) pair, got {r!r}") from None
        out.append((a, b))
    return out


def _map_flags(readable: bool, writeable: bool, *, fixed: bool) -> int:
    """enum iommufd_ioas_map_flags, shared by IOMMU_IOAS_MAP and IOMMU_IOAS_COPY."""
    flags = u.IOMMU_IOAS_MAP_FIXED_IOVA if fixed else 0
    if readable:
        flags |= u.IOMMU_IOAS_MAP_READABLE
    if writeable:
        flags |= u.IOMMU_IOAS_MAP_WRITEABLE
    return flags


def _flag_op(name: str, flags: int) -> str:
    return f"{name}(flags={flags:#x})" if flags else name
