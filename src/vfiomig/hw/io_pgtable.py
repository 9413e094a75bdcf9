"""The IO page table of one domain, stored the way numpy likes it.

A real IO page table is a radix tree of 64-bit descriptors (drivers/iommu/io-pgtable-arm.c,
drivers/iommu/generic_pt/). Walking a tree of 2^28 descriptors per page in Python is out of
the question, so the model keeps the same information in three flat pieces:

* `Extents`: a sorted list of mapping extents (iova, uva, length, read, write), one per
  map() call (split by partial unmaps). It answers "is it mapped, where to, with which
  permission" for any byte, with a bisect per extent, never a loop per page.
* `BlockCodes`: one byte per 2 MiB of IOVA saying which leaf size covers it: 4 KiB leaves
  (or nothing), one 2 MiB leaf, or part of a 1 GiB leaf. The leaf holding any IOVA follows.
* `PackedBits`: one bit per 4 KiB page, little bit order (np.packbits(bitorder="little")),
  for per-leaf hardware state (the dirty bit here, cached-writable-dirty in the IOTLB). A
  leaf's state is replicated over all of its pages, so a range of the array *is* the 4 KiB
  dirty bitmap iommufd wants, and every update covers whole leaves.

Per-page arrays are allocated per chunk (16 GiB of IOVA, 512 KiB of bits) on first set, so
a domain costs memory only where something is mapped, anywhere in the 64-bit IOVA space.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE

SZ_2M = 1 << 21
SZ_1G = 1 << 30
PGSIZE_BITMAP = PAGE_SIZE | SZ_2M | SZ_1G

# BlockCodes values: what covers a 2 MiB block of IOVA.
CODE_4K = 0  # 4 KiB leaves (or nothing: Extents says which pages are mapped)
CODE_2M = 1  # one 2 MiB leaf
CODE_1G = 2  # 1/512 of a 1 GiB leaf
CODE_SIZE = {CODE_4K: PAGE_SIZE, CODE_2M: SZ_2M, CODE_1G: SZ_1G}
BLOCK_SHIFT = 21
PAGES_PER_BLOCK = SZ_2M // PAGE_SIZE

CHUNK_SHIFT = 22  # pages per chunk: 2^22 pages = 16 GiB of IOVA
CHUNK_PAGES = 1 << CHUNK_SHIFT
CHUNK_BLOCKS = CHUNK_PAGES // PAGES_PER_BLOCK

U8 = npt.NDArray[np.uint8]


def pieces(p0: int, p1: int, shift: int = CHUNK_SHIFT) -> Iterator[tuple[int, int, int]]:
    """(chunk key, local start, local end) covering units [p0, p1), chunk = 2^shift units."""
    while p0 < p1:
        key = p0 >> shift
        base = key << shift
        hi = min(p1, base + (1 << shift))
        yield key, p0 - base, hi - base
        p0 = hi


def byte_parts(lo: int, hi: int) -> Iterator[tuple[slice, int]]:
    """Bit range [lo, hi) as byte slices with the mask of its bits in them: a partial head
    byte, the run of whole bytes (mask 0xFF), a partial tail byte."""
    full_lo, full_hi = (lo + 7) >> 3, hi >> 3
    if lo & 7:
        b = lo >> 3
        top = min(8, hi - (b << 3))
        yield slice(b, b + 1), ((1 << top) - 1) & ~((1 << (lo & 7)) - 1)
    if full_hi > full_lo:
        yield slice(full_lo, full_hi), 0xFF
    if hi & 7 and hi >> 3 >= full_lo:
        yield slice(hi >> 3, (hi >> 3) + 1), (1 << (hi & 7)) - 1


class PackedBits:
    """One bit per 4 KiB page of the 64-bit IOVA space, allocated per chunk on first set."""

    def __init__(self) -> None:
        self._chunks: dict[int, U8] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._chunks.values())

    def chunk(self, key: int) -> U8:
        c = self._chunks.get(key)
        if c is None:
            c = self._chunks[key] = np.zeros(CHUNK_PAGES // 8, np.uint8)
        return c

    def present(self, p0: int, p1: int) -> Iterator[tuple[int, int, int]]:
        """(chunk key, local start, local end) of the allocated chunks meeting pages
        [p0, p1), in order: the cost follows the chunks that exist, not the range (which
        may span the whole 64-bit space)."""
        if p1 <= p0:
            return
        k0, k1 = p0 >> CHUNK_SHIFT, (p1 - 1) >> CHUNK_SHIFT
        if k1 - k0 < len(self._chunks):
            keys = [k for k in range(k0, k1 + 1) if k in self._chunks]
        else:
            keys = sorted(k for k in self._chunks if k0 <= k <= k1)
        for key in keys:
            base = key << CHUNK_SHIFT
            yield key, max(p0, base) - base, min(p1, base + CHUNK_PAGES) - base

    def parts(self, p0: int, p1: int, create: bool) -> Iterator[tuple[U8, slice, int]]:
        """(chunk array, byte slice, bit mask) for pages [p0, p1); absent chunks are skipped
        unless `create`."""
        spans = pieces(p0, p1) if create else self.present(p0, p1)
        for key, lo, hi in spans:
            c = self.chunk(key)
            for sl, m in byte_parts(lo, hi):
                yield c, sl, m

    def set(self, p0: int, p1: int) -> None:
        for c, sl, m in self.parts(p0, p1, create=True):
            c[sl] |= m

    def clear(self, p0: int, p1: int) -> None:
        for c, sl, m in self.parts(p0, p1, create=False):
            if m == 0xFF:
                c[sl] = 0
            else:
                c[sl] &= ~m & 0xFF

    def clear_all(self) -> None:
        self._chunks.clear()

    def test(self, p: int) -> bool:
        c = self._chunks.get(p >> CHUNK_SHIFT)
        local = p & (CHUNK_PAGES - 1)
        return c is not None and bool(int(c[local >> 3]) >> (local & 7) & 1)

    def nonzero(self, p0: int, p1: int) -> npt.NDArray[np.int64]:
        """Indexes of the set bits among pages [p0, p1), ascending; only allocated chunks
        are read, and of those only their non-zero bytes are unpacked."""
        found = []
        for key, lo, hi in self.present(p0, p1):
            b0 = lo >> 3
            seg = self._chunks[key][b0 : (hi + 7) >> 3]
            nz = np.flatnonzero(seg)
            if nz.size == 0:
                continue
            on = np.unpackbits(seg[nz][:, None], axis=1, bitorder="little").astype(bool)
            idx = ((nz + b0)[:, None] * 8 + np.arange(8))[on]
            found.append(idx[(idx >= lo) & (idx < hi)] + (key << CHUNK_SHIFT))
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)

    def or_into(self, p0: int, p1: int, out: U8) -> None:
        """OR the bits of pages [p0, p1) into `out` (bit 0 of out[0] is page p0).

        The fast path of a dirty-bitmap read: when p0 is byte aligned, each allocated chunk
        is ORed straight into `out`, with no intermediate array; absent chunks cost nothing.
        """
        if p0 & 7:
            n = (p1 - p0 + 7) >> 3
            out[:n] |= self.get(p0, p1)
            return
        for key, lo, hi in pieces(p0, p1):
            c = self._chunks.get(key)
            if c is None:
                continue
            o = ((key << CHUNK_SHIFT) + lo - p0) >> 3
            whole = (hi - lo) >> 3
            out[o : o + whole] |= c[lo >> 3 : (lo >> 3) + whole]
            if (hi - lo) & 7:  # a partial last byte: only the bits inside the range
                out[o + whole] |= c[(lo >> 3) + whole] & ((1 << ((hi - lo) & 7)) - 1)

    def get(self, p0: int, p1: int) -> U8:
        """Bits of pages [p0, p1) packed little-endian from bit 0; pad bits are 0."""
        base, top = p0 & ~7, (p1 + 7) & ~7
        raw = np.empty((top - base) >> 3, np.uint8)
        for key, lo, hi in pieces(base, top):  # chunk edges are multiples of 8 pages
            o = ((key << CHUNK_SHIFT) + lo - base) >> 3
            c = self._chunks.get(key)
            raw[o : o + ((hi - lo) >> 3)] = 0 if c is None else c[lo >> 3 : hi >> 3]
        n, s = p1 - p0, p0 - base
        if s:  # shift the whole array right by s bits
            shifted = (raw >> s).astype(np.uint8, copy=False)
            shifted[:-1] |= raw[1:] << (8 - s)
            raw = shifted
        out = raw[: (n + 7) >> 3]
        if n & 7:
            out[-1] &= (1 << (n & 7)) - 1
        return out


class BlockCodes:
    """One byte per 2 MiB block of IOVA: the leaf size covering it (CODE_*)."""

    def __init__(self) -> None:
        self._chunks: dict[int, U8] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._chunks.values())

    def fill(self, b0: int, b1: int, code: int) -> None:
        for key, lo, hi in pieces(b0, b1, CHUNK_SHIFT - 9):
            c = self._chunks.get(key)
            if c is None:
                if code == CODE_4K:
                    continue
                c = self._chunks[key] = np.zeros(CHUNK_BLOCKS, np.uint8)
            c[lo:hi] = code

    def get(self, b: int) -> int:
        c = self._chunks.get(b >> (CHUNK_SHIFT - 9))
        return 0 if c is None else int(c[b & (CHUNK_BLOCKS - 1)])


@dataclass(frozen=True)
class Extent:
    """A run of IOVA mapped to contiguous user addresses with one permission."""

    iova: int
    uva: int
    length: int
    read: bool
    write: bool

    @property
    def end(self) -> int:
        return self.iova + self.length

    def cut(self, start: int, end: int) -> Extent:
        return Extent(start, self.uva + start - self.iova, end - start, self.read, self.write)


class Extents:
    """Sorted, non-overlapping mapping extents (the translation half of the page table)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._exts: list[Extent] = []

    def __iter__(self) -> Iterator[Extent]:
        return iter(list(self._exts))

    def __len__(self) -> int:
        return len(self._exts)

    def find(self, iova: int) -> Extent | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and iova < self._exts[i].end:
            return self._exts[i]
        return None

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._starts, end) - 1  # the last extent starting before end
        return i >= 0 and self._exts[i].end > start

    def insert(self, ext: Extent) -> None:
        i = bisect.bisect_left(self._starts, ext.iova)
        self._starts.insert(i, ext.iova)
        self._exts.insert(i, ext)

    def run_end(self, start: int, end: int) -> int:
        """End of the contiguously mapped run from `start` (itself mapped), capped at `end`."""
        i = bisect.bisect_right(self._starts, start) - 1
        cur = self._exts[i].end
        while cur < end and i + 1 < len(self._exts) and self._exts[i + 1].iova == cur:
            i += 1
            cur = self._exts[i].end
        return min(cur, end)

    def remove(self, start: int, end: int) -> None:
        """Unmap [start, end), keeping the parts of extents outside it."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        j = bisect.bisect_left(self._starts, end)
        keep: list[Extent] = []
        for e in self._exts[i:j]:
            if e.end <= start:
                keep.append(e)
                continue
            if e.iova < start:
                keep.append(e.cut(e.iova, start))
            if e.end > end:
                keep.append(e.cut(end, e.end))
        self._exts[i:j] = keep
        self._starts[i:j] = [e.iova for e in keep]


class IoPgtable:
    """Translation, leaf sizes and the hardware dirty bit of one IO page table."""

    def __init__(self) -> None:
        self.extents = Extents()
        self.codes = BlockCodes()
        self.dirty = PackedBits()  # the leaf's dirty state (vendor encoding: see iommu.py)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.dirty.nbytes

    def map(self, iova: int, uva: int, length: int, read: bool, write: bool, huge: bool) -> None:
        """Install leaves for [iova, iova+length): the largest size where IOVA, address and
        remaining length allow (iommu_pgsize / generic_pt pt_compute_best_pgsize: the greedy
        choice from the start equals "every aligned slot that fits"), 4 KiB only if not huge."""
        self.extents.insert(Extent(iova, uva, length, read, write))
        if not huge:
            return
        end = iova + length
        g0, g1 = _slots(iova, uva, end, SZ_1G)
        m0, m1 = _slots(iova, uva, end, SZ_2M)
        if g1 > g0:
            self.codes.fill(g0 >> BLOCK_SHIFT, g1 >> BLOCK_SHIFT, CODE_1G)
            self.codes.fill(m0 >> BLOCK_SHIFT, g0 >> BLOCK_SHIFT, CODE_2M)
            self.codes.fill(g1 >> BLOCK_SHIFT, m1 >> BLOCK_SHIFT, CODE_2M)
        elif m1 > m0:
            self.codes.fill(m0 >> BLOCK_SHIFT, m1 >> BLOCK_SHIFT, CODE_2M)

    def leaf(self, iova: int) -> tuple[int, int] | None:
        """(start, size) of the leaf holding iova, None if unmapped."""
        if self.extents.find(iova) is None:
            return None
        size = CODE_SIZE[self.codes.get(iova >> BLOCK_SHIFT)]
        return iova & ~(size - 1), size

    def leaf_pages(self, p0: int, p1: int) -> tuple[int, int]:
        """Pages [p0, p1) widened to whole leaves at both ends (where mapped): interior leaves
        are covered already, so only the first and the last can stick out."""
        first, last = self.leaf(p0 << PAGE_SHIFT), self.leaf((p1 - 1) << PAGE_SHIFT)
        if first is not None:
            p0 = first[0] >> PAGE_SHIFT
        if last is not None:
            p1 = (last[0] + last[1]) >> PAGE_SHIFT
        return p0, p1

    def remove(self, start: int, end: int) -> None:
        """Drop the leaves of [start, end) (whole leaves: a huge leaf is never cut)."""
        self.extents.remove(start, end)
        # Blocks only partly inside hold 4 KiB leaves (code 0) already, so this is exact.
        self.codes.fill(start >> BLOCK_SHIFT, ((end - 1) >> BLOCK_SHIFT) + 1, CODE_4K)
        self.dirty.clear(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def split_codes(self, start: int, size: int) -> None:
        """Replace the huge leaf at start by 512 of the next smaller size."""
        code = CODE_4K if size == SZ_2M else CODE_2M
        self.codes.fill(start >> BLOCK_SHIFT, (start + size) >> BLOCK_SHIFT, code)


def _slots(iova: int, uva: int, end: int, size: int) -> tuple[int, int]:
    """The run [lo, hi) of size-aligned slots inside [iova, end) usable as leaves: only if the
    IOVA and the address it maps to are congruent modulo size (else lo == hi)."""
    if (iova - uva) % size:
        return 0, 0
    lo = (iova + size - 1) & ~(size - 1)
    hi = end & ~(size - 1)
    return (lo, hi) if hi > lo else (0, 0)
