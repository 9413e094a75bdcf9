"""Scale: a 1 TiB IOAS with 4 KiB IOPTEs over unbacked memory, dirty-tracked, costs a few
bits per page and no loop per page (kernel-uapi.md / issue 4, item 4)."""

from __future__ import annotations

import tracemalloc

import numpy as np
from test_iommufd_util import BASE, DIRTY, K4, M2, NO_CLEAR, Iommufd

TIB = 1 << 40
NPAGES = TIB // K4


def test_one_tib_at_4k_ioptes() -> None:
    tracemalloc.start()
    try:
        f = Iommufd(vendor="vtd")
        ioas = f.ioas_alloc()
        f.huge_pages(ioas, False)  # 4 KiB IOPTEs: 2^28 of them
        uva, mem = f.buf(TIB, backed=False)
        assert mem is None
        d = f.dev()
        hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
        d.attach(hwpt)
        f.map(ioas, uva, TIB, BASE)
        f.set_dirty(hwpt, True)
        assert d.hw.domain.leaf(BASE + TIB - K4) == (BASE + TIB - K4, K4)
        rng = np.random.default_rng(7)
        pages = sorted({int(p) for p in rng.integers(0, NPAGES, 2000)} | {0, NPAGES - 1})
        for p in pages:
            d.hw.dma_write(BASE + p * K4, 8)  # unbacked memory: a length, no bytes
        d.hw.dma_write(BASE + 5 * M2, 3 * M2)  # and one long run
        bm, bmem = f.buf(NPAGES // 8)
        assert bmem is not None
        f.get_dirty(hwpt, BASE, TIB, K4, bm, NO_CLEAR)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    got = np.flatnonzero(np.unpackbits(bmem, bitorder="little"))
    run = range(5 * M2 // K4, 8 * M2 // K4)
    assert got.tolist() == sorted(set(pages) | set(run))
    # Two bits per page in the page table (dirty + IOTLB; the 16 GiB chunks at both ends
    # add a little), the 32 MiB user bitmap besides; nothing near a byte per page (256 MiB)
    # or 1 TiB of memory.
    assert d.hw.domain.nbytes * 8 / NPAGES < 2.1
    assert peak < 200 << 20, f"peak {peak >> 20} MiB"
    # cleared on a read without NO_CLEAR, then nothing is left
    bmem[:] = 0
    f.get_dirty(hwpt, BASE, TIB, K4, bm)
    assert int(np.unpackbits(bmem, bitorder="little").sum()) == len(got)
    bmem[:] = 0
    f.get_dirty(hwpt, BASE, TIB, K4, bm)
    assert not bmem.any()
    assert f.unmap(ioas, BASE, TIB) == TIB


def test_one_tib_at_2m_granule_and_huge_leaves() -> None:
    f = Iommufd(vendor="smmuv3")
    ioas = f.ioas_alloc()
    uva, _ = f.buf(TIB, backed=False)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.map(ioas, uva, TIB, BASE)  # huge pages on: 1 GiB / 2 MiB leaves
    f.set_dirty(hwpt, True)
    hit = BASE + 3 * (1 << 30) + 100
    leaf = d.hw.domain.leaf(hit)  # below the uAPI: which leaf the write dirties
    assert leaf is not None and leaf[1] > K4
    d.hw.dma_write(hit, 8)
    bm, bmem = f.buf(TIB // M2 // 8)
    assert bmem is not None
    f.get_dirty(hwpt, BASE, TIB, M2, bm)
    got = np.flatnonzero(np.unpackbits(bmem, bitorder="little")).tolist()
    lstart, lsize = leaf
    first = (lstart - BASE) // M2
    assert got == list(range(first, first + lsize // M2))
