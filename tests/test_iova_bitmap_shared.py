"""The one iova_bitmap behind both dirty reports (drivers/iommu/iommufd/iova_bitmap.c).

VFIO's DMA_LOGGING_REPORT and iommufd's GET_DIRTY_BITMAP write the user's bitmap through
the same IovaBitmap; they differ only in what happens to iova_bitmap_for_each's error:
VFIO returns it (EFAULT when the bitmap stops short), iommufd discards it (bits over
unpinnable pages are dropped, the call succeeds).
"""

from __future__ import annotations

import errno

import numpy as np
from conftest import Dev, bits_of, report, start
from hypothesis import given, settings
from hypothesis import strategies as st
from test_iommufd_util import BASE, DIRTY, K4, NO_CLEAR, Iommufd

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap

MB = 1 << 20


def _naive(iova: int, shift: int, max_bits: int, starts: list[int], length: int) -> np.ndarray:
    """Bit by bit: every bit overlapping [s, s+length), not before iova, below max_bits."""
    out = np.zeros(max_bits, dtype=bool)
    for s in starts:
        last = s + length - 1
        if last < iova:
            continue
        first_bit = (max(s, iova) - iova) >> shift
        last_bit = min((last - iova) >> shift, max_bits - 1)
        out[first_bit : last_bit + 1] = True
    return out


@settings(max_examples=80, deadline=None)
@given(
    shift=st.sampled_from([12, 13, 16, 21]),
    off=st.integers(0, 64),
    pages=st.lists(st.integers(-8, 600), max_size=40),
    span=st.sampled_from([1, 2, 3, 16, 512]),
    length=st.sampled_from([K4, 1 << 20, 600 * K4]),
)
def test_set_ranges_is_iova_bitmap_set_for_each_range(
    shift: int, off: int, pages: list[int], span: int, length: int
) -> None:
    k = ModelKernel()
    data, mem = k.mmap(4 * K4)
    assert mem is not None
    iova = (1 << 32) + (8 << shift)
    bm = IovaBitmap(k.mm, iova, length, 1 << shift, data + off)
    starts = [iova + p * K4 for p in pages]
    bm.set_ranges(starts, span * K4)
    want = _naive(iova, shift, bm.max_bits, starts, span * K4)
    nbytes = (bm.max_bits + 7) // 8
    got = np.unpackbits(mem[off : off + nbytes], bitorder="little")[: bm.max_bits]
    assert np.array_equal(got.astype(bool), want)
    assert not mem[:off].any() and not mem[off + nbytes :].any()


def _bitmap_then_hole(k: ModelKernel) -> int:
    """A bitmap whose first 8 bytes are the last bytes of a mapping: 64 bits pinnable."""
    addr, _ = k.mmap(K4)
    return addr + K4 - 8


def test_vfio_report_faults_where_iommufd_drops() -> None:
    # VFIO: the device logs page 3 and page 100; the bitmap holds 64 bits, then nothing.
    k = ModelKernel()
    d = Dev(k, migration_flags=7, dma_logging=True, state_size=4096, chunk_size=4096)
    assert start(d, [(0, 4 * MB)])[0] == 0
    d.hw.on_dma_write(3 * K4, 8)
    d.hw.on_dma_write(100 * K4, 8)
    bm = _bitmap_then_hole(k)
    e, raw = report(d, 0, 4 * MB, bitmap=bm, nbytes=8)
    assert e == errno.EFAULT and bits_of(raw) == [3]
    assert bits_of(report(d, 0, 4 * MB)[1]) == [100]  # what was not reported is still logged

    # iommufd: the same bitmap, the same pages dirty: success, the bit past it dropped
    f = Iommufd(vendor="vtd")
    ioas = f.ioas_alloc()
    f.huge_pages(ioas, False)
    addr, _ = f.buf(4 * MB)
    f.map(ioas, addr, 4 * MB, BASE)
    dev = f.dev()
    hwpt = f.hwpt_alloc(dev.devid, ioas, DIRTY)
    dev.attach(hwpt)
    f.set_dirty(hwpt, True)
    dev.hw.dma_write(BASE + 3 * K4, 8)
    dev.hw.dma_write(BASE + 100 * K4, 8)
    bm = _bitmap_then_hole(f.k)
    f.get_dirty(hwpt, BASE, 4 * MB, K4, bm)  # no error
    assert bits_of(f.k.mm.read(bm, 8)) == [3]
    full, _ = f.buf(K4)
    f.get_dirty(hwpt, BASE, 4 * MB, K4, full, NO_CLEAR)
    assert bits_of(f.k.mm.read(full, K4)) == []  # page 100 was cleared all the same


def test_vfio_report_sets_a_whole_tracked_page_past_the_end() -> None:
    """mlx5 reports a dirty tracked page with iova_bitmap_set(dirty, addr, tracked size):
    a tracked page that runs past the report's end sets bits past it too, as far as the
    pinned bitmap pages go (the same iova_bitmap_set as iommufd's huge-leaf spill)."""
    k = ModelKernel()
    d = Dev(k, migration_flags=7, dma_logging=True, state_size=4096, chunk_size=4096)
    assert start(d, [(0, 4 * MB)], 2 * MB) == (0, 2 * MB)
    d.hw.on_dma_write(2 * MB + 5, 1)
    assert bits_of(report(d, 0, 3 * MB, 64 * 1024)[1]) == list(range(32, 64))
