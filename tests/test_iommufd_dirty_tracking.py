"""Port of the kernel's iommufd dirty-tracking selftests, plus the finer points around them.

tools/testing/selftests/iommu/iommufd.c, FIXTURE(iommufd_dirty_tracking): every test
(enforce_dirty, set_dirty_tracking, device_dirty_capability, get_dirty_bitmap,
get_dirty_bitmap_no_clear) over every buffer-size variant (6.10+ list: 8k 16k 64k 128k 320k
64M 64M_huge 128M 128M_huge), with the bitmap at a page boundary, PAGE_SIZE-unaligned and
u64-unaligned (+0xff1), and _test_mock_dirty_bitmaps() of iommufd_utils.h.

Adaptations, and why: the mock IOMMU's set_dirty test op becomes a DMA write by a device
attached to the dirty HWPT (the only way hardware sets a dirty bit in vfiomig); the mock
page (2 KiB) becomes the 4 KiB page and the mock huge page the 2 MiB leaf. As in the
current selftest (iommupt conversion), non-huge variants turn IOMMU_OPTION_HUGE_PAGES off
before anything is mapped, so IOPTEs are 4 KiB. The selftest's memset of `bitmap_size`
*bytes* for a bitmap of `bitmap_size` bits is not copied: here the bitmap is exactly
ceil(bits/8) bytes, and the bytes around it are checked to stay untouched.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from test_iommufd_util import (
    BASE,
    DIRTY,
    K4,
    M2,
    NO_CLEAR,
    Dev,
    Iommufd,
    bits,
    errno_of,
)

from vfiomig.uapi import iommufd as u

# (name, buffer_size, hugepages) as FIXTURE_VARIANT_ADD(iommufd_dirty_tracking, ...)
VARIANTS = [
    ("domain_dirty8k", 8 << 10, False),  # half of an u8 index bitmap (2 bits at 4K)
    ("domain_dirty16k", 16 << 10, False),  # one u8 index bitmap at 2K mock pages
    ("domain_dirty64k", 64 << 10, False),  # one u32 index bitmap
    ("domain_dirty128k", 128 << 10, False),  # one u64 index bitmap
    ("domain_dirty320k", 320 << 10, False),  # two u64 index and trailing end bitmap
    ("domain_dirty64M", 64 << 20, False),  # 4K bitmap at 2K pages (2K here)
    ("domain_dirty64M_huge", 64 << 20, True),
    ("domain_dirty128M", 128 << 20, False),  # 8K bitmap at 2K pages (4K here)
    ("domain_dirty128M_huge", 128 << 20, True),
]
# The mock aperture starts at 16 MiB; a real SMMUv3 reserves its SW MSI window at 128 MiB,
# which a 128 MiB buffer there would hit: map at 4 GiB instead.
MOCK_APERTURE_START = BASE
PAGE = K4  # MOCK_PAGE_SIZE
HUGE = M2  # MOCK_HUGE_PAGE_SIZE
# Bitmap placements of get_dirty_bitmap{,_no_clear}: aligned, "PAGE_SIZE unaligned" (the
# mock page is half a page; 2048 keeps that meaning), and u64 unaligned.
BITMAP_OFFSETS = [0, 2048, 0xFF1]


class DirtyTracking:
    """FIXTURE_SETUP(iommufd_dirty_tracking)."""

    def __init__(self, buffer_size: int, hugepages: bool, vendor: str = "smmuv3") -> None:
        self.f = Iommufd(vendor=vendor)
        self.buffer_size = buffer_size
        self.hugepages = hugepages
        self.buffer, _ = self.f.buf(buffer_size)  # mmap: 2 MiB aligned, like posix_memalign
        self.page_size = PAGE
        self.bitmap_bits = buffer_size // PAGE
        size = -(-self.bitmap_bits // 8)
        # "Provision with an extra (PAGE_SIZE) for the unaligned case"
        self.bitmap, bm = self.f.buf(size + K4)
        assert bm is not None
        self.bm = bm
        self.ioas_id = self.f.ioas_alloc()
        if not hugepages:
            self.f.huge_pages(self.ioas_id, False)
        self.dev = self.f.dev()
        self.hwpt_id = self.dev.attach(self.ioas_id)
        self.idev_id = self.dev.devid


@pytest.fixture(params=VARIANTS, ids=[v[0] for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> tuple[str, int, bool]:
    return request.param


def mock_dirty_bitmaps(
    t: DirtyTracking,
    hwpt_id: int,
    dev: Dev,
    length: int,
    iova: int,
    page_size: int,
    pte_page_size: int,
    bitmap_off: int,
    flags: int,
) -> None:
    """_test_mock_dirty_bitmaps (iommufd_utils.h)."""
    npte = pte_page_size // page_size
    pteset = 2 * npte
    nbits = length // page_size
    nr = nbits // pteset or 1
    nbytes = -(-nbits // 8)
    # Mark every pteset-th page dirty: one DMA write each (the mock's set_dirty op).
    marked = 0
    for i in range(0, nbits, pteset):
        dev.hw.dma_write(iova + i * page_size, 8)
        marked += 1
    assert marked == nr
    data = t.bitmap + bitmap_off

    def read() -> np.ndarray:
        t.bm[:] = 0
        t.f.get_dirty(hwpt_id, iova, length, page_size, data, flags)
        got = bits(t.bm, bitmap_off, nbits)
        # bytes outside ceil(nbits/8) at the offset stay zero (bits are only ever set)
        outside = np.concatenate([t.bm[:bitmap_off], t.bm[bitmap_off + nbytes :]])
        assert not outside.any()
        return got

    got = read()
    expect = np.zeros(nbits, dtype=np.uint8)
    for i in range(0, nbits, pteset):
        expect[i : i + npte] = 1
    assert np.array_equal(got, expect)
    # Read again: cleared, unless NO_CLEAR
    got = read()
    assert np.array_equal(got, expect if flags & NO_CLEAR else np.zeros_like(expect))


def test_enforce_dirty(variant: tuple[str, int, bool]) -> None:
    t = DirtyTracking(variant[1], variant[2])
    f = t.f
    # Regular case: a dirty HWPT takes a dirty-capable device, refuses one without
    hwpt_id = f.hwpt_alloc(t.idev_id, t.ioas_id, DIRTY)
    ok = f.dev()
    assert ok.attach(hwpt_id) == hwpt_id
    no_dirty = f.dev(iommu_dirty=False)
    assert errno_of(no_dirty.attach, hwpt_id) == errno.EINVAL
    ok.close()
    f.destroy(hwpt_id)
    # IOMMU device does not support dirty tracking
    ioas_id = f.ioas_alloc()
    assert no_dirty.attach(ioas_id) != 0
    assert errno_of(f.hwpt_alloc, no_dirty.devid, ioas_id, DIRTY) == errno.EOPNOTSUPP
    no_dirty.close()


def test_set_dirty_tracking(variant: tuple[str, int, bool]) -> None:
    t = DirtyTracking(variant[1], variant[2])
    hwpt_id = t.f.hwpt_alloc(t.idev_id, t.ioas_id, DIRTY)
    d = t.f.dev()
    d.attach(hwpt_id)
    t.f.set_dirty(hwpt_id, True)
    assert d.hw.domain.dirty_tracking  # beyond the selftest: the hardware really toggled
    t.f.set_dirty(hwpt_id, False)
    assert not d.hw.domain.dirty_tracking
    d.close()
    t.f.destroy(hwpt_id)


def test_device_dirty_capability(variant: tuple[str, int, bool]) -> None:
    t = DirtyTracking(variant[1], variant[2])
    hwpt_id = t.f.hwpt_alloc(t.idev_id, t.ioas_id, 0)
    d = t.f.dev()
    d.attach(hwpt_id)
    caps = t.f.hw_info(t.idev_id).out_capabilities
    assert caps & u.IOMMU_HW_CAP_DIRTY_TRACKING == u.IOMMU_HW_CAP_DIRTY_TRACKING
    d.close()
    t.f.destroy(hwpt_id)


def _dirty_bitmap_test(variant: tuple[str, int, bool], flags: int) -> None:
    t = DirtyTracking(variant[1], variant[2])
    page_size = HUGE if t.hugepages else PAGE  # the IOPTE size
    t.f.map(t.ioas_id, t.buffer, t.buffer_size, MOCK_APERTURE_START)
    hwpt_id = t.f.hwpt_alloc(t.idev_id, t.ioas_id, DIRTY)
    assert t.dev.attach(hwpt_id) == hwpt_id  # replace: its DMA now goes through hwpt_id
    t.f.set_dirty(hwpt_id, True)
    for off in BITMAP_OFFSETS:
        mock_dirty_bitmaps(
            t,
            hwpt_id,
            t.dev,
            t.buffer_size,
            MOCK_APERTURE_START,
            t.page_size,
            page_size,
            off,
            flags,
        )
    t.dev.attach(t.ioas_id)
    t.f.destroy(hwpt_id)


def test_get_dirty_bitmap(variant: tuple[str, int, bool]) -> None:
    _dirty_bitmap_test(variant, 0)


def test_get_dirty_bitmap_no_clear(variant: tuple[str, int, bool]) -> None:
    _dirty_bitmap_test(variant, NO_CLEAR)


# ----------------------------------------------------------------------------------------
# Finer points of §5.7 / §5.8 / §11 beyond the selftest


def _setup(
    length: int = 64 * K4, huge: bool = False, vendor: str = "vtd"
) -> tuple[Iommufd, Dev, int, int, int]:
    """A dirty HWPT with [BASE, BASE+length) mapped and tracking on; returns
    (f, dev, ioas, hwpt, bitmap address)."""
    f = Iommufd(vendor=vendor)
    ioas = f.ioas_alloc()
    if not huge:
        f.huge_pages(ioas, False)
    addr, _ = f.buf(length)
    f.map(ioas, addr, length, BASE)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.set_dirty(hwpt, True)
    bm, _ = f.buf(4 * K4)
    return f, d, ioas, hwpt, bm


def _read(f: Iommufd, hwpt: int, iova: int, length: int, ps: int, flags: int = 0) -> list[int]:
    bm, mem = f.buf(max(K4, length // ps // 8 + K4))
    assert mem is not None
    f.get_dirty(hwpt, iova, length, ps, bm, flags)
    return [int(i) for i in np.flatnonzero(np.unpackbits(mem, bitorder="little"))]


def test_enable_clears_every_dirty_bit() -> None:
    """SMMUv3 creates writable mappings writable-dirty; enabling clears them all."""
    f = Iommufd(vendor="smmuv3")
    ioas = f.ioas_alloc()
    f.huge_pages(ioas, False)
    addr, _ = f.buf(16 * K4)
    f.map(ioas, addr, 16 * K4, BASE)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    assert _read(f, hwpt, BASE, 16 * K4, K4, NO_CLEAR) == list(range(16))  # before enable
    f.set_dirty(hwpt, True)
    assert _read(f, hwpt, BASE, 16 * K4, K4) == []
    d.hw.dma_write(BASE + 3 * K4, b"abc")
    f.set_dirty(hwpt, True)  # enabling again is a fresh snapshot too
    assert _read(f, hwpt, BASE, 16 * K4, K4) == []


def test_disable_keeps_bits_and_enable_clears() -> None:
    f, d, _ioas, hwpt, _bm = _setup()
    d.hw.dma_write(BASE + 5 * K4, 1)
    f.set_dirty(hwpt, False)  # disable: driver only, bits stay
    assert _read(f, hwpt, BASE, 64 * K4, K4, NO_CLEAR) == [5]
    f.set_dirty(hwpt, True)
    assert _read(f, hwpt, BASE, 64 * K4, K4) == []


def test_bits_relative_to_request_iova_and_larger_page_size() -> None:
    f, d, _ioas, hwpt, _bm = _setup()
    for p in (9, 10, 33):
        d.hw.dma_write(BASE + p * K4, 1)
    # relative to the request's iova, not to IOVA 0
    assert _read(f, hwpt, BASE + 8 * K4, 32 * K4, K4, NO_CLEAR) == [1, 2, 25]
    # 16 KiB granule: pages 9,10 -> bit 2, page 33 -> bit 8
    assert _read(f, hwpt, BASE, 64 * K4, 4 * K4, NO_CLEAR) == [2, 8]
    # 64 KiB granule: pages 9,10 -> bit 0, page 33 -> bit 2
    assert _read(f, hwpt, BASE, 64 * K4, 16 * K4, NO_CLEAR) == [0, 2]
    # 8 KiB granule from 8 pages in: (9-8)//2=0, (10-8)//2=1, (33-8)//2=12
    assert _read(f, hwpt, BASE + 8 * K4, 32 * K4, 2 * K4, NO_CLEAR) == [0, 1, 12]
    # 256 KiB granule, the whole range: one bit
    assert _read(f, hwpt, BASE, 64 * K4, 64 * K4, NO_CLEAR) == [0]
    # 1 KiB granule: each 4 KiB page sets 4 bits
    assert _read(f, hwpt, BASE + 8 * K4, 4 * K4, 1024, NO_CLEAR) == list(range(4, 12))


def test_granule_groups_span_area_boundaries() -> None:
    """Two contiguous areas meeting in the middle of a 16 KiB granule: the second area's
    pages fall in the groups counted from the request's iova, not from the area."""
    f = Iommufd(vendor="amd")
    ioas = f.ioas_alloc()
    f.huge_pages(ioas, False)
    a, _ = f.buf(2 * K4)
    b, _ = f.buf(14 * K4)
    f.map(ioas, a, 2 * K4, BASE)
    f.map(ioas, b, 14 * K4, BASE + 2 * K4)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.set_dirty(hwpt, True)
    for p in (4, 13):
        d.hw.dma_write(BASE + p * K4, 1)
    assert _read(f, hwpt, BASE, 16 * K4, 4 * K4, NO_CLEAR) == [1, 3]
    assert _read(f, hwpt, BASE, 16 * K4, 2 * K4, NO_CLEAR) == [2, 6]
    assert _read(f, hwpt, BASE, 16 * K4, 8 * K4, NO_CLEAR) == [0, 1]


def test_non_power_of_two_page_size_acts_through_its_lowest_bit() -> None:
    f, d, _ioas, hwpt, _bm = _setup()
    d.hw.dma_write(BASE + 6 * K4, 1)
    # 0x3000: mask test only; iova and end must have bits 12..13 clear... BASE is fine, and
    # 0x3000 - 1 = 0x2fff masks length 0x10000 as aligned; the granule is 0x1000.
    assert _read(f, hwpt, BASE, 16 * K4, 0x3000, NO_CLEAR) == [6]
    # a length that fails the mask test is EINVAL
    cmd = f.dirty_cmd(hwpt, BASE, 0x3000, 0x3000, _bm)
    assert f.err(u.IOMMU_HWPT_GET_DIRTY_BITMAP, cmd) == errno.EINVAL


def test_bitmap_bits_only_set_never_cleared() -> None:
    f, d, _ioas, hwpt, bm = _setup()
    f.k.mm.write(bm, b"\xff\x00\xaa")
    d.hw.dma_write(BASE + 8 * K4, 1)
    f.get_dirty(hwpt, BASE, 64 * K4, K4, bm)
    assert f.k.mm.read(bm, 3) == b"\xff\x01\xaa"


def test_walk_stops_at_first_hole_and_swallows_errors() -> None:
    f = Iommufd(vendor="amd")
    ioas = f.ioas_alloc()
    f.huge_pages(ioas, False)
    a, _ = f.buf(8 * K4)
    b, _ = f.buf(8 * K4)
    c, _ = f.buf(8 * K4)
    f.map(ioas, a, 8 * K4, BASE)
    f.map(ioas, b, 8 * K4, BASE + 8 * K4)  # contiguous with the first
    f.map(ioas, c, 8 * K4, BASE + 24 * K4)  # after a hole
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.set_dirty(hwpt, True)
    for p in (1, 12, 25):
        d.hw.dma_write(BASE + p * K4, 1)
    assert _read(f, hwpt, BASE, 32 * K4, K4) == [1, 12]  # success; stops at the hole
    assert _read(f, hwpt, BASE + 16 * K4, 16 * K4, K4) == []  # starts in a hole: nothing
    assert _read(f, hwpt, BASE + 24 * K4, 8 * K4, K4) == [1]


def test_iova_zero_length_zero_walks_from_zero() -> None:
    """iova 0, length 0 passes every check; with nothing mapped at IOVA 0 it walks
    nothing and succeeds."""
    f, d, _ioas, hwpt, bm = _setup()
    d.hw.dma_write(BASE, 1)
    f.get_dirty(hwpt, 0, 0, K4, bm)
    assert _read(f, hwpt, BASE, 64 * K4, K4, NO_CLEAR) == [0]  # nothing was cleared


def test_faulting_bitmap_drops_bits_but_clears_state() -> None:
    """7.x: bits whose bitmap page cannot be pinned are dropped, yet the IOPTEs are
    cleared: those dirty pages are lost (spec §5.8)."""
    length = 65536 * K4  # 64K pages -> 8 KiB of bitmap: two bitmap pages
    f, d, _ioas, hwpt, _bm = _setup(length)
    bm, mem = f.buf(K4)  # only the first bitmap page exists; the next is a guard gap
    assert mem is not None
    d.hw.dma_write(BASE + 3 * K4, 1)  # lands in bitmap page 0
    d.hw.dma_write(BASE + 40000 * K4, 1)  # lands in bitmap page 1 (unmapped)
    f.get_dirty(hwpt, BASE, length, K4, bm)  # success
    got = [int(i) for i in np.flatnonzero(np.unpackbits(mem, bitorder="little"))]
    assert got == [3]
    assert _read(f, hwpt, BASE, length, K4) == []  # the dropped one was cleared too
    # A bitmap pointer that is not user memory at all: still success, nothing anywhere
    d.hw.dma_write(BASE + 5 * K4, 1)
    f.get_dirty(hwpt, BASE, length, K4, 0x10)
    assert _read(f, hwpt, BASE, length, K4) == []


def test_unbacked_bitmap_memory_is_unpinnable() -> None:
    f, d, _ioas, hwpt, _bm = _setup()
    bm, mem = f.buf(K4, backed=False)
    assert mem is None
    d.hw.dma_write(BASE, 1)
    f.get_dirty(hwpt, BASE, 64 * K4, K4, bm)
    assert _read(f, hwpt, BASE, 64 * K4, K4) == []


def test_huge_leaf_reported_whole_and_cursor_semantics() -> None:
    """§11: a dirty leaf is recorded as (walk cursor, leaf size): a request starting inside
    a 2 MiB leaf marks [cursor, cursor + 2 MiB), beyond the leaf's end, and a leaf running
    past the request's end sets bits past ceil(length/page_size), within the pinned pages."""
    f, d, _ioas, hwpt, _bm = _setup(8 * M2, huge=True, vendor="vtd")
    d.hw.dma_write(BASE + M2 + 5 * K4, 1)  # dirty the second 2 MiB leaf
    # Whole leaf at 4K granularity
    assert _read(f, hwpt, BASE, 8 * M2, K4, NO_CLEAR) == list(range(512, 1024))
    # At 2 MiB granularity: one bit
    assert _read(f, hwpt, BASE, 8 * M2, M2, NO_CLEAR) == [1]
    # Request starting inside the dirty leaf (offset 256 pages): recorded from the cursor,
    # a full leaf's worth: bits 0..511 of the request, i.e. 256 pages past the leaf's end.
    assert _read(f, hwpt, BASE + M2 + M2 // 2, 2 * M2, K4, NO_CLEAR) == list(range(512))
    # Request ending inside the dirty leaf: the whole leaf is recorded, past the end
    # (bits 256..767 though the request has only 512 bits; the bitmap page holds them).
    assert _read(f, hwpt, BASE + M2 // 2, M2, K4, NO_CLEAR) == list(range(256, 768))


def test_no_clear_leaves_state_for_the_next_read() -> None:
    f, d, _ioas, hwpt, _bm = _setup()
    d.hw.dma_write(BASE + 2 * K4, 1)
    assert _read(f, hwpt, BASE, 64 * K4, K4, NO_CLEAR) == [2]
    assert _read(f, hwpt, BASE, 64 * K4, K4) == [2]
    assert _read(f, hwpt, BASE, 64 * K4, K4) == []


def test_writes_after_a_clear_are_seen_again() -> None:
    """The IOTLB sync after clearing: a write after the report sets the bit again."""
    f, d, _ioas, hwpt, _bm = _setup()
    for _ in range(3):
        d.hw.dma_write(BASE + 7 * K4, 1)
        assert _read(f, hwpt, BASE, 64 * K4, K4) == [7]
        assert _read(f, hwpt, BASE, 64 * K4, K4) == []


@pytest.mark.parametrize("vendor", ["smmuv3", "vtd", "amd"])
def test_auto_domain_has_no_dirty_ops(vendor: str) -> None:
    f = Iommufd(vendor=vendor)
    ioas = f.ioas_alloc()
    d = f.dev()
    hwpt = d.attach(ioas)
    assert f.err(u.IOMMU_HWPT_SET_DIRTY_TRACKING, _sdt(hwpt, 1)) == errno.EOPNOTSUPP
    bm, _ = f.buf(K4)
    cmd = f.dirty_cmd(hwpt, BASE, 16 * K4, K4, bm)
    assert f.err(u.IOMMU_HWPT_GET_DIRTY_BITMAP, cmd) == errno.EOPNOTSUPP


def _sdt(hwpt: int, flags: int) -> object:
    from test_iommufd_util import sized

    return sized(u.iommu_hwpt_set_dirty_tracking, flags=flags, hwpt_id=hwpt)
