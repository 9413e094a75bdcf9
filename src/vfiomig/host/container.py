"""The legacy VFIO path: a ``Container`` (/dev/vfio/vfio) with the type1 IOMMU and its
``Group`` s (/dev/vfio/N), including type1's software dirty-page tracking.

    with Container(t) as c, Group(t, "/dev/vfio/7") as g:
        g.set_container(c)
        c.set_iommu()                       # VFIO_TYPE1v2_IOMMU
        c.map_dma(ram, iova=0)
        c.dirty_pages_start()
        bits = c.dirty_pages_bitmap(0, ram.length, c.iommu_info().min_page_size)
        with g.get_device("0000:65:00.1") as dev: ...

Type1 reports *every* mapped page dirty on every query while a device behind a real IOMMU is
attached; that is the reason iommufd dirty tracking exists.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from errno import E2BIG
from typing import Any

from vfiomig.host.bitmap import MAX_BITMAP_BYTES, DirtyBitmap, granule, type1_bitmap_bytes
from vfiomig.host.cstruct import fill, ulong_arg
from vfiomig.host.device import VfioDevice
from vfiomig.host.errors import ContainerError, GroupError, OpenError, VfioError, call
from vfiomig.host.memory import Scratch, UserBuffer, user_range
from vfiomig.host.resource import Resource
from vfiomig.host.transport import VFIO_CONTAINER_PATH, Transport
from vfiomig.uapi import vfio as v


@dataclass(frozen=True)
class MigrationCap:
    """VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION."""

    flags: int
    pgsize_bitmap: int
    max_dirty_bitmap_size: int


@dataclass(frozen=True)
class Type1Info:
    """VFIO_IOMMU_GET_INFO of a type1 container, capability chain parsed."""

    flags: int
    iova_pgsizes: int
    iova_ranges: tuple[tuple[int, int], ...] = ()
    migration: MigrationCap | None = None
    dma_avail: int | None = None
    caps: dict[int, bytes] = field(default_factory=dict)

    @property
    def min_page_size(self) -> int:
        p = self.iova_pgsizes
        return p & -p if p else 4096


class Container(Resource):
    """An open /dev/vfio/vfio; a context manager that closes it."""

    _owns_fd = True

    def __init__(self, transport: Transport, path: str = VFIO_CONTAINER_PATH) -> None:
        self.transport = transport
        self.path = path
        self.fd = call(OpenError, f"open({path})", transport.open, path, os.O_RDWR)
        self.scratch = Scratch(transport.mmap)

    def ioctl(self, request: int, arg: Any, op: str, cls: type[VfioError] = ContainerError) -> int:
        self._check_open(op)
        return call(cls, op, self.transport.ioctl, self.fd, request, arg)

    def api_version(self) -> int:
        return self.ioctl(v.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")

    def check_extension(self, extension: int) -> int:
        extension = ulong_arg("VFIO_CHECK_EXTENSION", "extension", extension)
        return self.ioctl(v.VFIO_CHECK_EXTENSION, extension, f"VFIO_CHECK_EXTENSION({extension})")

    def set_iommu(self, iommu_type: int = v.VFIO_TYPE1v2_IOMMU) -> None:
        """VFIO_SET_IOMMU (needs a group set on the container first)."""
        iommu_type = ulong_arg("VFIO_SET_IOMMU", "iommu_type", iommu_type)
        self.ioctl(v.VFIO_SET_IOMMU, iommu_type, f"VFIO_SET_IOMMU({iommu_type})")

    def iommu_info(self) -> Type1Info:
        """VFIO_IOMMU_GET_INFO, asking again with the argsz the kernel wants for its caps."""
        size = 512
        for _ in range(4):
            buf = bytearray(size)
            hdr = v.vfio_iommu_type1_info.from_buffer(buf)
            hdr.argsz = size
            self.ioctl(v.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
            hdr = v.vfio_iommu_type1_info.from_buffer_copy(
                buf[: ctypes.sizeof(v.vfio_iommu_type1_info)]
            )
            if hdr.argsz <= size:
                return _parse_type1_info(bytes(buf), hdr)
            size = int(hdr.argsz)
        raise ContainerError(E2BIG, "VFIO_IOMMU_GET_INFO", "argsz kept growing")

    def map_dma(
        self,
        user: UserBuffer | int,
        iova: int,
        size: int | None = None,
        *,
        readable: bool = True,
        writeable: bool = True,
    ) -> None:
        op = "VFIO_IOMMU_MAP_DMA"
        self._check_open(op)
        vaddr, size = user_range(user, size, "size", op)
        flags = (v.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (
            v.VFIO_DMA_MAP_FLAG_WRITE if writeable else 0
        )
        m = fill(
            v.vfio_iommu_type1_dma_map,
            op,
            argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        self.ioctl(v.VFIO_IOMMU_MAP_DMA, m, f"{op}({m.iova:#x}, {m.size:#x})")

    def unmap_dma(self, iova: int, size: int) -> int:
        """VFIO_IOMMU_UNMAP_DMA; returns bytes unmapped (0 for an empty range: success)."""
        fill(v.vfio_iommu_type1_dma_unmap, "VFIO_IOMMU_UNMAP_DMA", iova=iova, size=size)
        buf = v.unmap_dma_buffer(iova, size)
        self.ioctl(v.VFIO_IOMMU_UNMAP_DMA, buf, f"VFIO_IOMMU_UNMAP_DMA({iova:#x}, {size:#x})")
        return int(v.vfio_iommu_type1_dma_unmap.from_buffer(buf).size)

    def unmap_all(self) -> int:
        buf = v.unmap_dma_buffer(0, 0, v.VFIO_DMA_UNMAP_FLAG_ALL)
        self.ioctl(v.VFIO_IOMMU_UNMAP_DMA, buf, "VFIO_IOMMU_UNMAP_DMA(all)")
        return int(v.vfio_iommu_type1_dma_unmap.from_buffer(buf).size)

    def unmap_dma_dirty(self, iova: int, size: int, pgsize: int) -> tuple[int, DirtyBitmap]:
        """VFIO_IOMMU_UNMAP_DMA with GET_DIRTY_BITMAP: report, then unmap."""
        op = "VFIO_IOMMU_UNMAP_DMA(GET_DIRTY_BITMAP)"
        fill(v.vfio_iommu_type1_dma_unmap, op, iova=iova, size=size)
        bm, read = self._user_bitmap("unmap_bitmap", iova, size, pgsize, op)
        buf = v.unmap_dma_buffer(iova, size, v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, bm)
        op = f"VFIO_IOMMU_UNMAP_DMA({iova:#x}, {size:#x}, GET_DIRTY_BITMAP)"
        self.ioctl(v.VFIO_IOMMU_UNMAP_DMA, buf, op)
        return int(v.vfio_iommu_type1_dma_unmap.from_buffer(buf).size), read()

    def _user_bitmap(
        self, name: str, iova: int, size: int, pgsize: int, op: str
    ) -> tuple[v.vfio_bitmap, Callable[[], DirtyBitmap]]:
        """A struct vfio_bitmap over scratch user memory (``uapi.vfio.alloc_bitmap`` would put
        it in this process's heap, which the model kernel cannot reach), and a function that
        reads what the kernel wrote there. Its size is what type1 requires and writes
        (verify_bitmap_size: size >> __ffs(pgsize) bits in u64 words); type1 itself refuses
        a bitmap over MAX_BITMAP_BYTES (EINVAL) before writing it, so no more is mapped."""
        self._check_open(op)
        bm = fill(v.vfio_bitmap, op, pgsize=pgsize, size=0)
        pgsize = int(bm.pgsize)
        nbytes = type1_bitmap_bytes(size, pgsize) if pgsize else 8  # __ffs(0): EINVAL
        bm.size = nbytes
        mem = self.scratch.get(name, min(nbytes, MAX_BITMAP_BYTES))
        bm.data = ctypes.cast(mem.addr, ctypes.POINTER(ctypes.c_uint64))

        def read() -> DirtyBitmap:
            words = mem.words(min(nbytes, MAX_BITMAP_BYTES))
            return DirtyBitmap.from_words(iova, size, granule(pgsize), words)

        return bm, read

    def _dirty_pages(self, flags: int, op: str, get: Any = None) -> bytearray:
        buf = v.dirty_pages_buffer(flags, get)
        self.ioctl(v.VFIO_IOMMU_DIRTY_PAGES, buf, op)
        return buf

    def dirty_pages_start(self) -> None:
        self._dirty_pages(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START, "VFIO_IOMMU_DIRTY_PAGES(START)")

    def dirty_pages_stop(self) -> None:
        self._dirty_pages(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, "VFIO_IOMMU_DIRTY_PAGES(STOP)")

    def dirty_pages_bitmap(self, iova: int, size: int, pgsize: int) -> DirtyBitmap:
        """VFIO_IOMMU_DIRTY_PAGES GET_BITMAP (pgsize must be the container's minimum)."""
        op = "VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP)"
        get = fill(v.vfio_iommu_type1_dirty_bitmap_get, op, iova=iova, size=size)
        bm, read = self._user_bitmap("dirty_bitmap", iova, size, pgsize, op)
        get.bitmap = bm
        op = f"VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP, {iova:#x}, {size:#x}, {bm.pgsize:#x})"
        self._dirty_pages(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, op, get)
        return read()

    def _release(self) -> None:
        self.scratch.close()
        call(ContainerError, "close(container)", self.transport.close, self.fd)

    def __repr__(self) -> str:
        return f"Container({self.path!r}, fd={self.fd}{', closed' if self.closed else ''})"


class Group(Resource):
    """An open /dev/vfio/N; a context manager that closes it."""

    _owns_fd = True

    def __init__(self, transport: Transport, path: str) -> None:
        self.transport = transport
        self.path = path
        self.fd = call(OpenError, f"open({path})", transport.open, path, os.O_RDWR)

    def ioctl(self, request: int, arg: Any, op: str) -> int:
        self._check_open(op)
        return call(GroupError, op, self.transport.ioctl, self.fd, request, arg)

    def status(self) -> int:
        st = v.vfio_group_status(argsz=ctypes.sizeof(v.vfio_group_status))
        self.ioctl(v.VFIO_GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS")
        return int(st.flags)

    @property
    def viable(self) -> bool:
        return bool(self.status() & v.VFIO_GROUP_FLAGS_VIABLE)

    def set_container(self, container: Container) -> None:
        # The argument is a pointer to an int holding the container fd.
        if not isinstance(container, Container):
            raise TypeError(f"VFIO_GROUP_SET_CONTAINER: a Container, not {container!r}")
        container._check_open("VFIO_GROUP_SET_CONTAINER")  # its fd may be another file now
        fd = bytearray(struct.pack("=i", container.fd))
        self.ioctl(v.VFIO_GROUP_SET_CONTAINER, fd, "VFIO_GROUP_SET_CONTAINER")

    def unset_container(self) -> None:
        self.ioctl(v.VFIO_GROUP_UNSET_CONTAINER, 0, "VFIO_GROUP_UNSET_CONTAINER")

    def get_device(self, name: str) -> VfioDevice:
        """VFIO_GROUP_GET_DEVICE_FD by device name (a PCI address on Linux)."""
        if not isinstance(name, str):
            raise TypeError(f"VFIO_GROUP_GET_DEVICE_FD: name must be a str, got {name!r}")
        arg = bytearray(name.encode() + b"\0")
        fd = self.ioctl(v.VFIO_GROUP_GET_DEVICE_FD, arg, f"VFIO_GROUP_GET_DEVICE_FD({name})")
        return VfioDevice(self.transport, f"{self.path}:{name}", fd=fd)

    def _release(self) -> None:
        call(GroupError, "close(group)", self.transport.close, self.fd)

    def __repr__(self) -> str:
        return f"Group({self.path!r}, fd={self.fd}{', closed' if self.closed else ''})"


def _parse_type1_info(raw: bytes, hdr: v.vfio_iommu_type1_info) -> Type1Info:
    caps: dict[int, bytes] = {}
    ranges: list[tuple[int, int]] = []
    mig: MigrationCap | None = None
    avail: int | None = None
    hsize = ctypes.sizeof(v.vfio_info_cap_header)
    off = int(hdr.cap_offset) if hdr.flags & v.VFIO_IOMMU_INFO_CAPS else 0
    seen: set[int] = set()
    while off and off not in seen and off + hsize <= len(raw):
        seen.add(off)
        cap = v.vfio_info_cap_header.from_buffer_copy(raw, off)
        end = int(cap.next) if cap.next > off else len(raw)
        caps[int(cap.id)] = raw[off:end]
        if cap.id == v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            c = v.vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(raw, off)
            rs = ctypes.sizeof(v.vfio_iova_range)
            base = off + ctypes.sizeof(v.vfio_iommu_type1_info_cap_iova_range)
            for i in range(int(c.nr_iovas)):
                if base + (i + 1) * rs > len(raw):
                    break
                r = v.vfio_iova_range.from_buffer_copy(raw, base + i * rs)
                ranges.append((int(r.start), int(r.end)))
        elif cap.id == v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
            m = v.vfio_iommu_type1_info_cap_migration.from_buffer_copy(raw, off)
            mig = MigrationCap(int(m.flags), int(m.pgsize_bitmap), int(m.max_dirty_bitmap_size))
        elif cap.id == v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            avail = int(v.vfio_iommu_type1_info_dma_avail.from_buffer_copy(raw, off).avail)
        off = int(cap.next)
    return Type1Info(
        flags=int(hdr.flags),
        iova_pgsizes=int(hdr.iova_pgsizes),
        iova_ranges=tuple(ranges),
        migration=mig,
        dma_avail=avail,
        caps=caps,
    )
