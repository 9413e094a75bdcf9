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

Bounded memory, as in the kernel: iova_bitmap_get pins at most PAGE_SIZE / sizeof(struct
page *) = 512 user pages of bitmap (2 MiB) at a time and iova_bitmap_set sets bits in them
with bitmap_set; nothing is allocated per page of the request. The model works in steps of
at most STEP_BITS bitmap bits (a quarter of that window): every array it builds for one step
is bounded by it, whatever the IOVA length, the page size (from 1 byte, which the kernel's
selftests use, to 2^63) or the size of a dirty IOPTE or tracked page. Long runs of set bits
are written straight into user memory (a fill, like bitmap_set), never as an array per bit.

Everything is vectorized: 4 KiB-granular packed bits from the hw page table become the
bitmap's granule with byte-wise reductions or expansions, and are OR-ed into numpy views
of user memory at any bit offset (a shift of the packed bytes); a driver's list of dirty
ranges (`set_ranges`) becomes bits in one pass per step. No loop per page or per bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from errno import EFAULT
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE, TASK_SIZE_MAX
from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.bitops import __ffs as _ffs
from vfiomig.kernel.errors import err
from vfiomig.kernel.uaccess import access_ok

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory

_BYTE_ANY_2 = np.array(
    [sum(1 << j for j in range(4) if (b >> (2 * j)) & 3) for b in range(256)], dtype=np.uint8
)  # one byte of 8 page-bits -> 4 bits, each the OR of a pair
_BYTE_ANY_4 = np.array(
    [sum(1 << j for j in range(2) if (b >> (4 * j)) & 15) for b in range(256)], dtype=np.uint8
)  # one byte -> 2 bits, each the OR of a nibble


# The most bitmap bits one step of the model builds an array for (iova_bitmap_get's window
# is 512 pinned pages = 2^24 bits; a quarter of it keeps the numpy temporaries small).
STEP_BITS = 1 << 22


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
    """Repeat every bit k times (a granule smaller than the 4 KiB page: k bits per page);
    k a power of two. Callers bound nbits * k (one step)."""
    bits = np.unpackbits(packed, count=nbits, bitorder="little")
    if k >= 8:  # each bit becomes k/8 whole bytes
        return np.repeat(bits * np.uint8(0xFF), k >> 3)
    return np.packbits(np.repeat(bits.astype(bool), k), bitorder="little")


def any_bits(packed: npt.NDArray[np.uint8], lo: int, hi: int) -> bool:
    """Is any of bits [lo, hi) of an LSB-first packed bit string set?"""
    if hi <= lo:
        return False
    b0, b1 = lo >> 3, (hi - 1) >> 3
    head = (0xFF << (lo & 7)) & 0xFF
    tail = 0xFF >> (7 - ((hi - 1) & 7))
    if b0 == b1:
        return bool(int(packed[b0]) & head & tail)
    return bool(
        int(packed[b0]) & head or int(packed[b1]) & tail or packed[b0 + 1 : b1].any()
    )


def merge_runs(
    first: npt.NDArray[np.int64], last: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Inclusive runs [first, last] sorted and merged where they overlap or touch."""
    order = np.argsort(first, kind="stable")
    f, lst = first[order], last[order]
    reach = np.maximum.accumulate(lst)
    new = np.ones(f.size, dtype=bool)
    new[1:] = f[1:] > reach[:-1] + 1
    heads = np.flatnonzero(new)
    tails = np.append(heads[1:], f.size) - 1
    return f[heads], reach[tails]


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
        # bits that may land: those whose byte is inside the pinned pages, which are user
        # pages (below TASK_SIZE_MAX: this also keeps every bit index within int64)
        self.max_bits = max(0, (min(pinnable_end, TASK_SIZE_MAX) - data) * 8)

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

    def _any_backed(self, byte0: int, byte1: int) -> bool:
        """Can any of bitmap bytes [byte0, byte1) be pinned?"""
        return any(True for _ in self._backed(self.data + byte0, self.data + byte1))

    def _or_byte(self, byte: int, mask: int) -> None:
        for _lo, _hi, view in self._backed(self.data + byte, self.data + byte + 1):
            view[0] |= mask

    def fill(self, first: int, last: int) -> None:
        """bitmap_set of bits [first, last] (clipped to what may land), straight into the
        pinnable user memory: partial head and tail bytes OR-ed, whole bytes set. No array
        per bit: a run of 2^40 bits costs what the bytes that land cost."""
        last = min(last, self.max_bits - 1)
        if first > last:
            return
        b0, b1 = first >> 3, last >> 3
        head = (0xFF << (first & 7)) & 0xFF
        tail = 0xFF >> (7 - (last & 7))
        if b0 == b1:
            self._or_byte(b0, head & tail)
            return
        if head != 0xFF:
            self._or_byte(b0, head)
            b0 += 1
        if tail != 0xFF:
            self._or_byte(b1, tail)
            b1 -= 1
        for _lo, _hi, view in self._backed(self.data + b0, self.data + b1 + 1):
            view[:] = 0xFF

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
        self.fill(first, last)

    def set_ranges(self, starts: npt.NDArray[np.uint64] | list[int], length: int) -> None:
        """iova_bitmap_set(start, length) for every start at once (a driver's dirty list).

        The ranges become runs of bits, merged where they overlap or touch. A run of a step
        or more is a fill; the others are built per step of STEP_BITS bits (one small
        array each) and OR-ed in: memory follows the list and the step, not the bits."""
        s = np.asarray(starts, dtype=np.uint64)
        if s.size == 0 or length <= 0 or self.max_bits == 0:
            return
        lo = np.uint64(self.iova)
        ends = s + np.uint64((length - 1) & U64_MAX)  # last byte of each range
        keep = (ends >= lo) & (ends >= s)  # not before the bitmap, no u64 wrap
        s, ends = s[keep], ends[keep]
        shift = np.uint64(self.pgshift)
        ufirst = (np.maximum(s, lo) - lo) >> shift
        ulast = (ends - lo) >> shift
        inside = ufirst < np.uint64(self.max_bits)
        if not inside.any():
            return
        cap = np.uint64(self.max_bits - 1)
        first, last = merge_runs(
            ufirst[inside].astype(np.int64), np.minimum(ulast[inside], cap).astype(np.int64)
        )
        step = STEP_BITS
        long = last - first + 1 >= step
        for f, lst in zip(first[long].tolist(), last[long].tolist(), strict=True):
            self.fill(f, lst)
        first, last = first[~long], last[~long]
        if first.size == 0:
            return
        # one pass per step that has runs starting in it (a run may end in the next)
        win = first // step
        bounds = np.flatnonzero(np.diff(win)) + 1
        for a, b in zip(
            np.concatenate(([0], bounds)).tolist(),
            np.concatenate((bounds, [first.size])).tolist(),
            strict=True,
        ):
            base = int(win[a]) * step
            f, lst = first[a:b] - base, last[a:b] - base
            span = int(lst.max()) + 1
            marks = np.zeros(span + 1, dtype=np.int8)  # runs are disjoint: +1 / -1 edges
            marks[f] = 1
            marks[lst + 1] -= 1
            packed = np.packbits(np.cumsum(marks[:-1], dtype=np.int8) > 0, bitorder="little")
            self.set_packed(base, packed, span)

    # -- VFIO's DMA_LOGGING_REPORT: iova_bitmap_for_each's error is returned ---------------

    def pin_run(self, length: int) -> int:
        """Pin the bitmap as iova_bitmap_get does: the pages pinnable in one run from its
        start (EFAULT when not even the first one is). From now on only bits in them land.
        Returns the IOVA (at most `length`) those bits cover: what the driver is asked."""
        if not access_ok(self.data, 1):  # a kernel address is no user page to pin
            raise err(EFAULT)
        try:
            r = self.mm.region(self.data, 1)
        except OSError:
            raise err(EFAULT) from None
        if not r.backed:
            raise err(EFAULT)  # unbacked memory has no pages to pin
        self.max_bits = min(self.max_bits, (r.end - self.data) * 8)
        return min(length, self.max_bits << self.pgshift)

    def set_pages(self, cur: int, bits: npt.NDArray[np.uint8], npages: int) -> None:
        """Record the 4 KiB page bits of [cur, cur + npages*4K) (bit j = page j). Callers
        pass at most one hw window of pages (2^22); the granule conversion works in steps."""
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
            self._reduce_pages(page0, packed, npages)
        else:
            self._expand_pages(page0, packed, npages)

    def _reduce_pages(self, page0: int, packed: npt.NDArray[np.uint8], npages: int) -> None:
        """A granule above 4 KiB: bit b is the OR of pages [b*r, (b+1)*r)."""
        s = self.pgshift - PAGE_SHIFT
        r = 1 << s
        first, last = page0 >> s, (page0 + npages - 1) >> s
        if first >= self.max_bits:
            return
        if last - first < 2:  # a granule as large as the pages given: bit by bit
            for b in range(first, min(last, self.max_bits - 1) + 1):
                lo = max(page0, b << s) - page0
                hi = min(page0 + npages, (b + 1) << s) - page0
                if any_bits(packed, lo, hi):
                    self.fill(b, b)
            return
        # r < npages here, so the pad before the first whole group is under npages too
        pad = page0 % r  # pages of the first output bit that lie before cur
        # Pages beyond what can land need no reduction.
        keep = min(npages, (self.max_bits - first) * r - pad)
        stream = mask_tail(packed, keep)
        stream = shift_packed(np.concatenate([np.zeros(pad >> 3, np.uint8), stream]), pad & 7)
        red = reduce_packed(stream, pad + keep, r)
        self.set_packed(first, red, (pad + keep + r - 1) // r)

    def _expand_pages(self, page0: int, packed: npt.NDArray[np.uint8], npages: int) -> None:
        """A granule below 4 KiB: every page is k bits. Done a step of bits at a time,
        skipping clean pages and bitmap bytes that cannot be pinned."""
        k = 1 << (PAGE_SHIFT - self.pgshift)
        per = max(8, STEP_BITS // k)  # pages per step, a multiple of 8
        for i in range(0, npages, per):
            first = (page0 + i) * k
            if first >= self.max_bits:
                return
            n = min(per, npages - i, -(-(self.max_bits - first) // k))
            part = mask_tail(packed[i >> 3 : (i + n + 7) >> 3], n)
            if not part.any() or not self._any_backed(first >> 3, ((first + n * k) >> 3) + 1):
                continue
            self.set_packed(first, expand_packed(part, n, k), n * k)
