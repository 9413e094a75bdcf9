"""Dirty bitmaps as the kernel writes them, and what a caller wants from them.

IOMMU_HWPT_GET_DIRTY_BITMAP, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT and type1's
VFIO_IOMMU_DIRTY_PAGES all fill a user buffer of little-endian u64 words where bit ``k``
(LSB-first) stands for ``[iova + k * page_size, iova + (k + 1) * page_size)``, relative to the
request's base ``iova``. :class:`DirtyBitmap` holds a copy of those words and answers with
numpy, never a Python loop per page: a 1 TiB range at 4 KiB is 32 MiB of words, and the cost
of ``pages()`` / ``ranges()`` grows with the dirty words, not with the range.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Largest bitmap the library maps for one request (8 TiB of IOVA at 4 KiB; type1's own cap).
# type1 refuses anything larger itself (EINVAL). iommufd and device DMA logging have no such
# cap: they would write the user bitmap past the buffer the library mapped, so a larger
# request that the kernel would accept is refused here (ValueError, split the range), and
# only one the kernel rejects before touching the bitmap (iova + length wraps) goes through.
MAX_BITMAP_BYTES = 256 << 20


U64_MAX = (1 << 64) - 1


def granule(page_size: int) -> int:
    """The IOVA one bit stands for: ``1 << __ffs(page_size)``. The kernel shifts by the
    lowest set bit (iova_bitmap_alloc, type1's pgshift), so a page size that is not a power
    of two acts through that bit; 3 means one byte per bit, not three."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    return page_size & -page_size


def iova_bitmap_bytes(length: int, page_size: int) -> int:
    """Bytes of user bitmap iova_bitmap may write for ``length`` bytes of IOVA (iommufd's
    GET_DIRTY_BITMAP and VFIO's DMA_LOGGING_REPORT): iova_bitmap_alloc's
    mapped_total_index, the u64 words up to the bit of ``length - 1`` (u64 arithmetic: a
    length of 0 is the whole 2^64 span) at ``__ffs(page_size)``."""
    pgshift = granule(page_size).bit_length() - 1
    return ((((length - 1) & U64_MAX) >> pgshift) // 64 + 1) * 8


def type1_bitmap_bytes(size: int, pgsize: int) -> int:
    """Bytes type1 requires of a dirty bitmap (vfio_iommu_type1.c verify_bitmap_size):
    DIRTY_BITMAP_BYTES(size >> __ffs(pgsize)), whole u64 words; at least one word."""
    pages = size >> (granule(pgsize).bit_length() - 1)
    return max(1, -(-pages // 64)) * 8


def bitmap_bytes(length: int, page_size: int) -> int:
    """Bytes of whole u64 words covering ``length`` bytes of IOVA, one bit per
    ``granule(page_size)`` (what :class:`DirtyBitmap` holds)."""
    pages = -(-length // granule(page_size))
    return max(1, -(-pages // 64)) * 8


def check_bitmap_size(nbytes: int, length: int, page_size: int, *, rejected: bool) -> None:
    """ValueError when the kernel would write more than MAX_BITMAP_BYTES of bitmap.

    ``rejected``: the kernel refuses the request before it touches the bitmap (its end is
    past 2^64, a page size it does not take); such a request is passed through so that its
    rejection can be tested."""
    if nbytes > MAX_BITMAP_BYTES and not rejected:
        raise ValueError(
            f"a dirty bitmap for {length:#x} bytes at {page_size:#x} is {nbytes} bytes, more "
            f"than the {MAX_BITMAP_BYTES} the library maps for one request; ask in parts"
        )


def _check_geometry(iova: int, length: int, page_size: int) -> None:
    for name, value in (("iova", iova), ("length", length), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"DirtyBitmap {name} must be an integer, got {type(value).__name__}")
    if page_size <= 0:
        raise ValueError(f"DirtyBitmap page_size must be positive, got {page_size}")
    if length < 0 or iova < 0:
        raise ValueError(f"DirtyBitmap iova and length must be >= 0, got {iova}, {length}")


def _zeros(n: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """np.zeros, with a range too large to hold refused as ValueError (not MemoryError)."""
    try:
        return np.zeros(n, dtype=dtype)
    except (MemoryError, ValueError, OverflowError):
        raise ValueError(f"a bitmap of {n} {np.dtype(dtype).name} is too large to hold") from None


@dataclass(frozen=True)
class DirtyBitmap:
    """Dirty pages of ``[iova, iova + length)`` at ``page_size`` granularity."""

    iova: int
    length: int
    page_size: int
    words: npt.NDArray[np.uint64]

    @classmethod
    def from_words(
        cls, iova: int, length: int, page_size: int, words: npt.NDArray[np.uint64]
    ) -> DirtyBitmap:
        """Keep exactly the bits of the range; bits past its last page are dropped (a huge
        IOPTE may make the kernel set bits beyond the requested length). ``page_size`` is
        what one bit stands for (a positive int); ValueError otherwise."""
        _check_geometry(iova, length, page_size)
        npages = -(-length // page_size)
        nwords = -(-npages // 64)
        w = _zeros(nwords, np.uint64)
        n = min(nwords, len(words))
        w[:n] = words[:n]
        tail = npages % 64
        if nwords and tail:
            w[-1] &= np.uint64((1 << tail) - 1)
        return cls(iova, length, page_size, w)

    @classmethod
    def from_pages(
        cls, iova: int, length: int, page_size: int, pages: npt.ArrayLike
    ) -> DirtyBitmap:
        """A bitmap with the given page indexes set (for tests and expectations)."""
        _check_geometry(iova, length, page_size)
        npages = -(-length // page_size)
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= npages):
            raise ValueError("page index outside the range")
        bits = _zeros(-(-npages // 64) * 64, np.uint8)
        bits[idx] = 1
        words = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
        return cls(iova, length, page_size, words)

    @property
    def npages(self) -> int:
        return -(-self.length // self.page_size)

    def count(self) -> int:
        """Number of dirty pages."""
        return int(np.bitwise_count(self.words).sum(dtype=np.int64))

    def __bool__(self) -> bool:
        return bool(self.words.any())

    def pages(self) -> npt.NDArray[np.int64]:
        """Sorted indexes of the dirty pages (relative to ``iova``)."""
        nz = np.flatnonzero(self.words)
        if nz.size == 0:
            return np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(
            self.words[nz].astype("<u8").view(np.uint8), bitorder="little"
        ).reshape(-1, 64)
        rows, cols = np.nonzero(bits)
        return nz[rows].astype(np.int64) * 64 + cols.astype(np.int64)

    def iovas(self) -> npt.NDArray[np.uint64]:
        """IOVA of each dirty page."""
        return np.uint64(self.iova) + self.pages().astype(np.uint64) * np.uint64(self.page_size)

    def is_dirty(self, iova: int) -> bool:
        iova = operator.index(iova)  # TypeError for a float or a string
        if not self.iova <= iova < self.iova + self.npages * self.page_size:
            raise ValueError(f"IOVA {iova:#x} outside the bitmap's range")
        k = (iova - self.iova) // self.page_size
        return bool((int(self.words[k // 64]) >> (k % 64)) & 1)

    def runs(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(first page, page count) of every maximal run of dirty pages."""
        p = self.pages()
        if p.size == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        breaks = np.flatnonzero(np.diff(p) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [p.size]))
        return p[starts], ends - starts

    def ranges(self) -> Iterator[tuple[int, int]]:
        """``(iova, length)`` of every maximal dirty run, in IOVA order."""
        first, count = self.runs()
        for f, c in zip(first.tolist(), count.tolist(), strict=True):
            yield self.iova + f * self.page_size, c * self.page_size

    def dirty_bytes(self) -> int:
        return self.count() * self.page_size

    def __or__(self, other: DirtyBitmap) -> DirtyBitmap:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        if (self.iova, self.length, self.page_size) != (other.iova, other.length, other.page_size):
            raise ValueError("can only merge bitmaps of the same range and page size")
        return DirtyBitmap(self.iova, self.length, self.page_size, self.words | other.words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return (self.iova, self.length, self.page_size) == (
            other.iova,
            other.length,
            other.page_size,
        ) and bool(np.array_equal(self.words, other.words))

    def __hash__(self) -> int:
        return hash((self.iova, self.length, self.page_size, self.words.tobytes()))

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(iova={self.iova:#x}, length={self.length:#x}, "
            f"page_size={self.page_size:#x}, dirty={self.count()}/{self.npages})"
        )
