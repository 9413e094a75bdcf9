"""The legacy VFIO type1 IOMMU backend (drivers/vfio/vfio_iommu_type1.c, Linux 7.2).

The container's IOMMU driver: user DMA mappings (`VfioDma`, struct vfio_dma) kept sorted by
IOVA, IOMMU domains for groups with a real IOMMU (one hardware domain from vfiomig.hw.iommu
shared by every such group, as type1 reuses a compatible domain), emulated groups (mdevs)
that reach memory by pinning pages and vfio_dma_rw, and type1's *software* dirty tracking.

Dirty pages the way type1 really reports them (vfio_iommu_type1.c):

* START gives every mapping a bitmap (one bit per smallest IOMMU page) pre-set with the pages
  emulated devices have pinned; mappings made while tracking start with a clean bitmap.
* vfio_pin_pages and vfio_dma_rw writes set bits.
* `num_non_pinned_groups` counts groups that can DMA behind type1's back: every group with a
  real IOMMU domain, until its driver first pins pages (pinned_page_dirty_scope). While there
  is one, every report marks every IOMMU-mapped page dirty (update_user_bitmap): type1 never
  reads hardware dirty bits, so a passthrough device makes the whole guest dirty each time.
* After a mapping is reported its bitmap is cleared and re-populated with the still-pinned
  pages: pinned pages are dirty on every report, dma_rw writes once.
* Detaching a group that was not pinned-scope while tracking marks every mapping fully dirty
  (vfio_iommu_populate_bitmap_full).
* The user bitmap is written in whole u64 words per mapping (update_user_bitmap): the
  mapping's bits shifted to their place, the first word OR-ed with what the user word held
  (when the mapping does not start on a word boundary), every later word overwritten,
  including the gap bits after the mapping up to the next word boundary.

Per-page state is numpy: a mapping's bitmap is a uint64 word array and every bitmap
operation is a slice or a vectorized shift; pinned pages are a dict per mapping (pinning is
at most VFIO_PIN_PAGES_MAX_ENTRIES pages a call).

Not modelled: RLIMIT_MEMLOCK accounting (the process may lock everything), VM_PFNMAP / MMIO
mappings, several IOMMU domains in one container (the model's IOMMU makes every domain
compatible, so there is at most one), no-snoop / cache coherency (all coherent).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from errno import (
    EACCES,
    EBUSY,
    EEXIST,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOSPC,
    ENOTTY,
    EOVERFLOW,
    EPERM,
)
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.io_pgtable import byte_parts
from vfiomig.hw.memory import PAGE_SIZE, TASK_SIZE_MAX
from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.bitops import __ffs as _ffs
from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.io_pagetable import Geometry
from vfiomig.kernel.iommufd.iommu_drivers import (
    IOMMU_RESV_DIRECT_RELAXABLE,
    ResvRegion,
    iommu_driver,
)
from vfiomig.kernel.uaccess import UserArg
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.hw.iommu import Domain
    from vfiomig.hw.memory import Memory
    from vfiomig.kernel.group import VfioGroup
    from vfiomig.kernel.machine import ModelKernel
    from vfiomig.kernel.vfio_main import VfioDevice

PAGE_MASK = U64_MAX & ~(PAGE_SIZE - 1)
INT_MAX = (1 << 31) - 1

IOMMU_READ = 1 << 0  # include/linux/iommu.h
IOMMU_WRITE = 1 << 1

# DIRTY_BITMAP_PAGES_MAX / DIRTY_BITMAP_SIZE_MAX: bitmap_set() takes an int bit count
DIRTY_BITMAP_PAGES_MAX = INT_MAX


def DIRTY_BITMAP_BYTES(n: int) -> int:  # noqa: N802 - the kernel macro's name
    """ALIGN(n, 64) / 8: bytes of a bitmap of n bits in whole u64 words."""
    return ((n + 63) // 64) * 8


DIRTY_BITMAP_SIZE_MAX = DIRTY_BITMAP_BYTES(DIRTY_BITMAP_PAGES_MAX)  # 256 MiB
DMA_ENTRY_LIMIT = 0xFFFF  # module parameter dma_entry_limit (U16_MAX)
# vfio_dma_do_unmap gives an emulated device this many notifications to unpin a mapping.
UNMAP_NOTIFY_RETRIES = 10

_MAP = struct.Struct("<IIQQQ")  # struct vfio_iommu_type1_dma_map
_UNMAP = struct.Struct("<IIQQ")  # struct vfio_iommu_type1_dma_unmap (header)
_BITMAP = struct.Struct("<QQQ")  # struct vfio_bitmap {pgsize, size, data}
_DIRTY = struct.Struct("<II")  # struct vfio_iommu_type1_dirty_bitmap (header)
_RANGE = struct.Struct("<QQ")  # struct vfio_iommu_type1_dirty_bitmap_get {iova, size, ...}
_INFO = struct.Struct("<IIQII")  # struct vfio_iommu_type1_info
_INFO_MINSZ = 16  # offsetofend(struct vfio_iommu_type1_info, iova_pgsizes)
_CAP_HDR = struct.Struct("<HHI")  # struct vfio_info_cap_header
_U64 = np.dtype("<u8")

_MAP_FLAGS = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE | v.VFIO_DMA_MAP_FLAG_VADDR
_UNMAP_FLAGS = (
    v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | v.VFIO_DMA_UNMAP_FLAG_VADDR | v.VFIO_DMA_UNMAP_FLAG_ALL
)
_DIRTY_FLAGS = (
    v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START
    | v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
    | v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
)


def _pgshift_of(pgsize: int) -> int:
    """__ffs(bitmap.pgsize). __ffs(0) is undefined in the kernel; the model says EINVAL."""
    if pgsize == 0:
        raise err(EINVAL)
    return _ffs(pgsize)


def access_ok(addr: int, size: int) -> bool:
    """access_ok(): the range lies below TASK_SIZE_MAX (hw/memory.py; mapped or not)."""
    return 0 <= addr and addr + size <= TASK_SIZE_MAX


def verify_bitmap_size(npages: int, bitmap_size: int) -> None:
    if (
        not npages
        or not bitmap_size
        or bitmap_size > DIRTY_BITMAP_SIZE_MAX
        or bitmap_size < DIRTY_BITMAP_BYTES(npages)
    ):
        raise err(EINVAL)


# ---------------------------------------------------------------------------------------
# bitmaps of u64 words, bit i of the map = bit i % 64 of word i // 64 (lib/bitmap.c)


def bitmap_zalloc(nbits: int) -> npt.NDArray[np.uint64]:
    """vfio_dma_bitmap_alloc: DIRTY_BITMAP_BYTES(nbits) plus one spare u64 for the shift."""
    return np.zeros(DIRTY_BITMAP_BYTES(nbits) // 8 + 1, dtype=_U64)


def _bitmap_range(bm: npt.NDArray[np.uint64], start: int, n: int, value: bool) -> None:
    """Bits [start, start + n) of the little-endian words, through their bytes: the same
    head byte / whole bytes / tail byte split the hw's packed bits use (byte_parts)."""
    if n <= 0:
        return
    b = bm.view(np.uint8)
    for sl, m in byte_parts(start, start + n):
        if m == 0xFF:
            b[sl] = 0xFF if value else 0
        elif value:
            b[sl] |= m
        else:
            b[sl] &= ~m & 0xFF


def bitmap_set(bm: npt.NDArray[np.uint64], start: int, n: int) -> None:
    """bitmap_set(bm, start, n)."""
    _bitmap_range(bm, start, n, True)


def bitmap_clear(bm: npt.NDArray[np.uint64], start: int, n: int) -> None:
    """bitmap_clear(bm, start, n)."""
    _bitmap_range(bm, start, n, False)


def bitmap_set_bits(bm: npt.NDArray[np.uint64], bits: npt.NDArray[np.int64]) -> None:
    """bitmap_set(bm, b, 1) for every b in `bits`, at once."""
    if bits.size:
        np.bitwise_or.at(bm, bits >> 6, np.left_shift(np.uint64(1), (bits & 63).astype(_U64)))


# ---------------------------------------------------------------------------------------
# struct vfio_dma, vfio_domain, vfio_iommu_group


@dataclass
class VfioDma:
    """struct vfio_dma: one VFIO_IOMMU_MAP_DMA mapping."""

    iova: int
    vaddr: int
    size: int
    prot: int  # IOMMU_READ | IOMMU_WRITE
    iommu_mapped: bool = False  # pinned and in the IOMMU domain(s)
    vaddr_invalid: bool = False  # VFIO_DMA_UNMAP_FLAG_VADDR until MAP_FLAG_VADDR
    pfns: dict[int, int] = field(default_factory=dict)  # pfn_list: pinned iova -> ref_count
    bitmap: npt.NDArray[np.uint64] | None = None  # while dirty tracking is on

    @property
    def last(self) -> int:
        """dma->iova + dma->size - 1: the last byte (the end may be 2**64)."""
        return self.iova + self.size - 1


@dataclass
class VfioIommuGroup:
    """struct vfio_iommu_group."""

    group: VfioGroup
    pinned_page_dirty_scope: bool


@dataclass
class VfioDomain:
    """struct vfio_domain: a hardware IOMMU domain and the groups attached to it."""

    domain: Domain
    groups: list[VfioIommuGroup] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# the hardware beneath (vfiomig.hw.iommu)


def _hw_devices(group: VfioGroup) -> list[Any]:
    return [d.hw for d in group.devices if d.hw is not None]


def _hw_attach(domain: Domain, group: VfioGroup) -> None:
    """iommu_attach_group: the devices' DMA is translated by `domain` from now on."""
    for hw in _hw_devices(group):
        domain.attach(hw)
        hw.domain = domain


def _hw_detach(domain: Domain, group: VfioGroup) -> None:
    """iommu_detach_group: back to blocked DMA (the group still owns DMA, nothing maps)."""
    for hw in _hw_devices(group):
        if domain.attached(hw):
            domain.detach(hw)
        if hw.domain is domain:
            hw.domain = None


def _hw_map(domain: Domain, dma: VfioDma) -> None:
    """iommu_map of the pinned range, with huge leaves where alignment allows (type1 maps
    physically contiguous runs; the model's memory stands for hugepage-backed guests)."""
    domain.map(
        dma.iova,
        dma.vaddr,
        dma.size,
        read=bool(dma.prot & IOMMU_READ),
        write=bool(dma.prot & IOMMU_WRITE),
        huge=True,
    )


# ---------------------------------------------------------------------------------------
# the backend's module-level entry points


def vfio_iommu_type1_check_extension(iommu: VfioIommuType1 | None, arg: int) -> int:
    if arg in (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU, v.VFIO_UNMAP_ALL):
        return 1
    if arg == v.VFIO_UPDATE_VADDR:
        # mdevs cannot pin/unpin/rw while vaddrs are being updated
        return int(iommu is not None and not iommu.emulated_groups)
    if arg == v.VFIO_DMA_CC_IOMMU:
        return 0 if iommu is None else 1  # every modelled domain enforces coherency
    return 0


def vfio_iommu_type1_open(kernel: ModelKernel, arg: int) -> VfioIommuType1:
    if arg == v.VFIO_TYPE1_IOMMU:
        return VfioIommuType1(kernel, v2=False)
    if arg in (v.VFIO_TYPE1v2_IOMMU, v.__VFIO_RESERVED_TYPE1_NESTING_IOMMU):
        return VfioIommuType1(kernel, v2=True)
    raise err(EINVAL)


class VfioIommuType1:
    """struct vfio_iommu and its ops."""

    def __init__(self, kernel: ModelKernel, v2: bool) -> None:
        self.kernel = kernel
        self.v2 = v2
        self.domains: list[VfioDomain] = []  # domain_list
        self.emulated_groups: list[VfioIommuGroup] = []
        self.iova_list: list[tuple[int, int]] = []  # valid IOVA ranges, inclusive
        self.dmas: list[VfioDma] = []  # dma_list, sorted by iova
        self._starts: list[int] = []
        self.device_list: list[VfioDevice] = []  # emulated devices with ops->dma_unmap
        self.dma_avail = DMA_ENTRY_LIMIT
        self.vaddr_invalid_count = 0
        self.pgsize_bitmap = PAGE_MASK
        self.num_non_pinned_groups = 0
        self.dirty_page_tracking = False

    @property
    def mm(self) -> Memory:
        return self.kernel.mm

    @property
    def pgsize(self) -> int:
        """The smallest IOMMU page size: the map alignment and the dirty bitmap's page."""
        return 1 << _ffs(self.pgsize_bitmap)

    # -- the dma tree ---------------------------------------------------------------

    def find_dma(self, start: int, size: int) -> VfioDma | None:
        """vfio_find_dma: a mapping overlapping [start, start + size - 1]."""
        last = start + max(size, 1) - 1
        i = bisect.bisect_right(self._starts, last) - 1
        if i >= 0 and self.dmas[i].last >= start:
            return self.dmas[i]
        return None

    def _first_index(self, start: int, last: int) -> int | None:
        """vfio_find_dma_first_node: index of the first mapping overlapping [start, last]."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self.dmas[i].last < start:
            i += 1
        if i < len(self.dmas) and self.dmas[i].iova <= last:
            return i
        return None

    def _link_dma(self, dma: VfioDma) -> None:
        i = bisect.bisect_right(self._starts, dma.iova)
        self._starts.insert(i, dma.iova)
        self.dmas.insert(i, dma)

    def _unlink_dma(self, dma: VfioDma) -> None:
        i = bisect.bisect_left(self._starts, dma.iova)
        assert self.dmas[i] is dma
        del self._starts[i]
        del self.dmas[i]

    # -- pinning, mapping, removing ---------------------------------------------------

    def _pin_map(self, dma: VfioDma, domains: list[VfioDomain]) -> None:
        """vfio_pin_map_dma / the replay: pin the user pages and map them in `domains`.
        Pinning an address the process has not mapped fails as pin_user_pages: EFAULT
        (also a kernel address past TASK_SIZE_MAX: access_ok)."""
        if not access_ok(dma.vaddr, dma.size) or not self.mm.contains(dma.vaddr, dma.size):
            raise err(EFAULT)
        for d in domains:
            _hw_map(d.domain, dma)
        dma.iommu_mapped = True

    def _unmap_unpin(self, dma: VfioDma) -> None:
        """vfio_unmap_unpin: out of every domain (the IOTLB is flushed by the unmap)."""
        if dma.iommu_mapped:
            for d in self.domains:
                d.domain.unmap(dma.iova, dma.size)
        dma.iommu_mapped = False

    def _remove_dma(self, dma: VfioDma) -> None:
        """vfio_remove_dma."""
        if dma.pfns:  # WARN_ON(!RB_EMPTY_ROOT(&dma->pfn_list))
            self._warn(f"vfio_remove_dma: iova {dma.iova:#x} still has pinned pages")
            dma.pfns.clear()
        self._unmap_unpin(dma)
        self._unlink_dma(dma)
        dma.bitmap = None
        if dma.vaddr_invalid:
            self.vaddr_invalid_count -= 1
        self.dma_avail += 1

    def _unmap_unpin_all(self) -> None:
        for dma in list(self.dmas):
            self._remove_dma(dma)

    def _warn(self, msg: str) -> None:
        for dev in self.device_list or [d for g in self._all_groups() for d in g.group.devices]:
            dev.warn(msg)

    # -- groups -----------------------------------------------------------------------

    def _all_groups(self) -> list[VfioIommuGroup]:
        return [g for d in self.domains for g in d.groups] + self.emulated_groups

    def _find_group(self, group: VfioGroup) -> VfioIommuGroup | None:
        """vfio_iommu_find_iommu_group."""
        return next((g for g in self._all_groups() if g.group is group), None)

    def attach_group(self, group: VfioGroup) -> None:
        """vfio_iommu_type1_attach_group."""
        from vfiomig.kernel.group import VFIO_EMULATED_IOMMU

        if self.vaddr_invalid_count:
            raise err(EBUSY)  # attach may need to pin
        if self._find_group(group) is not None:
            raise err(EINVAL)
        if group.type == VFIO_EMULATED_IOMMU:
            # It can only dirty memory through interfaces that track it.
            self.emulated_groups.insert(0, VfioIommuGroup(group, True))
            return
        # An IOMMU-backed group: join the existing (always compatible) domain, or get a
        # new one and replay every mapping into it.
        if self.domains:
            vdom, new = self.domains[0], False
        else:
            vdom, new = VfioDomain(self.kernel.iommu.domain_alloc(dirty_tracking=False)), True
        # What the IOMMU driver says of the domain and the group (iommufd's source too):
        # domain->geometry and iommu_get_group_resv_regions().
        driver = iommu_driver(self.kernel)
        start, end = driver.aperture.aperture_start, driver.aperture.aperture_end
        if self._aper_conflict(start, end):
            raise err(EINVAL)
        resv = driver.resv_regions
        if self._resv_conflict(resv):
            raise err(EINVAL)
        iova_copy = _iova_resv_exclude(_iova_aper_resize(list(self.iova_list), start, end), resv)
        if new:
            done: list[VfioDma] = []
            try:
                for dma in self.dmas:  # vfio_iommu_replay
                    if not dma.iommu_mapped:
                        self._pin_map(dma, [vdom])
                        done.append(dma)
            except OSError:
                for dma in done:  # unwind
                    vdom.domain.unmap(dma.iova, dma.size)
                    dma.iommu_mapped = False
                raise
        _hw_attach(vdom.domain, group)
        vdom.groups.insert(0, VfioIommuGroup(group, False))
        if new:
            self.domains.insert(0, vdom)
            self._update_pgsize_bitmap()
        self.iova_list = iova_copy
        # It can dirty memory directly: demote the scope until it pins pages.
        self.num_non_pinned_groups += 1

    def detach_group(self, group: VfioGroup) -> None:
        """vfio_iommu_type1_detach_group."""
        update_dirty_scope = False
        for g in self.emulated_groups:
            if g.group is group:
                update_dirty_scope = not g.pinned_page_dirty_scope
                self.emulated_groups.remove(g)
                if not self.emulated_groups and not self.domains:
                    self._unmap_unpin_all()
                break
        else:
            iova_copy = list(self.iova_list)
            for vdom in self.domains:
                g2 = next((x for x in vdom.groups if x.group is group), None)
                if g2 is None:
                    continue
                _hw_detach(vdom.domain, group)
                update_dirty_scope = not g2.pinned_page_dirty_scope
                vdom.groups.remove(g2)
                if not vdom.groups:
                    if len(self.domains) == 1:
                        if not self.emulated_groups:
                            self._unmap_unpin_all()
                        else:  # vfio_iommu_unmap_unpin_reaccount
                            for dma in self.dmas:
                                self._unmap_unpin(dma)
                    self.domains.remove(vdom)
                    iova_copy = self._aper_expand(iova_copy)
                    self._update_pgsize_bitmap()
                break
            refreshed = self._resv_refresh(iova_copy)
            if refreshed is not None:
                self.iova_list = refreshed
        if update_dirty_scope:
            # Removing a group without dirty tracking may promote the scope, but what it
            # may have written is unknown: everything is dirty.
            self.num_non_pinned_groups -= 1
            if self.dirty_page_tracking:
                self._populate_bitmap_full()

    def release(self) -> None:
        """vfio_iommu_type1_release: the container lost its last group."""
        self.emulated_groups.clear()
        self._unmap_unpin_all()
        for vdom in self.domains:
            for g in vdom.groups:
                _hw_detach(vdom.domain, g.group)
        self.domains.clear()
        self.iova_list.clear()

    def register_device(self, device: VfioDevice) -> None:
        """vfio_iommu_type1_register_device: only devices with ops->dma_unmap."""
        if callable(getattr(device, "dma_unmap", None)) and device not in self.device_list:
            self.device_list.insert(0, device)

    def unregister_device(self, device: VfioDevice) -> None:
        if device in self.device_list:
            self.device_list.remove(device)

    def _update_pgsize_bitmap(self) -> None:
        """vfio_update_pgsize_bitmap: sizes every domain supports, never below PAGE_SIZE."""
        bm = U64_MAX
        for d in self.domains:
            bm &= int(d.domain.pgsize_bitmap)
        if bm & ~PAGE_MASK:
            bm = (bm & PAGE_MASK) | PAGE_SIZE
        self.pgsize_bitmap = bm

    # -- the valid IOVA list -----------------------------------------------------------

    def _aper_conflict(self, start: int, end: int) -> bool:
        """vfio_iommu_aper_conflict."""
        if not self.iova_list:
            return False
        first, last = self.iova_list[0], self.iova_list[-1]
        if start > last[1] or end < first[0]:
            return True
        if start > first[0] and self.find_dma(first[0], start - first[0]):
            return True
        return end < last[1] and self.find_dma(end + 1, last[1] - end) is not None

    def _resv_conflict(self, resv: tuple[ResvRegion, ...]) -> bool:
        return any(
            t != IOMMU_RESV_DIRECT_RELAXABLE and self.find_dma(s, n) is not None for s, n, t in resv
        )

    def _aper_expand(self, iova_copy: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """vfio_iommu_aper_expand: the smallest aperture of the remaining domains."""
        if not iova_copy:
            return iova_copy
        geo = iommu_driver(self.kernel).aperture if self.domains else Geometry()  # all of it
        out = list(iova_copy)
        out[0] = (geo.aperture_start, out[0][1])
        out[-1] = (out[-1][0], geo.aperture_end)
        return out

    def _resv_refresh(self, iova_copy: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """vfio_iommu_resv_refresh: rebuild from the aperture and the remaining groups'
        reserved regions; None (keep the old list) when there is nothing to refresh."""
        if not iova_copy:
            return None
        # Every remaining IOMMU-backed group brings its vendor's regions (a domain in the
        # list always has a group).
        resv = iommu_driver(self.kernel).resv_regions if self.domains else ()
        fresh = _iova_aper_resize([], iova_copy[0][0], iova_copy[-1][1])
        try:
            return _iova_resv_exclude(fresh, resv)
        except OSError:
            return None

    # -- ioctls -----------------------------------------------------------------------

    def check_extension(self, arg: int) -> int:
        return vfio_iommu_type1_check_extension(self, arg)

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        """vfio_iommu_type1_ioctl."""
        if cmd == v.VFIO_CHECK_EXTENSION:
            return self.check_extension(arg & U64_MAX if isinstance(arg, int) else U64_MAX)
        handler = {
            v.VFIO_IOMMU_GET_INFO: self.ioctl_get_info,
            v.VFIO_IOMMU_MAP_DMA: self.ioctl_map_dma,
            v.VFIO_IOMMU_UNMAP_DMA: self.ioctl_unmap_dma,
            v.VFIO_IOMMU_DIRTY_PAGES: self.ioctl_dirty_pages,
        }.get(cmd)
        if handler is None:
            raise err(ENOTTY)
        if isinstance(arg, int):
            raise err(EFAULT)  # copy_from_user through a non-pointer
        return handler(arg)

    # VFIO_IOMMU_GET_INFO

    def _build_caps(self) -> list[bytes]:
        """The capability chain, in the order vfio_iommu_type1_get_info builds it."""
        caps = [
            # vfio_iommu_migration_build_caps: only the smallest page size is supported
            _CAP_HDR.pack(v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1, 0)
            + struct.pack("<I4xQQ", 0, self.pgsize, DIRTY_BITMAP_SIZE_MAX),
            # vfio_iommu_dma_avail_build_caps
            _CAP_HDR.pack(v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 0)
            + struct.pack("<I", self.dma_avail),
        ]
        if self.iova_list:  # an emulated-only container has none
            body = struct.pack("<II", len(self.iova_list), 0) + b"".join(
                struct.pack("<QQ", s, e) for s, e in self.iova_list
            )
            caps.append(_CAP_HDR.pack(v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0) + body)
        return [c.ljust((len(c) + 7) & ~7, b"\0") for c in caps]  # vfio_info_cap_add ALIGN

    def ioctl_get_info(self, arg: UserArg) -> int:
        argsz, _, _ = struct.unpack("<IIQ", arg.read(0, _INFO_MINSZ))
        if argsz < _INFO_MINSZ:
            raise err(EINVAL)
        info_size = _INFO.size
        minsz = min(argsz, info_size)
        caps = self._build_caps()
        caps_size = sum(len(c) for c in caps)
        flags = v.VFIO_IOMMU_INFO_PGSIZES | v.VFIO_IOMMU_INFO_CAPS
        cap_offset = 0
        out_argsz = argsz
        if argsz < info_size + caps_size:
            out_argsz = info_size + caps_size  # tell the user how much to allocate
        else:
            chain = bytearray()
            for i, c in enumerate(caps):  # vfio_info_cap_shift: next is from the info start
                nxt = info_size + len(chain) + len(c) if i + 1 < len(caps) else 0
                chain += c[:4] + struct.pack("<I", nxt) + c[8:]
            arg.write(info_size, chain)
            cap_offset = info_size
        info = _INFO.pack(out_argsz, flags, self.pgsize_bitmap, cap_offset, 0)
        arg.write(0, info[:minsz])
        return 0

    # VFIO_IOMMU_MAP_DMA

    def ioctl_map_dma(self, arg: UserArg) -> int:
        """vfio_iommu_type1_map_dma."""
        argsz, flags, vaddr, iova, size = _MAP.unpack(arg.read(0, _MAP.size))
        if argsz < _MAP.size or flags & ~_MAP_FLAGS:
            raise err(EINVAL)
        self.do_map(flags, vaddr, iova, size)
        return 0

    def do_map(self, flags: int, vaddr: int, iova: int, size: int) -> None:
        """vfio_dma_do_map (with 6.18's check_add_overflow: a wrap is EOVERFLOW)."""
        set_vaddr = bool(flags & v.VFIO_DMA_MAP_FLAG_VADDR)
        if not size:
            raise err(EINVAL)
        if iova + size - 1 > U64_MAX or vaddr + size - 1 > U64_MAX:
            raise err(EOVERFLOW)
        prot = (IOMMU_WRITE if flags & v.VFIO_DMA_MAP_FLAG_WRITE else 0) | (
            IOMMU_READ if flags & v.VFIO_DMA_MAP_FLAG_READ else 0
        )
        if bool(prot) == set_vaddr:
            raise err(EINVAL)
        if (size | iova | vaddr) & (self.pgsize - 1):
            raise err(EINVAL)
        dma = self.find_dma(iova, size)
        if set_vaddr:
            if dma is None:
                raise err(ENOENT)
            if not dma.vaddr_invalid or dma.iova != iova or dma.size != size:
                raise err(EINVAL)
            dma.vaddr = vaddr
            dma.vaddr_invalid = False
            self.vaddr_invalid_count -= 1
            return
        if dma is not None:
            raise err(EEXIST)
        if not self.dma_avail:
            raise err(ENOSPC)
        if not self._iova_dma_valid(iova, iova + size - 1):
            raise err(EINVAL)
        dma = VfioDma(iova=iova, vaddr=vaddr, size=size, prot=prot)
        if self.domains:  # only a container with an IOMMU domain pins and maps now
            self._pin_map(dma, self.domains)
        if self.dirty_page_tracking:
            if size // self.pgsize > DIRTY_BITMAP_PAGES_MAX:
                self._unmap_unpin(dma)
                raise err(EINVAL)
            dma.bitmap = bitmap_zalloc(size // self.pgsize)
        self.dma_avail -= 1
        self._link_dma(dma)

    def _iova_dma_valid(self, start: int, end: int) -> bool:
        """vfio_iommu_iova_dma_valid: inside one valid range, or no list at all."""
        if not self.iova_list:
            return True
        return any(s <= start and end <= e for s, e in self.iova_list)

    # VFIO_IOMMU_UNMAP_DMA

    def ioctl_unmap_dma(self, arg: UserArg) -> int:
        """vfio_iommu_type1_unmap_dma."""
        argsz, flags, iova, size = _UNMAP.unpack(arg.read(0, _UNMAP.size))
        if argsz < _UNMAP.size or flags & ~_UNMAP_FLAGS:
            raise err(EINVAL)
        get_dirty = bool(flags & v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
        if get_dirty and flags & (v.VFIO_DMA_UNMAP_FLAG_ALL | v.VFIO_DMA_UNMAP_FLAG_VADDR):
            raise err(EINVAL)
        bitmap: tuple[int, int, int] | None = None
        if get_dirty:
            if argsz < _UNMAP.size + _BITMAP.size:
                raise err(EINVAL)
            pgsize, bsize, data = _BITMAP.unpack(arg.read(_UNMAP.size, _BITMAP.size))
            if not access_ok(data, bsize):
                raise err(EINVAL)
            verify_bitmap_size(size >> _pgshift_of(pgsize), bsize)
            bitmap = (pgsize, bsize, data)
        unmapped = self.do_unmap(flags, iova, size, bitmap)
        arg.write(0, _UNMAP.pack(argsz, flags, iova, unmapped))
        return 0

    def do_unmap(
        self, flags: int, iova: int, size: int, bitmap: tuple[int, int, int] | None
    ) -> int:
        """vfio_dma_do_unmap: returns the bytes unmapped (written back only on success)."""
        unmap_all = bool(flags & v.VFIO_DMA_UNMAP_FLAG_ALL)
        invalidate_vaddr = bool(flags & v.VFIO_DMA_UNMAP_FLAG_VADDR)
        if invalidate_vaddr and self.emulated_groups:
            raise err(EBUSY)  # cannot update vaddr while an mdev is present
        pgsize = self.pgsize
        if iova & (pgsize - 1):
            raise err(EINVAL)
        if unmap_all:
            if iova or size:
                raise err(EINVAL)
            last = U64_MAX
        else:
            if not size or size & (pgsize - 1):
                raise err(EINVAL)
            last = iova + size - 1
            if last > U64_MAX:
                raise err(EOVERFLOW)
        if bitmap is not None and (not self.dirty_page_tracking or bitmap[0] != pgsize):
            raise err(EINVAL)  # only the smallest page size, only while tracking

        unmapped = 0
        dma_last: VfioDma | None = None
        retries = 0
        while True:  # "again:"
            if self.v2 and not unmap_all:
                # v2: the range must not bisect a mapping
                dma = self.find_dma(iova, 1)
                if dma is not None and dma.iova != iova:
                    raise err(EINVAL)
                dma = self.find_dma(last, 1)
                if dma is not None and dma.last != last:
                    raise err(EINVAL)
            i = self._first_index(iova, last)
            first_i = i
            restart = False
            while i is not None and i < len(self.dmas):
                dma = self.dmas[i]
                if dma.iova > last:
                    break
                if not self.v2 and iova > dma.iova:
                    break  # v1: a request inside a mapping unmaps nothing (size 0)
                if invalidate_vaddr:
                    if dma.vaddr_invalid:
                        assert first_i is not None
                        for undo in self.dmas[first_i:i]:  # roll this call back
                            undo.vaddr_invalid = False
                            self.vaddr_invalid_count -= 1
                        raise err(EINVAL)
                    dma.vaddr_invalid = True
                    self.vaddr_invalid_count += 1
                    unmapped += dma.size
                    i += 1
                    continue
                if dma.pfns:
                    # An emulated device pins pages here: ask it to unpin, then start over.
                    if dma_last is dma:
                        retries += 1
                    else:
                        dma_last, retries = dma, 0
                    if retries > UNMAP_NOTIFY_RETRIES:
                        # The kernel BUG()s here; the model drops the pins and says so.
                        self._warn(f"vfio_dma_do_unmap: pins at {dma.iova:#x} never released")
                        dma.pfns.clear()
                    else:
                        self._notify_dma_unmap(dma)
                    restart = True
                    break
                if bitmap is not None:
                    self._update_user_bitmap(bitmap[2], dma, iova, pgsize)
                unmapped += dma.size
                self._remove_dma(dma)  # the next mapping slides to index i
            if not restart:
                return unmapped

    def _notify_dma_unmap(self, dma: VfioDma) -> None:
        """vfio_notify_dma_unmap: every registered device must unpin in the range."""
        for dev in list(self.device_list):
            getattr(dev, "dma_unmap")(dma.iova, dma.size)  # noqa: B009 - an optional op

    # VFIO_IOMMU_DIRTY_PAGES

    def ioctl_dirty_pages(self, arg: UserArg) -> int:
        """vfio_iommu_type1_dirty_pages."""
        if not self.v2:
            raise err(EACCES)
        argsz, flags = _DIRTY.unpack(arg.read(0, _DIRTY.size))
        if argsz < _DIRTY.size or flags & ~_DIRTY_FLAGS:
            raise err(EINVAL)
        if flags == 0 or flags & (flags - 1):
            raise err(EINVAL)  # exactly one flag (__ffs(flags) != __fls(flags))
        if flags & v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START:
            if not self.dirty_page_tracking:
                self._dma_bitmap_alloc_all()
                self.dirty_page_tracking = True
            return 0
        if flags & v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP:
            if self.dirty_page_tracking:
                self.dirty_page_tracking = False
                for dma in self.dmas:
                    dma.bitmap = None
            return 0
        # GET_BITMAP
        data_size = argsz - _DIRTY.size
        if data_size < _RANGE.size + _BITMAP.size:
            raise err(EINVAL)
        raw = arg.read(_DIRTY.size, _RANGE.size + _BITMAP.size)
        iova, size = _RANGE.unpack_from(raw)
        pgsize, bsize, data = _BITMAP.unpack_from(raw, _RANGE.size)
        if not size:
            raise err(EINVAL)
        last = iova + size - 1
        if last > U64_MAX:
            raise err(EOVERFLOW)
        if not access_ok(data, bsize):
            raise err(EINVAL)
        verify_bitmap_size(size >> _pgshift_of(pgsize), bsize)
        iommu_pgsize = self.pgsize
        if pgsize != iommu_pgsize or iova & (iommu_pgsize - 1) or size & (iommu_pgsize - 1):
            raise err(EINVAL)
        if not self.dirty_page_tracking:
            raise err(EINVAL)
        self._iova_dirty_bitmap(data, iova, last, pgsize)
        return 0

    def _dma_bitmap_alloc_all(self) -> None:
        """vfio_dma_bitmap_alloc_all: a bitmap per mapping, pre-set with pinned pages."""
        pgsize = self.pgsize
        for n, dma in enumerate(self.dmas):
            if dma.size // pgsize > DIRTY_BITMAP_PAGES_MAX:
                for prev in self.dmas[:n]:
                    prev.bitmap = None
                raise err(EINVAL)
            dma.bitmap = bitmap_zalloc(dma.size // pgsize)
            self._populate_bitmap(dma)

    def _populate_bitmap(self, dma: VfioDma) -> None:
        """vfio_dma_populate_bitmap: a bit per pinned page."""
        if dma.pfns and dma.bitmap is not None:
            pinned = np.fromiter(dma.pfns, dtype=np.int64, count=len(dma.pfns))
            bitmap_set_bits(dma.bitmap, (pinned - dma.iova) >> _ffs(self.pgsize))

    def _populate_bitmap_full(self) -> None:
        """vfio_iommu_populate_bitmap_full."""
        shift = _ffs(self.pgsize_bitmap)
        for dma in self.dmas:
            if dma.bitmap is not None:
                bitmap_set(dma.bitmap, 0, dma.size >> shift)

    def _iova_dirty_bitmap(self, ubitmap: int, iova: int, last: int, pgsize: int) -> None:
        """vfio_iova_dirty_bitmap: the range must not bisect a mapping."""
        dma = self.find_dma(iova, 1)
        if dma is not None and dma.iova != iova:
            raise err(EINVAL)
        dma = self.find_dma(last, 1)
        if dma is not None and dma.last != last:
            raise err(EINVAL)
        pgshift = _ffs(pgsize)
        i = self._first_index(iova, last)
        for dma in self.dmas[i:] if i is not None else []:
            if dma.iova > last:
                break
            self._update_user_bitmap(ubitmap, dma, iova, pgsize)
            # Re-populate: pinned pages stay dirty, dma_rw writes and unpinned pages go.
            assert dma.bitmap is not None
            bitmap_clear(dma.bitmap, 0, dma.size >> pgshift)
            self._populate_bitmap(dma)

    def _update_user_bitmap(self, ubitmap: int, dma: VfioDma, base_iova: int, pgsize: int) -> None:
        """update_user_bitmap: whole u64 words of the mapping's bits into the user bitmap.

        The mapping's bitmap is shifted in place to its bit position within the first
        word, that first word is OR-ed with what the user already had there (the words of
        an earlier mapping), and DIRTY_BITMAP_BYTES(nbits + shift) bytes are copied out.
        """
        bm = dma.bitmap
        assert bm is not None
        pgshift = _ffs(pgsize)
        nbits = dma.size >> pgshift
        bit_offset = (dma.iova - base_iova) >> pgshift
        copy_offset, shift = divmod(bit_offset, 64)
        if self.num_non_pinned_groups and dma.iommu_mapped:
            # A device that can DMA behind type1's back: report every page.
            bitmap_set(bm, 0, nbits)
        nwords = DIRTY_BITMAP_BYTES(nbits + shift) // 8
        dst = ubitmap + copy_offset * 8
        if shift:
            src = bm[:nwords].copy()  # bitmap_shift_left(bm, bm, shift, nbits + shift)
            bm[:nwords] = src << np.uint64(shift)
            bm[1:nwords] |= src[: nwords - 1] >> np.uint64(64 - shift)
            leftover = _user_view(self.mm, dst, 8).view(_U64)[0]
            bm[0] |= leftover  # bitmap_or(bm, bm, &leftover, shift): the whole word
        _user_view(self.mm, dst, nwords * 8)[:] = bm[:nwords].view(np.uint8)

    # -- the emulated-device interface (vfio_pin_pages / vfio_dma_rw) -------------------

    def pin_pages(self, group: VfioGroup, user_iova: int, npage: int, prot: int) -> list[int]:
        """vfio_iommu_type1_pin_pages: user VAs of the pinned pages."""
        if npage <= 0:
            raise err(EINVAL)
        if not self.v2:
            raise err(EACCES)
        if user_iova + npage * PAGE_SIZE - 1 > U64_MAX:
            raise err(EOVERFLOW)
        if self.vaddr_invalid_count:
            raise err(EBUSY)  # WARN_ONCE: not allowed with VFIO_UPDATE_VADDR
        if not self.device_list:
            raise err(EINVAL)  # no dma_unmap notifier registered
        pages: list[int] = []
        tracking_shift = _ffs(self.pgsize_bitmap)
        try:
            for i in range(npage):
                iova = user_iova + PAGE_SIZE * i
                dma = self.find_dma(iova, PAGE_SIZE)
                if dma is None:
                    raise err(EINVAL)
                if dma.prot & prot != prot:
                    raise err(EPERM)
                vaddr = (dma.vaddr + (iova - dma.iova)) & PAGE_MASK
                if iova in dma.pfns:
                    dma.pfns[iova] += 1
                    pages.append(vaddr)
                    continue
                if not access_ok(vaddr, PAGE_SIZE) or not self.mm.contains(vaddr, PAGE_SIZE):
                    raise err(EFAULT)  # vaddr_get_pfns: nothing to pin there
                dma.pfns[iova] = 1
                pages.append(vaddr)
                if self.dirty_page_tracking and dma.bitmap is not None:
                    bitmap_set(dma.bitmap, (iova - dma.iova) >> tracking_shift, 1)
        except OSError:
            for j in range(len(pages)):  # pin_unwind
                self._unpin_page_external(user_iova + PAGE_SIZE * j)
            raise
        g = self._find_group(group)
        if g is not None and not g.pinned_page_dirty_scope:
            g.pinned_page_dirty_scope = True  # it declared itself dirty-tracking capable
            self.num_non_pinned_groups -= 1
        return pages

    def _unpin_page_external(self, iova: int) -> None:
        dma = self.find_dma(iova, PAGE_SIZE)
        if dma is None or iova not in dma.pfns:
            return
        dma.pfns[iova] -= 1
        if not dma.pfns[iova]:
            del dma.pfns[iova]

    def unpin_pages(self, user_iova: int, npage: int) -> None:
        """vfio_iommu_type1_unpin_pages (misuse is a WARN and nothing happens)."""
        if not self.v2 or npage <= 0 or user_iova + npage * PAGE_SIZE - 1 > U64_MAX:
            self._warn("vfio_iommu_type1_unpin_pages: bad call")
            return
        for i in range(npage):
            iova = user_iova + PAGE_SIZE * i
            if self.find_dma(iova, PAGE_SIZE) is None:
                self._warn("vfio_iommu_type1_unpin_pages: iova not mapped")
                return
            self._unpin_page_external(iova)

    def dma_rw(self, user_iova: int, data: bytes | bytearray | memoryview, write: bool) -> None:
        """vfio_iommu_type1_dma_rw: copy to/from the process's memory behind the mapping,
        one mapping (chunk) at a time; a write marks the pages it touched dirty."""
        if self.vaddr_invalid_count:
            raise err(EBUSY)
        buf = memoryview(data).cast("B")
        done = 0
        while done < len(buf):
            iova = user_iova + done
            dma = self.find_dma(iova, 1)
            if dma is None:
                raise err(EINVAL)
            if (write and not dma.prot & IOMMU_WRITE) or not dma.prot & IOMMU_READ:
                raise err(EPERM)
            offset = iova - dma.iova
            count = min(len(buf) - done, dma.size - offset)
            vaddr = dma.vaddr + offset
            if not access_ok(vaddr, count):
                raise err(EFAULT)
            try:
                view = self.mm.view(vaddr, count)
            except OSError:
                raise err(EFAULT) from None
            if write:
                view[:] = np.frombuffer(buf[done : done + count], dtype=np.uint8)
                if self.dirty_page_tracking and dma.bitmap is not None:
                    shift = _ffs(self.pgsize_bitmap)
                    first = offset >> shift
                    bitmap_set(dma.bitmap, first, ((offset + count - 1) >> shift) - first + 1)
            else:
                buf[done : done + count] = view.tobytes()
            done += count


# ---------------------------------------------------------------------------------------
# valid IOVA list helpers (inclusive ranges)


def _iova_aper_resize(iova: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """vfio_iommu_aper_resize: clip the list to [start, end]."""
    if not iova:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    lst = list(iova)
    # adjust the start
    while lst:
        s, e = lst[0]
        if start < s:
            break
        if s <= start < e:
            lst[0] = (start, e)
            break
        lst.pop(0)
    # adjust the end
    for s, e in lst:
        if end > e:
            out.append((s, e))
        elif s < end <= e:
            out.append((s, end))
    return out


def _iova_resv_exclude(
    iova: list[tuple[int, int]], resv: tuple[ResvRegion, ...]
) -> list[tuple[int, int]]:
    """vfio_iommu_resv_exclude: cut the reserved regions out; nothing left is EINVAL."""
    lst = list(iova)
    for rstart, length, rtype in resv:
        if rtype == IOMMU_RESV_DIRECT_RELAXABLE:
            continue
        rend = rstart + length - 1
        out: list[tuple[int, int]] = []
        for s, e in lst:
            if rstart > e or rend < s:
                out.append((s, e))
                continue
            if rstart > s:
                out.append((s, rstart - 1))
            if rend < e:
                out.append((rend + 1, e))
        lst = out
    if not lst:
        raise err(EINVAL)
    return lst


def _user_view(mm: Memory, addr: int, n: int) -> npt.NDArray[np.uint8]:
    """copy_{from,to}_user through a pointer field: EFAULT unless all bytes exist."""
    if not access_ok(addr, n):
        raise err(EFAULT)
    try:
        return mm.view(addr, n)
    except OSError:
        raise err(EFAULT) from None
