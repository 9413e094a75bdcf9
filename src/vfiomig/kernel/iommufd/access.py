"""iommufd ACCESS objects: how an emulated (mdev-like) device reaches an IOAS without a domain.

Follows the iommufd_access_* half of drivers/iommu/iommufd/device.c and
drivers/vfio/iommufd.c (vfio_iommufd_emulated_*): binding such a device creates an ACCESS
(its id is what BIND returns as out_devid); ATTACH points the access at an IOAS (only an
IOAS: any other id is ENOENT); the driver then pins pages (vfio_pin_pages) or copies through
the IOAS (vfio_dma_rw). Nothing of this sets an IOMMU dirty bit: an ACCESS has no IO page
table, so IOMMU_HWPT_GET_DIRTY_BITMAP never sees what an emulated device writes.

Driver API (the VfioDevice gets `iommufd_access` while bound):
    access.pin_pages(iova, length, write) -> [(user_va, length)]   # IOVA must be page aligned
    access.unpin_pages(iova, length)                                # exactly a pinned range
    access.rw(iova, data_or_length, write) -> bytes | None          # copy to/from the IOAS
and the driver may define `dma_unmap(iova, length)`, called when userspace unmaps IOVA it
has pinned; it must unpin (vfio_iommufd_emulated_unmap -> ops->dma_unmap).
"""

from __future__ import annotations

from errno import EINVAL, ENOENT, EOVERFLOW, EPERM
from typing import TYPE_CHECKING, Any

from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel.bitops import ULONG_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.io_pagetable import IOMMU_READ, IOMMU_WRITE, IoptArea
from vfiomig.kernel.iommufd.main import IommufdCtx, IommufdObject, IommufdObjectType

if TYPE_CHECKING:
    from vfiomig.kernel.iommufd.ioas import IommufdIoas


class IommufdAccess(IommufdObject):
    """struct iommufd_access (vfio_user_ops: needs_pin_pages = 1)."""

    type = IommufdObjectType.ACCESS

    def __init__(self, ictx: IommufdCtx, vdev: Any) -> None:
        super().__init__()
        self.ictx = ictx
        self.vdev = vdev
        self.ioas: IommufdIoas | None = None
        self.iova_alignment = PAGE_SIZE  # needs_pin_pages (1 for an rw-only access)
        self.pins: list[tuple[int, int]] = []  # (iova, length) of each pin_pages call

    def destroy(self) -> None:
        """iommufd_access_destroy_object."""
        if self.ioas is not None:
            self.change_ioas(None)

    # -- attach ----------------------------------------------------------------------

    def change_ioas(self, new: IommufdIoas | None) -> None:
        """iommufd_access_change_ioas."""
        cur = self.ioas
        if cur is new:
            return
        if new is not None:
            new.iopt.add_access(self)  # EADDRINUSE if areas are not page aligned
            new.users += 1
        if cur is not None:
            self.notify_unmap(0, ULONG_MAX)  # access->ops->unmap(data, 0, ULONG_MAX)
            cur.iopt.remove_access(self)
            cur.users -= 1
        self.ioas = new

    def notify_unmap(self, iova: int, length: int) -> None:
        """access->ops->unmap: the driver must unpin what it pinned in the range."""
        cb = getattr(self.vdev, "dma_unmap", None)
        if callable(cb):
            cb(iova, length)

    # -- pin / rw --------------------------------------------------------------------

    def _walk(self, iova: int, length: int, write: bool) -> list[tuple[IoptArea, int, int]]:
        if not length:
            raise err(EINVAL)
        last = iova + length - 1
        if last > ULONG_MAX:
            raise err(EOVERFLOW)
        if self.ioas is None:
            raise err(ENOENT)
        pieces, done = self.ioas.iopt.contig(iova, last)
        for area, _cur, _plast in pieces:
            if area.prevent_access:
                raise err(EINVAL)
            if not area.prot & (IOMMU_WRITE if write else IOMMU_READ):
                raise err(EPERM)
        if not done:
            raise err(ENOENT)
        return pieces

    def pin_pages(self, iova: int, length: int, write: bool = True) -> list[tuple[int, int]]:
        """iommufd_access_pin_pages: the user memory under [iova, iova+length)."""
        pieces = self._walk(iova, length, write)
        assert self.ioas is not None
        iopt = self.ioas.iopt
        out = []
        for i, (area, cur, plast) in enumerate(pieces):
            # iopt_area_contig_is_aligned: whole pages, except at the two ends
            if area.byte(cur) % PAGE_SIZE or (
                i < len(pieces) - 1 and (area.byte(area.last) + 1) % PAGE_SIZE
            ):
                raise err(EINVAL)
            assert area.pages is not None
            # user pages: EFAULT if unmapped; file pages: EINVAL if not pinnable
            uva = iopt.pin_range(area.pages, area.byte(cur), plast - cur + 1, pinned=area.filled)
            out.append((uva, plast - cur + 1))
        for area, _cur, _plast in pieces:
            area.num_accesses += 1
        self.pins.append((iova, length))
        return out

    def unpin_pages(self, iova: int, length: int) -> None:
        """iommufd_access_unpin_pages: must match an earlier pin exactly."""
        if (iova, length) not in self.pins or self.ioas is None:
            return  # WARN_ON in the kernel
        self.pins.remove((iova, length))
        pieces, _ = self.ioas.iopt.contig(iova, iova + length - 1)
        for area, _cur, _plast in pieces:
            area.num_accesses = max(0, area.num_accesses - 1)

    def rw(self, iova: int, data: bytes | int, write: bool) -> bytes | None:
        """iommufd_access_rw: copy to (write) or from the IOAS. `data` is the bytes to write
        or, to read, the length. Writing an int is a length only (as hw DMA takes it): the
        checks happen and no bytes move, for unbacked memory."""
        length = data if isinstance(data, int) else len(data)
        pieces = self._walk(iova, length, write)
        assert self.ioas is not None
        iopt = self.ioas.iopt
        mm = self.ictx.kernel.mm
        out = bytearray()
        off = 0
        for area, cur, plast in pieces:
            n = plast - cur + 1
            assert area.pages is not None
            uva = iopt.pin_range(area.pages, area.byte(cur), n, pinned=area.filled)
            if write:
                if not isinstance(data, int):
                    mm.write(uva, data[off : off + n])  # EFAULT on unbacked memory
            else:
                out += mm.read(uva, n)
            off += n
        return None if write else bytes(out)


def iommufd_access_create(ictx: IommufdCtx, vdev: Any) -> IommufdAccess:
    """iommufd_access_create: the driver holds a user until iommufd_access_destroy."""
    access = ictx.alloc(IommufdAccess(ictx, vdev))
    access.users += 1
    return access


def iommufd_access_destroy(access: IommufdAccess) -> None:
    access.users -= 1
    access.ictx.remove(access)


def iommufd_access_attach(access: IommufdAccess, ioas_id: int) -> None:
    from vfiomig.kernel.iommufd.ioas import iommufd_get_ioas

    if access.ioas is not None:
        raise err(EINVAL)  # WARN_ON
    access.change_ioas(iommufd_get_ioas(access.ictx, ioas_id))


def iommufd_access_replace(access: IommufdAccess, ioas_id: int) -> None:
    from vfiomig.kernel.iommufd.ioas import iommufd_get_ioas

    if access.ioas is None:
        raise err(ENOENT)
    access.change_ioas(iommufd_get_ioas(access.ictx, ioas_id))


def iommufd_access_detach(access: IommufdAccess) -> None:
    if access.ioas is not None:
        access.change_ioas(None)
