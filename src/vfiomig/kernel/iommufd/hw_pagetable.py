"""HWPT_PAGING objects and their commands (drivers/iommu/iommufd/hw_pagetable.c).

A paging HWPT owns one hw domain (vfiomig.hw.iommu.Domain) and belongs to one IOAS: it is
filled with every mapping of the IOAS when it is created (iopt_table_add_domain) and
follows every later MAP / UNMAP. Only a HWPT allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING
has dirty ops; automatic HWPTs (a device attached straight to an IOAS) never do.
"""

from __future__ import annotations

from errno import EINVAL, ENOENT, EOPNOTSUPP
from typing import TYPE_CHECKING, Any

from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.iommu_drivers import dev_iommu_ops, iommu_driver
from vfiomig.kernel.iommufd.main import (
    IommufdCtx,
    IommufdObject,
    IommufdObjectType,
    Ucmd,
    register,
)
from vfiomig.uapi import iommufd as u

if TYPE_CHECKING:
    from vfiomig.kernel.iommufd.device import IommufdDevice
    from vfiomig.kernel.iommufd.eventq import IommufdFault
    from vfiomig.kernel.iommufd.ioas import IommufdIoas

_VALID_PAGING_FLAGS = (
    u.IOMMU_HWPT_ALLOC_NEST_PARENT
    | u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | u.IOMMU_HWPT_FAULT_ID_VALID
    | u.IOMMU_HWPT_ALLOC_PASID
)


class IommufdHwptPaging(IommufdObject):
    """struct iommufd_hwpt_paging."""

    type = IommufdObjectType.HWPT_PAGING

    def __init__(self, ioas: IommufdIoas, domain: Any, flags: int) -> None:
        super().__init__()
        self.ioas = ioas
        self.domain = domain
        self.nest_parent = bool(flags & u.IOMMU_HWPT_ALLOC_NEST_PARENT)
        self.auto_domain = False
        self.in_ioas = False  # on ioas.hwpt_list / in the iopt's domains
        self.fault: IommufdFault | None = None  # hwpt->fault (IOMMU_HWPT_FAULT_ID_VALID)

    def destroy(self) -> None:
        """iommufd_hwpt_paging_destroy (and __iommufd_hwpt_destroy: the fault's user)."""
        if self.in_ioas:
            self.ioas.hwpt_list.remove(self)
            self.ioas.iopt.table_remove_domain(self.domain)
            self.in_ioas = False
        self.ioas.users -= 1
        if self.fault is not None:
            self.fault.users -= 1
            self.fault = None


class IommufdHwptNested(IommufdObject):
    """struct iommufd_hwpt_nested: a stage-1 domain of the driver's own format over a
    nest-parent paging HWPT (hw_pagetable.c iommufd_hwpt_nested_alloc). Devices attach to
    it like to a paging HWPT; its IOVA is the parent's, so `ioas` is the parent's."""

    type = IommufdObjectType.HWPT_NESTED
    auto_domain = False

    def __init__(self, parent: IommufdHwptPaging) -> None:
        super().__init__()
        self.parent = parent
        self.ioas = parent.ioas
        self.domain: Any = None
        self.fault: IommufdFault | None = None  # hwpt->fault

    def destroy(self) -> None:
        """iommufd_hwpt_nested_destroy: drop the parent (and the fault queue)."""
        self.parent.users -= 1
        if self.fault is not None:
            self.fault.users -= 1
            self.fault = None


def iommufd_hwpt_nested_alloc(
    ictx: IommufdCtx, parent: IommufdHwptPaging, idev: IommufdDevice, flags: int, data: Any
) -> IommufdHwptNested:
    """iommufd_hwpt_nested_alloc for a driver with domain_alloc_nested (the mock IOMMU):
    `data` is the user data (type, uptr, len) the driver copies its config from."""
    ops: Any = dev_iommu_ops(ictx.kernel, idev.vdev)
    if flags & ~(u.IOMMU_HWPT_FAULT_ID_VALID | u.IOMMU_HWPT_ALLOC_PASID) or not data.len:
        raise err(EOPNOTSUPP)
    same_driver = getattr(parent.domain, "owner", None) is ops  # domain->owner == ops
    if parent.auto_domain or not parent.nest_parent or not same_driver:
        raise err(EINVAL)
    hwpt = ictx.alloc(IommufdHwptNested(parent))
    parent.users += 1
    try:
        hwpt.domain = ops.domain_alloc_nested(
            parent.domain, flags & ~u.IOMMU_HWPT_FAULT_ID_VALID, data
        )
    except OSError:
        ictx.remove(hwpt)  # iommufd_object_abort_and_destroy
        raise
    return hwpt


def iommufd_hwpt_paging_alloc(
    ictx: IommufdCtx,
    ioas: IommufdIoas,
    idev: IommufdDevice,
    flags: int,
    immediate_attach: bool,
    user_data: bool,
) -> IommufdHwptPaging:
    """iommufd_hwpt_paging_alloc: a new domain, filled with every mapping of the IOAS."""
    from vfiomig.kernel.iommufd.device import (
        iommufd_hw_pagetable_attach,
        iommufd_hw_pagetable_detach,
    )

    if flags & ~_VALID_PAGING_FLAGS:
        raise err(EOPNOTSUPP)
    if flags & u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING and not idev.dirty_capable:
        raise err(EOPNOTSUPP)  # !device_iommu_capable(dev, IOMMU_CAP_DIRTY_TRACKING)
    if flags & u.IOMMU_HWPT_FAULT_ID_VALID and flags & u.IOMMU_HWPT_ALLOC_NEST_PARENT:
        raise err(EOPNOTSUPP)  # a nest parent takes no faults
    driver = dev_iommu_ops(ictx.kernel, idev.vdev)
    driver.check_paging_flags(flags & ~u.IOMMU_HWPT_FAULT_ID_VALID, user_data)
    domain = driver.domain_alloc_paging(ictx.kernel, idev.vdev, flags)
    hwpt = ictx.alloc(IommufdHwptPaging(ioas, domain, flags))
    ioas.users += 1  # pairs with iommufd_hwpt_paging_destroy
    try:
        if immediate_attach:
            iommufd_hw_pagetable_attach(hwpt, idev)
        try:
            ioas.iopt.table_add_domain(domain, driver.aperture)
        except OSError:
            if immediate_attach:
                iommufd_hw_pagetable_detach(idev)
            raise
    except OSError:
        ictx.remove(hwpt)  # iommufd_object_abort_and_destroy
        raise
    ioas.hwpt_list.append(hwpt)
    hwpt.in_ioas = True
    return hwpt


def iommufd_get_hwpt_paging(ictx: IommufdCtx, hwpt_id: int) -> IommufdHwptPaging:
    return ictx.get(hwpt_id, IommufdHwptPaging)


class _UserData:
    """struct iommu_user_data of a HWPT_ALLOC: the driver-specific config."""

    def __init__(self, cmd: Any) -> None:
        self.type = int(cmd.data_type)
        self.uptr = int(cmd.data_uptr)
        self.len = int(cmd.data_len)


@register(u.IOMMU_HWPT_ALLOC, u.iommu_hwpt_alloc, 24)
def iommufd_hwpt_alloc(ucmd: Ucmd) -> int:
    from vfiomig.kernel.iommufd.device import IommufdDevice
    from vfiomig.kernel.iommufd.eventq import iommufd_get_fault
    from vfiomig.kernel.iommufd.ioas import IommufdIoas

    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    none = u.IOMMU_HWPT_DATA_NONE
    if (cmd.data_type == none and cmd.data_len) or (cmd.data_type != none and not cmd.data_len):
        raise err(EINVAL)
    idev = ictx.get(cmd.dev_id, IommufdDevice)
    pt_obj = ictx.find(cmd.pt_id)
    if pt_obj is None:
        raise err(EINVAL)  # iommufd_get_object's error is turned into EINVAL here
    hwpt: IommufdHwptPaging | IommufdHwptNested
    if isinstance(pt_obj, IommufdIoas):
        hwpt = iommufd_hwpt_paging_alloc(ictx, pt_obj, idev, cmd.flags, False, bool(cmd.data_len))
    elif isinstance(pt_obj, IommufdHwptPaging) and hasattr(
        dev_iommu_ops(ictx.kernel, idev.vdev), "domain_alloc_nested"
    ):
        hwpt = iommufd_hwpt_nested_alloc(ictx, pt_obj, idev, cmd.flags, _UserData(cmd))
    elif isinstance(pt_obj, IommufdHwptPaging):
        # iommufd_hwpt_nested_alloc: the machine's IOMMU model builds no nested domains.
        if cmd.flags & ~u.IOMMU_HWPT_FAULT_ID_VALID or not cmd.data_len:
            raise err(EOPNOTSUPP)
        if iommu_driver(ictx.kernel).vendor == "smmuv3":
            raise err(EOPNOTSUPP)  # SMMUv3 nests through a vIOMMU only (no domain_alloc_nested)
        if pt_obj.auto_domain or not pt_obj.nest_parent:
            raise err(EINVAL)
        raise err(EOPNOTSUPP)  # the driver does not take this nesting data
    else:
        raise err(EINVAL)
    if cmd.flags & u.IOMMU_HWPT_FAULT_ID_VALID:
        # iommufd_get_fault: missing or not a FAULT, ENOENT (the new HWPT is taken back).
        try:
            fault = iommufd_get_fault(ictx, cmd.fault_id)
        except OSError:
            ictx.remove(hwpt)
            raise
        hwpt.fault = fault  # the domain's iopf_handler delivers to it
        fault.users += 1
    cmd.out_hwpt_id = hwpt.id
    try:
        ucmd.respond()
    except OSError:
        ictx.remove(hwpt)
        raise
    return 0


@register(u.IOMMU_HWPT_SET_DIRTY_TRACKING, u.iommu_hwpt_set_dirty_tracking, 16)
def iommufd_hwpt_set_dirty_tracking(ucmd: Ucmd) -> int:
    """__reserved is not checked (the kernel does not)."""
    cmd = ucmd.cmd
    if cmd.flags & ~u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
        raise err(EOPNOTSUPP)
    hwpt = iommufd_get_hwpt_paging(ucmd.ictx, cmd.hwpt_id)
    enable = bool(cmd.flags & u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
    hwpt.ioas.iopt.set_dirty_tracking(hwpt.domain, enable)
    return 0


@register(u.IOMMU_HWPT_GET_DIRTY_BITMAP, u.iommu_hwpt_get_dirty_bitmap, 48)
def iommufd_hwpt_get_dirty_bitmap(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.flags & ~u.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or cmd.__reserved:
        raise err(EOPNOTSUPP)
    hwpt = iommufd_get_hwpt_paging(ucmd.ictx, cmd.hwpt_id)
    hwpt.ioas.iopt.read_and_clear_dirty_data(
        hwpt.domain, cmd.flags, cmd.iova, cmd.length, cmd.page_size, cmd.data
    )
    return 0


@register(u.IOMMU_HWPT_INVALIDATE, u.iommu_hwpt_invalidate, 32)
def iommufd_hwpt_invalidate(ucmd: Ucmd) -> int:
    """Only nested HWPTs and vIOMMUs take invalidations; a paging HWPT is EINVAL. The
    command is answered (entry_num = entries done) on every path."""
    cmd = ucmd.cmd
    rc = 0
    done_num = 0
    pt_obj = ucmd.ictx.find(cmd.hwpt_id)
    if cmd.__reserved:
        rc = EOPNOTSUPP
    elif cmd.entry_num and (not cmd.data_uptr or not cmd.entry_len):
        rc = EINVAL
    elif pt_obj is None:
        rc = ENOENT
    elif isinstance(pt_obj, IommufdHwptNested):
        invalidate = getattr(pt_obj.domain, "cache_invalidate_user", None)
        if invalidate is None:
            rc = EOPNOTSUPP
        else:
            # ops->cache_invalidate_user: entries handled before an error count as done
            rc, done_num = invalidate(cmd.data_type, cmd.data_uptr, cmd.entry_len, cmd.entry_num)
    else:
        rc = EINVAL  # a paging HWPT (7.2: only nested HWPTs and vIOMMUs invalidate)
    cmd.entry_num = done_num
    ucmd.respond()
    if rc:
        raise err(rc)
    return 0
