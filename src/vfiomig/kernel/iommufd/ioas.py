"""IOAS objects and their commands (drivers/iommu/iommufd/ioas.c).

An IOAS is an io_pagetable (io_pagetable.py) plus the list of paging HWPTs that mirror
it. Handlers read as the kernel's: check the command, get the object (ENOENT), do the
iopt_* work, respond.
"""

from __future__ import annotations

import bisect
import struct
from errno import EFAULT, EINVAL, EMSGSIZE, ENOENT, EOPNOTSUPP, EOVERFLOW
from typing import TYPE_CHECKING

from vfiomig.kernel.bitops import U64_MAX, ULONG_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.io_pagetable import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE, IoPagetable
from vfiomig.kernel.iommufd.main import (
    IommufdCtx,
    IommufdObject,
    IommufdObjectType,
    Ucmd,
    register,
)
from vfiomig.kernel.uaccess import user_read, user_write
from vfiomig.uapi import iommufd as u

if TYPE_CHECKING:
    from vfiomig.kernel.iommufd.hw_pagetable import IommufdHwptPaging

_RANGE = struct.Struct("<QQ")  # struct iommu_iova_range {start, last}
_MAP_FLAGS = u.IOMMU_IOAS_MAP_FIXED_IOVA | u.IOMMU_IOAS_MAP_WRITEABLE | u.IOMMU_IOAS_MAP_READABLE
_RW = u.IOMMU_IOAS_MAP_WRITEABLE | u.IOMMU_IOAS_MAP_READABLE


class IommufdIoas(IommufdObject):
    """struct iommufd_ioas."""

    type = IommufdObjectType.IOAS

    def __init__(self, ictx: IommufdCtx) -> None:
        super().__init__()
        self.ictx = ictx
        self.iopt = IoPagetable(ictx.kernel.mm)
        self.hwpt_list: list[IommufdHwptPaging] = []

    def destroy(self) -> None:
        """iommufd_ioas_destroy: unmap everything (no domain or access can be left)."""
        self.iopt.unmap_all()


def iommufd_ioas_alloc(ictx: IommufdCtx) -> IommufdIoas:
    return ictx.alloc(IommufdIoas(ictx))


def iommufd_get_ioas(ictx: IommufdCtx, ioas_id: int) -> IommufdIoas:
    return ictx.get(ioas_id, IommufdIoas)


def _check_map_cmd(flags: int, *u64s: int) -> None:
    """The checks IOAS_MAP and IOAS_COPY open with, in order: only the map flags
    (EOPNOTSUPP), no IOVA or length at ULONG_MAX or above (EOVERFLOW), read or write
    asked for (EINVAL)."""
    if flags & ~_MAP_FLAGS:
        raise err(EOPNOTSUPP)
    if any(x >= ULONG_MAX for x in u64s):
        raise err(EOVERFLOW)
    if not flags & _RW:
        raise err(EINVAL)


def _alloc_or(flags: int, iova: int) -> int | None:
    """The fixed IOVA, or None to let the IOAS allocate one (IOPT_ALLOC_IOVA)."""
    return iova if flags & u.IOMMU_IOAS_MAP_FIXED_IOVA else None


def conv_iommu_prot(map_flags: int) -> int:
    prot = IOMMU_CACHE
    if map_flags & u.IOMMU_IOAS_MAP_WRITEABLE:
        prot |= IOMMU_WRITE
    if map_flags & u.IOMMU_IOAS_MAP_READABLE:
        prot |= IOMMU_READ
    return prot


@register(u.IOMMU_IOAS_ALLOC, u.iommu_ioas_alloc, 12)
def iommufd_ioas_alloc_ioctl(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.flags:
        raise err(EOPNOTSUPP)
    ioas = iommufd_ioas_alloc(ucmd.ictx)
    cmd.out_ioas_id = ioas.id
    try:
        ucmd.respond()
    except OSError:
        ucmd.ictx.remove(ioas)  # iommufd_object_abort_and_destroy
        raise
    return 0


@register(u.IOMMU_IOAS_IOVA_RANGES, u.iommu_ioas_iova_ranges, 32)
def iommufd_ioas_iova_ranges(ucmd: Ucmd) -> int:
    """The holes of the reserved tree; EMSGSIZE (after responding) when they do not fit."""
    cmd = ucmd.cmd
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.ioas_id)
    iopt = ioas.iopt
    max_iovas = cmd.num_iovas
    ranges = cmd.allowed_iovas
    cmd.num_iovas = 0
    cmd.out_iova_alignment = iopt.iova_alignment
    mm = ucmd.ictx.kernel.mm
    for start, last in iopt.reserved_holes():
        if cmd.num_iovas < max_iovas:
            try:
                user_write(mm, ranges + cmd.num_iovas * _RANGE.size, _RANGE.pack(start, last))
            except OSError:
                raise err(EFAULT) from None
        cmd.num_iovas += 1
    ucmd.respond()
    if cmd.num_iovas > max_iovas:
        raise err(EMSGSIZE)
    return 0


def _load_iovas(ucmd: Ucmd, ptr: int, num: int) -> list[tuple[int, int]]:
    """iommufd_ioas_load_iovas: each start < last, no two overlapping (EINVAL)."""
    mm = ucmd.ictx.kernel.mm
    loaded: list[tuple[int, int]] = []
    # The kernel's interval tree, as sorted starts and lasts of disjoint ranges: an overlap
    # with any earlier range is a neighbour test, so a long list costs n log n, not n^2.
    starts: list[int] = []
    lasts: list[int] = []
    for i in range(num):
        try:
            start, last = _RANGE.unpack(user_read(mm, ptr + i * _RANGE.size, _RANGE.size))
        except OSError:
            raise err(EFAULT) from None
        if start >= last:
            raise err(EINVAL)
        k = bisect.bisect_left(starts, start)
        if (k < len(starts) and starts[k] <= last) or (k > 0 and lasts[k - 1] >= start):
            raise err(EINVAL)  # interval_tree_iter_first found an overlap
        starts.insert(k, start)
        lasts.insert(k, last)
        loaded.append((start, last))
    return loaded


@register(u.IOMMU_IOAS_ALLOW_IOVAS, u.iommu_ioas_allow_iovas, 24)
def iommufd_ioas_allow_iovas(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.ioas_id)
    ranges = _load_iovas(ucmd, cmd.allowed_iovas, cmd.num_iovas)
    ioas.iopt.set_allow_iova(ranges)
    return 0


@register(u.IOMMU_IOAS_MAP, u.iommu_ioas_map, 40)
def iommufd_ioas_map(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    _check_map_cmd(cmd.flags, cmd.iova, cmd.length)
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.ioas_id)
    cmd.iova = ioas.iopt.map_user_pages(
        cmd.user_va, cmd.length, _alloc_or(cmd.flags, cmd.iova), conv_iommu_prot(cmd.flags)
    )
    ucmd.respond()
    return 0


@register(u.IOMMU_IOAS_MAP_FILE, u.iommu_ioas_map_file, 40)
def iommufd_ioas_map_file(ucmd: Ucmd) -> int:
    """ioas.c iommufd_ioas_map_file: the checks of IOAS_MAP (there is no __reserved; `fd`
    sits in its place), the IOAS, then iopt_map_file_pages: no length EINVAL, start +
    length - 1 overflowing EOVERFLOW, the fd EBADF, then the map as for user memory. The
    file is pinned when a domain or access needs it: a file that is no memfd, or a range
    past its end, fails there (EINVAL), so not at all while the IOAS has no domain."""
    cmd = ucmd.cmd
    _check_map_cmd(cmd.flags, cmd.iova, cmd.length)
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.ioas_id)
    cmd.iova = ioas.iopt.map_file_pages(
        ucmd.ictx.kernel.fdt,
        cmd.fd,
        cmd.start,
        cmd.length,
        _alloc_or(cmd.flags, cmd.iova),
        conv_iommu_prot(cmd.flags),
    )
    ucmd.respond()
    return 0


@register(u.IOMMU_IOAS_CHANGE_PROCESS, u.iommu_ioas_change_process, 8)
def iommufd_ioas_change_process(ucmd: Ucmd) -> int:
    """ioas.c iommufd_ioas_change_process: __reserved EOPNOTSUPP; any area of any IOAS
    that is not a file's pages (IOPT_ADDRESS_FILE) EINVAL, nothing changed; else the
    pinned-page charge moves to the calling process. The model has one process, which
    already carries the charge (need_charge_update is false): success, no change."""
    if ucmd.cmd.__reserved:
        raise err(EOPNOTSUPP)
    for obj in sorted(ucmd.ictx.objects.values(), key=lambda o: o.id):
        if isinstance(obj, IommufdIoas):  # iommufd_take_all_iova_rwsem, in id order
            for area in obj.iopt.areas:
                if area.pages is None or area.pages.pin is None:
                    raise err(EINVAL)
    return 0


@register(u.IOMMU_IOAS_COPY, u.iommu_ioas_copy, 40)
def iommufd_ioas_copy(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    _check_map_cmd(cmd.flags, cmd.length, cmd.src_iova, cmd.dst_iova)
    src = iommufd_get_ioas(ucmd.ictx, cmd.src_ioas_id)
    pages = src.iopt.get_pages(cmd.src_iova, cmd.length)
    dst = iommufd_get_ioas(ucmd.ictx, cmd.dst_ioas_id)
    cmd.dst_iova = dst.iopt.map_pages(
        pages, cmd.length, _alloc_or(cmd.flags, cmd.dst_iova), conv_iommu_prot(cmd.flags)
    )
    ucmd.respond()
    return 0


@register(u.IOMMU_IOAS_UNMAP, u.iommu_ioas_unmap, 24)
def iommufd_ioas_unmap(ucmd: Ucmd) -> int:
    """Unmap-all of an empty IOAS succeeds; any other range with nothing in it is ENOENT."""
    cmd = ucmd.cmd
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.ioas_id)
    if cmd.iova == 0 and cmd.length == U64_MAX:
        rc, unmapped = ioas.iopt.unmap_all()
    else:
        if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
            raise err(EOVERFLOW)
        rc, unmapped = ioas.iopt.unmap_iova(cmd.iova, cmd.length)
        if not rc and not unmapped:
            rc = ENOENT
    if rc:
        raise err(rc)
    cmd.length = unmapped
    ucmd.respond()
    return 0


def iommufd_ioas_option(ucmd: Ucmd) -> int:
    """iommufd_ioas_option (IOMMU_OPTION_HUGE_PAGES), called from main.iommufd_option."""
    cmd = ucmd.cmd
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.object_id)
    if cmd.option_id != u.IOMMU_OPTION_HUGE_PAGES:
        raise err(EOPNOTSUPP)
    if cmd.op == u.IOMMU_OPTION_OP_GET:
        cmd.val64 = int(not ioas.iopt.disable_large_pages)
        return 0
    if cmd.op == u.IOMMU_OPTION_OP_SET:
        if cmd.val64 == 0:
            ioas.iopt.disable_large_pages_()
            return 0
        if cmd.val64 == 1:
            ioas.iopt.enable_large_pages()
            return 0
        raise err(EINVAL)
    raise err(EOPNOTSUPP)
