"""vIOMMU, vDEVICE and HW queue commands (drivers/iommu/iommufd/viommu.c), to where the
model's scope ends.

A vIOMMU is a slice of the physical IOMMU for one VM (nested translation, guest-owned
invalidation queues, virtual device ids). The model's IOMMUs have none: the driver's
check in IOMMU_VIOMMU_ALLOC answers EOPNOTSUPP for every device, as the kernel does on
hardware without the support (iommu_drivers.IommuDriver.viommu_size). So no VIOMMU object
ever exists, and every command that names one (VDEVICE_ALLOC, VEVENTQ_ALLOC in eventq.py,
HW_QUEUE_ALLOC) ends at its lookup with ENOENT, after the checks that come before it.
"""

from __future__ import annotations

from errno import EINVAL, ENOENT, EOPNOTSUPP, EOVERFLOW
from typing import NoReturn

from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.iommu_drivers import iommu_driver
from vfiomig.kernel.iommufd.main import IommufdCtx, Ucmd, register
from vfiomig.uapi import iommufd as u


def iommufd_get_viommu(ictx: IommufdCtx, viommu_id: int) -> NoReturn:
    """iommufd_get_viommu (iommufd_private.h). No VIOMMU object is ever made in the model, so
    every id is missing or of another type: ENOENT."""
    raise err(ENOENT)


@register(u.IOMMU_VIOMMU_ALLOC, u.iommu_viommu_alloc, 24)
def iommufd_viommu_alloc_ioctl(ucmd: Ucmd) -> int:
    """viommu.c iommufd_viommu_alloc_ioctl: flags or the DEFAULT type EOPNOTSUPP; dev_id
    not a DEVICE ENOENT; then the driver: no get_viommu_size / viommu_init op, or a size of
    0 for this device and type, EOPNOTSUPP. Every modelled IOMMU stops there. The kernel
    goes on with hwpt_id (not a HWPT_PAGING: ENOENT; not a nesting parent: EINVAL), which
    the model never reaches: the driver check comes first."""
    from vfiomig.kernel.iommufd.device import IommufdDevice

    cmd = ucmd.cmd
    if cmd.flags or cmd.type == u.IOMMU_VIOMMU_TYPE_DEFAULT:
        raise err(EOPNOTSUPP)
    ucmd.ictx.get(cmd.dev_id, IommufdDevice)
    if not iommu_driver(ucmd.ictx.kernel).viommu_size(cmd.type):
        raise err(EOPNOTSUPP)
    raise AssertionError("no modelled IOMMU driver supports a vIOMMU")  # pragma: no cover


@register(u.IOMMU_VDEVICE_ALLOC, u.iommu_vdevice_alloc, 24)
def iommufd_vdevice_alloc_ioctl(ucmd: Ucmd) -> int:
    """viommu.c iommufd_vdevice_alloc_ioctl: virt_id > ULONG_MAX EINVAL (never, with a
    64-bit unsigned long), then the vIOMMU: ENOENT. The device (ENOENT), its IOMMU
    (EINVAL), an existing vDEVICE or virt_id (EEXIST) come after it."""
    iommufd_get_viommu(ucmd.ictx, ucmd.cmd.viommu_id)


@register(u.IOMMU_HW_QUEUE_ALLOC, u.iommu_hw_queue_alloc, 40)
def iommufd_hw_queue_alloc_ioctl(ucmd: Ucmd) -> int:
    """viommu.c iommufd_hw_queue_alloc_ioctl: flags or the DEFAULT type EOPNOTSUPP; a zero
    length EINVAL; nesting_parent_iova + length - 1 past U64_MAX EOVERFLOW; then the vIOMMU:
    ENOENT. The driver's queue support and the pinning of the queue come after it."""
    cmd = ucmd.cmd
    if cmd.flags or cmd.type == u.IOMMU_HW_QUEUE_TYPE_DEFAULT:
        raise err(EOPNOTSUPP)
    if not cmd.length:
        raise err(EINVAL)
    if cmd.nesting_parent_iova + cmd.length - 1 > U64_MAX:  # check_add_overflow on u64
        raise err(EOVERFLOW)
    iommufd_get_viommu(ucmd.ictx, cmd.viommu_id)
