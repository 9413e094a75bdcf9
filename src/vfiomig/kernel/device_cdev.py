"""The VFIO device cdev's iommufd ioctls (drivers/vfio/device_cdev.c, drivers/vfio/iommufd.c).

A cdev fd starts unbound: every device ioctl but VFIO_DEVICE_BIND_IOMMUFD is EINVAL until
it is bound (vfio_device_fops_unl_ioctl checks `df->access_granted`).

Binding a physical device creates an iommufd DEVICE (vfio_iommufd_physical_bind); binding
an emulated one (mdev-like: `emulated_iommu`) creates an ACCESS instead
(vfio_iommufd_emulated_bind), and out_devid is that object's id. ATTACH_IOMMUFD_PT then
attaches the DEVICE to a HWPT or an IOAS (a second attach replaces), or points the ACCESS
at an IOAS; DETACH undoes it (and is a no-op when nothing is attached).
"""

from __future__ import annotations

import ctypes
from errno import EBADF, EBADFD, EBUSY, EFAULT, EINVAL, EOPNOTSUPP
from typing import Any

from vfiomig.kernel.errors import err
from vfiomig.kernel.uaccess import UserArg
from vfiomig.uapi import vfio as v

_BIND_MINSZ = 16  # offsetofend(struct vfio_device_bind_iommufd, out_devid)
_ATTACH_MINSZ = 12  # offsetofend(struct vfio_device_attach_iommufd_pt, pt_id)
_DETACH_MINSZ = 8  # offsetofend(struct vfio_device_detach_iommufd_pt, flags)
_PT_ID_OFF = v.vfio_device_attach_iommufd_pt.pt_id.offset


def vfio_df_ioctl_bind_iommufd(df: Any, arg: UserArg | int) -> int:
    """vfio_df_ioctl_bind_iommufd (7.2), check for check."""
    from vfiomig.kernel.group import vfio_group_of
    from vfiomig.kernel.iommufd.access import iommufd_access_create
    from vfiomig.kernel.iommufd.device import iommufd_device_bind
    from vfiomig.kernel.iommufd.main import IommufdFile

    if isinstance(arg, int):
        raise err(EFAULT)
    argsz = arg.u32(0)  # get_user(argsz): EFAULT first
    if argsz < _BIND_MINSZ:
        raise err(EINVAL)
    bind = arg.copy_struct(v.vfio_device_bind_iommufd, argsz, _BIND_MINSZ)  # E2BIG past 24
    if bind.flags & ~v.VFIO_DEVICE_BIND_FLAG_TOKEN or bind.iommufd < 0:
        raise err(EINVAL)
    if df.group is not None:  # BIND_IOMMUFD is only for cdev fds
        raise err(EINVAL)
    group = vfio_group_of(df.device)
    if group is not None and group.opened_file is not None:  # vfio_device_block_group
        raise err(EBUSY)
    if df.access_granted:  # one device file cannot be bound twice
        raise err(EINVAL)
    kernel = df.device.kernel
    f = kernel.fdt.files.get(bind.iommufd)
    if f is None:
        raise err(EBADF)
    if not isinstance(f, IommufdFile):
        raise err(EBADFD)
    if bind.flags & v.VFIO_DEVICE_BIND_FLAG_TOKEN:
        # No modelled device uses a PF/VF token (vfio_pci_core_match_token): a token on a
        # device that does not need one is EINVAL.
        raise err(EINVAL)  # checked in vfio_df_open, after the ctx lookup
    vdev = df.device
    if vdev.open_count:  # vfio_df_open: only the group path may open a device twice
        raise err(EINVAL)
    if vdev.emulated_iommu:
        obj: Any = iommufd_access_create(f.ictx, vdev)
        vdev.iommufd_access = obj
    else:
        obj = iommufd_device_bind(f.ictx, vdev)
    f.refs += 1  # iommufd_ctx_get: the device file keeps the iommufd alive
    df.iommufd, df.idev, df.access_granted = f, obj, True
    vdev.cdev_df = df  # device->cdev_opened, and its iommufd (vfio-pci's hot reset uses both)
    vdev.open_device()
    # copy_to_user of out_devid only; a fault here undoes the bind (vfio_df_unbind_iommufd).
    try:
        arg.write(v.vfio_device_bind_iommufd.out_devid.offset, bytes(ctypes.c_uint32(obj.id)))
    except OSError:
        vfio_df_unbind_iommufd(df)
        raise
    return 0


def vfio_df_unbind_iommufd(df: Any) -> None:
    """Called on a failed bind and when a bound cdev fd is released: close the device, then
    vfio_iommufd_{physical,emulated}_unbind (which detach first)."""
    from vfiomig.kernel.iommufd.access import IommufdAccess, iommufd_access_destroy
    from vfiomig.kernel.iommufd.device import iommufd_device_unbind

    if not df.access_granted:
        return
    vdev = df.device
    vdev.close_device()
    vdev.cdev_df = None
    obj = df.idev
    if isinstance(obj, IommufdAccess):
        iommufd_access_destroy(obj)
        vdev.iommufd_access = None
    else:
        iommufd_device_unbind(obj)
    vdev.iommufd_attached = False
    f = df.iommufd
    df.iommufd, df.idev, df.access_granted = None, None, False
    f.refs -= 1
    if f.refs == 0:
        f.release()


def _attach_ioas(df: Any, pt_id: int) -> int:
    """ops->attach_ioas: vfio_iommufd_{physical,emulated}_attach_ioas."""
    from vfiomig.kernel.iommufd.access import (
        IommufdAccess,
        iommufd_access_attach,
        iommufd_access_replace,
    )
    from vfiomig.kernel.iommufd.device import iommufd_device_attach, iommufd_device_replace

    vdev = df.device
    obj = df.idev
    attached = vdev.iommufd_attached
    if isinstance(obj, IommufdAccess):
        (iommufd_access_replace if attached else iommufd_access_attach)(obj, pt_id)
    else:
        pt_id = (iommufd_device_replace if attached else iommufd_device_attach)(obj, pt_id)
    vdev.iommufd_attached = True
    return pt_id


def _detach_ioas(df: Any) -> None:
    """ops->detach_ioas: nothing to do when nothing is attached."""
    from vfiomig.kernel.iommufd.access import IommufdAccess, iommufd_access_detach
    from vfiomig.kernel.iommufd.device import iommufd_device_detach

    vdev = df.device
    if not vdev.iommufd_attached:
        return
    obj = df.idev
    if isinstance(obj, IommufdAccess):
        iommufd_access_detach(obj)
    else:
        iommufd_device_detach(obj)
    vdev.iommufd_attached = False


def vfio_df_ioctl_attach_pt(df: Any, arg: UserArg | int) -> int:
    """vfio_df_ioctl_attach_pt: out pt_id is the HWPT actually attached (the IOAS id for an
    emulated device). No modelled driver has pasid_attach_ioas: the PASID flag is
    EOPNOTSUPP."""
    if isinstance(arg, int):
        raise err(EFAULT)
    attach = arg.get(v.vfio_device_attach_iommufd_pt, size=_ATTACH_MINSZ)
    if attach.argsz < _ATTACH_MINSZ:
        raise err(EINVAL)
    if attach.flags & ~v.VFIO_DEVICE_ATTACH_PASID:
        raise err(EINVAL)
    if attach.flags & v.VFIO_DEVICE_ATTACH_PASID:
        raise err(EOPNOTSUPP)
    new_id = _attach_ioas(df, attach.pt_id)
    try:
        arg.write(_PT_ID_OFF, bytes(ctypes.c_uint32(new_id)))
    except OSError:
        _detach_ioas(df)
        raise
    return 0


def vfio_df_ioctl_detach_pt(df: Any, arg: UserArg | int) -> int:
    if isinstance(arg, int):
        raise err(EFAULT)
    detach = arg.get(v.vfio_device_detach_iommufd_pt, size=_DETACH_MINSZ)
    if detach.argsz < _DETACH_MINSZ:
        raise err(EINVAL)
    if detach.flags & ~v.VFIO_DEVICE_DETACH_PASID:
        raise err(EINVAL)
    if detach.flags & v.VFIO_DEVICE_DETACH_PASID:
        raise err(EOPNOTSUPP)
    _detach_ioas(df)
    return 0
