"""VFIO type1 container ioctls answered by iommufd itself (drivers/iommu/iommufd/vfio_compat.c).

/dev/iommu takes the VFIO container ioctls too, on the "compat IOAS" (IOMMU_VFIO_IOAS):
GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU, IOMMU_GET_INFO, IOMMU_MAP_DMA and
IOMMU_UNMAP_DMA. Dirty tracking is not one of them: VFIO_IOMMU_DIRTY_PAGES is ENOTTY and
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP is EINVAL ("obsoleted by the new dirty tracking
direction"); iommufd's dirty tracking is IOMMU_HWPT_GET_DIRTY_BITMAP.
"""

from __future__ import annotations

import struct
from errno import EFAULT, EINVAL, ENODEV, ENOTTY, EOPNOTSUPP
from typing import TYPE_CHECKING

from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel.bitops import U64_MAX, ULONG_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.io_pagetable import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from vfiomig.kernel.iommufd.ioas import iommufd_get_ioas
from vfiomig.kernel.iommufd.main import IommufdCtx, Ucmd, register
from vfiomig.kernel.uaccess import UserArg
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.kernel.iommufd.ioas import IommufdIoas

U32_MAX = (1 << 32) - 1
PAGE_MASK = ~(PAGE_SIZE - 1) & U64_MAX

_MAP = struct.Struct("<IIQQQ")  # vfio_iommu_type1_dma_map: argsz flags vaddr iova size
_UNMAP = struct.Struct("<IIQQ")  # vfio_iommu_type1_dma_unmap up to size
_INFO = struct.Struct("<IIQII")  # vfio_iommu_type1_info
_CAP_HDR = struct.Struct("<HHI")  # vfio_info_cap_header: id version next
_RANGE = struct.Struct("<QQ")


def get_compat_ioas(ictx: IommufdCtx) -> IommufdIoas:
    if ictx.vfio_ioas is None:
        raise err(ENODEV)
    return ictx.vfio_ioas


@register(u.IOMMU_VFIO_IOAS, u.iommu_vfio_ioas, 12)
def iommufd_vfio_ioas(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    if cmd.op == u.IOMMU_VFIO_IOAS_GET:
        cmd.ioas_id = get_compat_ioas(ictx).id
        ucmd.respond()
        return 0
    if cmd.op == u.IOMMU_VFIO_IOAS_SET:
        ictx.vfio_ioas = iommufd_get_ioas(ictx, cmd.ioas_id)
        return 0
    if cmd.op == u.IOMMU_VFIO_IOAS_CLEAR:
        ictx.vfio_ioas = None
        return 0
    raise err(EOPNOTSUPP)


def _uarg(arg: UserArg | int) -> UserArg:
    if isinstance(arg, int):
        raise err(EFAULT)
    return arg


def iommufd_vfio_map_dma(ictx: IommufdCtx, arg: UserArg | int) -> int:
    uarg = _uarg(arg)
    argsz, flags, vaddr, iova, size = _MAP.unpack(uarg.read(0, _MAP.size))
    if argsz < _MAP.size or flags & ~(v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE):
        raise err(EINVAL)
    prot = IOMMU_CACHE
    if flags & v.VFIO_DMA_MAP_FLAG_READ:
        prot |= IOMMU_READ
    if flags & v.VFIO_DMA_MAP_FLAG_WRITE:
        prot |= IOMMU_WRITE
    ioas = get_compat_ioas(ictx)
    ioas.iopt.map_user_pages(vaddr, size, iova, prot)
    return 0


def iommufd_vfio_unmap_dma(ictx: IommufdCtx, arg: UserArg | int) -> int:
    """Only VFIO_DMA_UNMAP_FLAG_ALL; an empty range unmaps 0 bytes successfully (6.18+).
    The struct is written back (size = bytes unmapped) even when the unmap failed."""
    uarg = _uarg(arg)
    argsz, flags, iova, size = _UNMAP.unpack(uarg.read(0, _UNMAP.size))
    if argsz < _UNMAP.size or flags & ~v.VFIO_DMA_UNMAP_FLAG_ALL:
        raise err(EINVAL)
    ioas = get_compat_ioas(ictx)
    if flags & v.VFIO_DMA_UNMAP_FLAG_ALL:
        if iova != 0 or size != 0:
            raise err(EINVAL)
        rc, unmapped = ioas.iopt.unmap_all()
    else:
        if ioas.iopt.disable_large_pages:
            # type1 (v1) may poke holes: cut at both ends first (no cut before IOVA 0)
            cuts = [(iova + size - 1) & U64_MAX, (iova - 1) & U64_MAX]
            ioas.iopt.cut_iova(cuts if iova else cuts[:1])
        rc, unmapped = ioas.iopt.unmap_iova(iova, size)
    try:
        uarg.write(0, _UNMAP.pack(argsz, flags, iova, unmapped))
    except OSError:
        rc = EFAULT
    if rc:
        raise err(rc)
    return 0


def iommufd_vfio_check_extension(ictx: IommufdCtx, ext: int) -> int:
    if ext in (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU, v.VFIO_UNMAP_ALL):
        return 1
    if ext == v.VFIO_DMA_CC_IOMMU:
        get_compat_ioas(ictx)  # ENODEV without a compat IOAS
        return 1  # every modelled domain enforces cache coherency
    return 0  # NOIOMMU (CONFIG_VFIO_NOIOMMU off), UPDATE_VADDR, nesting, unknown


def iommufd_vfio_set_iommu(ictx: IommufdCtx, type_: int) -> int:
    """TYPE1 (v1) is emulated by disabling huge IOPTEs, so any range can be unmapped."""
    if type_ not in (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU):
        raise err(EINVAL)  # VFIO_NOIOMMU_IOMMU too: the model has no no-IOMMU mode
    ioas = get_compat_ioas(ictx)
    if type_ == v.VFIO_TYPE1_IOMMU:
        ioas.iopt.disable_large_pages_()
    return 0


def iommufd_get_pagesizes(ioas: IommufdIoas) -> int:
    bitmap = ULONG_MAX
    for domain in ioas.iopt.domains:
        bitmap &= int(domain.pgsize_bitmap)
    if bitmap & ~PAGE_MASK:
        bitmap &= PAGE_MASK
        bitmap |= PAGE_SIZE
    return max(bitmap, ioas.iopt.iova_alignment)


def _fill_cap_dma_avail(ioas: IommufdIoas, uarg: UserArg, off: int, avail: int) -> int:
    size = _CAP_HDR.size + 4
    if avail >= size:
        uarg.write(off, _CAP_HDR.pack(v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 0))
        uarg.write(off + _CAP_HDR.size, struct.pack("<I", U32_MAX))
    return size


def _fill_cap_iova(ioas: IommufdIoas, uarg: UserArg, off: int, avail: int) -> int:
    head = _CAP_HDR.size + 8  # header, nr_iovas, reserved
    nr = 0
    for start, last in ioas.iopt.reserved_holes():
        if avail >= head + (nr + 1) * _RANGE.size:
            uarg.write(off + head + nr * _RANGE.size, _RANGE.pack(start, last))
        nr += 1
    if avail >= head + nr * _RANGE.size:
        uarg.write(off, _CAP_HDR.pack(v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0))
        uarg.write(off + _CAP_HDR.size, struct.pack("<II", nr, 0))
    return head + nr * _RANGE.size


def iommufd_vfio_iommu_get_info(ictx: IommufdCtx, arg: UserArg | int) -> int:
    uarg = _uarg(arg)
    minsz = 16  # offsetofend(struct vfio_iommu_type1_info, iova_pgsizes)
    argsz, _flags, _pgsizes = struct.unpack("<IIQ", uarg.read(0, minsz))
    if argsz < minsz:
        raise err(EINVAL)
    minsz = min(argsz, _INFO.size)
    ioas = get_compat_ioas(ictx)
    flags = v.VFIO_IOMMU_INFO_PGSIZES
    pgsizes = iommufd_get_pagesizes(ioas)
    cap_offset = 0
    total = _INFO.size
    last_cap: int | None = None
    for fill in (_fill_cap_dma_avail, _fill_cap_iova):
        avail = argsz - total if argsz > total else 0
        cap_size = fill(ioas, uarg, total, avail)
        cap_size = (cap_size + 7) & ~7
        if last_cap is not None and argsz >= total:
            uarg.write(last_cap + 4, struct.pack("<I", total))  # last_cap->next
        last_cap = total
        total += cap_size
    if argsz >= total:
        cap_offset = _INFO.size
    flags |= v.VFIO_IOMMU_INFO_CAPS
    uarg.write(0, _INFO.pack(total, flags, pgsizes, cap_offset, 0)[:minsz])
    return 0


def iommufd_vfio_ioctl(ictx: IommufdCtx, cmd: int, arg: UserArg | int) -> int:
    """iommufd_vfio_ioctl: anything else (VFIO_IOMMU_DIRTY_PAGES included) is ENOTTY."""
    if cmd == v.VFIO_GET_API_VERSION:
        return v.VFIO_API_VERSION
    if cmd == v.VFIO_SET_IOMMU:
        return iommufd_vfio_set_iommu(ictx, arg if isinstance(arg, int) else -1)
    if cmd == v.VFIO_CHECK_EXTENSION:
        return iommufd_vfio_check_extension(ictx, arg if isinstance(arg, int) else -1)
    if cmd == v.VFIO_IOMMU_GET_INFO:
        return iommufd_vfio_iommu_get_info(ictx, arg)
    if cmd == v.VFIO_IOMMU_MAP_DMA:
        return iommufd_vfio_map_dma(ictx, arg)
    if cmd == v.VFIO_IOMMU_UNMAP_DMA:
        return iommufd_vfio_unmap_dma(ictx, arg)
    raise err(ENOTTY)  # -ENOIOCTLCMD
