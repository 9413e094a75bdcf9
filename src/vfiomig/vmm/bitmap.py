"""Packed per-page bitmaps: QEMU's RAMBlock ``bmap`` and KVM's dirty log, as numpy words.

Bit ``p`` of word ``p >> 6`` (LSB first) stands for guest page ``p``, the layout the kernel's
dirty bitmaps use too, so a bitmap read through the uAPI ORs in word by word. Every operation
costs numpy passes over words (or over the pages it returns), never a Python loop per page:
a 1 TiB guest is 268 M pages, 32 MiB of words.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Pages = npt.NDArray[np.int64]
ONE = np.uint64(1)
# Words scanned per numpy pass when looking for set bits from a cursor (4 M pages).
SCAN_BLOCK = 1 << 16


def _expand(words: npt.NDArray[np.uint64], base_word: int) -> Pages:
    """Page indexes of the set bits of ``words`` (word 0 is ``base_word``), sorted."""
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(words[nz].astype("<u8").view(np.uint8), bitorder="little")
    rows, cols = np.nonzero(bits.reshape(-1, 64))
    return (nz[rows].astype(np.int64) + base_word) * 64 + cols.astype(np.int64)


class PageBitmap:
    """One bit per guest page."""

    def __init__(self, npages: int, *, fill: bool = False) -> None:
        self.npages = npages
        self.words = np.zeros(-(-npages // 64), dtype=np.uint64)
        self._count: int | None = 0  # cached popcount; None when it must be recounted
        if fill:
            self.set_all()

    def set_all(self) -> None:
        self.words[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        self._trim()
        self._count = self.npages

    def clear(self) -> None:
        self.words[:] = 0
        self._count = 0

    def _trim(self) -> None:
        tail = self.npages % 64
        if tail and self.words.size:
            self.words[-1] &= np.uint64((1 << tail) - 1)

    def set_pages(self, pages: Pages) -> None:
        """Set the bits of ``pages`` (duplicates allowed)."""
        if pages.size:
            np.bitwise_or.at(self.words, pages >> 6, ONE << (pages & 63).astype(np.uint64))
            self._count = None

    def or_words(self, first_page: int, words: npt.NDArray[np.uint64], npages: int) -> None:
        """OR a kernel bitmap whose bit 0 is ``first_page`` (covering ``npages`` pages)."""
        if npages <= 0:
            return
        self._count = None
        if first_page % 64 == 0:
            n = -(-npages // 64)
            w0 = first_page // 64
            self.words[w0 : w0 + n] |= words[:n]
            self._trim()
            return
        self.set_pages(_expand(words[: -(-npages // 64)], 0) + first_page)  # unaligned: rare

    def or_bitmap(self, other: PageBitmap) -> None:
        self.words |= other.words
        self._count = None

    def count(self) -> int:
        if self._count is None:
            self._count = int(np.bitwise_count(self.words).sum(dtype=np.int64))
        return self._count

    def pages(self) -> Pages:
        return _expand(self.words, 0)

    def test(self, pages: Pages) -> npt.NDArray[np.bool_]:
        return ((self.words[pages >> 6] >> (pages & 63).astype(np.uint64)) & ONE).astype(bool)

    def fetch_and_clear(self) -> PageBitmap:
        """A copy of the bitmap, leaving this one empty (KVM_GET_DIRTY_LOG + clear)."""
        out = PageBitmap(0)
        out.npages, out.words, out._count = self.npages, self.words.copy(), self._count
        self.clear()
        return out

    def take(self, cursor: int, limit: int) -> tuple[Pages, int]:
        """Up to ``limit`` set pages at or after ``cursor`` in page order, wrapping once to 0;
        their bits are cleared. Returns (pages, the cursor after the last page taken).

        QEMU's ram_find_and_save_block walks the bitmap from where it stopped and wraps.
        Here a block of words is popcounted, only the words that hold the next ``limit``
        pages are expanded, and runs of all-ones words become ranges directly.
        """
        got: list[Pages] = []
        n = 0
        nwords = self.words.size
        if cursor >= self.npages:
            cursor = 0
        w = cursor // 64
        skip = cursor % 64  # bits of the first word before the cursor (first visit only)
        scanned = 0
        while n < limit and scanned <= nwords:
            end = min(w + SCAN_BLOCK, nwords)
            block = self.words[w:end].copy()
            if skip:
                block[0] &= ~np.uint64((1 << skip) - 1)
                skip = 0
            counts = np.cumsum(np.bitwise_count(block), dtype=np.int64)
            if counts.size and counts[-1]:
                k = int(np.searchsorted(counts, limit - n))  # last word needed
                sub = block[: k + 1]
                p = _expand_fast(sub, w)[: limit - n]
                self._clear_taken(p)
                if self._count is not None:
                    self._count -= p.size
                got.append(p)
                n += p.size
            scanned += end - w
            w = 0 if end >= nwords else end
        if not got:
            return np.zeros(0, dtype=np.int64), cursor
        out = np.concatenate(got) if len(got) > 1 else got[0]
        return out, int(out[-1]) + 1

    def _clear_taken(self, p: Pages) -> None:
        """Clear the bits of ``p``, a run of consecutive set bits in page order: every set
        bit of the words strictly between its first and last word is in it; the two end
        words are cleared bit by bit."""
        if p.size == 0:
            return
        w0, w1 = int(p[0]) >> 6, int(p[-1]) >> 6
        if w1 - w0 > 1:
            self.words[w0 + 1 : w1] = 0
        edge = p[(p >> 6 == w0) | (p >> 6 == w1)]
        np.bitwise_and.at(self.words, edge >> 6, ~(ONE << (edge & 63).astype(np.uint64)))


def _expand_fast(words: npt.NDArray[np.uint64], base_word: int) -> Pages:
    """_expand, with all-ones words turned into page ranges without unpacking."""
    full = words == np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    if not full.all():
        if not full.any():
            return _expand(words, base_word)
        part = words.copy()
        part[full] = 0
        pages = np.concatenate((_expand(part, base_word), _full_pages(full, base_word)))
        pages.sort(kind="stable")
        return pages
    return np.arange(base_word * 64, (base_word + words.size) * 64, dtype=np.int64)


def _full_pages(full: npt.NDArray[np.bool_], base_word: int) -> Pages:
    idx = np.flatnonzero(full).astype(np.int64) + base_word
    return (idx[:, None] * 64 + np.arange(64, dtype=np.int64)).ravel()
