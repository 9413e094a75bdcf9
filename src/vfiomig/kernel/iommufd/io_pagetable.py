"""The io_pagetable: the IOVA -> user memory map of one IOAS, replicated into its domains.

Follows drivers/iommu/iommufd/io_pagetable.c (and the parts of pages.c it relies on):

* An *area* maps [iova, last] to a slice of an `IoptPages` (the user memory one IOAS_MAP
  pinned, or the file pages of one IOAS_MAP_FILE; IOAS_COPY makes areas that share the
  source's pages). Areas never overlap.
* *Reserved* ranges (outside a domain's aperture, a device's MSI window) and the *allowed*
  list (IOMMU_IOAS_ALLOW_IOVAS) constrain where IOVA may go.
* Every area is mapped into every domain (hw IO page table) of the IOAS. Pages are pinned,
  i.e. user memory must exist, only when a domain or an access needs them: mapping into an
  IOAS without domains is lazy, exactly like iopt_area_fill_domains() returning early.
* `iova_alignment` starts at 1 and becomes the largest of the domains' smallest page size,
  the accesses' alignment and PAGE_SIZE when huge pages are disabled.

The model keeps areas in a sorted Python list: area operations loop over areas (each one a
user mapping), never over pages. Per-page state lives in the hw page tables (numpy) and in
the user's dirty bitmap (numpy views); see dirty handling at the end and iova_bitmap.py.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from errno import (
    EADDRINUSE,
    EBUSY,
    EDEADLOCK,
    EEXIST,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EOPNOTSUPP,
    EOVERFLOW,
    EPERM,
)
from typing import TYPE_CHECKING, Any

from vfiomig.hw.io_pgtable import CHUNK_SHIFT
from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE
from vfiomig.kernel.bitops import U64_MAX, ULONG_MAX
from vfiomig.kernel.bitops import __ffs as ffs
from vfiomig.kernel.errors import err
from vfiomig.kernel.fault_inject import fail_point
from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap
from vfiomig.kernel.uaccess import access_ok

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory
    from vfiomig.kernel.fs import FdTable, File
    from vfiomig.kernel.iommufd.access import IommufdAccess

SIZE_MAX = U64_MAX
HPAGE_SIZE = 2 << 20  # THP size (CONFIG_TRANSPARENT_HUGEPAGE), the cap of auto IOVA alignment

# include/linux/iommu.h
IOMMU_READ = 1 << 0
IOMMU_WRITE = 1 << 1
IOMMU_CACHE = 1 << 2

# iommu_dirty_bitmap flags (include/linux/iommu.h) == IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
IOMMU_DIRTY_NO_CLEAR = 1 << 0

# The dirty walk's window: one chunk of the hw dirty bits (2^22 pages, 16 GiB of IOVA).
HW_WINDOW = 1 << (CHUNK_SHIFT + PAGE_SHIFT)

# The IOMMU driver tries this often to get an access to let go of a range being unmapped.
UNMAP_MAX_TRIES = 100


def roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class FilePin:
    """What pages of a file hold (pages->file): a reference on the file (get_file) and,
    once pinned, the kernel address their pages are mapped at (hw/memory.py map_data).
    Dropped with the pages (iopt_release_pages: fput), through a weakref finalizer."""

    def __init__(self, file: File) -> None:
        self.file = file
        file.refs += 1  # get_file
        self.kaddr: int | None = None
        self.mm: Memory | None = None

    def release(self) -> None:
        if self.mm is not None and self.kaddr is not None:
            self.mm.munmap(self.kaddr)
        self.file.refs -= 1  # fput
        if self.file.refs == 0:
            self.file.release()


@dataclass(eq=False)
class IoptPages:
    """struct iopt_pages: the memory of one mapping, in whole pages: user memory from the
    page-aligned `uptr` (IOPT_ADDRESS_USER) or, with `pin`, a file's pages from its offset
    `start` (IOPT_ADDRESS_FILE; uptr is unused)."""

    uptr: int
    npages: int
    writable: bool
    start: int = 0
    pin: FilePin | None = None
    # pages->source_mm: the process whose memory this is (its pid under `vfiomig run`, where
    # a fork child can map memory the parent later pins; None: the kernel's own mm)
    source_mm: int | None = None

    @property
    def end(self) -> int:
        return self.uptr + self.npages * PAGE_SIZE

    @property
    def origin(self) -> int:
        """What an allocated IOVA keeps the alignment of (iopt_alloc_area_pages): the user
        address, or the file offset for file pages."""
        return self.start if self.pin is not None else self.uptr

    def addr(self, byte: int) -> int:
        """The address (in the Memory) of byte `byte` of the pages: a user address, or the
        kernel address of the pinned file pages (pin them first: iopt_pin_file_pages)."""
        if self.pin is None:
            return self.uptr + byte
        assert self.pin.kaddr is not None
        return self.pin.kaddr + byte


def iopt_alloc_user_pages(uptr: int, length: int, writable: bool) -> IoptPages:
    """pages.c iopt_alloc_user_pages + iopt_alloc_pages: no pinning yet."""
    if uptr + length > ULONG_MAX:  # check_add_overflow(uptr, length)
        raise err(EOVERFLOW)
    if length > SIZE_MAX - PAGE_SIZE or length == 0:
        raise err(EINVAL)
    start_byte = uptr % PAGE_SIZE
    npages = (start_byte + length + PAGE_SIZE - 1) // PAGE_SIZE
    return IoptPages(uptr - start_byte, npages, writable)


def iopt_alloc_file_pages(
    file: File, start_byte: int, start: int, length: int, writable: bool
) -> IoptPages:
    """pages.c iopt_alloc_file_pages + iopt_alloc_pages: the file is referenced, nothing is
    pinned and the file's type is not looked at yet (memfd_pin_folios does, when a domain
    or an access needs the pages)."""
    if length > SIZE_MAX - PAGE_SIZE or length == 0:
        raise err(EINVAL)
    npages = (start_byte + length + PAGE_SIZE - 1) // PAGE_SIZE
    pages = IoptPages(0, npages, writable, start - start_byte, FilePin(file))
    assert pages.pin is not None
    weakref.finalize(pages, pages.pin.release)
    return pages


def iopt_pin_file_pages(mm: Memory, pages: IoptPages, byte: int, length: int) -> None:
    """pfn_reader_user_pin -> memfd_pin_folios (mm/gup.c) over bytes [byte, byte + length)
    of file pages: only a shmem or hugetlbfs file has folios to pin (EINVAL otherwise), and
    only below its size (shmem_get_folio_gfp: an index at or past i_size is EINVAL). The
    first pin maps the pages at a kernel address, where DMA reaches the file's bytes."""
    from vfiomig.kernel.memfd import MemfdFile

    assert pages.pin is not None
    f = pages.pin.file
    if not isinstance(f, MemfdFile):
        raise err(EINVAL)
    last_index = (pages.start + byte + length - 1) // PAGE_SIZE
    if last_index * PAGE_SIZE >= f.size:
        raise err(EINVAL)
    if pages.pin.kaddr is None:
        view = f.pages(pages.start, pages.npages * PAGE_SIZE)
        pages.pin.kaddr = mm.map_data(view, pages.start, kernel=True).addr
        pages.pin.mm = mm


@dataclass(eq=False)
class IoptArea:
    """struct iopt_area: [iova, last] -> pages, from byte `start_byte` of the pages."""

    iova: int
    last: int
    pages: IoptPages | None
    start_byte: int
    prot: int
    filled: bool = False  # mapped into the domains (a storage domain holds the pfns)
    num_accesses: int = 0
    prevent_access: bool = False

    @property
    def length(self) -> int:
        return self.last - self.iova + 1

    @property
    def page_offset(self) -> int:
        return self.start_byte % PAGE_SIZE

    def byte(self, iova: int) -> int:
        """The byte of the pages iova maps to (iopt_area_start_byte)."""
        return self.start_byte + (iova - self.iova)

    def uva(self, iova: int) -> int:
        """The address iova maps to (iopt_area_start_byte + pages->uptr; file pages must
        be pinned)."""
        assert self.pages is not None
        return self.pages.addr(self.byte(iova))


@dataclass
class PagesSlice:
    """struct iopt_pages_list element: a slice of pages to become one area."""

    pages: IoptPages
    start_byte: int
    length: int
    area: IoptArea | None = None


@dataclass(eq=False)
class Reserved:
    start: int
    last: int
    owner: Any


@dataclass
class Geometry:
    """struct iommu_domain_geometry: the IOVA a domain can translate."""

    aperture_start: int = 0
    aperture_end: int = ULONG_MAX


def _spans(intervals: list[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[bool, int, int]]:
    """interval_tree_for_each_span over [lo, hi]: (is_hole, start, last) in order; touching
    or overlapping intervals form one used span."""
    ivs = sorted((max(s, lo), min(e, hi)) for s, e in intervals if e >= lo and s <= hi)
    cur = lo
    i = 0
    while cur <= hi:
        if i < len(ivs) and ivs[i][0] <= cur:
            end = ivs[i][1]
            i += 1
            while i < len(ivs) and ivs[i][0] <= end + 1:
                end = max(end, ivs[i][1])
                i += 1
            if end >= cur:
                yield False, cur, end
                cur = end + 1
            continue
        nxt = ivs[i][0] if i < len(ivs) else hi + 1
        yield True, cur, nxt - 1
        cur = nxt


def _check_range(start: int, last: int, length: int, align: int, page_offset: int) -> int | None:
    """__alloc_iova_check_range: the aligned start inside [start, last], or None."""
    aligned = start + align - 1
    if aligned > ULONG_MAX:  # ALIGN_UP overflow
        return None
    aligned = (aligned & ~(align - 1)) | page_offset
    if aligned >= last or last - aligned < length - 1:
        return None
    return aligned


class IoPagetable:
    """struct io_pagetable."""

    def __init__(self, mm: Memory) -> None:
        self.mm = mm
        self.areas: list[IoptArea] = []
        self._starts: list[int] = []
        self._lasts: list[int] = []
        self.reserved: list[Reserved] = []
        self.allowed: list[tuple[int, int]] = []
        self.domains: list[Any] = []  # hw Domains (vfiomig.hw.iommu.Domain)
        self.accesses: list[IommufdAccess] = []
        self.iova_alignment = 1
        self.disable_large_pages = False

    # -- the interval trees ----------------------------------------------------------

    def area_iter(self, start: int, last: int) -> list[IoptArea]:
        """iopt_area_iter_first/next: the areas intersecting [start, last], ascending."""
        lo = bisect.bisect_left(self._lasts, start)
        hi = bisect.bisect_right(self._starts, last)
        return self.areas[lo:hi]

    def _insert(self, area: IoptArea) -> None:
        i = bisect.bisect_left(self._starts, area.iova)
        self.areas.insert(i, area)
        self._starts.insert(i, area.iova)
        self._lasts.insert(i, area.last)

    def _remove(self, area: IoptArea) -> None:
        i = bisect.bisect_left(self._starts, area.iova)
        assert self.areas[i] is area
        del self.areas[i], self._starts[i], self._lasts[i]

    def reserved_iter(self, start: int, last: int) -> list[Reserved]:
        return [r for r in self.reserved if r.start <= last and r.last >= start]

    def reserved_holes(self) -> list[tuple[int, int]]:
        """The usable IOVA ranges [start, last]: the holes of the reserved tree over
        [0, ULONG_MAX] (what IOAS_IOVA_RANGES and the compat IOVA_RANGE capability list)."""
        used = [(r.start, r.last) for r in self.reserved]
        return [(s, e) for is_hole, s, e in _spans(used, 0, ULONG_MAX) if is_hole]

    def allowed_intersects(self, start: int, last: int) -> bool:
        return any(s <= last and e >= start for s, e in self.allowed)

    def contig(self, iova: int, last: int) -> tuple[list[tuple[IoptArea, int, int]], bool]:
        """iopt_for_each_contig_area: [(area, cur_iova, last_in_area)] for the run of
        contiguous areas from iova, and whether the run reached `last`."""
        out: list[tuple[IoptArea, int, int]] = []
        first = self.area_iter(iova, iova)
        if not first or first[0].pages is None:
            return out, False
        i = bisect.bisect_left(self._starts, first[0].iova)
        cur = iova
        while i < len(self.areas):
            area = self.areas[i]
            if area.iova > cur or area.pages is None:  # a hole (or an unfinished area)
                return out, False
            piece_last = min(last, area.last)
            out.append((area, cur, piece_last))
            if last <= area.last:
                return out, True
            cur = area.last + 1
            i += 1
        return out, False

    # -- IOVA allocation -------------------------------------------------------------

    def alloc_iova(self, addr: int, length: int) -> int:
        """iopt_alloc_iova: first fit that keeps addr's alignment; never IOVA 0."""
        page_offset = addr % PAGE_SIZE
        if length == 0 or length >= ULONG_MAX // 2:
            raise err(EOVERFLOW)
        if not addr:
            iova_alignment = roundup_pow_of_two(length)
        else:
            iova_alignment = min(roundup_pow_of_two(length), 1 << ffs(addr))
        iova_alignment = min(iova_alignment, HPAGE_SIZE)
        if iova_alignment < self.iova_alignment:
            raise err(EINVAL)
        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        if self.allowed:
            allowed = [(s, e) for hole, s, e in _spans(self.allowed, lo, hi) if not hole]
        else:
            allowed = [(lo, hi)]
        used = [(r.start, r.last) for r in self.reserved] + [(a.iova, a.last) for a in self.areas]
        for a_start, a_last in allowed:
            if _check_range(a_start, a_last, length, iova_alignment, page_offset) is None:
                continue
            for is_hole, s, e in _spans(used, a_start, a_last):
                if not is_hole:
                    continue
                got = _check_range(s, e, length, iova_alignment, page_offset)
                if got is not None:
                    return got
        raise err(ENOSPC)

    def check_iova(self, iova: int, length: int) -> None:
        """iopt_check_iova (a FIXED_IOVA map)."""
        if iova & (self.iova_alignment - 1):
            raise err(EINVAL)
        last = iova + length - 1
        if last > ULONG_MAX:
            raise err(EOVERFLOW)
        if self.reserved_iter(iova, last):
            raise err(EINVAL)
        if self.area_iter(iova, last):
            raise err(EEXIST)

    # -- map -------------------------------------------------------------------------

    def _insert_area(self, elm: PagesSlice, iova: int, prot: int) -> IoptArea:
        """iopt_insert_area: the area is in the tree but not yet filled (pages None)."""
        fail_point(self.mm, "failslab", ENOMEM)  # iopt_area_alloc
        if prot & IOMMU_WRITE and not elm.pages.writable:
            raise err(EPERM)
        page_offset = elm.start_byte % PAGE_SIZE
        if page_offset & (self.iova_alignment - 1):
            raise err(EINVAL)
        last = iova + elm.length - 1
        if last > ULONG_MAX:
            raise err(EOVERFLOW)
        area = IoptArea(iova, last, None, elm.start_byte, prot)
        self._insert(area)
        return area

    def _abort(self, elms: list[PagesSlice]) -> None:
        for elm in elms:
            if elm.area is not None:
                self._remove(elm.area)
                elm.area = None

    def map_pages(self, elms: list[PagesSlice], length: int, iova: int | None, prot: int) -> int:
        """iopt_map_pages: iova None allocates one. Returns the IOVA."""
        if length & (self.iova_alignment - 1) or not length:
            raise err(EINVAL)
        if iova is None:
            first = elms[0]
            iova = self.alloc_iova(first.pages.origin + first.start_byte, length)
        else:
            self.check_iova(iova, length)
        cur = iova
        try:
            for elm in elms:
                elm.area = self._insert_area(elm, cur, prot)
                cur += elm.length
        except OSError:
            self._abort(elms)
            raise
        done: list[PagesSlice] = []
        try:
            for elm in elms:
                assert elm.area is not None
                self._fill_domains(elm.area, elm.pages)
                done.append(elm)
        except OSError:
            for elm in done:
                assert elm.area is not None
                self._unfill_domains(elm.area)
            self._abort(elms)
            raise
        for elm in elms:
            assert elm.area is not None
            elm.area.pages = elm.pages
        return iova

    def map_user_pages(self, uptr: int, length: int, iova: int | None, prot: int) -> int:
        """iopt_map_user_pages."""
        pages = iopt_alloc_user_pages(uptr, length, bool(prot & IOMMU_WRITE))
        fail_point(self.mm, "failslab", ENOMEM)  # iopt_alloc_pages: kzalloc
        pages.source_mm = getattr(self.mm, "pid", None)
        return self.map_pages([PagesSlice(pages, uptr - pages.uptr, length)], length, iova, prot)

    def map_file_pages(
        self, fdt: FdTable, fd: int, start: int, length: int, iova: int | None, prot: int
    ) -> int:
        """iopt_map_file_pages: [start, start + length) of the file at `fd`. The model has
        no dma-buf, so dma_buf_get(fd) always fails and the fd is taken as a file."""
        if not length:
            raise err(EINVAL)
        if start + length - 1 > ULONG_MAX:  # check_add_overflow(start, length - 1)
            raise err(EOVERFLOW)
        start_byte = start % PAGE_SIZE
        file = fdt.get(fd)  # fget: EBADF
        pages = iopt_alloc_file_pages(file, start_byte, start, length, bool(prot & IOMMU_WRITE))
        return self.map_pages([PagesSlice(pages, start_byte, length)], length, iova, prot)

    def get_pages(self, iova: int, length: int) -> list[PagesSlice]:
        """iopt_get_pages: the slices of pages under a contiguous IOVA range (IOAS_COPY)."""
        if not length:
            raise err(EINVAL)
        last = iova + length - 1
        if last > ULONG_MAX:
            raise err(EOVERFLOW)
        pieces, done = self.contig(iova, last)
        if not done:
            raise err(ENOENT)
        out = []
        for area, cur, plast in pieces:
            assert area.pages is not None
            out.append(PagesSlice(area.pages, area.start_byte + (cur - area.iova), plast - cur + 1))
        return out

    # -- domains ---------------------------------------------------------------------

    def _pin(self, area: IoptArea, pages: IoptPages) -> int:
        """Pinning the pages behind an area: user pages must be mapped at a user address
        (EFAULT otherwise), file pages must be pinnable (EINVAL, iopt_pin_file_pages).
        Returns the address of the area's first byte."""
        if area.filled:
            # pinned already: a new domain copies from one that has them
            return pages.addr(area.start_byte)
        fail_point(self.mm, "fail_page_alloc", ENOMEM)
        return self.pin_range(pages, area.start_byte, area.length)

    def pin_range(self, pages: IoptPages, byte: int, length: int, pinned: bool = False) -> int:
        """The address of bytes [byte, byte + length) of `pages`, pinned (see _pin).
        `pinned`: the area is in the domains already (an access reads what they hold), so
        the mapping process (pages->source_mm, maybe a fork child now gone) is not needed."""
        if pages.pin is not None:
            iopt_pin_file_pages(self.mm, pages, byte, length)
            return pages.addr(byte)
        uva = pages.uptr + byte
        if not access_ok(uva, length):
            raise err(EFAULT)
        src = pages.source_mm
        if src is not None and src != getattr(self.mm, "pid", None) and not pinned:
            # mmget_not_zero(pages->source_mm): the mapping process (a fork child) may be gone
            contains_in = getattr(self.mm, "contains_in", None)
            if contains_in is not None and not contains_in(src, uva, length):
                raise err(EFAULT)
            return uva
        if not self.mm.contains(uva, length):
            raise err(EFAULT)
        return uva

    def _map_domain(self, domain: Any, area: IoptArea, uva: int) -> None:
        if not area.prot & (IOMMU_READ | IOMMU_WRITE):
            # A mapping without access (possible through VFIO_IOMMU_MAP_DMA) installs no
            # IOPTE: io-pgtable-arm's map_pages returns early for it.
            return
        domain.map(
            area.iova,
            uva,
            area.length,
            read=bool(area.prot & IOMMU_READ),
            write=bool(area.prot & IOMMU_WRITE),
            huge=not self.disable_large_pages,
        )

    def _unmap_domain(self, domain: Any, area: IoptArea) -> None:
        domain.unmap(area.iova, area.length)
        domain.iotlb_sync(area.iova, area.length)

    def _fill_domains(self, area: IoptArea, pages: IoptPages) -> None:
        """iopt_area_fill_domains: nothing to do (and nothing pinned) without domains."""
        if not self.domains:
            return
        uva = self._pin(area, pages)
        done = []
        try:
            for domain in self.domains:
                self._map_domain(domain, area, uva)
                done.append(domain)
        except OSError:
            for domain in done:
                self._unmap_domain(domain, area)
            raise
        area.filled = True

    def _unfill_domains(self, area: IoptArea) -> None:
        if area.filled:
            for domain in self.domains:
                self._unmap_domain(domain, area)
            area.filled = False

    def _check_iova_alignment(self, new_alignment: int) -> None:
        """iopt_check_iova_alignment: every area must conform to a larger alignment."""
        mask = new_alignment - 1
        for area in self.areas:
            if area.iova & mask or area.length & mask or area.page_offset & mask:
                raise err(EADDRINUSE)

    def _calculate_iova_alignment(self) -> None:
        """iopt_calculate_iova_alignment."""
        new = PAGE_SIZE if self.disable_large_pages else 1
        for domain in self.domains:
            new = max(new, 1 << ffs(domain.pgsize_bitmap))
        for access in self.accesses:
            new = max(new, access.iova_alignment)
        if new > self.iova_alignment:
            self._check_iova_alignment(new)
        self.iova_alignment = new

    def reserve_iova(self, start: int, last: int, owner: Any) -> None:
        """iopt_reserve_iova: EADDRINUSE if an area or an allowed range is in the way."""
        if self.area_iter(start, last) or self.allowed_intersects(start, last):
            raise err(EADDRINUSE)
        self.reserved.append(Reserved(start, last, owner))

    def remove_reserved_iova(self, owner: Any) -> None:
        self.reserved = [r for r in self.reserved if r.owner is not owner]

    def table_add_domain(self, domain: Any, geometry: Geometry) -> None:
        """iopt_table_add_domain: align, reserve outside the aperture, fill with every area."""
        new_alignment = max(1 << ffs(domain.pgsize_bitmap), self.iova_alignment)
        if new_alignment > PAGE_SIZE:
            raise err(EINVAL)
        if new_alignment != self.iova_alignment:
            self._check_iova_alignment(new_alignment)
        try:
            if geometry.aperture_start != 0:
                self.reserve_iova(0, geometry.aperture_start - 1, domain)
            if geometry.aperture_end != ULONG_MAX:
                self.reserve_iova(geometry.aperture_end + 1, ULONG_MAX, domain)
            self._fill_domain(domain)
        except OSError:
            self.remove_reserved_iova(domain)
            raise
        self.iova_alignment = new_alignment
        self.domains.append(domain)

    def _fill_domain(self, domain: Any) -> None:
        """iopt_fill_domain: on failure the domain is left unchanged."""
        done: list[IoptArea] = []
        try:
            for area in self.areas:
                if area.pages is None:
                    continue
                uva = self._pin(area, area.pages)
                self._map_domain(domain, area, uva)
                done.append(area)
        except OSError:
            for area in done:
                self._unmap_domain(domain, area)
            raise
        for area in done:
            area.filled = True

    def table_remove_domain(self, domain: Any) -> None:
        """iopt_table_remove_domain: unmap every area from it, drop its reservations."""
        if domain not in self.domains:
            return
        self.domains.remove(domain)
        for area in self.areas:
            if area.pages is not None and area.filled:
                self._unmap_domain(domain, area)
                if not self.domains:
                    area.filled = False
        self.remove_reserved_iova(domain)
        self._calculate_iova_alignment()

    # -- unmap -----------------------------------------------------------------------

    def unmap_iova_range(self, start: int, last: int) -> tuple[int, int]:
        """iopt_unmap_iova_range: (errno or 0, bytes unmapped). Nothing mapped is success
        with 0 bytes (the IOAS_UNMAP ioctl turns that into ENOENT). Areas unmapped before an
        error stay unmapped."""
        unmapped = 0
        tries = 0
        while True:
            found = self.area_iter(start, last)
            if not found:
                return 0, unmapped
            area = found[0]
            if area.pages is None:
                return EBUSY, unmapped
            if area.iova < start or area.last > last:
                return ENOENT, unmapped
            if area.iova != start:
                tries = 0
            if area.num_accesses:
                start = area.iova
                area.prevent_access = True
                self._notify_unmap(area.iova, area.length)
                tries += 1
                if tries > UNMAP_MAX_TRIES:  # WARN_ON: something does not let go
                    return EDEADLOCK, unmapped
                continue
            pages = area.pages
            area.pages = None
            self._unfill_domains(area)
            self._remove(area)
            del pages
            unmapped += area.length

    def unmap_iova(self, iova: int, length: int) -> tuple[int, int]:
        """iopt_unmap_iova."""
        if not length:
            return EINVAL, 0
        last = iova + length - 1
        if last > ULONG_MAX:
            return EOVERFLOW, 0
        return self.unmap_iova_range(iova, last)

    def unmap_all(self) -> tuple[int, int]:
        return self.unmap_iova_range(0, ULONG_MAX)

    def _notify_unmap(self, iova: int, length: int) -> None:
        """iommufd_access_notify_unmap: ask every access on this IOAS to let go."""
        for access in list(self.accesses):
            access.notify_unmap(iova, length)

    # -- allowed ranges, cuts, options -----------------------------------------------

    def set_allow_iova(self, ranges: list[tuple[int, int]]) -> None:
        """iopt_set_allow_iova: replace the allowed list atomically."""
        for s, e in ranges:
            if self.reserved_iter(s, e):
                raise err(EADDRINUSE)
        self.allowed = sorted(ranges)

    def _area_split(self, area: IoptArea, iova: int) -> None:
        """iopt_area_split: `iova` becomes the last byte of the left part (VFIO type1 v1)."""
        if iova in (area.iova, area.last):
            return
        if area.pages is None or area.prevent_access:
            raise err(EBUSY)
        new_start = iova + 1
        mask = self.iova_alignment - 1
        if new_start & mask or (area.start_byte + (new_start - area.iova)) & mask:
            raise err(EINVAL)
        if area.num_accesses:
            raise err(EINVAL)
        if area.filled and not self.disable_large_pages:  # could hold huge IOPTEs
            raise err(EINVAL)
        self._remove(area)
        lhs = IoptArea(area.iova, iova, area.pages, area.start_byte, area.prot, area.filled)
        rhs = IoptArea(
            new_start,
            area.last,
            area.pages,
            area.start_byte + (new_start - area.iova),
            area.prot,
            area.filled,
        )
        self._insert(lhs)
        self._insert(rhs)

    def cut_iova(self, iovas: list[int]) -> None:
        """iopt_cut_iova."""
        for iova in iovas:
            found = self.area_iter(iova, iova)
            if found:
                self._area_split(found[0], iova)

    def enable_large_pages(self) -> None:
        self.disable_large_pages = False
        self._calculate_iova_alignment()

    def disable_large_pages_(self) -> None:
        """iopt_disable_large_pages: not once domains hold mappings."""
        if self.disable_large_pages:
            return
        if self.domains and self.areas:
            raise err(EINVAL)
        self.disable_large_pages = True
        try:
            self._calculate_iova_alignment()
        except OSError:
            self.disable_large_pages = False
            raise

    def add_access(self, access: IommufdAccess) -> None:
        """iopt_add_access."""
        self.accesses.append(access)
        try:
            self._calculate_iova_alignment()
        except OSError:
            self.accesses.remove(access)
            raise

    def remove_access(self, access: IommufdAccess) -> None:
        if access in self.accesses:
            self.accesses.remove(access)
        self._calculate_iova_alignment()

    # -- dirty tracking --------------------------------------------------------------

    def set_dirty_tracking(self, domain: Any, enable: bool) -> None:
        """iopt_set_dirty_tracking: enabling first clears every dirty bit of every area
        (iopt_clear_dirty_data: read-and-clear with no bitmap, then one IOTLB sync)."""
        if not domain.has_dirty_ops:
            raise err(EOPNOTSUPP)
        if enable:
            for area in self.areas:
                if area.pages is None:
                    continue
                domain.clear_dirty(area.iova, area.length)
            for area in self.areas:
                if area.pages is not None:
                    domain.iotlb_sync(area.iova, area.length)
        domain.set_dirty_tracking(enable)

    def read_and_clear_dirty_data(
        self, domain: Any, flags: int, iova: int, length: int, page_size: int, data: int
    ) -> None:
        """iopt_read_and_clear_dirty_data (the range checks) + iommu_read_and_clear_dirty."""
        check_iova_range(self.iova_alignment, iova, length, page_size)
        if not domain.has_dirty_ops:
            raise err(EOPNOTSUPP)
        bitmap = IovaBitmap(self.mm, iova, length, page_size, data)
        clear = not flags & IOMMU_DIRTY_NO_CLEAR
        last = iova + ((length - 1) & U64_MAX)
        # iova_bitmap_for_each -> __iommu_read_and_clear_dirty; its result is discarded:
        # a hole stops the walk, and what was walked is reported (and cleared).
        pieces, _done = self.contig(iova, last)
        for _area, cur, plast in pieces:
            own = getattr(domain, "record_dirty", None)  # a driver's read_and_clear_dirty
            if own is not None:
                own(bitmap, cur, plast - cur + 1, clear)
            else:
                record_dirty(domain, bitmap, cur, plast - cur + 1, clear)
        if clear and pieces:
            start = pieces[0][1]
            domain.iotlb_sync(start, pieces[-1][2] - start + 1)


def check_iova_range(iova_alignment: int, iova: int, length: int, page_size: int) -> None:
    """iommufd_check_iova_range, in u64 arithmetic."""
    last = iova + ((length - 1) & U64_MAX)
    if last > U64_MAX:
        raise err(EOVERFLOW)
    if iova > ULONG_MAX or last > ULONG_MAX:
        raise err(EOVERFLOW)
    end = (last + 1) & U64_MAX
    if iova & (iova_alignment - 1) or end & (iova_alignment - 1):
        raise err(EINVAL)
    if not page_size:
        raise err(EINVAL)
    if iova & (page_size - 1) or end & (page_size - 1):
        raise err(EINVAL)


def record_dirty(domain: Any, bitmap: IovaBitmap, cur: int, length: int, clear: bool) -> None:
    """ops->read_and_clear_dirty(domain, cur, length) with iommu_dirty_bitmap_record.

    The hw returns the dirty state of [cur, cur+length) at 4 KiB granularity, a dirty leaf
    setting all of its pages in range (and clearing the whole leaf). The driver records a
    dirty leaf as (walk cursor, leaf size) (generic_pt record_dirty): the leaf the walk
    starts inside is recorded from `cur`, so it reaches past its own end by (cur - start);
    a leaf that runs past the end of the range is recorded whole. Both spill bits beyond
    the 4 KiB bitmap, which are added here as ranges.

    When the user's bitmap takes the 4 KiB bits as they are (granule 4 KiB, byte aligned,
    one backed mapping), the hw ORs its bits straight into user memory: no intermediate
    array. Otherwise one window of 4 KiB bits at a time goes through IovaBitmap.set_pages.
    """
    npages = length // PAGE_SIZE
    if npages == 0:
        return
    end = cur + length
    # the edge leaves' state, read before the walk clears it
    first_dirty = _page_dirty(domain, cur)
    last_dirty = _page_dirty(domain, end - PAGE_SIZE)
    # The walk in windows of the hw's 16 GiB chunks: no leaf crosses their (absolute)
    # edges, so clearing one window leaves the next as it was, and the 4 KiB bits of one
    # window are 512 KiB at most, whatever the area's size. Clean windows are skipped.
    lo = cur
    while lo < end:
        hi = min(end, (lo // HW_WINDOW + 1) * HW_WINDOW)
        n = (hi - lo) // PAGE_SIZE
        if domain.has_dirty(lo, hi - lo):
            direct = bitmap.direct_view(lo, n)
            if direct is not None:
                domain.read_and_clear_dirty(lo, hi - lo, clear=clear, out=direct)
            else:
                bitmap.set_pages(lo, domain.read_and_clear_dirty(lo, hi - lo, clear=clear), n)
        lo = hi
    first = domain.leaf(cur)
    if first is not None and first_dirty:
        fstart, fsize = first
        if fstart < cur:  # recorded at the cursor, not at the leaf's start
            bitmap.set(cur, fsize)
            if fstart + fsize >= end:
                return
    last_leaf = domain.leaf(end - 1)
    if last_leaf is not None and last_dirty:
        lstart, lsize = last_leaf
        if lstart + lsize > end:
            rec = max(lstart, cur)
            bitmap.set(rec, lsize)


def _page_dirty(domain: Any, iova: int) -> bool:
    return bool(int(domain.read_and_clear_dirty(iova, PAGE_SIZE, clear=False)[0]) & 1)
