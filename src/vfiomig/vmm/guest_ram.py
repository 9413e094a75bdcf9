"""Guest RAM as the simulation holds it: user memory of the VMM process, per-page state.

A guest carries real bytes when its RAM is at most 4 GiB (``bytes`` mode): its RAM is one
backed mapping of the host's user memory, which the IOMMU maps and devices DMA into. Above
that (``versions`` mode, up to 1 TiB) each page has a uint32 write version instead of bytes:
RAM is then a *device window* of real bytes at the bottom of RAM, where devices keep their
queues and buffers (as a guest kernel's DMA buffers often sit low), plus an unbacked mapping
for the rest. CPU writes never touch the window (the guest driver owns it), so a workload can
never scribble over a device's rings: a workload's page 0 is the first page above it.

Page identity is (version, bytes): versions mode keeps both planes for window pages, bytes
mode only bytes. Zero pages: a page below ``zero_first`` starts with data, a page at or above
it starts zero; a written page stops being zero.

Writes are vectorised: one batch of page indexes per simulated step, applied to the plane(s)
and to the vCPU dirty log (KVM's dirty log, here as a packed PageBitmap) in one go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vfiomig.host.memory import UserBuffer
from vfiomig.host.transport import Transport
from vfiomig.vmm.bitmap import PageBitmap, Pages

PAGE = 4096
PAGE_SHIFT = 12
BYTES_MODE_MAX = 4 << 30  # the largest guest that carries real bytes by default
WINDOW = 16 << 20  # bytes of the device window (queues, rings, buffers)
UNSENT = np.uint32(0xFFFF_FFFF)  # a destination page that never arrived (versions mode)


@dataclass
class Chunk:
    """One user mapping that holds guest RAM ``[first_page, first_page + npages)``."""

    first_page: int
    npages: int
    buf: UserBuffer

    @property
    def end_page(self) -> int:
        return self.first_page + self.npages

    @property
    def backed(self) -> bool:
        return self.buf.backed

    def pages2d(self) -> npt.NDArray[np.uint8]:
        return self.buf.array.reshape(-1, PAGE)


class GuestRam:
    """The RAM of one guest on one host (source or destination)."""

    def __init__(
        self, t: Transport, size: int, *, mode: str, zero: float = 0.0, source: bool = True
    ) -> None:
        if size % (2 << 20):
            raise ValueError("guest RAM must be a multiple of 2 MiB")
        if size < 2 * WINDOW:
            raise ValueError(f"guest RAM must be at least {2 * WINDOW >> 20} MiB")
        if mode not in ("bytes", "versions"):
            raise ValueError(f"ram content mode {mode!r}: bytes or versions")
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self.mode = mode
        self.zero_first = self.npages - int(self.npages * zero)
        self.window_pages = WINDOW >> PAGE_SHIFT  # pages [0, window_pages) are the window
        self.chunks: list[Chunk] = []
        if mode == "bytes":
            self.chunks.append(Chunk(0, self.npages, t.mmap(size)))
            self.versions: npt.NDArray[np.uint32] | None = None
        else:
            w = self.window_pages
            self.chunks.append(Chunk(0, w, t.mmap(WINDOW)))
            self.chunks.append(Chunk(w, self.npages - w, t.mmap(size - WINDOW, backed=False)))
            fill = 0 if source else UNSENT
            self.versions = np.full(self.npages, fill, dtype=np.uint32)
        self.dirty_log = PageBitmap(self.npages)  # KVM's log of vCPU writes
        # Pages the vCPUs have written since boot (a write never leaves a page zero): with
        # zero_first it answers the zero-page check for all but the device window, whose
        # bytes devices change behind the CPU's back and are checked for real.
        self.written = PageBitmap(self.npages)
        self.logging = False  # KVM_MEM_LOG_DIRTY_PAGES
        self.stamp = 0  # write batches so far: the version a batch writes
        if source:
            self._fill_data()

    # -- content ------------------------------------------------------------------------

    def _fill_data(self) -> None:
        """Pages below zero_first hold data: one non-zero word each (cheap, and enough for
        a zero-page check to tell them apart)."""
        for c in self.backed_chunks():
            hi = min(c.end_page, self.zero_first) - c.first_page
            if hi > 0:
                words = c.buf.array.view("<u8").reshape(-1, PAGE // 8)
                words[:hi, 0] = np.arange(c.first_page, c.first_page + hi, dtype=np.uint64) | (
                    np.uint64(0xDA7A) << np.uint64(48)
                )

    def backed_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.backed]

    def window(self) -> Chunk:
        """The backed chunk holding the device window (the bottom WINDOW bytes)."""
        c = self.chunk_of(0)
        if not c.backed:
            raise AssertionError("the device window is always backed")
        return c

    def chunk_of(self, page: int) -> Chunk:
        for c in self.chunks:
            if c.first_page <= page < c.end_page:
                return c
        raise ValueError(f"page {page} outside guest RAM")

    @property
    def cpu_pages(self) -> int:
        """Pages a CPU workload may write: all but the device window."""
        return self.npages - self.window_pages

    def cpu_write(self, pages: Pages) -> None:
        """vCPUs write workload pages (sorted, counted from the first page above the device
        window): each write changes the page and dirties it in KVM's log."""
        if pages.size == 0:
            return
        pages = pages + self.window_pages
        self.stamp += 1
        if self.versions is not None:
            self.versions[pages] = self.stamp
        for c in self.backed_chunks():
            lo, hi = np.searchsorted(pages, (c.first_page, c.end_page))
            p = pages[lo:hi] - c.first_page
            if p.size:
                words = c.buf.array.view("<u8")
                slot = (p * 7 + self.stamp) % (PAGE // 8)
                words[p * (PAGE // 8) + slot] = (np.uint64(self.stamp) << np.uint64(32)) | (
                    p.astype(np.uint64) + np.uint64(1)
                )
        self.written.set_pages(pages)
        if self.logging:
            self.dirty_log.set_pages(pages)

    def cpu_stored(self, first: int, last: int) -> None:
        """The guest's CPUs stored bytes into pages [first, last] themselves (a guest driver
        filling its rings and buffers): KVM logs those pages like any vCPU write."""
        pages = np.arange(first, last + 1, dtype=np.int64)
        self.written.set_pages(pages)
        if self.logging:
            self.dirty_log.set_pages(pages)

    def zero_mask(self, pages: Pages) -> npt.NDArray[np.bool_]:
        """Which of ``pages`` (sorted) are all zero now (QEMU's buffer_is_zero): pages of the
        device window by their bytes, the others by whether they started zero and were
        never written."""
        zero = (pages >= self.zero_first) & ~self.written.test(pages)
        hi = int(np.searchsorted(pages, self.window_pages))
        if hi:
            words = self.window().buf.array.view("<u8").reshape(-1, PAGE // 8)
            zero[:hi] = ~words[pages[:hi]].any(axis=1)
        return zero

    # -- what the stream carries ----------------------------------------------------------

    def page_bytes(self, pages: Pages) -> npt.NDArray[np.uint8]:
        """Bytes of the backed pages among ``pages`` (sorted), in order, as rows."""
        rows = [
            c.pages2d()[pages[lo:hi] - c.first_page]
            for c in self.backed_chunks()
            for lo, hi in [np.searchsorted(pages, (c.first_page, c.end_page))]
            if hi > lo
        ]
        if not rows:
            return np.zeros((0, PAGE), dtype=np.uint8)
        return np.concatenate(rows) if len(rows) > 1 else rows[0]

    def backed_mask(self, pages: Pages) -> npt.NDArray[np.bool_]:
        m = np.zeros(pages.size, dtype=bool)
        for c in self.backed_chunks():
            lo, hi = np.searchsorted(pages, (c.first_page, c.end_page))
            m[lo:hi] = True
        return m

    def store(
        self,
        pages: Pages,
        zero: npt.NDArray[np.bool_],
        versions: npt.NDArray[np.uint32] | None,
        rows: npt.NDArray[np.uint8],
    ) -> None:
        """Load received pages: ``rows`` are the bytes of the backed, non-zero ones."""
        if self.versions is not None:
            if versions is None:
                raise ValueError("a versions-mode guest needs page versions")
            self.versions[pages] = versions
        data = ~zero & self.backed_mask(pages)
        k = 0
        for c in self.backed_chunks():
            lo, hi = np.searchsorted(pages, (c.first_page, c.end_page))
            if hi <= lo:
                continue
            rel = pages[lo:hi] - c.first_page
            d2 = c.pages2d()
            z = zero[lo:hi]
            d2[rel[z]] = 0
            nd = int(data[lo:hi].sum())
            d2[rel[~z]] = rows[k : k + nd]
            k += nd

    def digest(self) -> str:
        """A hash of the whole RAM state (both planes), for save files and checks."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        if self.versions is not None:
            h.update(self.versions.data)
        for c in self.backed_chunks():
            h.update(c.buf.array.data)
        return h.hexdigest()

    def close(self) -> None:
        for c in self.chunks:
            c.buf.close()
