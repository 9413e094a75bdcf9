"""The legacy VFIO container, /dev/vfio/vfio (drivers/vfio/container.c).

Opening /dev/vfio/vfio gives a new, empty container. Groups join it with
VFIO_GROUP_SET_CONTAINER; once it has a group, VFIO_SET_IOMMU picks the IOMMU backend. The
model registers exactly one backend, vfio_iommu_type1 (VFIO_TYPE1_IOMMU and
VFIO_TYPE1v2_IOMMU), as an x86-64 or arm64 kernel with CONFIG_VFIO_CONTAINER=y and
CONFIG_VFIO_NOIOMMU=n. vfio_fops_unl_ioctl:

    VFIO_GET_API_VERSION   VFIO_API_VERSION (0)
    VFIO_CHECK_EXTENSION   asked of the backend (of every registered backend while unset)
    VFIO_SET_IOMMU         vfio_ioctl_set_iommu: EINVAL without a group or when already set,
                           ENODEV for an extension no backend reports, else the backend's
                           open/attach errno
    anything else          the backend's ioctl once set; EINVAL while unset

Detaching the last group releases the backend (the container is "deprivileged").

Emulated devices (mdevs) reach guest memory through the container with
`vfio_device_container_pin_pages`, `vfio_device_container_unpin_pages` and
`vfio_device_container_dma_rw`: the container half of vfio_pin_pages / vfio_unpin_pages /
vfio_dma_rw in vfio_main.c, with the checks vfio_main.c makes first. A device that pins
must implement `dma_unmap(iova, length)` (ops->dma_unmap) and unpin there.
"""

from __future__ import annotations

from errno import E2BIG, EBUSY, EINVAL, ENODEV, ENOTTY
from typing import TYPE_CHECKING

from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.group import VFIO_IOMMU, VfioGroup, vfio_group_of
from vfiomig.kernel.uaccess import UserArg
from vfiomig.kernel.vfio_iommu_type1 import (
    VfioIommuType1,
    vfio_iommu_type1_check_extension,
    vfio_iommu_type1_open,
)
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.kernel.machine import ModelKernel
    from vfiomig.kernel.vfio_main import VfioDevice

# VFIO_PIN_PAGES_MAX_ENTRIES: one page of unsigned longs (include/linux/vfio.h)
VFIO_PIN_PAGES_MAX_ENTRIES = PAGE_SIZE // 8


class VfioContainer:
    """struct vfio_container."""

    def __init__(self, kernel: ModelKernel) -> None:
        self.kernel = kernel
        self.groups: list[VfioGroup] = []  # group_list (list_add: newest first)
        self.iommu: VfioIommuType1 | None = None  # iommu_driver + iommu_data


class VfioContainerFile(File):
    """An open of /dev/vfio/vfio. Attached groups keep the container alive (kref), so
    closing the fd first changes nothing for them."""

    def __init__(self, container: VfioContainer) -> None:
        super().__init__()
        self.container = container

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        return vfio_fops_unl_ioctl(self.container, cmd, arg)


def vfio_fops_open(kernel: ModelKernel) -> VfioContainerFile:
    return VfioContainerFile(VfioContainer(kernel))


def _ulong_arg(arg: UserArg | int) -> int:
    """The ioctl's `unsigned long arg` by value. A buffer stands for a user pointer, which
    no extension number equals."""
    return arg & U64_MAX if isinstance(arg, int) else U64_MAX


def vfio_fops_unl_ioctl(container: VfioContainer, cmd: int, arg: UserArg | int) -> int:
    if cmd == v.VFIO_GET_API_VERSION:
        return v.VFIO_API_VERSION
    if cmd == v.VFIO_CHECK_EXTENSION:
        return vfio_container_ioctl_check_extension(container, _ulong_arg(arg))
    if cmd == v.VFIO_SET_IOMMU:
        return vfio_ioctl_set_iommu(container, _ulong_arg(arg))
    if container.iommu is None:
        raise err(EINVAL)  # no backend to pass the ioctl to: ret stays -EINVAL
    return container.iommu.ioctl(cmd, arg)


def vfio_container_ioctl_check_extension(container: VfioContainer, arg: int) -> int:
    if container.iommu is None:
        return vfio_iommu_type1_check_extension(None, arg)  # poll the registered backend
    return container.iommu.check_extension(arg)


def vfio_ioctl_set_iommu(container: VfioContainer, arg: int) -> int:
    if not container.groups or container.iommu is not None:
        raise err(EINVAL)
    if vfio_iommu_type1_check_extension(None, arg) <= 0:
        raise err(ENODEV)  # no registered backend reports this extension
    iommu = vfio_iommu_type1_open(container.kernel, arg)  # EINVAL for VFIO_UNMAP_ALL etc.
    done: list[VfioGroup] = []
    try:
        for group in container.groups:  # __vfio_container_attach_groups
            iommu.attach_group(group)
            done.append(group)
    except OSError:
        for group in reversed(done):
            iommu.detach_group(group)
        iommu.release()
        raise
    container.iommu = iommu
    return 0


def vfio_container_attach_group(container: VfioContainer, group: VfioGroup) -> None:
    """vfio_container_attach_group (group->group_lock held by the caller)."""
    if group.type == VFIO_IOMMU and group.dma_owner_claimed_elsewhere():
        raise err(EBUSY)  # iommu_group_claim_dma_owner: a device is bound to an iommufd
    if container.iommu is not None:
        container.iommu.attach_group(group)
    group.container = container
    group.container_users = 1
    container.groups.insert(0, group)


def vfio_group_detach_container(group: VfioGroup) -> None:
    container = group.container
    assert container is not None
    iommu = container.iommu
    if iommu is not None:
        iommu.detach_group(group)
    group.container = None
    group.container_users = 0
    container.groups.remove(group)
    if iommu is not None and not container.groups:
        iommu.release()  # the last group deprivileges the container
        container.iommu = None


def vfio_device_container_register(device: VfioDevice) -> None:
    iommu = _container_iommu(device)
    if iommu is not None:
        iommu.register_device(device)


def vfio_device_container_unregister(device: VfioDevice) -> None:
    iommu = _container_iommu(device)
    if iommu is not None:
        iommu.unregister_device(device)


def _container_iommu(device: VfioDevice) -> VfioIommuType1 | None:
    group = vfio_group_of(device)
    if group is None or group.container is None:
        return None
    return group.container.iommu


def _has_dma_unmap(device: VfioDevice) -> bool:
    return callable(getattr(device, "dma_unmap", None))


def _container_of_open_device(device: VfioDevice) -> VfioIommuType1:
    """vfio_assert_device_open + vfio_device_has_container, for the container path only."""
    if device.open_count == 0:
        raise err(EINVAL)  # WARN_ON(!vfio_assert_device_open(device))
    group = vfio_group_of(device)
    if group is None or group.container is None:
        raise err(EINVAL)  # not opened through a group: not this path
    if group.container.iommu is None:
        raise err(ENOTTY)  # !driver
    return group.container.iommu


def vfio_device_container_pin_pages(
    device: VfioDevice, iova: int, npage: int, prot: int
) -> list[int]:
    """vfio_pin_pages -> vfio_device_container_pin_pages -> vfio_iommu_type1_pin_pages.

    Pins `npage` pages from `iova` and returns, per page, the user virtual address of the
    page (the model's stand-in for struct page: IOPTEs and pins hold user VAs).
    `prot` is IOMMU_READ | IOMMU_WRITE.
    """
    if not npage or device.open_count == 0:
        raise err(EINVAL)
    if not _has_dma_unmap(device):
        raise err(EINVAL)
    iommu = _container_of_open_device(device)
    if npage > VFIO_PIN_PAGES_MAX_ENTRIES:
        raise err(E2BIG)
    group = vfio_group_of(device)
    assert group is not None
    return iommu.pin_pages(group, iova, npage, prot)


def vfio_device_container_unpin_pages(device: VfioDevice, iova: int, npage: int) -> None:
    """vfio_unpin_pages -> vfio_device_container_unpin_pages (WARN and return on misuse)."""
    if device.open_count == 0 or not _has_dma_unmap(device):
        device.warn("vfio_unpin_pages: device not open or without dma_unmap")
        return
    if npage <= 0 or npage > VFIO_PIN_PAGES_MAX_ENTRIES:
        device.warn("vfio_unpin_pages: bad npage")
        return
    iommu = _container_iommu(device)
    if iommu is None:
        device.warn("vfio_unpin_pages: no container backend")
        return
    iommu.unpin_pages(iova, npage)


def vfio_device_container_dma_rw(
    device: VfioDevice, iova: int, data: bytes | bytearray | memoryview, write: bool
) -> None:
    """vfio_dma_rw -> vfio_device_container_dma_rw -> vfio_iommu_type1_dma_rw.

    write=True copies `data` to guest memory at `iova` (and marks it dirty while tracking);
    write=False fills the writable buffer `data` from guest memory.
    """
    if len(data) <= 0 or device.open_count == 0:
        raise err(EINVAL)
    if not write and memoryview(data).readonly:
        raise err(EINVAL)
    iommu = _container_of_open_device(device)
    iommu.dma_rw(iova, data, write)
