"""The IOMMU beneath the model kernel: domains (IO page table + IOTLB), DMA translation,
hardware dirty bits with each vendor's encoding, break-before-make on split.

One `Iommu` per modelled machine; `Iommu.domain_alloc` gives an `iommu_domain`. The vendor
decides the dirty-bit encoding and its control (kernel-uapi.md §9.1):

=========  ====================================================  ===========================
vendor     dirty test / atomic clear                             who turns recording on
=========  ====================================================  ===========================
smmuv3     DBM (bit 51) = 1 and AP[2] (bit 7) = 0 / set AP[2]    always on in a domain with
           (io-pgtable-arm.c arm_lpae_prot_to_pte, ARM_HD quirk)  dirty ops (HTTU HA/HD in CD)
vtd        second-stage D (bit 9) / test_and_clear_bit(9)        SSADE per device (PASID
           (intel/iommu.h DMA_SL_PTE_DIRTY_BIT)                   entry), set_dirty_tracking
amd        HD (bit 6) / test_and_clear_bit(6)                    DTE.HAD per device,
           (amd_iommu_types.h IOMMU_PTE_HD_BIT)                   set_dirty_tracking
=========  ====================================================  ===========================

The page-table state lives in io_pgtable.py (extents, leaf sizes, packed dirty bits) and the
IOTLB in iotlb.py; every path that grows with memory is numpy over packed bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vfiomig.hw.io_pgtable import PGSIZE_BITMAP, Extent, IoPgtable, PackedBits
from vfiomig.hw.iotlb import Iotlb
from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE

VENDORS = ("smmuv3", "vtd", "amd")


class IommuFault(Exception):
    """A DMA the IOMMU refused: nothing was read or written."""

    def __init__(self, iova: int, write: bool, reason: str) -> None:
        super().__init__(f"IOMMU fault: {'write' if write else 'read'} at {iova:#x}: {reason}")
        self.iova = iova
        self.write = write
        self.reason = reason


# -- descriptor encodings (pte()): the bits each vendor's walker reads and writes ------------

# drivers/iommu/io-pgtable-arm.c (stage-1 LPAE, 4 KiB granule)
ARM_LPAE_PTE_TYPE_BLOCK = 1
ARM_LPAE_PTE_TYPE_PAGE = 3
ARM_LPAE_PTE_AP_UNPRIV = 1 << 6
ARM_LPAE_PTE_AP_RDONLY = 1 << 7  # AP[2]
ARM_LPAE_PTE_SH_IS = 3 << 8
ARM_LPAE_PTE_AF = 1 << 10
ARM_LPAE_PTE_NG = 1 << 11
ARM_LPAE_PTE_DBM = 1 << 51
# drivers/iommu/intel/iommu.h (second-stage PTE)
DMA_PTE_READ = 1 << 0
DMA_PTE_WRITE = 1 << 1
DMA_PTE_LARGE_PAGE = 1 << 7
DMA_SL_PTE_DIRTY = 1 << 9
# drivers/iommu/amd/amd_iommu_types.h (v1 page table)
IOMMU_PTE_PR = 1 << 0
IOMMU_PTE_HD = 1 << 6
IOMMU_PTE_FC = 1 << 60
IOMMU_PTE_IR = 1 << 61
IOMMU_PTE_IW = 1 << 62


def _pte_smmuv3(oa: int, size: int, e: Extent, dirty: bool, hd: bool) -> int:
    """arm_lpae_prot_to_pte + __arm_lpae_init_pte. With the ARM_HD quirk a writable leaf is
    DBM=1 and its AP[2] is the inverse of dirty (writable-clean = AP[2] set)."""
    pte = oa | ARM_LPAE_PTE_AF | ARM_LPAE_PTE_SH_IS | ARM_LPAE_PTE_NG | ARM_LPAE_PTE_AP_UNPRIV
    pte |= ARM_LPAE_PTE_TYPE_PAGE if size == PAGE_SIZE else ARM_LPAE_PTE_TYPE_BLOCK
    if not e.write:
        return pte | ARM_LPAE_PTE_AP_RDONLY
    if hd:
        pte |= ARM_LPAE_PTE_DBM | (0 if dirty else ARM_LPAE_PTE_AP_RDONLY)
    return pte


def _pte_vtd(oa: int, size: int, e: Extent, dirty: bool, hd: bool) -> int:
    pte = oa | (DMA_PTE_READ if e.read else 0) | (DMA_PTE_WRITE if e.write else 0)
    pte |= DMA_PTE_LARGE_PAGE if size > PAGE_SIZE else 0
    return pte | (DMA_SL_PTE_DIRTY if dirty else 0)


def _pte_amd(oa: int, size: int, e: Extent, dirty: bool, hd: bool) -> int:
    # A leaf at its level's natural size has NextLevel = 0 (bits 9-11).
    pte = oa | IOMMU_PTE_PR | IOMMU_PTE_FC
    pte |= (IOMMU_PTE_IR if e.read else 0) | (IOMMU_PTE_IW if e.write else 0)
    return pte | (IOMMU_PTE_HD if dirty else 0)


_ENCODE: dict[str, Callable[[int, int, Extent, bool, bool], int]] = {
    "smmuv3": _pte_smmuv3,
    "vtd": _pte_vtd,
    "amd": _pte_amd,
}


# -- the machine's IOMMU ----------------------------------------------------------------------


class Iommu:
    """One IOMMU (one vendor) for the whole modelled machine."""

    def __init__(self, vendor: str, *, bbml2: bool = False, dirty: bool = True) -> None:
        if vendor not in VENDORS:
            raise ValueError(f"unknown IOMMU vendor {vendor!r} (known: {', '.join(VENDORS)})")
        self.vendor = vendor
        self.bbml2 = bbml2  # SMMUv3 FEAT_BBML2: block <-> table changes without an invalid window
        self.dirty_capable = dirty  # IOMMU_CAP_DIRTY_TRACKING (HTTU-HD, SSADS, EFR HD)

    def domain_alloc(self, *, dirty_tracking: bool) -> Domain:
        """domain_alloc_paging_flags: dirty_tracking = IOMMU_HWPT_ALLOC_DIRTY_TRACKING."""
        if dirty_tracking and not self.dirty_capable:
            raise ValueError("this IOMMU has no hardware dirty tracking")
        return Domain(self, has_dirty_ops=dirty_tracking)


@dataclass
class _Attached:
    dev: object
    dirty_capable: bool
    tracking: bool  # VT-d SSADE / AMD DTE.HAD for this device


class Domain:
    """One iommu_domain: an IO page table and its IOTLB."""

    pgsize_bitmap = PGSIZE_BITMAP

    def __init__(self, iommu: Iommu, *, has_dirty_ops: bool) -> None:
        self.iommu = iommu
        self.vendor = iommu.vendor
        self.has_dirty_ops = has_dirty_ops
        self.dirty_tracking = False  # HWPT dirty tracking starts disabled (§5.6)
        self.faults: list[tuple[int, bool, str]] = []  # (iova, write, reason)
        self.pt = IoPgtable()
        self.tlb = Iotlb()
        self._devs: dict[int, _Attached] = {}
        self._broken: tuple[int, int] | None = None  # BBM window: [start, end) is invalid

    @property
    def nbytes(self) -> int:
        """Memory held by the per-page and per-block arrays."""
        return self.pt.nbytes + self.tlb.nbytes

    # -- devices and dirty-tracking control ------------------------------------------------

    def attach(self, dev: object, *, dirty_capable: bool = True) -> None:
        """A device's context/PASID entry or DTE now points at this domain. A device inherits
        the domain's tracking state (intel_pasid_setup_second_level sets SSADE if
        domain->dirty_tracking; amd set_dte_entry sets HAD likewise)."""
        if self.has_dirty_ops and not dirty_capable:
            # intel paging_domain_compatible / arm_smmu_attach_dev: -EINVAL
            raise ValueError("a dirty-tracking domain needs a dirty-capable device IOMMU")
        self._devs[id(dev)] = _Attached(dev, dirty_capable, self.dirty_tracking)

    def detach(self, dev: object) -> None:
        if self._devs.pop(id(dev), None) is None:
            raise ValueError("device is not attached to this domain")

    def attached(self, dev: object) -> bool:
        return id(dev) in self._devs

    def tracking_enabled(self, dev: object) -> bool:
        """Whether a write by `dev` makes the walker set dirty bits."""
        att = self._devs.get(id(dev))
        if att is None or not self.has_dirty_ops:
            return False
        return self.vendor == "smmuv3" or att.tracking  # SMMUv3 HTTU is always on

    def set_dirty_tracking(self, enable: bool) -> None:
        """SMMUv3: no hardware change (arm_smmu_set_dirty_tracking is a no-op). VT-d/AMD:
        SSADE / DTE.HAD of every attached device, then a flush of the domain's caches
        (intel_pasid_setup_dirty_tracking, amd_iommu_set_dirty_tracking); old bits stay."""
        self._need_dirty_ops()
        if self.vendor != "smmuv3":
            changed = any(a.tracking != enable for a in self._devs.values())
            for a in self._devs.values():
                a.tracking = enable
            if changed:
                self.flush_all()
        self.dirty_tracking = enable

    def _need_dirty_ops(self) -> None:
        if not self.has_dirty_ops:
            raise ValueError("domain has no dirty ops (not allocated with dirty tracking)")

    # -- map / unmap / lookup ------------------------------------------------------------

    def map(self, iova: int, uva: int, length: int, *, read: bool, write: bool, huge: bool) -> None:
        _check_aligned(iova=iova, uva=uva, length=length)
        if length == 0 or not (read or write):
            raise ValueError("map needs a non-empty range and read or write permission")
        if self.pt.extents.overlaps(iova, iova + length):
            raise ValueError(f"[{iova:#x}, {iova + length:#x}) is already partly mapped")
        if self.vendor == "smmuv3":
            read = True  # stage-1 descriptors have no "no read" (arm_lpae_prot_to_pte)
        self.pt.map(iova, uva, length, read, write, huge)
        p0, p1 = iova >> PAGE_SHIFT, (iova + length) >> PAGE_SHIFT
        if write and self.has_dirty_ops and self.vendor == "smmuv3":
            self.pt.dirty.set(p0, p1)  # created writable-dirty: DBM=1, AP[2]=0

    def unmap(self, iova: int, length: int) -> int:
        """Remove whole leaves from iova on; returns the bytes unmapped and invalidates their
        IOTLB entries. Like the kernel's walkers it stops at a hole, and unmaps nothing if
        iova is inside a huge leaf. A range ending inside a huge leaf takes the whole leaf on
        VT-d/AMD (generic_pt __unmap_range: "the entire entry is unmapped and the length
        returned will be larger") and stops before it on SMMUv3 (io-pgtable-arm
        __arm_lpae_unmap refuses to unmap part of a block)."""
        _check_aligned(iova=iova, length=length)
        first = self.pt.leaf(iova)
        if length == 0 or first is None or first[0] != iova:
            return 0
        stop = self.pt.extents.run_end(iova, iova + length)
        last = self.pt.leaf(stop - 1)  # stop - 1 is inside the mapped run from iova
        assert last is not None
        lstart, lsize = last
        if lstart + lsize > stop:
            stop = lstart if self.vendor == "smmuv3" else lstart + lsize
        if stop > iova:
            self.pt.remove(iova, stop)
            self.tlb.invalidate(iova >> PAGE_SHIFT, stop >> PAGE_SHIFT)
        return stop - iova

    def leaf(self, iova: int) -> tuple[int, int] | None:
        if self._in_bbm_window(iova):
            return None
        return self.pt.leaf(iova)

    def iova_to_phys(self, iova: int) -> int | None:
        e = self.pt.extents.find(iova)
        if e is None or self._in_bbm_window(iova):
            return None
        return e.uva + iova - e.iova

    def pte(self, iova: int) -> int:
        lf = self.leaf(iova)
        e = self.pt.extents.find(iova)
        if lf is None or e is None:
            return 0
        oa = e.uva + lf[0] - e.iova
        dirty = self.pt.dirty.test(lf[0] >> PAGE_SHIFT)
        return _ENCODE[self.vendor](oa, lf[1], e, dirty, self.has_dirty_ops)

    def _in_bbm_window(self, iova: int) -> bool:
        return self._broken is not None and self._broken[0] <= iova < self._broken[1]

    # -- dirty bits and IOTLB -----------------------------------------------------------

    def read_and_clear_dirty(
        self,
        iova: int,
        length: int,
        *,
        clear: bool,
        out: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """The packed 4 KiB dirty bitmap of [iova, iova+length). With clear, each dirty leaf
        is test-and-cleared whole (generic_pt record_dirty -> pt_entry_make_write_clean;
        SMMUv3 sets AP[2]); the caller flushes the IOTLB (iotlb_sync). No "enabled" check:
        bits from an earlier enabled period are reported and cleared (§9.1).

        With `out` (at least ceil(pages / 8) bytes), the bits are ORed into it and `out` is
        returned: the kernel passes the user's bitmap itself, as the hardware walk records
        straight into iova_bitmap."""
        self._need_dirty_ops()
        _check_aligned(iova=iova, length=length)
        p0, p1 = iova >> PAGE_SHIFT, (iova + length) >> PAGE_SHIFT
        if out is None:
            bits = self.pt.dirty.get(p0, p1)
        else:
            self.pt.dirty.or_into(p0, p1, out)
            bits = out
        if clear and p1 > p0:
            self.pt.dirty.clear(*self.pt.leaf_pages(p0, p1))
        return bits

    def has_dirty(self, iova: int, length: int) -> bool:
        """Could any page of [iova, iova+length) be dirty? False only when no dirty bit
        is stored there at all (a quick test on the sparse chunks, no bits read)."""
        _check_aligned(iova=iova, length=length)
        p0, p1 = iova >> PAGE_SHIFT, (iova + length) >> PAGE_SHIFT
        return any(True for _ in self.pt.dirty.present(p0, p1))

    def clear_dirty(self, iova: int, length: int) -> None:
        """read_and_clear_dirty with nothing to record (iommu_read_and_clear_dirty with a
        NULL bitmap): every leaf meeting the range is cleaned, no bits are built."""
        self._need_dirty_ops()
        _check_aligned(iova=iova, length=length)
        p0, p1 = iova >> PAGE_SHIFT, (iova + length) >> PAGE_SHIFT
        if p1 > p0:
            self.pt.dirty.clear(*self.pt.leaf_pages(p0, p1))

    def iotlb_sync(self, iova: int, length: int) -> None:
        """Invalidate the IOTLB for the range: every cached leaf overlapping it."""
        _check_aligned(iova=iova, length=length)
        p0, p1 = iova >> PAGE_SHIFT, (iova + length) >> PAGE_SHIFT
        if p1 > p0:
            self.tlb.invalidate(*self.pt.leaf_pages(p0, p1))

    def flush_all(self) -> None:
        self.tlb.invalidate_all()

    # -- split (break-before-make) --------------------------------------------------------

    def split(self, iova: int, *, during: Callable[[], None] | None = None) -> None:
        """Replace the huge leaf holding iova by 512 leaves of the next smaller size, with the
        same translation, permissions and dirty state. SMMUv3 without BBML2 must break before
        make: the entry is invalid (and its TLB entry gone) while `during` runs."""
        lf = self.leaf(iova)
        if lf is None or lf[1] == PAGE_SIZE:
            raise ValueError(f"no huge leaf holds {iova:#x}")
        if self.vendor == "smmuv3" and not self.iommu.bbml2:
            self._split_bbm(lf[0], lf[1], during)
        else:
            self._split_atomic(lf[0], lf[1], during)

    def _split_bbm(self, start: int, size: int, during: Callable[[], None] | None) -> None:
        # io-pgtable-arm arm_lpae_split_blk_unmap builds the new table from blk_pte, the
        # descriptor it read before the break: a writable-dirty block gives writable-dirty
        # pages. Breaking makes the entry invalid and invalidates its TLB entry.
        p0, p1 = start >> PAGE_SHIFT, (start + size) >> PAGE_SHIFT
        blk_dirty = self.pt.dirty.test(p0)
        self.pt.dirty.clear(p0, p1)
        self.tlb.invalidate(p0, p1)
        self._broken = (start, start + size)
        try:
            if during is not None:
                during()
        finally:
            self._broken = None
            self.pt.split_codes(start, size)
            if blk_dirty:
                self.pt.dirty.set(p0, p1)

    def _split_atomic(self, start: int, size: int, during: Callable[[], None] | None) -> None:
        # VT-d/AMD (and SMMUv3 with BBML2) swap the entry in one store: DMA keeps using the old
        # leaf until then, and the new leaves inherit its dirty bit (replicated already).
        try:
            if during is not None:
                during()
        finally:
            self.pt.split_codes(start, size)
            self.tlb.invalidate(start >> PAGE_SHIFT, (start + size) >> PAGE_SHIFT)

    # -- DMA ------------------------------------------------------------------------------

    def translate(self, iova: int, length: int, *, write: bool) -> list[tuple[int, int]]:
        """The segments [(uva, n), ...] a DMA reaches, or IommuFault (not recorded, no side
        effect) for the lowest faulting IOVA."""
        if iova < 0 or length < 0:
            raise ValueError("negative iova or length")
        end = iova + length
        segs: list[tuple[int, int]] = []
        fault = self._walk(iova, end, write, segs)
        if self._broken is not None and self._broken[0] < end and iova < self._broken[1]:
            at = max(iova, self._broken[0])
            if fault is None or at < fault[0]:
                fault = (at, "break-before-make")
        if fault is not None:
            raise IommuFault(fault[0], write, fault[1])
        return segs

    def _walk(
        self, cur: int, end: int, write: bool, segs: list[tuple[int, int]]
    ) -> tuple[int, str] | None:
        """Fill segs extent by extent; the first (iova, reason) that faults, else None."""
        while cur < end:
            e = self.pt.extents.find(cur)
            if e is None:
                return cur, "not mapped"
            if write and not e.write:
                return cur, "read-only"
            if not write and not e.read:
                return cur, "write-only"
            n = min(end, e.end) - cur
            uva = e.uva + cur - e.iova
            if segs and segs[-1][0] + segs[-1][1] == uva:
                segs[-1] = (segs[-1][0], segs[-1][1] + n)
            else:
                segs.append((uva, n))
            cur += n
        return None

    def dma(self, dev: object, iova: int, length: int, *, write: bool) -> list[tuple[int, int]]:
        """A device access through this domain: translation, permission check and the
        hardware's dirty/IOTLB update. A refused access does nothing and is recorded."""
        try:
            if not self.attached(dev):
                raise IommuFault(iova, write, "device not attached")
            segs = self.translate(iova, length, write=write)
        except IommuFault as f:
            self.faults.append((f.iova, f.write, f.reason))
            raise
        if length:
            last = (iova + length - 1) >> PAGE_SHIFT
            p0, p1 = self.pt.leaf_pages(iova >> PAGE_SHIFT, last + 1)
            if write:
                _walker_write(self.pt.dirty, self.tlb, p0, p1, self.tracking_enabled(dev))
            else:
                self.tlb.fill_from(self.pt.dirty, p0, p1)
        return segs


def _walker_write(dirty: PackedBits, tlb: Iotlb, p0: int, p1: int, hd: bool) -> None:
    """A write to the whole leaves [p0, p1). Leaves the IOTLB holds as writable-dirty are
    written with no page-table access. The others are walked: the hardware's atomic update
    sets the dirty bit (if recording is on for this device: HTTU clears AP[2], VT-d/AMD set
    D/HD) and the IOTLB caches the leaf with its dirty state."""
    for (d, sl, m), (t, _, _) in zip(
        dirty.parts(p0, p1, create=True), tlb.parts(p0, p1, create=True), strict=True
    ):
        if hd:
            d[sl] |= ~t[sl] & m
        t[sl] |= d[sl] & m


def _check_aligned(**values: int) -> None:
    for name, v in values.items():
        if v < 0 or v % PAGE_SIZE:
            raise ValueError(f"{name} {v:#x} is not a non-negative multiple of 4 KiB")
