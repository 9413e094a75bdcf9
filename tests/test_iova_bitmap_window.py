"""The user's dirty bitmap is written a bounded window at a time, whatever the request.

drivers/iommu/iommufd/iova_bitmap.c pins at most PAGE_SIZE / sizeof(struct page *) user
pages of bitmap at once (2 MiB: iova_bitmap_get) and sets bits in them with bitmap_set: the
kernel's memory does not grow with the IOVA length, the page size or the size of a dirty
IOPTE / tracked page. The model must not either: a page size below 4 KiB (which the kernel's
selftests use) or a huge one, over a large range, is accepted and answered with the same
bits as before, in memory bounded by a window (tracemalloc counts numpy's buffers).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import Dev, bits_of, report, start
from hypothesis import given, settings
from hypothesis import strategies as st
from test_iommufd_util import BASE, DIRTY, K4, NO_CLEAR, Iommufd

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.iommufd import iova_bitmap
from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap

MB = 1 << 20


def peak_of(fn: Callable[[], Any]) -> int:
    """Peak bytes traced while fn runs (numpy registers its buffers with tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def dirty_area(length: int, vendor: str = "vtd", iova: int = BASE) -> tuple[Iommufd, int, Any]:
    """An IOAS with `length` bytes of unbacked memory at `iova` in 4 KiB IOPTEs, a device on
    a dirty HWPT over it, tracking on. Returns (iommufd, hwpt id, device)."""
    f = Iommufd(vendor=vendor)
    ioas = f.ioas_alloc()
    f.huge_pages(ioas, False)
    uva, _ = f.buf(length, backed=False)
    f.map(ioas, uva, length, iova)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.set_dirty(hwpt, True)
    return f, hwpt, d


@pytest.mark.parametrize("page_size", [1, 512])
def test_get_dirty_bitmap_below_4k_in_bounded_memory(page_size: int) -> None:
    length = 256 * MB
    f, hwpt, d = dirty_area(length)
    d.hw.dma_write(BASE, length)  # every page dirty
    nbytes = length // page_size // 8
    bm, mem = f.buf(nbytes + K4)
    assert mem is not None
    peak = peak_of(lambda: f.get_dirty(hwpt, BASE, length, page_size, bm, NO_CLEAR))
    assert bool(np.all(mem[:nbytes] == 0xFF)) and not mem[nbytes:].any()
    assert peak < 16 * MB, f"peak {peak >> 20} MiB for a {nbytes >> 20} MiB bitmap"
    # the same answer, bit for bit, for scattered pages and a bitmap at an odd address
    f.get_dirty(hwpt, BASE, length, K4, bm)  # clear
    mem[:] = 0
    pages = [0, 1, 7, 4095, 4096, 30000, length // K4 - 1]
    for p in pages:
        d.hw.dma_write(BASE + p * K4 + 100, 1)
    f.get_dirty(hwpt, BASE, length, page_size, bm + 3)
    per = K4 // page_size
    want = sorted(p * per + j + 24 for p in pages for j in range(per))
    assert np.flatnonzero(np.unpackbits(mem, bitorder="little")).tolist() == want


@pytest.mark.parametrize("shift", [30, 40, 63])
def test_get_dirty_bitmap_with_a_huge_page_size(shift: int) -> None:
    """A page size of 2^63 is a legal mask: iova 0 and an end of 2^63 are aligned to it."""
    f, hwpt, d = dirty_area(64 * K4, iova=0)
    d.hw.dma_write(5 * K4, 8)
    bm, mem = f.buf(K4)
    assert mem is not None
    peak = peak_of(lambda: f.get_dirty(hwpt, 0, 1 << shift, 1 << shift, bm))
    assert bits_of(mem.tobytes()) == [0]
    assert peak < 4 * MB


def test_get_dirty_bitmap_huge_page_size_far_into_a_large_area() -> None:
    """Windows deep into an area of 32 GiB reduce into bit 0 of a 2^63 page without
    materialising the pages between the bitmap's base and the window."""
    length, top = 32 << 30, 1 << 63  # AMD's aperture reaches 2^64 - 1
    f, hwpt, d = dirty_area(length, vendor="amd", iova=top)
    d.hw.dma_write(top + length - K4, 8)
    bm, mem = f.buf(K4)
    assert mem is not None
    peak = peak_of(lambda: f.get_dirty(hwpt, top, 1 << 63, 1 << 63, bm))
    assert bits_of(mem.tobytes()) == [0]
    assert peak < 8 * MB


def test_logging_report_of_a_huge_tracked_page_in_bounded_memory() -> None:
    """A tracked page of 64 GiB reported at 4 KiB: 2^24 bits to set (a 2 MiB bitmap), set
    without an array per bit."""
    k = ModelKernel()
    d = Dev(k, log_page_shift=(12, 36), state_size=4096, chunk_size=4096)
    assert start(d, [(0, 1 << 36)], 1 << 36) == (0, 1 << 36)
    d.hw.on_dma_write(12345, 8)
    nbytes = (1 << 36) // K4 // 8
    out: list[tuple[int, bytes]] = []
    peak = peak_of(lambda: out.append(report(d, 0, 1 << 36, K4, nbytes=nbytes)))
    e, raw = out[0]
    assert e == 0 and raw == b"\xff" * nbytes
    assert peak < 16 * MB, f"peak {peak >> 20} MiB"


# -- IovaBitmap against bit-by-bit oracles, with small windows so that steps cross them -------


def _oracle_pages(
    iova: int, pgshift: int, max_bits: int, cur: int, dirty: list[int]
) -> np.ndarray:
    """Bit b is set iff a dirty 4 KiB page starting at cur + p*4K overlaps bit b's span."""
    out = np.zeros(max_bits, dtype=bool)
    for p in dirty:
        lo = (cur + p * K4 - iova) >> pgshift
        hi = (cur + p * K4 + K4 - 1 - iova) >> pgshift
        out[lo : min(hi + 1, max_bits)] = True
    return out


@settings(max_examples=150, deadline=None)
@given(
    pgshift=st.sampled_from([0, 1, 3, 9, 11, 12, 13, 15, 20, 30, 63]),
    page0=st.integers(0, 1 << 20),
    npages=st.integers(1, 3000),
    dirty=st.lists(st.integers(0, 2999), max_size=30),
    off=st.integers(0, 9),
    step=st.sampled_from([1 << 10, 1 << 14]),
)
def test_set_pages_matches_the_oracle(
    pgshift: int, page0: int, npages: int, dirty: list[int], off: int, step: int
) -> None:
    dirty = sorted({p for p in dirty if p < npages})
    k = ModelKernel()
    nbuf = 64 * K4
    data, mem = k.mmap(nbuf)
    assert mem is not None
    iova = (1 << 44) if pgshift < 44 else 0
    cur = iova + page0 * K4
    length = (page0 + npages) * K4
    bm = IovaBitmap(k.mm, iova, length, 1 << pgshift, data + off)
    bits = np.zeros(npages, dtype=bool)
    bits[dirty] = True
    old = iova_bitmap.STEP_BITS
    iova_bitmap.STEP_BITS = step
    try:
        bm.set_pages(cur, np.packbits(bits, bitorder="little"), npages)
    finally:
        iova_bitmap.STEP_BITS = old
    limit = min(bm.max_bits, (nbuf - off) * 8)
    want = _oracle_pages(iova, pgshift, limit, cur, dirty)
    got = np.unpackbits(mem, bitorder="little")[off * 8 : off * 8 + limit].astype(bool)
    assert np.array_equal(got, want)
    assert not mem[:off].any()


@settings(max_examples=150, deadline=None)
@given(
    pgshift=st.sampled_from([0, 3, 12, 13, 21, 40, 63]),
    starts=st.lists(st.integers(-(1 << 16), 1 << 22), max_size=30),
    span=st.sampled_from([1, 7, 4096, 1 << 16, 1 << 21, 1 << 40]),
    off=st.integers(0, 9),
    step=st.sampled_from([1 << 6, 1 << 12, 1 << 22]),
)
def test_set_ranges_matches_the_oracle(
    pgshift: int, starts: list[int], span: int, off: int, step: int
) -> None:
    k = ModelKernel()
    nbuf = 16 * K4
    data, mem = k.mmap(nbuf)
    assert mem is not None
    iova = 1 << 45
    length = 1 << 23
    bm = IovaBitmap(k.mm, iova, length, 1 << pgshift, data + off)
    abs_starts = [iova + s for s in starts]
    old = iova_bitmap.STEP_BITS
    iova_bitmap.STEP_BITS = step
    try:
        bm.set_ranges(abs_starts, span)
    finally:
        iova_bitmap.STEP_BITS = old
    limit = min(bm.max_bits, (nbuf - off) * 8)
    want = np.zeros(limit, dtype=bool)
    for s in abs_starts:
        last = s + span - 1
        if last < iova:
            continue
        lo = (max(s, iova) - iova) >> pgshift
        hi = (last - iova) >> pgshift
        want[lo : min(hi + 1, limit)] = True
    got = np.unpackbits(mem, bitorder="little")[off * 8 : off * 8 + limit].astype(bool)
    assert np.array_equal(got, want)
    assert not mem[:off].any()
