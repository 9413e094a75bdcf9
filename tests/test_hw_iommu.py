"""vfiomig.hw.iommu: translation, leaf sizes, unmap, vendor dirty encodings, IOTLB, split."""

from __future__ import annotations

import numpy as np
import pytest

from vfiomig.hw.iommu import (
    ARM_LPAE_PTE_AP_RDONLY,
    ARM_LPAE_PTE_DBM,
    ARM_LPAE_PTE_TYPE_BLOCK,
    ARM_LPAE_PTE_TYPE_PAGE,
    DMA_PTE_LARGE_PAGE,
    DMA_PTE_READ,
    DMA_PTE_WRITE,
    DMA_SL_PTE_DIRTY,
    IOMMU_PTE_HD,
    IOMMU_PTE_IR,
    IOMMU_PTE_IW,
    IOMMU_PTE_PR,
    VENDORS,
    Domain,
    Iommu,
    IommuFault,
)
from vfiomig.hw.memory import Memory

K4, M2, G1 = 4096, 1 << 21, 1 << 30
IOVA = 1 << 40  # 1 GiB aligned


def dirty_pages(dom: Domain, iova: int, length: int, clear: bool = False) -> list[int]:
    """Page numbers (relative to iova) reported dirty."""
    bits = dom.read_and_clear_dirty(iova, length, clear=clear)
    return np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist()


def harvest(dom: Domain, iova: int, length: int) -> list[int]:
    """What iommufd's GET_DIRTY_BITMAP does: read-and-clear, then flush the IOTLB."""
    pages = dirty_pages(dom, iova, length, clear=True)
    dom.iotlb_sync(iova, length)
    return pages


def setup(
    vendor: str,
    length: int = 4 * M2,
    *,
    huge: bool = True,
    bbml2: bool = False,
    write: bool = True,
    tracking: bool = True,
) -> tuple[Domain, object, int]:
    """A dirty-tracking domain with one device and [IOVA, IOVA+length) mapped (unbacked)."""
    mem = Memory()
    region = mem.mmap(length + G1, backed=False)
    uva = region.addr + (-region.addr) % G1 if length >= G1 else region.addr  # 1G-congruent
    dom = Iommu(vendor, bbml2=bbml2).domain_alloc(dirty_tracking=True)
    dev = object()
    dom.attach(dev)
    dom.map(IOVA, uva, length, read=True, write=write, huge=huge)
    if tracking:
        dom.set_dirty_tracking(True)
        harvest(dom, IOVA, length)  # iopt_set_dirty_tracking clears everything on enable
    return dom, dev, uva


# -- mapping, translation, leaf sizes ---------------------------------------------------------


def test_unknown_vendor_is_refused() -> None:
    with pytest.raises(ValueError):
        Iommu("rockchip")
    assert VENDORS == ("smmuv3", "vtd", "amd")


@pytest.mark.parametrize("vendor", VENDORS)
def test_leaf_sizes_and_translation(vendor: str) -> None:
    dom, _, uva = setup(vendor, G1 + 2 * M2 + 3 * K4)
    assert dom.pgsize_bitmap == K4 | M2 | G1
    assert dom.leaf(IOVA + 12345) == (IOVA, G1)
    assert dom.leaf(IOVA + G1 + M2 + 5) == (IOVA + G1 + M2, M2)
    assert dom.leaf(IOVA + G1 + 2 * M2 + K4 + 7) == (IOVA + G1 + 2 * M2 + K4, K4)
    assert dom.leaf(IOVA + G1 + 2 * M2 + 3 * K4) is None
    for off in (0, 4095, G1 - 1, G1 + M2 + 77, G1 + 2 * M2 + 3 * K4 - 1):
        assert dom.iova_to_phys(IOVA + off) == uva + off
    assert dom.iova_to_phys(IOVA - 1) is None


@pytest.mark.parametrize("vendor", VENDORS)
def test_small_leaves_when_not_huge_or_not_congruent(vendor: str) -> None:
    dom, _, _ = setup(vendor, 2 * M2, huge=False)
    assert dom.leaf(IOVA + M2) == (IOVA + M2, K4)
    dom2 = Iommu(vendor).domain_alloc(dirty_tracking=False)
    dom2.map(IOVA, 0x7F00_0000_1000, 2 * M2, read=True, write=True, huge=True)  # uva off by 4K
    assert dom2.leaf(IOVA + M2) == (IOVA + M2, K4)


def test_map_refuses_overlap_and_misalignment() -> None:
    dom = Iommu("vtd").domain_alloc(dirty_tracking=False)
    dom.map(IOVA, 0x7F00_0000_0000, 8 * K4, read=True, write=False, huge=True)
    for args in [(IOVA + 7 * K4, K4), (IOVA - K4, 2 * K4), (IOVA - K4, 20 * K4)]:
        with pytest.raises(ValueError):
            dom.map(args[0], 0x7F00_1000_0000, args[1], read=True, write=True, huge=False)
    for iova, uva, n in [(IOVA + 1, 0, K4), (IOVA + 9 * K4, 0x800, K4), (IOVA + 9 * K4, 0, 100)]:
        with pytest.raises(ValueError):
            dom.map(iova, uva, n, read=True, write=True, huge=False)
    with pytest.raises(ValueError):
        dom.map(IOVA + 9 * K4, 0, K4, read=False, write=False, huge=False)
    dom.map(IOVA - K4, 0x7F00_1000_0000, K4, read=True, write=True, huge=False)  # adjacent: fine


@pytest.mark.parametrize("vendor", VENDORS)
def test_unmap_removes_whole_mapping_and_stops_at_holes(vendor: str) -> None:
    dom, dev, _ = setup(vendor, 2 * M2 + 2 * K4)
    dom.map(IOVA + 4 * M2, 0x7F00_0000_0000, K4, read=True, write=True, huge=False)
    assert dom.unmap(IOVA + K4, K4) == 0  # starts inside the 2M leaf: nothing
    assert dom.unmap(IOVA, 8 * M2) == 2 * M2 + 2 * K4  # stops at the hole
    assert dom.leaf(IOVA) is None and dom.iova_to_phys(IOVA + M2) is None
    assert dom.leaf(IOVA + 4 * M2) is not None
    assert dom.unmap(IOVA, K4) == 0
    with pytest.raises(IommuFault):
        dom.dma(dev, IOVA, 8, write=False)
    assert dirty_pages(dom, IOVA, 2 * M2) == []


@pytest.mark.parametrize("vendor", VENDORS)
def test_unmap_ending_inside_a_huge_leaf(vendor: str) -> None:
    """generic_pt (VT-d, AMD) unmaps the whole leaf and returns more; io-pgtable-arm stops."""
    dom, _, _ = setup(vendor, 2 * M2)
    got = dom.unmap(IOVA, M2 + K4)
    if vendor == "smmuv3":
        assert got == M2 and dom.leaf(IOVA + M2) == (IOVA + M2, M2)
    else:
        assert got == 2 * M2 and dom.leaf(IOVA + M2) is None
    assert dom.leaf(IOVA) is None


# -- permissions and faults -------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_write_to_read_only_faults_and_is_recorded(vendor: str) -> None:
    dom, dev, uva = setup(vendor, M2, write=False, tracking=False)
    assert dom.dma(dev, IOVA + 100, 10, write=False) == [(uva + 100, 10)]
    with pytest.raises(IommuFault) as e:
        dom.dma(dev, IOVA + K4 - 2, 8, write=True)
    assert (e.value.iova, e.value.write, e.value.reason) == (IOVA + K4 - 2, True, "read-only")
    with pytest.raises(IommuFault) as e:
        dom.dma(dev, IOVA + M2 - 4, 8, write=False)
    assert (e.value.iova, e.value.reason) == (IOVA + M2, "not mapped")
    assert dom.faults == [(IOVA + K4 - 2, True, "read-only"), (IOVA + M2, False, "not mapped")]
    assert dirty_pages(dom, IOVA, M2) == []


def test_unattached_device_is_blocked() -> None:
    dom, dev, _ = setup("vtd", M2)
    dom.detach(dev)
    with pytest.raises(IommuFault) as e:
        dom.dma(dev, IOVA, 8, write=True)
    assert e.value.reason == "device not attached"
    assert dirty_pages(dom, IOVA, M2) == []


def test_write_only_mapping_on_x86_refuses_reads_but_smmuv3_cannot_express_it() -> None:
    for vendor, readable in [("vtd", False), ("amd", False), ("smmuv3", True)]:
        dom = Iommu(vendor).domain_alloc(dirty_tracking=False)
        dev = object()
        dom.attach(dev)
        dom.map(IOVA, 0x7F00_0000_0000, K4, read=False, write=True, huge=False)
        if readable:
            dom.dma(dev, IOVA, 4, write=False)
        else:
            with pytest.raises(IommuFault, match="write-only"):
                dom.dma(dev, IOVA, 4, write=False)


# -- dirty tracking: encodings and control ---------------------------------------------------


def test_smmuv3_encoding_writable_dirty_then_clean() -> None:
    dom, dev, _ = setup("smmuv3", 2 * M2 + K4, tracking=False)
    blk, page = dom.pte(IOVA), dom.pte(IOVA + 2 * M2)
    assert blk & 3 == ARM_LPAE_PTE_TYPE_BLOCK and page & 3 == ARM_LPAE_PTE_TYPE_PAGE
    for pte in (blk, page):  # created writable-dirty, tracking enabled or not
        assert pte & ARM_LPAE_PTE_DBM and not pte & ARM_LPAE_PTE_AP_RDONLY
    assert dirty_pages(dom, IOVA + 2 * M2, K4) == [0]
    harvest(dom, IOVA, 2 * M2 + K4)
    assert dom.pte(IOVA) & ARM_LPAE_PTE_AP_RDONLY and dom.pte(IOVA) & ARM_LPAE_PTE_DBM
    dom.dma(dev, IOVA + M2 + 8, 4, write=True)  # HTTU clears AP[2] of that block only
    assert dom.pte(IOVA) & ARM_LPAE_PTE_AP_RDONLY
    assert not dom.pte(IOVA + M2) & ARM_LPAE_PTE_AP_RDONLY
    assert dom.pte(IOVA) & ~0xFFF & ((1 << 48) - 1) == dom.iova_to_phys(IOVA)  # output address


def test_smmuv3_read_only_and_non_dirty_domains_have_no_dbm() -> None:
    ro, _, _ = setup("smmuv3", K4, write=False, tracking=False)
    assert ro.pte(IOVA) & ARM_LPAE_PTE_AP_RDONLY and not ro.pte(IOVA) & ARM_LPAE_PTE_DBM
    plain = Iommu("smmuv3").domain_alloc(dirty_tracking=False)
    plain.map(IOVA, 0x7F00_0000_0000, K4, read=True, write=True, huge=False)
    assert not plain.pte(IOVA) & (ARM_LPAE_PTE_DBM | ARM_LPAE_PTE_AP_RDONLY)
    assert plain.pte(IOVA + K4) == 0
    with pytest.raises(ValueError):
        plain.read_and_clear_dirty(IOVA, K4, clear=False)
    with pytest.raises(ValueError):
        plain.set_dirty_tracking(True)


@pytest.mark.parametrize(
    ("vendor", "dirty_bit", "perm_bits", "large_bit"),
    [
        ("vtd", DMA_SL_PTE_DIRTY, DMA_PTE_READ | DMA_PTE_WRITE, DMA_PTE_LARGE_PAGE),
        ("amd", IOMMU_PTE_HD, IOMMU_PTE_PR | IOMMU_PTE_IR | IOMMU_PTE_IW, 0),
    ],
)
def test_x86_encodings(vendor: str, dirty_bit: int, perm_bits: int, large_bit: int) -> None:
    dom, dev, uva = setup(vendor, M2 + K4)
    blk, page = dom.pte(IOVA), dom.pte(IOVA + M2)
    assert (
        blk & perm_bits == perm_bits
        and not blk & dirty_bit
        and blk & ((1 << 52) - 1) & ~0xFFF == uva
    )
    assert page & DMA_PTE_LARGE_PAGE == 0 and blk & DMA_PTE_LARGE_PAGE == large_bit
    dom.dma(dev, IOVA + M2, 1, write=True)
    assert dom.pte(IOVA + M2) & dirty_bit and not dom.pte(IOVA) & dirty_bit
    harvest(dom, IOVA, M2 + K4)
    assert not dom.pte(IOVA + M2) & dirty_bit


@pytest.mark.parametrize("vendor", VENDORS)
def test_no_new_dirty_bits_while_disabled_except_smmuv3(vendor: str) -> None:
    dom, dev, _ = setup(vendor, 16 * K4, huge=False)
    dom.dma(dev, IOVA, 1, write=True)
    dom.set_dirty_tracking(False)
    dom.dma(dev, IOVA + 5 * K4, 1, write=True)
    want = [0, 5] if vendor == "smmuv3" else [0]  # old bits stay; SMMUv3 HTTU never stops
    assert harvest(dom, IOVA, 16 * K4) == want  # no "enabled" check: reported and cleared
    assert harvest(dom, IOVA, 16 * K4) == []


def test_tracking_is_per_device_on_x86() -> None:
    dom, a, _ = setup("amd", 16 * K4, huge=False, tracking=False)
    dom.set_dirty_tracking(True)
    b = object()
    dom.attach(b)  # inherits the domain's state (set_dte_entry sets HAD if dirty_tracking)
    dom.dma(a, IOVA, 1, write=True)
    dom.dma(b, IOVA + K4, 1, write=True)
    assert dirty_pages(dom, IOVA, 16 * K4) == [0, 1]
    assert dom.tracking_enabled(a) and dom.tracking_enabled(b)
    dom.set_dirty_tracking(False)
    assert not dom.tracking_enabled(b)


def test_dirty_domain_needs_dirty_capable_devices_and_iommu() -> None:
    dom = Iommu("vtd").domain_alloc(dirty_tracking=True)
    with pytest.raises(ValueError):
        dom.attach(object(), dirty_capable=False)
    Iommu("vtd").domain_alloc(dirty_tracking=False).attach(object(), dirty_capable=False)
    with pytest.raises(ValueError):
        Iommu("amd", dirty=False).domain_alloc(dirty_tracking=True)


@pytest.mark.parametrize("vendor", VENDORS)
def test_clear_takes_the_whole_leaf_and_reports_only_the_range(vendor: str) -> None:
    dom, dev, _ = setup(vendor, 2 * M2)
    dom.dma(dev, IOVA + 3 * K4, 1, write=True)
    dom.dma(dev, IOVA + M2, 1, write=True)
    assert dirty_pages(dom, IOVA + M2 - 2 * K4, 4 * K4, clear=True) == [0, 1, 2, 3]
    dom.iotlb_sync(IOVA + M2 - 2 * K4, 4 * K4)
    assert dirty_pages(dom, IOVA, 2 * M2) == []  # both 2M leaves were cleared whole
    dom.dma(dev, IOVA + 5, 1, write=True)
    assert len(dirty_pages(dom, IOVA, 2 * M2)) == 512


# -- the IOTLB --------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("via_read", [False, True])
def test_clear_without_iotlb_flush_loses_the_next_write(vendor: str, via_read: bool) -> None:
    dom, dev, _ = setup(vendor, 8 * K4, huge=False)
    dom.dma(dev, IOVA + K4, 8, write=True)  # walked: dirty, cached as writable-dirty
    if via_read:
        dom.flush_all()
        dom.dma(dev, IOVA + K4, 8, write=False)  # a read caches the dirty leaf just the same
    assert dirty_pages(dom, IOVA, 8 * K4, clear=True) == [1]  # no iotlb_sync
    dom.dma(dev, IOVA + K4, 8, write=True)  # hits the cached writable-dirty entry
    assert dirty_pages(dom, IOVA, 8 * K4) == []  # lost
    assert harvest(dom, IOVA, 8 * K4) == []

    dom.dma(dev, IOVA + K4, 8, write=True)  # the flush above dropped the entry: walked again
    assert harvest(dom, IOVA, 8 * K4) == [1]
    dom.dma(dev, IOVA + K4, 8, write=True)
    assert harvest(dom, IOVA, 8 * K4) == [1]  # with the flush, every write is seen


@pytest.mark.parametrize("vendor", ["vtd", "amd"])
def test_unmap_drops_dirty_bits_and_cached_entries(vendor: str) -> None:
    dom, dev, uva = setup(vendor, 8 * K4, huge=False)
    dom.dma(dev, IOVA, 1, write=True)  # dirty, and cached as writable-dirty
    assert dom.unmap(IOVA, 8 * K4) == 8 * K4
    dom.map(IOVA, uva, 8 * K4, read=True, write=True, huge=False)
    assert dirty_pages(dom, IOVA, 8 * K4) == []  # a new x86 leaf starts clean
    dom.dma(dev, IOVA, 1, write=True)  # walked: the unmap invalidated the old entry
    assert dirty_pages(dom, IOVA, 8 * K4) == [0]


@pytest.mark.parametrize(
    ("vendor", "bbml2"), [("smmuv3", False), ("smmuv3", True), ("vtd", False), ("amd", False)]
)
def test_split_drops_the_cached_huge_entry(vendor: str, bbml2: bool) -> None:
    dom, dev, _ = setup(vendor, M2, bbml2=bbml2)
    dom.dma(dev, IOVA, 1, write=True)  # the 2M leaf is dirty and cached writable-dirty
    dom.split(IOVA)
    assert len(dirty_pages(dom, IOVA, M2, clear=True)) == 512  # cleared, no flush after
    dom.dma(dev, IOVA + 9 * K4, 1, write=True)  # no stale 2M entry: walked, recorded
    assert dirty_pages(dom, IOVA, M2) == [9]


def test_flush_all_and_enable_flush_drop_cached_entries() -> None:
    dom, dev, _ = setup("vtd", 8 * K4, huge=False)
    dom.dma(dev, IOVA, 1, write=True)
    dirty_pages(dom, IOVA, 8 * K4, clear=True)
    dom.flush_all()
    dom.dma(dev, IOVA, 1, write=True)
    assert dirty_pages(dom, IOVA, 8 * K4) == [0]
    # the same through SSADE: turning tracking off and on flushes the domain's caches
    dirty_pages(dom, IOVA, 8 * K4, clear=True)  # cached writable-dirty, no iotlb_sync
    dom.set_dirty_tracking(False)
    dom.set_dirty_tracking(True)
    dom.dma(dev, IOVA, 1, write=True)
    assert dirty_pages(dom, IOVA, 8 * K4) == [0]


# -- split and break-before-make ------------------------------------------------------------


def _split_with_dma(dom: Domain, dev: object, iova: int) -> list[str]:
    seen: list[str] = []

    def during() -> None:
        assert dom.leaf(iova) is None or dom.leaf(iova) == (iova & ~(M2 - 1), M2)
        try:
            dom.dma(dev, iova + 64, 8, write=True)
            seen.append("ok")
        except IommuFault as f:
            seen.append(f.reason)
            assert dom.pte(iova) == 0 and dom.iova_to_phys(iova) is None

    dom.split(iova, during=during)
    return seen


@pytest.mark.parametrize(
    ("vendor", "bbml2", "faults"),
    [
        ("smmuv3", False, True),
        ("smmuv3", True, False),
        ("vtd", False, False),
        ("amd", False, False),
    ],
)
def test_split_break_before_make(vendor: str, bbml2: bool, faults: bool) -> None:
    """The seed thread's question, "doesn't that explode if the invalid entry is DMA'd to?":
    splitting a live 2 MiB leaf for 4 KiB dirty granularity on SMMUv3 without BBML2 leaves
    the entry invalid for a window, and a device DMA in that window faults (and is lost).
    VT-d, AMD and SMMUv3 with BBML2 replace the leaf atomically: the DMA goes through."""
    dom, dev, uva = setup(vendor, 2 * M2, bbml2=bbml2)
    seen = _split_with_dma(dom, dev, IOVA)
    assert seen == (["break-before-make"] if faults else ["ok"])
    assert ((IOVA + 64, True, "break-before-make") in dom.faults) == faults
    # Same translation, now 4K leaves, so dirty state has 4K granularity.
    assert dom.leaf(IOVA + 5 * K4) == (IOVA + 5 * K4, K4)
    assert dom.iova_to_phys(IOVA + M2 - 1) == uva + M2 - 1
    assert dom.leaf(IOVA + M2) == (IOVA + M2, M2)
    # A write inside `during` went through the old 2M leaf (dirty, carried to all 512 pages);
    # a write that faulted left nothing.
    assert len(harvest(dom, IOVA, M2)) == (0 if faults else 512)
    dom.dma(dev, IOVA + 7 * K4, 1, write=True)
    assert harvest(dom, IOVA, 2 * M2) == [7]


def test_bbm_split_carries_the_dirty_state_read_before_the_break() -> None:
    """io-pgtable-arm builds the pages from the block descriptor: writable-dirty stays so."""
    dom, dev, _ = setup("smmuv3", M2)
    dom.dma(dev, IOVA, 1, write=True)
    seen = _split_with_dma(dom, dev, IOVA)
    assert seen == ["break-before-make"]
    assert len(harvest(dom, IOVA, M2)) == 512
    assert dom.pte(IOVA + K4) & ARM_LPAE_PTE_DBM  # pages keep DBM


@pytest.mark.parametrize("vendor", VENDORS)
def test_split_1g_gives_2m_leaves(vendor: str) -> None:
    dom, _, uva = setup(vendor, G1)
    dom.split(IOVA + 3 * M2 + 5)
    assert dom.leaf(IOVA + 3 * M2 + 5) == (IOVA + 3 * M2, M2)
    assert dom.iova_to_phys(IOVA + G1 - 1) == uva + G1 - 1
    with pytest.raises(ValueError):
        dom.split(IOVA + G1)  # not mapped
    dom.split(IOVA)
    with pytest.raises(ValueError):
        dom.split(IOVA)  # already 4K
