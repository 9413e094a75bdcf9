"""type1 dirty tracking (VFIO_IOMMU_DIRTY_PAGES, UNMAP_DMA + GET_DIRTY_BITMAP) by its bytes.

What is dirty comes from vfio_iommu_type1.c, not from any hardware dirty bit: with a
passthrough device every mapped page on every report; with only emulated devices, pinned
pages (every report) and vfio_dma_rw writes (once). Reports are checked against
`oracle_report`, a pure-Python restatement of the whole-word write rule, and against
literal words worked out by hand.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_type1_support import (
    MASK64,
    PAGE,
    PIN_KIND,
    PIN_PT_KIND,
    START,
    STOP,
    Legacy,
    Type1Oracle,
    bits_to_words,
    errno_of,
    oracle_report,
    words_of,
)

from vfiomig.hw.iommu import IommuFault
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.vfio_iommu_type1 import bitmap_clear, bitmap_set, bitmap_zalloc
from vfiomig.uapi import vfio as v

BASE = 0x4000_0000
ONES = b"\xff"


def everything(*sizes_in_pages: int) -> list[set[int]]:
    return [set(range(n)) for n in sizes_in_pages]


# -- what is dirty --------------------------------------------------------------------------


def test_a_passthrough_device_makes_every_mapped_page_dirty_on_every_report() -> None:
    lg = Legacy(ModelKernel())
    lg.map(BASE, 8 * PAGE)
    lg.map(BASE + 128 * PAGE, 30 * PAGE)
    lg.dirty(START)
    # pages 0-7 and 128-157 into a bitmap of all ones: each mapping overwrites its words
    # (the gap after it up to the word's end becomes 0); word 1 lies in the hole: untouched
    want = [0xFF, MASK64, (1 << 30) - 1]
    for _ in range(3):  # no DMA at all, and still everything, every time
        assert lg.get_bitmap(BASE, 158 * PAGE, fill=ONES) == want
    lg.hw().dma_write(BASE, b"dma")  # and DMA changes nothing either
    assert lg.get_bitmap(BASE, 158 * PAGE, fill=ONES) == want
    assert lg.get_bitmap(BASE + 128 * PAGE, 30 * PAGE) == [(1 << 30) - 1]  # per mapping


def test_shifted_reports_leak_the_bits_shifted_past_a_mapping() -> None:
    """update_user_bitmap shifts the mapping's bitmap in place and the report then clears
    only its first nbits bits: the bits shifted to [nbits, nbits + shift) stay, and the
    next shifted report copies them past the mapping's end. Over-reporting, never missed
    pages; a caller that asks per mapping (shift 0 from a fresh bitmap) never sees it."""
    lg = Legacy(ModelKernel())
    lg.map(BASE, 8 * PAGE)
    lg.map(BASE + 100 * PAGE, 30 * PAGE)  # pages 100-129: bit shift 36 in word 1
    lg.dirty(START)
    words = [lg.get_bitmap(BASE, 130 * PAGE) for _ in range(3)]
    assert words[0] == [0xFF, 0xFFFFFFF000000000, 0x3]  # exact the first time
    assert words[1] == [0xFF, 0xFFFFFFF000000000, 0x3FFFFFFF03]  # pages 136-165 leak in
    assert words[2] == [0xFF, 0xFFFFFFF000000000, 0xFFFFF03FFFFFFF03]
    oracle = Type1Oracle([(BASE, 8), (BASE + 100 * PAGE, 30)])
    assert [oracle.report([0, 0, 0], BASE, all_dirty=True) for _ in range(3)] == words


def test_emulated_only_dma_rw_writes_are_reported_once() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))
    lg.map(BASE, 16 * PAGE)
    lg.dirty(START)
    assert lg.get_bitmap(BASE, 16 * PAGE) == [0]
    mdev = lg.vdev()
    mdev.write(BASE + 5 * PAGE + 100, b"x" * 5000)  # pages 5 and 6
    mdev.write(BASE + 15 * PAGE, b"y")
    assert lg.get_bitmap(BASE, 16 * PAGE) == [1 << 5 | 1 << 6 | 1 << 15]
    assert lg.get_bitmap(BASE, 16 * PAGE) == [0]
    assert mdev.read(BASE + 5 * PAGE + 100, 3) == b"xxx"  # reads dirty nothing
    assert lg.get_bitmap(BASE, 16 * PAGE) == [0]


def test_pinned_pages_are_dirty_on_every_report_until_unpinned() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))
    lg.map(BASE, 16 * PAGE)
    mdev = lg.vdev()
    mdev.pin(BASE + 2 * PAGE)  # pinned before START: START pre-populates it
    lg.dirty(START)
    mdev.pin(BASE + 9 * PAGE)  # pinned while tracking
    for _ in range(3):
        assert lg.get_bitmap(BASE, 16 * PAGE) == [1 << 2 | 1 << 9]
    mdev.unpin(BASE + 9 * PAGE)
    assert lg.get_bitmap(BASE, 16 * PAGE) == [1 << 2 | 1 << 9]  # set until reported
    assert lg.get_bitmap(BASE, 16 * PAGE) == [1 << 2]


def test_a_passthrough_device_beside_an_mdev_still_dirties_everything() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND, "reference"))
    lg.map(BASE, 4 * PAGE)
    lg.dirty(START)
    lg.vdev(0).pin(BASE)  # the mdev's pins promote only the mdev's own group
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0xF]
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0xF]


def test_a_passthrough_group_that_pins_is_promoted_to_pinned_scope() -> None:
    lg = Legacy(ModelKernel(), (PIN_PT_KIND,))
    lg.map(BASE, 4 * PAGE)
    lg.dirty(START)
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0xF]  # it could DMA behind type1's back
    lg.vdev().pin(BASE + 2 * PAGE)  # it declared itself dirty-tracking capable
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0b100]
    lg.hw().dma_write(BASE, b"unseen")  # from now on type1 believes it, DMA or not
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0b100]


def test_detaching_the_passthrough_group_marks_everything_dirty_once() -> None:
    k = ModelKernel()
    lg = Legacy(k, (PIN_KIND, "reference"))
    lg.map(BASE, 4 * PAGE)
    lg.dirty(START)
    lg.vdev(0).pin(BASE + PAGE)
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0xF]
    k.close(lg.devfds[1])
    k.ioctl(lg.groups[1], v.VFIO_GROUP_UNSET_CONTAINER)
    # what it may have written is unknown: vfio_iommu_populate_bitmap_full
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0xF]
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0b10]  # now only the mdev's pin
    with pytest.raises(IommuFault):  # and the device lost its translations
        lg.hw(1).dma_write(BASE, b"x")


def test_detaching_while_not_tracking_marks_nothing() -> None:
    k = ModelKernel()
    lg = Legacy(k, (PIN_KIND, "reference"))
    lg.map(BASE, 4 * PAGE)
    k.close(lg.devfds[1])
    k.ioctl(lg.groups[1], v.VFIO_GROUP_UNSET_CONTAINER)
    lg.dirty(START)
    assert lg.get_bitmap(BASE, 4 * PAGE) == [0]


def test_mappings_made_while_tracking_start_clean() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))
    lg.dirty(START)
    lg.map(BASE, 8 * PAGE)
    assert lg.get_bitmap(BASE, 8 * PAGE) == [0]
    lg.vdev().write(BASE + 7 * PAGE, b"z")
    assert lg.get_bitmap(BASE, 8 * PAGE) == [1 << 7]


def test_start_is_idempotent_and_stop_forgets() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))
    lg.map(BASE, 8 * PAGE)
    assert lg.dirty(START) == 0
    lg.vdev().write(BASE + 3 * PAGE, b"w")
    assert lg.dirty(START) == 0  # already on: the bitmaps are kept
    assert lg.get_bitmap(BASE, 8 * PAGE) == [1 << 3]
    lg.vdev().write(BASE + 4 * PAGE, b"w")
    assert lg.dirty(STOP) == 0
    assert lg.dirty(STOP) == 0
    assert errno_of(lg.get_bitmap, BASE, 8 * PAGE) == errno.EINVAL  # not tracking
    lg.dirty(START)
    assert lg.get_bitmap(BASE, 8 * PAGE) == [0]  # the write before STOP is gone


# -- how it is written ----------------------------------------------------------------------


W5A = 0x5A5A5A5A5A5A5A5A


@pytest.mark.parametrize(
    ("fill", "b_page", "want"),
    [
        # A (3 pages at bit 0) overwrites word 0 whole: bits 3..63 become 0.
        # B (5 pages at bit 70): word 1 is OR-ed with what the user had, word 2 untouched.
        (ONES, 70, [0b111, MASK64, MASK64]),
        (b"\0", 70, [0b111, 0b11111 << 6, 0]),
        (b"\x5a", 70, [0b111, W5A | 0b11111 << 6, W5A]),
        # B on a word boundary: its first word is overwritten, garbage and all
        (ONES, 64, [0b111, 0b11111, MASK64]),
        (b"\x5a", 128, [0b111, W5A, 0b11111]),
    ],
)
def test_whole_word_writes_worked_by_hand(fill: bytes, b_page: int, want: list[int]) -> None:
    lg = Legacy(ModelKernel())
    lg.map(BASE, 3 * PAGE)
    lg.map(BASE + b_page * PAGE, 5 * PAGE)
    lg.dirty(START)
    assert lg.get_bitmap(BASE, 192 * PAGE, fill=fill) == want


@pytest.mark.parametrize(("fill", "want"), [(b"\0", 0b11 << 10), (ONES, MASK64)])
def test_report_relative_to_a_base_in_a_hole(fill: bytes, want: int) -> None:
    """The mapping's bits land at 10 and 11; its word is OR-ed with the user's (shift 10)."""
    lg = Legacy(ModelKernel())
    lg.map(BASE + 10 * PAGE, 2 * PAGE)
    lg.dirty(START)
    assert lg.get_bitmap(BASE, 20 * PAGE, fill=fill) == [want]


MAPPINGS = st.lists(
    st.tuples(st.integers(0, 90), st.integers(1, 150)), min_size=1, max_size=5
)  # (gap in pages before the mapping, its size in pages)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=MAPPINGS,
    lead=st.integers(0, 70),
    tail=st.integers(0, 70),
    passthrough=st.booleans(),
    data=st.data(),
)
def test_reports_equal_the_oracle(
    layout: list[tuple[int, int]], lead: int, tail: int, passthrough: bool, data: st.DataObject
) -> None:
    """Random mappings, pins, dma_rw writes, base offsets and user bitmap garbage: the
    kernel's words equal the oracle's, report after report."""
    lg = Legacy(ModelKernel(), ("reference",) if passthrough else (PIN_KIND,))
    maps: list[tuple[int, int]] = []
    page = lead
    for gap, npages in layout:
        page += gap
        maps.append((BASE + page * PAGE, npages))
        lg.map(BASE + page * PAGE, npages * PAGE)
        page += npages
    total = page + tail
    nwords = (total + 63) // 64
    oracle = Type1Oracle(maps)
    lg.dirty(START)
    if not passthrough:
        for iova, npages in maps:
            for p in data.draw(st.sets(st.integers(0, npages - 1), max_size=2)):
                lg.vdev().pin(iova + p * PAGE)
                oracle.pinned[iova].add(p)
                oracle.mark(iova, p)
    for _round in range(3):
        if not passthrough:
            for iova, npages in maps:
                for p in data.draw(st.sets(st.integers(0, npages - 1), max_size=6)):
                    lg.vdev().write(iova + p * PAGE + 17, b"d")
                    oracle.mark(iova, p)
        garbage = data.draw(st.lists(st.integers(0, MASK64), min_size=nwords, max_size=nwords))
        addr, mem = lg.bitmap(nwords * 8)
        mem[: nwords * 8] = bytearray(b"".join(w.to_bytes(8, "little") for w in garbage))
        lg.ioctl(v.VFIO_IOMMU_DIRTY_PAGES, lg.get_bitmap_buf(BASE, total * PAGE, addr, nwords * 8))
        assert words_of(mem, nwords * 8) == oracle.report(garbage, BASE, all_dirty=passthrough)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(-1, 130)), max_size=8))
def test_bitmap_set_and_clear_on_words_equal_a_bool_array(
    ops: list[tuple[bool, int, int]],
) -> None:
    """lib/bitmap.c bitmap_set / bitmap_clear on the u64 words of a mapping's bitmap."""
    bm, want = bitmap_zalloc(331), np.zeros((331 + 63) // 64 * 64 + 64, bool)
    for setting, start, n in ops:
        (bitmap_set if setting else bitmap_clear)(bm, start, n)
        want[start : start + max(n, 0)] = setting
    words = [int(w) for w in bm]
    assert words == bits_to_words(set(np.flatnonzero(want).tolist()), len(words))


def test_oracle_agrees_with_a_plain_reading_of_the_rule() -> None:
    """The oracle itself, on a case small enough to read: two mappings sharing word 0."""
    user = [0xF0F0, 0xAAAA]
    got = oracle_report(user, 0, [(0, 2 * PAGE, {1}), (10 * PAGE, 3 * PAGE, {0, 2})])
    # mapping 1: shift 0, word 0 overwritten with bit 1 -> 0b10
    # mapping 2: shift 10, word 0 = 0b10 | (0b101 << 10); word 1 untouched
    assert got == [0b10 | 0b101 << 10, 0xAAAA]
    assert bits_to_words({1, 10, 12}, 2) == got[:1] + [0]


# -- UNMAP_DMA + GET_DIRTY_BITMAP -----------------------------------------------------------


def test_unmap_reports_then_unmaps() -> None:
    lg = Legacy(ModelKernel())
    lg.map(BASE, 3 * PAGE)
    lg.map(BASE + 70 * PAGE, 5 * PAGE)
    lg.dirty(START)
    addr, mem = lg.bitmap(24, fill=ONES)
    assert lg.unmap_dirty(BASE, 192 * PAGE, addr, 24) == 8 * PAGE
    assert words_of(mem, 24) == [0b111, MASK64, MASK64]
    with pytest.raises(IommuFault):
        lg.hw().dma_write(BASE, b"gone")
    assert lg.unmap(BASE, 192 * PAGE) == 0


def test_unmap_of_an_emulated_mapping_reports_its_writes_and_pins() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))
    lg.map(BASE, 8 * PAGE)
    lg.dirty(START)
    mdev = lg.vdev()
    mdev.write(BASE + PAGE, b"a")
    mdev.pin(BASE + 6 * PAGE)
    addr, mem = lg.bitmap(8)
    assert lg.unmap_dirty(BASE, 8 * PAGE, addr, 8) == 8 * PAGE
    assert words_of(mem, 8) == [1 << 1 | 1 << 6]
    assert mdev.unmap_calls == [(BASE, 8 * PAGE)]  # asked to unpin first (ops->dma_unmap)
    assert mdev.pinned == []


def test_unmap_of_pins_never_released_is_a_warning_not_a_hang() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))
    lg.map(BASE, 2 * PAGE)
    mdev = lg.vdev()
    mdev.pin(BASE)
    mdev.stubborn = True
    assert lg.unmap(BASE, 2 * PAGE) == 2 * PAGE  # the kernel would BUG() here
    assert len(mdev.unmap_calls) == 11
    assert any("never released" in w for w in mdev.warnings)


def test_unmap_fault_on_the_bitmap_keeps_what_was_removed_before() -> None:
    lg = Legacy(ModelKernel())
    lg.map(BASE, PAGE)
    lg.map(BASE + 64 * PAGE, PAGE)  # its word lies beyond the 8 bytes that exist
    lg.dirty(START)
    addr, mem = lg.bitmap(PAGE)
    # the bitmap claims 16 bytes from the last 8 bytes of the region: word 1 faults
    e = errno_of(lg.unmap_dirty, BASE, 65 * PAGE, addr + PAGE - 8, 16)
    assert e == errno.EFAULT
    assert words_of(mem[PAGE - 8 :], 8) == [1]  # the first mapping was reported...
    with pytest.raises(IommuFault):
        lg.hw().dma_write(BASE, b"x")  # ...and removed
    lg.hw().dma_write(BASE + 64 * PAGE, b"x")  # the second one is still mapped
    assert lg.unmap(BASE, 65 * PAGE) == PAGE


# -- v1, scale ------------------------------------------------------------------------------


def test_a_v1_container_has_no_dirty_tracking() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,), iommu_type=v.VFIO_TYPE1_IOMMU)
    lg.map(BASE, PAGE)
    assert errno_of(lg.dirty, START) == errno.EACCES
    # EACCES comes before the header is even copied in
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_DIRTY_PAGES, bytearray(2)) == errno.EACCES
    assert errno_of(lg.vdev().pin, BASE) == errno.EACCES  # vfio_pin_pages is v2 only


def test_one_tib_passthrough_guest_reports_in_whole() -> None:
    """A 1 TiB mapping over unbacked memory: 2^28 pages, a 32 MiB report, all ones."""
    lg = Legacy(ModelKernel())
    size = 1 << 40
    lg.map(1 << 40, size, backed=False)
    lg.dirty(START)
    nbytes = size // PAGE // 8
    addr, mem = lg.bitmap(nbytes)
    lg.ioctl(v.VFIO_IOMMU_DIRTY_PAGES, lg.get_bitmap_buf(1 << 40, size, addr, nbytes))
    assert bool((mem[:nbytes] == 0xFF).all())
    lg.hw().dma_write((1 << 40) + (5 << 30), 1 << 20)  # a length-only DMA into it works


def test_more_than_int_max_pages_cannot_be_tracked() -> None:
    """DIRTY_BITMAP_PAGES_MAX: a mapping of 2^31 pages (8 TiB) or more has no bitmap."""
    lg = Legacy(ModelKernel(), (PIN_KIND,))  # emulated-only: nothing is pinned at map time
    big = (1 << 31) * PAGE
    lg.map(0, big, vaddr=1 << 46)
    assert errno_of(lg.dirty, START) == errno.EINVAL
    lg.unmap(0, big)
    lg.map(0, big - PAGE, vaddr=1 << 46)
    lg.dirty(START)  # 2^31 - 1 pages: fine
    assert errno_of(lg.map, big, big, 1 << 46) == errno.EINVAL  # and a new big one is refused
    assert lg.unmap(big, big) == 0
