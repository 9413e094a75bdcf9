"""VFIO groups, /dev/vfio/N (drivers/vfio/group.c).

Every modelled device sits alone in its own IOMMU group, whose node is the device's
`group_path` ("/dev/vfio/<index>", so group N holds device /dev/vfio/devices/vfioN). A device
with `emulated_iommu` (an mdev such as mtty) gets a VFIO_EMULATED_IOMMU group, as
vfio_register_emulated_iommu_dev() does; any other device a VFIO_IOMMU group.

The group file implements vfio_group_fops_unl_ioctl:

    VFIO_GROUP_GET_STATUS       vfio_group_ioctl_get_status
    VFIO_GROUP_SET_CONTAINER    vfio_group_ioctl_set_container (arg: pointer to an int fd)
    VFIO_GROUP_UNSET_CONTAINER  vfio_group_ioctl_unset_container
    VFIO_GROUP_GET_DEVICE_FD    vfio_group_ioctl_get_device_fd (arg: NUL-terminated name)

Device names. GET_DEVICE_FD matches dev_name() of the device in the kernel (a PCI address
such as "0000:06:0d.0", or an mdev UUID). The model names a device by the basename of its
cdev path: the device at /dev/vfio/devices/vfio3 is "vfio3" (see `vfio_device_name`).

Left out: a group bound to an iommufd instead of a container (SET_CONTAINER with a
/dev/iommu fd, the iommufd VFIO-compat path) answers EBADFD, as a kernel whose group code
does not recognise the fd; no-IOMMU groups do not exist in the model.
"""

from __future__ import annotations

import os
from errno import EBADF, EBADFD, EBUSY, EFAULT, EINVAL, ENODEV, ENOTTY
from typing import TYPE_CHECKING

from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.uaccess import UserArg
from vfiomig.kernel.vfio_main import VfioDevice, VfioDeviceFile, vfio_df_open
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.kernel.container import VfioContainer
    from vfiomig.kernel.machine import ModelKernel

# enum vfio_group_type (drivers/vfio/vfio.h)
VFIO_IOMMU = "iommu"
VFIO_EMULATED_IOMMU = "emulated"

_STATUS_MINSZ = 8  # offsetofend(struct vfio_group_status, flags)


def vfio_device_name(device: VfioDevice) -> str:
    """The model's dev_name(): the basename of the device's cdev path ("vfio0", ...)."""
    return os.path.basename(device.path)


class VfioGroup:
    """struct vfio_group: one IOMMU group and its /dev/vfio/N node."""

    def __init__(self, kernel: ModelKernel, path: str, gtype: str) -> None:
        self.kernel = kernel
        self.path = path
        self.type = gtype  # VFIO_IOMMU | VFIO_EMULATED_IOMMU
        self.devices: list[VfioDevice] = []  # group->device_list
        self.container: VfioContainer | None = None
        self.container_users = 0  # 1 for SET_CONTAINER + 1 per device opened through it
        self.opened_file: VfioGroupFile | None = None  # at most one open (EBUSY otherwise)

    def has_iommu(self) -> bool:
        """vfio_group_has_iommu (the iommufd flavour is not modelled)."""
        return self.container is not None

    def dma_owner_claimed_elsewhere(self) -> bool:
        """iommu_group_dma_owner_claimed() by someone other than this group: a device of
        the group bound to an iommufd through its cdev (iommu_device_claim_dma_owner)."""
        return self.cdev_device_open_cnt() > 0

    def cdev_device_open_cnt(self) -> int:
        """group->cdev_device_open_cnt: cdev fds bound on devices of this group.

        vfio_device_block_group() counts a cdev fd at VFIO_DEVICE_BIND_IOMMUFD, not at open.
        """
        return sum(
            1
            for f in self.kernel.fdt.files.values()
            if isinstance(f, VfioDeviceFile)
            and f.group is None
            and f.access_granted
            and f.device in self.devices
        )


# ---------------------------------------------------------------------------------------
# machine set-up: the hooks ModelKernel calls


def vfio_group_init(kernel: ModelKernel) -> None:
    """vfio_group_init -> vfio_container_init: the /dev/vfio/vfio misc device."""
    from vfiomig.kernel.container import vfio_fops_open

    kernel.chrdevs["/dev/vfio/vfio"] = lambda flags: vfio_fops_open(kernel)


def vfio_device_set_group(kernel: ModelKernel, device: VfioDevice) -> VfioGroup:
    """vfio_device_set_group + vfio_device_group_register: put a new device in its group
    and make the group's node openable."""
    path = device.group_path
    group: VfioGroup | None = kernel.groups.get(path)
    if group is None:
        gtype = VFIO_EMULATED_IOMMU if device.emulated_iommu else VFIO_IOMMU
        group = VfioGroup(kernel, path, gtype)
        kernel.groups[path] = group
        g = group
        kernel.chrdevs[path] = lambda flags: vfio_group_fops_open(g, flags)
    group.devices.append(device)
    return group


def vfio_group_of(device: VfioDevice) -> VfioGroup | None:
    """device->group."""
    group: VfioGroup | None = device.kernel.groups.get(device.group_path)
    return group


# ---------------------------------------------------------------------------------------
# the group file


def vfio_group_fops_open(group: VfioGroup, flags: int) -> VfioGroupFile:
    """vfio_group_fops_open: one open at a time; not while a device cdev of it is open."""
    if group.cdev_device_open_cnt():
        raise err(EBUSY)
    if group.opened_file is not None:
        raise err(EBUSY)
    f = VfioGroupFile(group)
    group.opened_file = f
    return f


class VfioGroupFile(File):
    def __init__(self, group: VfioGroup) -> None:
        super().__init__()
        self.group = group

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        """vfio_group_fops_unl_ioctl."""
        if cmd == v.VFIO_GROUP_GET_DEVICE_FD:
            return vfio_group_ioctl_get_device_fd(self.group, arg)
        if cmd == v.VFIO_GROUP_GET_STATUS:
            return vfio_group_ioctl_get_status(self.group, arg)
        if cmd == v.VFIO_GROUP_SET_CONTAINER:
            return vfio_group_ioctl_set_container(self.group, arg)
        if cmd == v.VFIO_GROUP_UNSET_CONTAINER:
            return vfio_group_ioctl_unset_container(self.group)
        raise err(ENOTTY)

    def release(self) -> None:
        """vfio_group_fops_release: device fds hold a reference on this file, so this
        only runs once no device of the group is open through it."""
        from vfiomig.kernel.container import vfio_group_detach_container

        group = self.group
        if group.container is not None:
            vfio_group_detach_container(group)
        group.opened_file = None


def vfio_group_ioctl_get_status(group: VfioGroup, arg: UserArg | int) -> int:
    if isinstance(arg, int):
        raise err(EFAULT)
    argsz = arg.u32(0)
    arg.read(0, _STATUS_MINSZ)  # copy_from_user(minsz)
    if argsz < _STATUS_MINSZ:
        raise err(EINVAL)
    flags = 0
    if group.has_iommu():
        flags |= v.VFIO_GROUP_FLAGS_CONTAINER_SET | v.VFIO_GROUP_FLAGS_VIABLE
    elif not group.dma_owner_claimed_elsewhere():
        flags |= v.VFIO_GROUP_FLAGS_VIABLE
    arg.put(v.vfio_group_status(argsz=argsz, flags=flags), size=_STATUS_MINSZ)
    return 0


def vfio_group_ioctl_set_container(group: VfioGroup, arg: UserArg | int) -> int:
    from vfiomig.kernel.container import VfioContainerFile, vfio_container_attach_group

    if isinstance(arg, int):
        raise err(EFAULT)  # get_user(fd, arg) through a non-pointer
    fd = int.from_bytes(arg.read(0, 4), "little", signed=True)
    f = group.kernel.fdt.files.get(fd)
    if f is None:
        raise err(EBADF)
    if group.has_iommu():
        raise err(EINVAL)
    if isinstance(f, VfioContainerFile):
        vfio_container_attach_group(f.container, group)
        return 0
    raise err(EBADFD)  # neither a container nor (modelled) an iommufd


def vfio_group_ioctl_unset_container(group: VfioGroup) -> int:
    from vfiomig.kernel.container import vfio_group_detach_container

    if not group.has_iommu():
        raise err(EINVAL)
    if group.container_users != 1:
        raise err(EBUSY)
    vfio_group_detach_container(group)
    return 0


def _strndup_user(arg: UserArg | int, n: int) -> str:
    """strndup_user(arg, n): EFAULT if the string runs into unreadable memory before its
    NUL, EINVAL if there is no NUL within n bytes."""
    if isinstance(arg, int):
        raise err(EFAULT)
    return arg.strndup(n)


def vfio_group_ioctl_get_device_fd(group: VfioGroup, arg: UserArg | int) -> int:
    name = _strndup_user(arg, PAGE_SIZE)
    device = next((d for d in group.devices if vfio_device_name(d) == name), None)
    if device is None:
        raise err(ENODEV)
    fdt = group.kernel.fdt
    fdt.get_unused_fd()  # EMFILE before the device is opened
    df = vfio_device_open_file(group, device)
    return fdt.install(df)


class VfioGroupDeviceFile(VfioDeviceFile):
    """A device fd obtained with VFIO_GROUP_GET_DEVICE_FD (df->group set)."""

    def release(self) -> None:
        """vfio_df_group_close: the last close also un-uses the container."""
        last = self.access_granted and self.device.open_count <= 1
        super().release()
        if last:
            vfio_device_group_unuse_iommu(self.device)


def vfio_device_open_file(group: VfioGroup, device: VfioDevice) -> VfioGroupDeviceFile:
    """vfio_device_open_file -> vfio_df_group_open -> vfio_df_open."""
    df = VfioGroupDeviceFile(device, os.O_RDWR)
    df.group = group
    if not group.has_iommu():
        raise err(EINVAL)
    first = device.open_count == 0
    if first:
        vfio_device_group_use_iommu(device)  # vfio_df_device_first_open, before open_device
    try:
        vfio_df_open(df)
    except OSError:
        if first:
            vfio_device_group_unuse_iommu(device)
        raise
    df.access_granted = True
    return df


def vfio_device_group_use_iommu(device: VfioDevice) -> None:
    """vfio_device_group_use_iommu -> vfio_group_use_container + container register."""
    from vfiomig.kernel.container import vfio_device_container_register

    group = vfio_group_of(device)
    if group is None or group.container is None:
        raise err(EINVAL)
    if group.container.iommu is None:  # SET_CONTAINER done, VFIO_SET_IOMMU not yet
        raise err(EINVAL)
    assert group.opened_file is not None
    group.opened_file.refs += 1  # get_file(group->opened_file)
    group.container_users += 1
    vfio_device_container_register(device)


def vfio_device_group_unuse_iommu(device: VfioDevice) -> None:
    from vfiomig.kernel.container import vfio_device_container_unregister

    group = vfio_group_of(device)
    if group is None or group.container is None:
        return
    vfio_device_container_unregister(device)
    group.container_users -= 1
    gf = group.opened_file
    if gf is not None:  # fput(group->opened_file)
        gf.refs -= 1
        if gf.refs == 0:
            gf.release()
