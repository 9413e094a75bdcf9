"""vmm.bitmap against a plain list-of-pages oracle (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiomig.vmm import bitmap as b
from vfiomig.vmm.bitmap import PageBitmap


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[int, list[int]]:
    npages = draw(st.integers(1, 700))
    dense = draw(st.booleans())
    if dense:  # long all-ones runs exercise the range fast path
        a = draw(st.integers(0, npages - 1))
        z = draw(st.integers(a, npages))
        extra = draw(st.lists(st.integers(0, npages - 1), max_size=20))
        return npages, sorted(set(range(a, z)) | set(extra))
    return npages, sorted(set(draw(st.lists(st.integers(0, npages - 1), max_size=200))))


@settings(max_examples=300, deadline=None)
@given(bitmaps(), st.integers(0, 800), st.integers(1, 800), st.sampled_from([1, 2, 1 << 16]))
def test_take_matches_a_wrapping_walk(
    bm: tuple[int, list[int]], cursor: int, limit: int, block: int
) -> None:
    npages, pages = bm
    old = b.SCAN_BLOCK
    b.SCAN_BLOCK = block  # small blocks walk the wrap-around and block edges
    try:
        m = PageBitmap(npages)
        m.set_pages(np.array(pages, dtype=np.int64))
        assert m.count() == len(pages)
        start = cursor if cursor < npages else 0
        order = [p for p in pages if p >= start] + [p for p in pages if p < start]
        want = order[:limit]
        got, nxt = m.take(cursor, limit)
        assert got.tolist() == want
        assert sorted(m.pages().tolist()) == sorted(set(pages) - set(want))
        assert m.count() == len(pages) - len(want)
        if want:
            assert nxt == want[-1] + 1
    finally:
        b.SCAN_BLOCK = old


@settings(max_examples=100, deadline=None)
@given(bitmaps(), st.integers(0, 100))
def test_or_words_at_any_offset(bm: tuple[int, list[int]], first: int) -> None:
    npages, pages = bm
    src = PageBitmap(npages)
    src.set_pages(np.array(pages, dtype=np.int64))
    dst = PageBitmap(npages + first)
    dst.or_words(first, src.words, npages)
    assert dst.pages().tolist() == [p + first for p in pages]


def test_fill_and_fetch_and_clear() -> None:
    m = PageBitmap(130, fill=True)
    assert m.count() == 130
    copy = m.fetch_and_clear()
    assert copy.count() == 130 and m.count() == 0
