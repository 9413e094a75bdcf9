"""iommufd DEVICE objects: a VFIO device bound to an iommufd (drivers/iommu/iommufd/device.c).

bind / unbind, attach / replace / detach to a paging HWPT or to an IOAS (through an
automatic HWPT, created or reused), and IOMMU_GET_HW_INFO. Each modelled device is alone
in its IOMMU group, so the group's attachment is the device's.

Attaching sets the device hardware's `domain` (DmaDevice.domain): from then on its DMA is
translated and dirty-tracked by that HWPT's IO page table; detaching blocks its DMA.
"""

from __future__ import annotations

from errno import EFAULT, EINVAL, ENODEV, ENOENT, EOPNOTSUPP
from typing import Any

from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.hw_pagetable import (
    IommufdHwptNested,
    IommufdHwptPaging,
    iommufd_hwpt_paging_alloc,
)
from vfiomig.kernel.iommufd.ioas import IommufdIoas
from vfiomig.kernel.iommufd.iommu_drivers import (
    IOMMU_RESV_DIRECT_RELAXABLE,
    dev_iommu_ops,
)
from vfiomig.kernel.iommufd.main import (
    IommufdCtx,
    IommufdObject,
    IommufdObjectType,
    Ucmd,
    register,
)
from vfiomig.kernel.uaccess import access_ok
from vfiomig.uapi import iommufd as u

# What a device attaches to: a paging HWPT, or a nested one over a paging parent.
Hwpt = IommufdHwptPaging | IommufdHwptNested


class IommufdDevice(IommufdObject):
    type = IommufdObjectType.DEVICE

    def __init__(self, ictx: IommufdCtx, vdev: Any) -> None:
        super().__init__()
        self.ictx = ictx
        self.vdev = vdev  # the VfioDevice (its driver, its IOMMU capabilities)
        self.hwpt: Hwpt | None = None  # igroup->hwpt

    @property
    def dirty_capable(self) -> bool:
        """device_iommu_capable(dev, IOMMU_CAP_DIRTY_TRACKING): the device's IOMMU instance
        can track dirty IOVAs (and the machine's IOMMU model has dirty tracking at all; a
        device behind its own IOMMU, the selftest's mock, answers for itself)."""
        if getattr(self.vdev, "iommu_ops", None) is not None:
            return bool(self.vdev.iommu_dirty)
        return bool(self.vdev.iommu_dirty and self.ictx.kernel.iommu.dirty_capable)

    @property
    def hw(self) -> Any:
        return self.vdev.hw


def iommufd_device_bind(ictx: IommufdCtx, vdev: Any) -> IommufdDevice:
    idev = ictx.alloc(IommufdDevice(ictx, vdev))
    # The driver is a user until iommufd_device_unbind(): IOMMU_DESTROY of it is EBUSY.
    idev.users += 1
    return idev


def iommufd_device_unbind(idev: IommufdDevice) -> None:
    """vfio_iommufd_physical_unbind: detach if attached, then unbind."""
    if idev.hwpt is not None:
        iommufd_device_detach(idev)
    idev.users -= 1
    idev.ictx.remove(idev)


# -- attach ----------------------------------------------------------------------------


def _enforce_resv_regions(hwpt: Hwpt, idev: IommufdDevice) -> None:
    """iopt_table_enforce_dev_resv_regions: the device's reserved regions (its MSI window,
    AMD's HyperTransport range) become reserved IOVA of the IOAS (EADDRINUSE if something
    is mapped or allowed there)."""
    iopt = hwpt.ioas.iopt
    try:
        for resv in dev_iommu_ops(idev.ictx.kernel, idev.vdev).resv_regions:
            if resv.type != IOMMU_RESV_DIRECT_RELAXABLE:
                iopt.reserve_iova(resv.start, resv.last, idev)
    except OSError:
        iopt.remove_reserved_iova(idev)
        raise


def _driver_attach(hwpt: Hwpt, idev: IommufdDevice) -> None:
    """iommu_attach_group -> ops->attach_dev: a dirty-tracking domain needs a device whose
    IOMMU can track dirty state (intel_iommu: !ssads_supported -> -EINVAL; arm-smmu-v3:
    no HTTU-HD -> -EINVAL).

    A HWPT with a FAULT (its domain has an iopf_handler) makes the driver enable I/O page
    faults for the device, and no modelled device can raise them (no PCI PRI, no stall):
    VT-d refuses (intel_iommu_attach_device -> iopf_for_domain_set ->
    intel_iommu_enable_iopf: !info->pri_enabled -> -ENODEV, after paging_domain_compatible);
    SMMUv3 (arm_smmu_enable_iopf: !master->stall_enabled) and AMD
    (amd_iommu_iopf_add_device: !dev_data->pri_enabled) attach without it. The selftest's
    mock devices, behind the mock IOMMU (dev_iommu_ops), do raise them (selftest.py)."""
    if hwpt.domain.has_dirty_ops and not idev.dirty_capable:
        raise err(EINVAL)
    ops = dev_iommu_ops(idev.ictx.kernel, idev.vdev)  # the mock IOMMU takes page faults
    if hwpt.fault is not None and getattr(ops, "vendor", None) == "vtd":
        raise err(ENODEV)


def _hw_attach(hwpt: Hwpt, idev: IommufdDevice) -> None:
    hw = idev.hw
    if hw is not None:
        hwpt.domain.attach(hw, dirty_capable=idev.dirty_capable)
        hw.domain = hwpt.domain


def _hw_detach(hwpt: Hwpt, idev: IommufdDevice) -> None:
    hw = idev.hw
    if hw is not None:
        hwpt.domain.detach(hw)
        if hw.domain is hwpt.domain:
            hw.domain = None


def iommufd_hw_pagetable_attach(hwpt: Hwpt, idev: IommufdDevice) -> None:
    if idev.hwpt is not None and idev.hwpt is not hwpt:
        raise err(EINVAL)
    _enforce_resv_regions(hwpt, idev)
    try:
        _driver_attach(hwpt, idev)
    except OSError:
        hwpt.ioas.iopt.remove_reserved_iova(idev)
        raise
    _hw_attach(hwpt, idev)
    idev.hwpt = hwpt
    hwpt.users += 1


def iommufd_hw_pagetable_detach(idev: IommufdDevice) -> Hwpt:
    """Returns the HWPT; the caller puts it (iommufd_hw_pagetable_put)."""
    hwpt = idev.hwpt
    assert hwpt is not None
    _hw_detach(hwpt, idev)
    idev.hwpt = None
    if hwpt.fault is not None:  # iommufd_fault_domain_detach_dev
        hwpt.fault.auto_response(idev)
    hwpt.ioas.iopt.remove_reserved_iova(idev)
    return hwpt


def iommufd_hw_pagetable_put(ictx: IommufdCtx, hwpt: Hwpt) -> None:
    """An automatic HWPT is destroyed with its last device."""
    if hwpt.auto_domain:
        ictx.put_and_try_destroy(hwpt)
    else:
        hwpt.users -= 1


def _do_attach(idev: IommufdDevice, hwpt: Hwpt) -> Hwpt | None:
    iommufd_hw_pagetable_attach(hwpt, idev)
    return None


def _do_replace(idev: IommufdDevice, hwpt: Hwpt) -> Hwpt | None:
    """iommufd_device_do_replace: returns the old HWPT for the caller to put."""
    old = idev.hwpt
    if old is None:
        raise err(EINVAL)
    if hwpt is old:
        return None
    iopt = hwpt.ioas.iopt
    other_ioas = hwpt.ioas is not old.ioas
    if other_ioas:
        _enforce_resv_regions(hwpt, idev)
    try:
        _driver_attach(hwpt, idev)  # iommu_group_replace_domain
    except OSError:
        if other_ioas:
            iopt.remove_reserved_iova(idev)
        raise
    _hw_detach(old, idev)
    _hw_attach(hwpt, idev)
    if old.fault is not None:  # iommufd_fault_domain_replace_dev: old faults answered
        old.fault.auto_response(idev)
    if other_ioas:
        old.ioas.iopt.remove_reserved_iova(idev)
    idev.hwpt = hwpt
    hwpt.users += 1
    return old


def _auto_get_domain(
    idev: IommufdDevice, ioas: IommufdIoas, replace: bool
) -> tuple[int, Hwpt | None]:
    """iommufd_device_auto_get_domain: reuse a compatible automatic HWPT of the IOAS (EINVAL
    means incompatible, try the next), else make one. Returns (hwpt id, HWPT to put)."""
    do = _do_replace if replace else _do_attach
    for hwpt in list(ioas.hwpt_list):
        if not hwpt.auto_domain:
            continue
        try:
            destroy = do(idev, hwpt)
        except OSError as e:
            if e.errno == EINVAL:
                continue
            raise
        return hwpt.id, destroy
    hwpt = iommufd_hwpt_paging_alloc(idev.ictx, ioas, idev, 0, not replace, False)
    destroy = None
    if replace:
        try:
            destroy = _do_replace(idev, hwpt)
        except OSError:
            idev.ictx.remove(hwpt)
            raise
    hwpt.auto_domain = True
    return hwpt.id, destroy


def iommufd_device_change_pt(idev: IommufdDevice, pt_id: int, replace: bool) -> int:
    """iommufd_device_change_pt: returns the id of the HWPT attached (the new pt_id)."""
    ictx = idev.ictx
    pt_obj = ictx.find(pt_id)
    if pt_obj is None:
        raise err(ENOENT)
    if isinstance(pt_obj, IommufdHwptPaging | IommufdHwptNested):
        destroy = (_do_replace if replace else _do_attach)(idev, pt_obj)
    elif isinstance(pt_obj, IommufdIoas):
        pt_id, destroy = _auto_get_domain(idev, pt_obj, replace)
    else:
        raise err(EINVAL)
    if destroy is not None:
        iommufd_hw_pagetable_put(ictx, destroy)
    return pt_id


def iommufd_device_attach(idev: IommufdDevice, pt_id: int) -> int:
    pt_id = iommufd_device_change_pt(idev, pt_id, replace=False)
    idev.users += 1  # pairs with iommufd_device_detach
    return pt_id


def iommufd_device_replace(idev: IommufdDevice, pt_id: int) -> int:
    return iommufd_device_change_pt(idev, pt_id, replace=True)


def iommufd_device_detach(idev: IommufdDevice) -> None:
    hwpt = iommufd_hw_pagetable_detach(idev)
    iommufd_hw_pagetable_put(idev.ictx, hwpt)
    idev.users -= 1


# -- IOMMU_GET_HW_INFO -----------------------------------------------------------------


@register(u.IOMMU_GET_HW_INFO, u.iommu_hw_info, 32)
def iommufd_get_hw_info(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.flags & ~u.IOMMU_HW_INFO_FLAG_INPUT_TYPE:
        raise err(EOPNOTSUPP)
    if any(cmd.__reserved):
        raise err(EOPNOTSUPP)
    if not cmd.flags & u.IOMMU_HW_INFO_FLAG_INPUT_TYPE:
        cmd.in_data_type = u.IOMMU_HW_INFO_TYPE_DEFAULT
    idev = ucmd.ictx.get(cmd.dev_id, IommufdDevice)
    driver = dev_iommu_ops(ucmd.ictx.kernel, idev.vdev)
    # ops->hw_info: the default type or the driver's own; anything else is refused.
    if cmd.in_data_type not in (u.IOMMU_HW_INFO_TYPE_DEFAULT, driver.hw_info_type):
        raise err(EOPNOTSUPP)
    data = driver.hw_info(idev.dirty_capable)
    cmd.out_data_type = driver.hw_info_type
    copy_len = min(cmd.data_len, len(data))
    mm = ucmd.ictx.kernel.mm
    try:
        if cmd.data_len and not access_ok(cmd.data_uptr, cmd.data_len):
            raise err(EFAULT)
        if copy_len:
            mm.write(cmd.data_uptr, data[:copy_len])
        if copy_len < cmd.data_len:  # clear_user of the rest of a larger buffer
            mm.view(cmd.data_uptr + copy_len, cmd.data_len - copy_len)[:] = 0
    except OSError:
        raise err(EFAULT) from None
    cmd.data_len = len(data)
    # iommufd_get_hw_info always writes out_max_pasid_log2: ilog2(dev->iommu->max_pasids)
    # when PASID is enabled, else 0. Only the selftest's PASID-capable mock device has
    # PASID (no modelled PCI device has it, nor PASID_EXEC/PRIV).
    max_pasids = int(getattr(idev.vdev, "max_pasids", 0) or 0)
    cmd.out_max_pasid_log2 = max_pasids.bit_length() - 1 if max_pasids else 0
    cmd.out_capabilities = 0
    if idev.dirty_capable:
        cmd.out_capabilities |= u.IOMMU_HW_CAP_DIRTY_TRACKING
    ucmd.respond()
    return 0
