"""Dirty tracking against an independent oracle, and at the scale of a 1 TiB guest.

The oracle keeps an explicit list of leaves (start, size, writable, dirty), chosen one at a
time by the greedy rule of iommu_map, and the dirty set "leaves written since the last clear"
(plus, on SMMUv3, writable leaves created since then: they start writable-dirty). The domain
is driven the way the kernel drives it: GET_DIRTY_BITMAP is read_and_clear_dirty(clear=True)
followed by iotlb_sync, NO_CLEAR is read_and_clear_dirty(clear=False).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiomig.hw.iommu import VENDORS, Domain, Iommu, IommuFault
from vfiomig.hw.memory import Memory

K4, M2, G1 = 4096, 1 << 21, 1 << 30
SLOT = 8 * M2  # small mappings live in 8 slots of 16 MiB
SLOTS_IOVA = 1 << 32
BIG_IOVA = 1 << 36  # one mapping with a 1 GiB leaf in it


@dataclass
class Leaf:
    start: int
    size: int
    write: bool
    dirty: bool

    @property
    def end(self) -> int:
        return self.start + self.size


class Oracle:
    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self.leaves: list[Leaf] = []  # sorted by start
        self.maps: list[tuple[int, int]] = []  # (iova, length)

    def map(self, iova: int, uva: int, length: int, write: bool, huge: bool) -> None:
        cur, end = iova, iova + length
        while cur < end:
            size = next(
                s
                for s in ((G1, M2, K4) if huge else (K4,))
                if cur % s == 0 and (uva + cur - iova) % s == 0 and cur + s <= end
            )
            bisect.insort(
                self.leaves,
                Leaf(cur, size, write, self.vendor == "smmuv3" and write),
                key=lambda lf: lf.start,
            )
            cur += size
        self.maps.append((iova, length))

    def unmap(self, iova: int, length: int) -> None:
        self.leaves = [lf for lf in self.leaves if not iova <= lf.start < iova + length]
        self.maps.remove((iova, length))

    def overlapping(self, a: int, b: int) -> list[Leaf]:
        i = max(bisect.bisect_right(self.leaves, a, key=lambda lf: lf.start) - 1, 0)
        out = []
        for lf in self.leaves[i:]:
            if lf.start >= b:
                break
            if lf.end > a:
                out.append(lf)
        return out

    def write_ok(self, a: int, b: int) -> bool:
        """Every byte of [a, b) covered by writable leaves."""
        cur = a
        for lf in self.overlapping(a, b):
            if lf.start > cur or not lf.write:
                return False
            cur = lf.end
        return cur >= b

    def bitmap(self, a: int, b: int) -> bytes:
        bits = np.zeros((b - a) // K4, bool)
        for lf in self.overlapping(a, b):
            if lf.dirty:
                bits[(max(a, lf.start) - a) // K4 : (min(b, lf.end) - a) // K4] = True
        return np.packbits(bits, bitorder="little").tobytes()

    def split(self, lf: Leaf) -> None:
        i = self.leaves.index(lf)
        small = lf.size // 512
        self.leaves[i : i + 1] = [
            Leaf(lf.start + k * small, small, lf.write, lf.dirty) for k in range(512)
        ]


class Machine:
    """A domain, its oracle, and the ops a hypothesis run draws."""

    def __init__(self, vendor: str) -> None:
        self.mem = Memory()
        self.small = self.mem.mmap(8 * SLOT, backed=False)
        self.big = self.mem.mmap(3 * G1, backed=False)
        self.dom: Domain = Iommu(vendor).domain_alloc(dirty_tracking=True)
        self.dev = object()
        self.dom.attach(self.dev)
        self.dom.set_dirty_tracking(True)
        self.orc = Oracle(vendor)
        self.used: set[int] = set()

    def map_small(
        self, slot: int, off: int, npages: int, shift: bool, write: bool, huge: bool
    ) -> None:
        if slot in self.used:
            return
        self.used.add(slot)
        iova = SLOTS_IOVA + slot * SLOT + off * K4
        uva = self.small.addr + slot * SLOT + off * K4 + (K4 if shift else 0)
        length = min(npages, SLOT // K4 - off) * K4
        self.dom.map(iova, uva, length, read=True, write=write, huge=huge)
        self.orc.map(iova, uva, length, write, huge)

    def map_big(self, length: int) -> None:
        if -1 in self.used:
            return
        self.used.add(-1)
        iova = BIG_IOVA + self.big.addr % G1  # 1G-congruent with its address
        self.dom.map(iova, self.big.addr, length, read=True, write=True, huge=True)
        self.orc.map(iova, self.big.addr, length, True, True)

    def write(self, a: int, n: int) -> None:
        ok = self.orc.write_ok(a, a + n)
        nfaults = len(self.dom.faults)
        try:
            self.dom.dma(self.dev, a, n, write=True)
        except IommuFault:
            assert not ok and len(self.dom.faults) == nfaults + 1
            return
        assert ok
        for lf in self.orc.overlapping(a, a + n):
            lf.dirty = True

    def report(self, a: int, b: int, clear: bool) -> None:
        got = self.dom.read_and_clear_dirty(a, b - a, clear=clear).tobytes()
        assert got == self.orc.bitmap(a, b)
        if clear:
            self.dom.iotlb_sync(a, b - a)
            for lf in self.orc.overlapping(a, b):
                lf.dirty = False


def _range_near(data: st.DataObject, m: Machine) -> tuple[int, int]:
    """A page-aligned range around one mapping (often cutting into its leaves)."""
    iova, length = data.draw(st.sampled_from(m.orc.maps))
    a = (
        iova
        + data.draw(st.sampled_from([0, K4, M2 - K4, M2 + K4]) | st.integers(-4, length // K4)) * K4
    )
    n = data.draw(
        st.sampled_from([length, K4, M2, 3 * M2 + K4]) | st.integers(1, 2048).map(lambda p: p * K4)
    )
    return max(a, K4), max(a, K4) + n


def _step(data: st.DataObject, m: Machine) -> None:
    op = data.draw(
        st.sampled_from(
            [
                "map",
                "map",
                "big",
                "write",
                "write",
                "write",
                "read",
                "clear",
                "clear",
                "peek",
                "unmap",
                "split",
            ]
        )
    )
    if op == "map":
        m.map_small(
            data.draw(st.integers(0, 7)),
            data.draw(st.sampled_from([0, 1, 511, 512, 1000])),
            data.draw(st.sampled_from([1, 511, 512, 513, 1536, 2000, 4000])),
            data.draw(st.booleans()),
            data.draw(st.integers(0, 3).map(bool)),
            data.draw(st.booleans()),
        )
    elif op == "big":
        m.map_big(data.draw(st.sampled_from([G1 + M2 + 3 * K4, 2 * G1, G1 - M2])))
    elif not m.orc.maps:
        return
    elif op in ("write", "read"):
        a, b = _range_near(data, m)
        a += data.draw(st.integers(0, K4 - 1))
        n = data.draw(st.integers(1, 3 * K4) | st.just(b - a))
        if op == "write":
            m.write(a, n)
        else:
            try:
                m.dom.dma(m.dev, a, n, write=False)  # caches translations; reports unchanged
            except IommuFault:
                pass
    elif op in ("clear", "peek"):
        m.report(*_range_near(data, m), clear=op == "clear")
    elif op == "unmap":
        iova, length = data.draw(st.sampled_from(m.orc.maps))
        assert m.dom.unmap(iova, length) == length
        m.orc.unmap(iova, length)
        m.used.discard(-1 if iova >= BIG_IOVA else (iova - SLOTS_IOVA) // SLOT)  # reusable
    else:  # split one huge leaf
        huge = [lf for lf in m.orc.leaves if lf.size > K4]
        if huge:
            lf = data.draw(st.sampled_from(huge))
            m.dom.split(lf.start + data.draw(st.integers(0, lf.size // K4 - 1)) * K4)
            m.orc.split(lf)


@settings(max_examples=120, deadline=None)
@given(data=st.data(), vendor=st.sampled_from(VENDORS))
def test_reported_bitmap_equals_the_oracle(data: st.DataObject, vendor: str) -> None:
    m = Machine(vendor)
    for _ in range(data.draw(st.integers(1, 30))):
        _step(data, m)
    for lf in m.orc.leaves[:: max(1, len(m.orc.leaves) // 50)]:
        assert m.dom.leaf(lf.start + lf.size - 1) == (lf.start, lf.size)
    for iova, length in list(m.orc.maps):
        m.report(iova, iova + length, clear=False)


@pytest.mark.parametrize("vendor", ["smmuv3", "vtd"])
def test_one_tib_of_4k_leaves(vendor: str) -> None:
    """Correctness at scale (timing is bench/hw_map.py's business)."""
    tib = 1 << 40
    mem = Memory()
    region = mem.mmap(tib, backed=False)
    dom = Iommu(vendor).domain_alloc(dirty_tracking=True)
    dev = object()
    dom.attach(dev)
    dom.map(tib, region.addr, tib, read=True, write=True, huge=False)
    dom.read_and_clear_dirty(tib, tib, clear=True)  # what enabling does first
    dom.iotlb_sync(tib, tib)
    dom.set_dirty_tracking(True)
    pages = [0, 12345, (1 << 27) + 9, (1 << 28) - 1]
    for p in pages:
        dom.dma(dev, tib + p * K4 + 100, 8, write=True)
    dom.dma(dev, tib + 77 * K4 - 4, 8, write=True)  # straddles pages 76 and 77
    bits = dom.read_and_clear_dirty(tib, tib, clear=True)
    dom.iotlb_sync(tib, tib)
    assert bits.size == (1 << 28) // 8
    assert np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist() == sorted(
        pages + [76, 77]
    )
    assert not dom.read_and_clear_dirty(tib, tib, clear=False).any()
    assert dom.nbytes <= (1 << 28) // 8 * 2 + (1 << 20)  # at most two bits per page
    assert dom.leaf(tib + tib - 1) == (tib + tib - K4, K4)
