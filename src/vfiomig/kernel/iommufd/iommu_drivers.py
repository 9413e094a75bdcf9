"""What the IOMMU driver beneath the model kernel tells VFIO and iommufd, per vendor.

The hardware (page tables, dirty bits, IOTLB) is vfiomig.hw.iommu; this table holds the
driver-level facts the IOMMU core hands up (struct iommu_ops): the domain aperture
(domain->geometry), the reserved regions a device brings (ops->get_resv_regions), which
HWPT_ALLOC flags the driver takes, and the IOMMU_GET_HW_INFO payload. It is the one source
of these facts for both users: iommufd (device.py, hw_pagetable.py) and the legacy type1
backend (vfio_iommu_type1.py). Sources: drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3{,-iommufd}.c,
drivers/iommu/intel/iommu.c, drivers/iommu/amd/iommu.c. Values are plausible ones for a
typical part (48-bit SMMUv3.2 with HTTU, scalable-mode VT-d, AMD with HD support and
without EFR2 HTRangeIgnore).
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EOPNOTSUPP
from typing import TYPE_CHECKING, Any, NamedTuple

from vfiomig.kernel.bitops import ULONG_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.iommufd.io_pagetable import Geometry
from vfiomig.uapi import iommufd as u

if TYPE_CHECKING:
    from vfiomig.kernel.machine import ModelKernel

# enum iommu_resv_type (include/linux/iommu.h)
IOMMU_RESV_DIRECT = 0
IOMMU_RESV_DIRECT_RELAXABLE = 1  # does not restrict the IOVA space
IOMMU_RESV_RESERVED = 2
IOMMU_RESV_MSI = 3
IOMMU_RESV_SW_MSI = 4


class ResvRegion(NamedTuple):
    """struct iommu_resv_region: [start, start + length) of IOVA, of a type."""

    start: int
    length: int
    type: int

    @property
    def last(self) -> int:
        return self.start + self.length - 1


# x86: the interrupt-remapping window (IOMMU_RESV_MSI); AMD also reserves the HyperTransport
# range unless EFR2 says HTRangeIgnore (amd_iommu_get_resv_regions). ARM: the window
# iommu-dma maps MSI doorbells into (MSI_IOVA_BASE, MSI_IOVA_LENGTH; IOMMU_RESV_SW_MSI).
X86_MSI = ResvRegion(0xFEE0_0000, 0x10_0000, IOMMU_RESV_MSI)
AMD_HT = ResvRegion(0xFD_0000_0000, 0x3_0000_0000, IOMMU_RESV_RESERVED)
ARM_SW_MSI = ResvRegion(0x0800_0000, 0x10_0000, IOMMU_RESV_SW_MSI)


@dataclass(frozen=True)
class IommuDriver:
    vendor: str
    hw_info_type: int
    aperture: Geometry
    resv_regions: tuple[ResvRegion, ...]

    def hw_info(self, dirty: bool) -> bytes:
        """ops->hw_info: the vendor struct of IOMMU_GET_HW_INFO."""
        if self.vendor == "smmuv3":
            # IDR0: S2P|S1P, TTF=AArch64, COHACC, HTTU=HA|HD (0b10) if dirty else HA (0b01),
            # ASID16, ATS; IDR1..5 with plausible sizes; IIDR Arm (0x43b); AIDR v3.2.
            idr0 = 0x3 | (0x2 << 2) | (1 << 4) | ((2 if dirty else 1) << 6) | (1 << 12) | (1 << 10)
            info = u.iommu_hw_info_arm_smmuv3(
                flags=0, idr=(idr0, 0x0E60_0002, 0, 0x10, 0, 0x0000_0075), iidr=0x43B, aidr=0x2
            )
            return bytes(info)
        if self.vendor == "vtd":
            # cap: SAGAW 4-level, MGAW 47 (48-bit), SSLPS 2M|1G; ecap: PASID(40), SMTS(43),
            # SLADS(45, second-stage A/D: dirty tracking) if dirty, SLTS(46), FLTS(47).
            cap = (0x4 << 8) | (47 << 16) | (0x3 << 34) | (1 << 7)
            ecap = (1 << 40) | (1 << 43) | (1 << 46) | (1 << 47) | (1 << 0) | (1 << 6)
            if dirty:
                ecap |= 1 << 45
            return bytes(u.iommu_hw_info_vtd(flags=0, cap_reg=cap, ecap_reg=ecap))
        # AMD: EFR with PPRSup, GTSup, GASup, HASup(49), HDSup(52) if dirty
        efr = (1 << 1) | (1 << 2) | (1 << 7) | (1 << 49)
        if dirty:
            efr |= 1 << 52
        return bytes(u.iommu_hw_info_amd(efr=efr, efr2=0))

    def viommu_size(self, viommu_type: int) -> int:
        """ops->get_viommu_size: 0 (or no such op) means no vIOMMU of that type here.
        intel/iommu.c and amd/iommu.c have no vIOMMU type in the 7.2 uAPI. SMMUv3
        (arm-smmu-v3-iommufd.c arm_smmu_get_viommu_size) needs FEAT_NESTING and then a
        fully coherent master (arm_smmu_master_canwbs) or S2FWB: the modelled SMMUv3 has
        no S2FWB (IDR3.FWB = 0 in hw_info) and its devices are not DMA-coherent, so 0."""
        return 0

    def check_paging_flags(self, flags: int, user_data: bool) -> None:
        """ops->domain_alloc_paging_flags: what the driver refuses (EOPNOTSUPP)."""
        if user_data:  # no driver takes user data for a paging domain
            raise err(EOPNOTSUPP)
        both = u.IOMMU_HWPT_ALLOC_NEST_PARENT | u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        if self.vendor == "smmuv3" and flags & both == both:
            # arm_smmu_domain_alloc_paging_flags: a nest parent is an S2 domain, dirty
            # tracking needs S1 with HTTU: the combination falls to -EOPNOTSUPP.
            raise err(EOPNOTSUPP)

    def domain_alloc_paging(self, kernel: ModelKernel, vdev: Any, flags: int) -> Any:
        """ops->domain_alloc_paging_flags: a hw domain of the machine's IOMMU."""
        return kernel.iommu.domain_alloc(
            dirty_tracking=bool(flags & u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        )


DRIVERS = {
    "smmuv3": IommuDriver(
        "smmuv3", u.IOMMU_HW_INFO_TYPE_ARM_SMMUV3, Geometry(0, (1 << 48) - 1), (ARM_SW_MSI,)
    ),
    "vtd": IommuDriver(
        "vtd", u.IOMMU_HW_INFO_TYPE_INTEL_VTD, Geometry(0, (1 << 48) - 1), (X86_MSI,)
    ),
    "amd": IommuDriver("amd", u.IOMMU_HW_INFO_TYPE_AMD, Geometry(0, ULONG_MAX), (X86_MSI, AMD_HT)),
}


def iommu_driver(kernel: ModelKernel) -> IommuDriver:
    """The driver of the machine's IOMMU (hw.iommu.Iommu, one vendor per machine)."""
    return DRIVERS[kernel.iommu.vendor]


def dev_iommu_ops(kernel: ModelKernel, vdev: Any) -> Any:
    """dev_iommu_ops(dev) (drivers/iommu/iommu-priv.h): the driver in front of a device.
    The machine's, except for a device that brings its own (`vdev.iommu_ops`: the
    selftest's mock devices, behind the mock IOMMU of selftest.py)."""
    ops = getattr(vdev, "iommu_ops", None)
    return ops if ops is not None else iommu_driver(kernel)
