"""vfiomig.hw.io_pgtable: packed per-page bits, leaf-size codes, extents, against plain oracles."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiomig.hw.io_pgtable import CHUNK_PAGES, SZ_1G, SZ_2M, Extent, Extents, IoPgtable, PackedBits

# A window of pages straddling a chunk boundary, so every op crosses chunks sometimes.
LO = CHUNK_PAGES * 3 - 200
N = 400

ranges = st.tuples(st.integers(0, N), st.integers(0, N)).map(sorted)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), ranges), max_size=12),
    probes=st.lists(ranges, min_size=1, max_size=6),
)
def test_packed_bits_match_a_bool_array(
    ops: list[tuple[bool, list[int]]], probes: list[list[int]]
) -> None:
    bits, oracle = PackedBits(), np.zeros(N, bool)
    for setting, (a, b) in ops:
        if setting:
            bits.set(LO + a, LO + b)
        else:
            bits.clear(LO + a, LO + b)
        oracle[a:b] = setting
    for a, b in probes:
        want = np.packbits(oracle[a:b], bitorder="little")
        assert bits.get(LO + a, LO + b).tobytes() == want.tobytes()
        if b > a:
            assert bits.test(LO + a) == oracle[a]


def test_bits_of_never_touched_chunks_read_as_zero_and_cost_nothing() -> None:
    bits = PackedBits()
    assert bits.get(1 << 40, (1 << 40) + 20).tobytes() == b"\0\0\0"
    bits.clear(0, 1 << 30)
    assert bits.nbytes == 0
    bits.set(1 << 50, (1 << 50) + 1)  # anywhere in the 64-bit space: one chunk
    assert bits.nbytes == CHUNK_PAGES // 8


def test_extents_remove_keeps_the_outside_parts() -> None:
    ex = Extents()
    ex.insert(Extent(0x10000, 0x7000_0000, 0x10000, True, True))
    ex.insert(Extent(0x30000, 0x8000_0000, 0x4000, True, False))
    ex.remove(0x14000, 0x32000)
    got = [(e.iova, e.uva, e.length, e.write) for e in ex]
    assert got == [(0x10000, 0x7000_0000, 0x4000, True), (0x32000, 0x8000_2000, 0x2000, False)]
    assert ex.find(0x14000) is None and ex.find(0x33FFF) is not None
    assert ex.overlaps(0x13000, 0x14000) and not ex.overlaps(0x14000, 0x32000)


def test_greedy_leaf_choice() -> None:
    """iommu_pgsize's greedy choice from the start: 4K up to 2M alignment, 2M up to 1G, 1G."""
    pt = IoPgtable()
    iova = SZ_1G - 3 * SZ_2M - 2 * 4096
    pt.map(iova, 0x7F00_0000_0000 + iova % SZ_1G, SZ_1G + 5 * SZ_2M, True, True, huge=True)
    sizes = []
    cur, end = iova, iova + SZ_1G + 5 * SZ_2M
    while cur < end:
        lf = pt.leaf(cur)
        assert lf is not None and lf[0] == cur
        sizes.append(lf[1])
        cur += lf[1]
    assert sizes == [4096] * 2 + [SZ_2M] * 3 + [SZ_1G] + [SZ_2M] * 1 + [4096] * 510


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(CHUNK_PAGES - 9000, CHUNK_PAGES + 9000), st.integers(1, 3000)),
        max_size=8,
    ),
    st.integers(CHUNK_PAGES - 6000, CHUNK_PAGES + 1000),
    st.integers(1, 5000),
)
def test_or_into_equals_get_ored_into_existing_bits(
    runs: list[tuple[int, int]], p0: int, n: int
) -> None:
    bits = PackedBits()
    for start, length in runs:
        bits.set(start, start + length)
    rng = np.random.default_rng(p0 ^ n)
    before = rng.integers(0, 256, (n + 7) // 8 + 2, dtype=np.uint8)  # garbage stays set
    out = before.copy()
    bits.or_into(p0, p0 + n, out)
    want = before.copy()
    want[: (n + 7) // 8] |= bits.get(p0, p0 + n)
    assert np.array_equal(out, want)
