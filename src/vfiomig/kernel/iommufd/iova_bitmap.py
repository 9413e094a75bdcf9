"""The user's dirty bitmap of one dirty report (drivers/iommu/iommufd/iova_bitmap.c).

One iova_bitmap.c serves both dirty reports of the kernel (it moved from drivers/vfio/ to
drivers/iommu/iommufd/ in 6.7 and is exported to VFIO), and so does this one class:

* IOMMU_HWPT_GET_DIRTY_BITMAP (io_pagetable.py) discards iova_bitmap_for_each's result, so a
  bit whose bitmap page cannot be pinned is dropped silently and the walk goes on;
* VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (vfio_main.py) returns it: `pin_run()` limits the
  bitmap to the pages pinnable in one run from its start (EFAULT if not even the first
  one), the driver reports the IOVA those cover, and a bitmap that stops short is EFAULT
  after that part was reported (and cleared).

Bit k stands for IOVA [iova + k*2^pgshift, iova + (k+1)*2^pgshift), pgshift = __ffs(page_size)
(a non-power-of-two page_size acts through its lowest set bit). Bit k is bit k%8 of byte
data + k/8: little-endian u64 words, so any byte address works, as the selftest's
`bitmap + 0xff1` shows. Bits are only ever set, never cleared.

Pinning (7.x): the bitmap's user pages are pinned as bits land in them; the pinnable span
is the u64 words of the whole request, rounded out to whole pages. A bit whose page cannot
be pinned (not mapped, or without bytes behind it) is dropped silently; the dirty state
it came from is cleared all the same. Bits past the request (a huge leaf that runs past
its end) land as long as they stay within the pinned pages.

Everything is vectorized: 4 KiB-granular packed bits from the hw page table become the
bitmap's granule with byte-wise reductions or expansions, and are OR-ed into numpy views
of user memory at any bit offset (a shift of the packed bytes); a driver's list of dirty
ranges (`set_ranges`) becomes bits in one pass. No loop per page or per bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from errno import EFAULT
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE
from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.bitops import __ffs as _ffs
from vfiomig.kernel.errors import err

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory

_BYTE_ANY_2 = np.array(
    [sum(1 << j for j in range(4) if (b >> (2 * j)) & 3) for b in range(256)], dtype=np.uint8
)  # one byte of 8 page-bits -> 4 bits, each the OR of a pair
_BYTE_ANY_4 = np.array(
    [sum(1 << j for j in range(2) if (b >> (4 * j)) & 15) for b in range(256)], dtype=np.uint8
)  # one byte -> 2 bits, each the OR of a nibble


def shift_packed(packed: npt.NDArray[np.uint8], s: int) -> npt.NDArray[np.uint8]:
    """Prepend `s` zero bits (0 <= s < 8) to an LSB-first packed bit string."""
    if s == 0:
        return packed
    out = np.zeros(packed.size + 1, dtype=np.uint8)
    out[:-1] = packed << np.uint8(s)
    out[1:] |= packed >> np.uint8(8 - s)
    return out


def mask_tail(packed: npt.NDArray[np.uint8], nbits: int) -> npt.NDArray[np.uint8]:
    """Keep exactly the first nbits bits (a copy only when the tail must change)."""
    nbytes = (nbits + 7) >> 3
    packed = packed[:nbytes]
    rem = nbits & 7
    if rem and packed.size and packed[-1] >> np.uint8(rem):
        packed = packed.copy()
        packed[-1] &= np.uint8((1 << rem) - 1)
    return packed


def reduce_packed(packed: npt.NDArray[np.uint8], nbits: int, r: int) -> npt.NDArray[np.uint8]:
    """OR every group of r bits (r a power of two) into one bit; groups start at bit 0."""
    ngroups = (nbits + r - 1) // r
    if r == 1:
        return mask_tail(packed, nbits)
    if r >= 8:
        per = r // 8
        need = ngroups * per
        buf = packed[:need]
        if buf.size < need:
            buf = np.concatenate([buf, np.zeros(need - buf.size, dtype=np.uint8)])
        any_ = buf.reshape(ngroups, per).any(axis=1)
        return np.packbits(any_, bitorder="little")
    # r == 2 or 4: a lookup per byte, then 8/r bytes per output byte
    lut, k = (_BYTE_ANY_2, 4) if r == 2 else (_BYTE_ANY_4, 2)
    per_out = 8 // k  # input bytes per output byte
    nin = (nbits + 7) >> 3
    nin_pad = -(-nin // per_out) * per_out
    buf = packed[:nin]
    if buf.size < nin_pad:
        buf = np.concatenate([buf, np.zeros(nin_pad - buf.size, dtype=np.uint8)])
    red = lut[buf].reshape(-1, per_out)
    out = np.zeros(red.shape[0], dtype=np.uint8)
    for j in range(per_out):
        out |= red[:, j] << np.uint8(j * k)
    return mask_tail(out, ngroups)


def expand_packed(packed: npt.NDArray[np.uint8], nbits: int, k: int) -> npt.NDArray[np.uint8]:
    """Repeat every bit k times (a granule smaller than the 4 KiB page: k bits per page)."""
    bits = np.unpackbits(packed, count=nbits, bitorder="little").astype(bool)
    return np.packbits(np.repeat(bits, k), bitorder="little")


class IovaBitmap:
    """struct iova_bitmap for one GET_DIRTY_BITMAP request."""

    def __init__(self, mm: Memory, iova: int, length: int, page_size: int, data: int) -> None:
        self.mm = mm
        self.iova = iova
        self.pgshift = _ffs(page_size)
        self.data = data
        # mapped_total_index: u64 words up to the bit of (length - 1); length 0 wraps.
        words = ((((length - 1) & U64_MAX) >> self.pgshift) >> 6) + 1
        end = data + words * 8
        pinnable_end = -(-end // PAGE_SIZE) * PAGE_SIZE
        # bits that may land: those whose byte is inside the pinned pages
        self.max_bits = max(0, (pinnable_end - data) * 8)

    # -- the user-memory side ----------------------------------------------------------

    def _backed(self, addr: int, end: int) -> Iterator[tuple[int, int, npt.NDArray[np.uint8]]]:
        """(lo, hi, the bytes of [lo, hi)) for every part of [addr, end) that can be pinned
        (mapped, with bytes behind it). One step per region, not per page."""
        for r in self.mm.regions_in(addr, end):
            lo, hi = max(addr, r.addr), min(end, r.end)
            if r.backed:
                yield lo, hi, self.mm.view(lo, hi - lo)

    def _or_bytes(self, byte0: int, packed: npt.NDArray[np.uint8]) -> None:
        """OR packed bytes into the bitmap from its byte `byte0`; parts over unmapped or
        unbacked memory are dropped (they cannot be pinned)."""
        base = self.data + byte0
        for lo, _hi, view in self._backed(base, base + packed.size):
            np.bitwise_or(view, packed[lo - base : lo - base + view.size], out=view)

    def _or_at(self, byte_idx: npt.NDArray[np.int64], vals: npt.NDArray[np.uint8]) -> None:
        """OR vals[i] into bitmap byte byte_idx[i] (sorted, unique), dropping what cannot
        be pinned."""
        if byte_idx.size == 0:
            return
        addrs = byte_idx + self.data
        for lo, hi, view in self._backed(int(addrs[0]), int(addrs[-1]) + 1):
            a, b = np.searchsorted(addrs, [lo, hi])
            view[addrs[a:b] - lo] |= vals[a:b]

    def direct_view(self, cur: int, npages: int) -> npt.NDArray[np.uint8] | None:
        """The user-memory bytes that take the 4 KiB bits of [cur, cur + npages*4K) as
        they are, when they can (granule 4 KiB, starting on a byte, all pinnable in one
        backed mapping, whole bytes); else None."""
        rel = cur - self.iova
        if self.pgshift != PAGE_SHIFT or rel % PAGE_SIZE or npages & 7:
            return None
        bit0 = rel >> PAGE_SHIFT
        if bit0 & 7 or bit0 + npages > self.max_bits:
            return None
        try:
            return self.mm.view(self.data + (bit0 >> 3), npages >> 3)
        except OSError:  # not mapped, unbacked, or across mappings: the general path
            return None

    def set_packed(self, bit0: int, packed: npt.NDArray[np.uint8], nbits: int) -> None:
        """OR nbits packed bits into the bitmap starting at bitmap bit `bit0`."""
        if bit0 >= self.max_bits or nbits <= 0:
            return
        nbits = min(nbits, self.max_bits - bit0)
        packed = mask_tail(packed, nbits)
        shifted = shift_packed(packed, bit0 & 7)
        self._or_bytes(bit0 >> 3, mask_tail(shifted, (bit0 & 7) + nbits))

    # -- iova_bitmap_set and its vectorized page form ----------------------------------

    def set(self, iova: int, length: int) -> None:
        """iova_bitmap_set: every bit overlapping [iova, iova+length)."""
        if length <= 0 or iova + length <= self.iova:
            return
        first = (max(iova, self.iova) - self.iova) >> self.pgshift
        last = (iova + length - 1 - self.iova) >> self.pgshift
        if first >= self.max_bits:
            return
        last = min(last, self.max_bits - 1)
        n = last - first + 1
        ones = np.full((n + 7) >> 3, 0xFF, dtype=np.uint8)
        self.set_packed(first, ones, n)

    def set_ranges(self, starts: npt.NDArray[np.uint64] | list[int], length: int) -> None:
        """iova_bitmap_set(start, length) for every start at once (a driver's dirty list)."""
        s = np.asarray(starts, dtype=np.uint64)
        if s.size == 0 or length <= 0 or self.max_bits == 0:
            return
        lo = np.uint64(self.iova)
        ends = s + np.uint64(length - 1)  # last byte of each range
        keep = (ends >= lo) & (ends >= s)  # not before the bitmap, no u64 wrap
        s, ends = s[keep], ends[keep]
        first = ((np.maximum(s, lo) - lo) >> np.uint64(self.pgshift)).astype(np.int64)
        last = ((ends - lo) >> np.uint64(self.pgshift)).astype(np.int64)
        inside = first < self.max_bits
        first, last = first[inside], np.minimum(last[inside], self.max_bits - 1)
        if first.size == 0:
            return
        counts = last - first + 1
        total = int(counts.sum())
        b0 = int(first.min())
        span = int(last.max()) - b0 + 1
        if total * 8 >= span:  # dense: a bool map of the span, packed
            marks = np.zeros(span + 1, dtype=np.int32)
            np.add.at(marks, first - b0, 1)
            np.add.at(marks, last - b0 + 1, -1)
            packed = np.packbits(np.cumsum(marks[:-1]) > 0, bitorder="little")
            self.set_packed(b0, packed, span)
            return
        # sparse: every bit, grouped by byte
        idx = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(total)
        idx = np.unique(idx)
        byte_idx, at = np.unique(idx >> 3, return_index=True)
        vals = np.bitwise_or.reduceat((1 << (idx & 7)).astype(np.uint8), at)
        self._or_at(byte_idx, vals)

    # -- VFIO's DMA_LOGGING_REPORT: iova_bitmap_for_each's error is returned ---------------

    def pin_run(self, length: int) -> int:
        """Pin the bitmap as iova_bitmap_get does: the pages pinnable in one run from its
        start (EFAULT when not even the first one is). From now on only bits in them land.
        Returns the IOVA (at most `length`) those bits cover: what the driver is asked."""
        try:
            r = self.mm.region(self.data, 1)
        except OSError:
            raise err(EFAULT) from None
        if not r.backed:
            raise err(EFAULT)  # unbacked memory has no pages to pin
        self.max_bits = min(self.max_bits, (r.end - self.data) * 8)
        return min(length, self.max_bits << self.pgshift)

    def set_pages(self, cur: int, bits: npt.NDArray[np.uint8], npages: int) -> None:
        """Record the 4 KiB page bits of [cur, cur + npages*4K) (bit j = page j)."""
        if npages <= 0:
            return
        rel = cur - self.iova
        if rel < 0 or rel % PAGE_SIZE:  # never: requests and areas are 4K aligned
            raise ValueError("dirty pages not aligned to the bitmap's IOVA")
        page0 = rel >> PAGE_SHIFT
        packed = np.asarray(bits, dtype=np.uint8)
        if self.pgshift == PAGE_SHIFT:
            self.set_packed(page0, packed, npages)
        elif self.pgshift > PAGE_SHIFT:
            r = 1 << (self.pgshift - PAGE_SHIFT)
            pad = page0 % r  # pages of the first output bit that lie before cur
            first = page0 // r
            # Pages beyond what can land need no reduction.
            keep = min(npages, (self.max_bits - first) * r - pad) if first < self.max_bits else 0
            if keep <= 0:
                return
            stream = mask_tail(packed, keep)
            stream = shift_packed(np.concatenate([np.zeros(pad >> 3, np.uint8), stream]), pad & 7)
            red = reduce_packed(stream, pad + keep, r)
            self.set_packed(first, red, (pad + keep + r - 1) // r)
        else:
            k = 1 << (PAGE_SHIFT - self.pgshift)
            first = page0 * k
            if first >= self.max_bits:
                return
            keep = min(npages, -(-(self.max_bits - first) // k))
            self.set_packed(first, expand_packed(mask_tail(packed, keep), keep, k), keep * k)
