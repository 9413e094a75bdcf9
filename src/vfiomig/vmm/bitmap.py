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
        if fill:
            self.set_all()

    def set_all(self) -> None:
        self.words[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        self._trim()

    def clear(self) -> None:
        self.words[:] = 0

    def _trim(self) -> None:
        tail = self.npages % 64
        if tail and self.words.size:
            self.words[-1] &= np.uint64((1 << tail) - 1)

    def set_pages(self, pages: Pages) -> None:
        """Set the bits of ``pages`` (duplicates allowed)."""
        if pages.size:
            np.bitwise_or.at(self.words, pages >> 6, ONE << (pages & 63).astype(np.uint64))

    def or_words(self, first_page: int, words: npt.NDArray[np.uint64], npages: int) -> None:
        """OR a kernel bitmap whose bit 0 is ``first_page`` (covering ``npages`` pages)."""
        if npages <= 0:
            return
        if first_page % 64 == 0:
            n = -(-npages // 64)
            w0 = first_page // 64
            self.words[w0 : w0 + n] |= words[:n]
            self._trim()
            return
        self.set_pages(_expand(words[: -(-npages // 64)], 0) + first_page)  # unaligned: rare

    def or_bitmap(self, other: PageBitmap) -> None:
        self.words |= other.words

    def count(self) -> int:
        return int(np.bitwise_count(self.words).sum(dtype=np.int64))

    def pages(self) -> Pages:
        return _expand(self.words, 0)

    def test(self, pages: Pages) -> npt.NDArray[np.bool_]:
        return ((self.words[pages >> 6] >> (pages & 63).astype(np.uint64)) & ONE).astype(bool)

    def fetch_and_clear(self) -> PageBitmap:
        """A copy of the bitmap, leaving this one empty (KVM_GET_DIRTY_LOG + clear)."""
        out = PageBitmap(0)
        out.npages, out.words = self.npages, self.words.copy()
        self.words[:] = 0
        return out

    def take(self, cursor: int, limit: int) -> tuple[Pages, int]:
        """Up to ``limit`` set pages at or after ``cursor`` in page order, wrapping once to 0;
        their bits are cleared. Returns (pages, the cursor after the last page taken).

        QEMU's ram_find_and_save_block walks the bitmap from where it stopped and wraps; the
        scan here is a numpy pass per block of SCAN_BLOCK words.
        """
        got: list[Pages] = []
        n = 0
        nwords = self.words.size
        w = cursor // 64 if cursor < self.npages else 0
        first = True
        scanned = 0
        while n < limit and scanned <= nwords:
            end = min(w + SCAN_BLOCK, nwords)
            block = self.words[w:end]
            if block.any():
                p = _expand(block, w)
                if first:
                    p = p[p >= cursor]
                first = False
                p = p[: limit - n]
                if p.size:
                    self._clear_sorted(p)
                    got.append(p)
                    n += p.size
            else:
                first = False
            scanned += end - w
            w = 0 if end >= nwords else end
        if not got:
            return np.zeros(0, dtype=np.int64), cursor
        out = np.concatenate(got) if len(got) > 1 else got[0]
        return out, int(out[-1]) + 1

    def _clear_sorted(self, p: Pages) -> None:
        w = p >> 6
        np.bitwise_and.at(self.words, w, ~(ONE << (p & 63).astype(np.uint64)))
