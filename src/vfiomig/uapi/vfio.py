"""ctypes mirror of Linux 7.2 include/uapi/linux/vfio.h.

Every struct, constant, enum and ioctl request number of the header is here
under its C name. Structures are plain ``ctypes.Structure`` subclasses with the
C field names; anonymous unions are exposed through ``_anonymous_`` so their
members read like in C. Flexible array members are zero-length ctypes arrays,
so ``ctypes.sizeof`` and field offsets equal the C ``sizeof``/``offsetof``.
The function-like macros for the deprecated v1 migration region
(VFIO_DEVICE_STATE_VALID and friends) are not mirrored.

At the bottom are a few helpers to build the variable-length ioctl arguments
(header followed by a payload in one mutable buffer).
"""

from __future__ import annotations

import ctypes
import enum
from typing import TypeVar

from vfiomig.uapi.ioctl import _IO

# Short private aliases for the kernel integer types. __aligned_u64 differs from
# __u64 only on hosts the package refuses to import on (see __init__).
_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_s32 = ctypes.c_int32
_u64 = ctypes.c_uint64
_aligned_u64 = ctypes.c_uint64

VFIO_API_VERSION = 0

# Extensions (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments)
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
__VFIO_RESERVED_TYPE1_NESTING_IOMMU = 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

VFIO_TYPE = ord(";")
VFIO_BASE = 100


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [
        ("id", _u16),
        ("version", _u16),
        ("next", _u32),
    ]


# -------- container fd (/dev/vfio/vfio) --------

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)

# -------- group fd (/dev/vfio/$GROUP) --------


class vfio_group_status(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
    ]


VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)

# -------- device fd --------


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("num_regions", _u32),
        ("num_irqs", _u32),
        ("cap_offset", _u32),
        ("pad", _u32),
    ]


VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)

# mdev device_api attribute values (C string literals)
VFIO_DEVICE_API_PCI_STRING = "vfio-pci"
VFIO_DEVICE_API_PLATFORM_STRING = "vfio-platform"
VFIO_DEVICE_API_AMBA_STRING = "vfio-amba"
VFIO_DEVICE_API_CCW_STRING = "vfio-ccw"
VFIO_DEVICE_API_AP_STRING = "vfio-ap"

# VFIO_DEVICE_GET_INFO capability ids (s390 zPCI ones are defined in vfio_zdev.h)
VFIO_DEVICE_INFO_CAP_ZPCI_BASE = 1
VFIO_DEVICE_INFO_CAP_ZPCI_GROUP = 2
VFIO_DEVICE_INFO_CAP_ZPCI_UTIL = 3
VFIO_DEVICE_INFO_CAP_ZPCI_PFIP = 4
VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP = 5


class vfio_device_info_cap_pci_atomic_comp(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", _u32),
        ("reserved", _u32),
    ]


VFIO_PCI_ATOMIC_COMP32 = 1 << 0
VFIO_PCI_ATOMIC_COMP64 = 1 << 1
VFIO_PCI_ATOMIC_COMP128 = 1 << 2


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("cap_offset", _u32),
        ("size", _aligned_u64),
        ("offset", _aligned_u64),
    ]


VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [
        ("offset", _aligned_u64),
        ("size", _aligned_u64),
    ]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", _u32),
        ("reserved", _u32),
        ("areas", vfio_region_sparse_mmap_area * 0),
    ]


VFIO_REGION_INFO_CAP_TYPE = 2


class vfio_region_info_cap_type(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("type", _u32),
        ("subtype", _u32),
    ]


# Region types, global per bus driver. In C (1 << 31) is an int; the value is
# given here as the unsigned bit pattern it is used as.
VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF
VFIO_REGION_TYPE_GFX = 1
VFIO_REGION_TYPE_CCW = 2
VFIO_REGION_TYPE_MIGRATION_DEPRECATED = 3

# Region sub-types; the numbering restarts per vendor / region type.
VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION = 1
VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG = 2
VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG = 3
VFIO_REGION_SUBTYPE_NVIDIA_NVLINK2_RAM = 1
VFIO_REGION_SUBTYPE_IBM_NVLINK2_ATSD = 1
VFIO_REGION_SUBTYPE_GFX_EDID = 1


class vfio_region_gfx_edid(ctypes.Structure):
    _fields_ = [
        ("edid_offset", _u32),
        ("edid_max_size", _u32),
        ("edid_size", _u32),
        ("max_xres", _u32),
        ("max_yres", _u32),
        ("link_state", _u32),
    ]


VFIO_DEVICE_GFX_LINK_STATE_UP = 1
VFIO_DEVICE_GFX_LINK_STATE_DOWN = 2

VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD = 1
VFIO_REGION_SUBTYPE_CCW_SCHIB = 2
VFIO_REGION_SUBTYPE_CCW_CRW = 3

VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED = 1


class vfio_device_migration_info(ctypes.Structure):
    """Deprecated v1 migration region layout, kept because the header keeps it."""

    _fields_ = [
        ("device_state", _u32),
        ("reserved", _u32),
        ("pending_bytes", _aligned_u64),
        ("data_offset", _aligned_u64),
        ("data_size", _aligned_u64),
    ]


VFIO_DEVICE_STATE_V1_STOP = 0
VFIO_DEVICE_STATE_V1_RUNNING = 1 << 0
VFIO_DEVICE_STATE_V1_SAVING = 1 << 1
VFIO_DEVICE_STATE_V1_RESUMING = 1 << 2
VFIO_DEVICE_STATE_MASK = (
    VFIO_DEVICE_STATE_V1_RUNNING | VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING
)

VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4


class vfio_region_info_cap_nvlink2_ssatgt(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("tgt", _aligned_u64),
    ]


VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5


class vfio_region_info_cap_nvlink2_lnkspd(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("link_speed", _u32),
        ("__pad", _u32),
    ]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("count", _u32),
    ]


VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)


class vfio_irq_set(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("start", _u32),
        ("count", _u32),
        ("data", _u8 * 0),
    ]


VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)

VFIO_IRQ_SET_DATA_TYPE_MASK = (
    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
)
VFIO_IRQ_SET_ACTION_TYPE_MASK = (
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER
)

VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)

# Fixed vfio-pci region and IRQ indexes (anonymous C enums, so plain ints).
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

VFIO_CCW_CONFIG_REGION_INDEX = 0
VFIO_CCW_NUM_REGIONS = 1

VFIO_CCW_IO_IRQ_INDEX = 0
VFIO_CCW_CRW_IRQ_INDEX = 1
VFIO_CCW_REQ_IRQ_INDEX = 2
VFIO_CCW_NUM_IRQS = 3

VFIO_AP_REQ_IRQ_INDEX = 0
VFIO_AP_CFG_CHG_IRQ_INDEX = 1
VFIO_AP_NUM_IRQS = 2


class _vfio_pci_dependent_device_id(ctypes.Union):
    # Anonymous union: group_id for group-opened devices, devid for cdevs.
    _fields_ = [
        ("group_id", _u32),
        ("devid", _u32),
    ]


class vfio_pci_dependent_device(ctypes.Structure):
    _anonymous_ = ("_id",)
    _fields_ = [
        ("_id", _vfio_pci_dependent_device_id),
        ("segment", _u16),
        ("bus", _u8),
        ("devfn", _u8),
    ]


VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1


class vfio_pci_hot_reset_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("count", _u32),
        ("devices", vfio_pci_dependent_device * 0),
    ]


VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_pci_hot_reset(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("count", _u32),
        ("group_fds", _s32 * 0),
    ]


VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)


class _vfio_device_gfx_plane_info_id(ctypes.Union):
    # Anonymous union: which member is valid depends on the plane type flag.
    _fields_ = [
        ("region_index", _u32),
        ("dmabuf_id", _u32),
    ]


class vfio_device_gfx_plane_info(ctypes.Structure):
    _anonymous_ = ("_id",)
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("drm_plane_type", _u32),
        ("drm_format", _u32),
        ("drm_format_mod", _aligned_u64),
        ("width", _u32),
        ("height", _u32),
        ("stride", _u32),
        ("size", _u32),
        ("x_pos", _u32),
        ("y_pos", _u32),
        ("x_hot", _u32),
        ("y_hot", _u32),
        ("_id", _vfio_device_gfx_plane_info_id),
        ("reserved", _u32),
    ]


VFIO_GFX_PLANE_TYPE_PROBE = 1 << 0
VFIO_GFX_PLANE_TYPE_DMABUF = 1 << 1
VFIO_GFX_PLANE_TYPE_REGION = 1 << 2
VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)

VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)


class vfio_device_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("offset", _aligned_u64),
        ("data", _aligned_u64),
        ("fd", _s32),
        ("reserved", _u32),
    ]


VFIO_DEVICE_IOEVENTFD_8 = 1 << 0
VFIO_DEVICE_IOEVENTFD_16 = 1 << 1
VFIO_DEVICE_IOEVENTFD_32 = 1 << 2
VFIO_DEVICE_IOEVENTFD_64 = 1 << 3
VFIO_DEVICE_IOEVENTFD_SIZE_MASK = 0xF
VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)


class vfio_device_feature(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("data", _u8 * 0),
    ]


VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)


class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iommufd", _s32),
        ("out_devid", _u32),
        ("token_uuid_ptr", _aligned_u64),
    ]


VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("pt_id", _u32),
        ("pasid", _u32),
    ]


VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("pasid", _u32),
    ]


VFIO_DEVICE_DETACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)

# -------- VFIO_DEVICE_FEATURE indexes and payloads --------

VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0


class vfio_device_feature_migration(ctypes.Structure):
    _fields_ = [
        ("flags", _aligned_u64),
    ]


VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2
VFIO_DEVICE_FEATURE_MIGRATION = 1


class vfio_device_feature_mig_state(ctypes.Structure):
    _fields_ = [
        ("device_state", _u32),  # a vfio_device_mig_state value
        ("data_fd", _s32),
    ]


VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2


class vfio_device_mig_state(enum.IntEnum):
    VFIO_DEVICE_STATE_ERROR = 0
    VFIO_DEVICE_STATE_STOP = 1
    VFIO_DEVICE_STATE_RUNNING = 2
    VFIO_DEVICE_STATE_STOP_COPY = 3
    VFIO_DEVICE_STATE_RESUMING = 4
    VFIO_DEVICE_STATE_RUNNING_P2P = 5
    VFIO_DEVICE_STATE_PRE_COPY = 6
    VFIO_DEVICE_STATE_PRE_COPY_P2P = 7
    VFIO_DEVICE_STATE_NR = 8


VFIO_DEVICE_STATE_ERROR = vfio_device_mig_state.VFIO_DEVICE_STATE_ERROR
VFIO_DEVICE_STATE_STOP = vfio_device_mig_state.VFIO_DEVICE_STATE_STOP
VFIO_DEVICE_STATE_RUNNING = vfio_device_mig_state.VFIO_DEVICE_STATE_RUNNING
VFIO_DEVICE_STATE_STOP_COPY = vfio_device_mig_state.VFIO_DEVICE_STATE_STOP_COPY
VFIO_DEVICE_STATE_RESUMING = vfio_device_mig_state.VFIO_DEVICE_STATE_RESUMING
VFIO_DEVICE_STATE_RUNNING_P2P = vfio_device_mig_state.VFIO_DEVICE_STATE_RUNNING_P2P
VFIO_DEVICE_STATE_PRE_COPY = vfio_device_mig_state.VFIO_DEVICE_STATE_PRE_COPY
VFIO_DEVICE_STATE_PRE_COPY_P2P = vfio_device_mig_state.VFIO_DEVICE_STATE_PRE_COPY_P2P
VFIO_DEVICE_STATE_NR = vfio_device_mig_state.VFIO_DEVICE_STATE_NR


class vfio_precopy_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("initial_bytes", _aligned_u64),
        ("dirty_bytes", _aligned_u64),
    ]


VFIO_PRECOPY_INFO_REINIT = 1 << 0
# Issued on the migration data fd, not on the device fd.
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)

VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3


class vfio_device_low_power_entry_with_wakeup(ctypes.Structure):
    _fields_ = [
        ("wakeup_eventfd", _s32),
        ("reserved", _u32),
    ]


VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5


class vfio_device_feature_dma_logging_control(ctypes.Structure):
    _fields_ = [
        ("page_size", _aligned_u64),
        ("num_ranges", _u32),
        ("__reserved", _u32),
        ("ranges", _aligned_u64),  # user pointer to vfio_device_feature_dma_logging_range[]
    ]


class vfio_device_feature_dma_logging_range(ctypes.Structure):
    _fields_ = [
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
    ]


VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7


class vfio_device_feature_dma_logging_report(ctypes.Structure):
    _fields_ = [
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
        ("page_size", _aligned_u64),
        ("bitmap", _aligned_u64),  # user pointer to the __u64 bitmap
    ]


VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8


class vfio_device_feature_mig_data_size(ctypes.Structure):
    _fields_ = [
        ("stop_copy_length", _aligned_u64),
    ]


VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9


class vfio_device_feature_bus_master(ctypes.Structure):
    _fields_ = [
        ("op", _u32),
    ]


VFIO_DEVICE_FEATURE_CLEAR_MASTER = 0
VFIO_DEVICE_FEATURE_SET_MASTER = 1
VFIO_DEVICE_FEATURE_BUS_MASTER = 10

VFIO_DEVICE_FEATURE_DMA_BUF = 11


class vfio_region_dma_range(ctypes.Structure):
    _fields_ = [
        ("offset", _u64),
        ("length", _u64),
    ]


class vfio_device_feature_dma_buf(ctypes.Structure):
    _fields_ = [
        ("region_index", _u32),
        ("open_flags", _u32),
        ("flags", _u32),
        ("nr_ranges", _u32),
        ("dma_ranges", vfio_region_dma_range * 0),
    ]


# SET-only opt-in that makes vfio_precopy_info.flags meaningful; no payload.
VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 = 12

# -------- Type1 IOMMU (container) API --------


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iova_pgsizes", _aligned_u64),
        ("cap_offset", _u32),
        ("pad", _u32),
    ]


VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1

VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1


class vfio_iova_range(ctypes.Structure):
    _fields_ = [
        ("start", _u64),
        ("end", _u64),
    ]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", _u32),
        ("reserved", _u32),
        ("iova_ranges", vfio_iova_range * 0),
    ]


VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2


class vfio_iommu_type1_info_cap_migration(ctypes.Structure):
    # Plain __u64 members: the 4 bytes of padding after flags are implicit in C
    # and ctypes inserts them the same way on 64-bit hosts.
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", _u32),
        ("pgsize_bitmap", _u64),
        ("max_dirty_bitmap_size", _u64),
    ]


VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("avail", _u32),
    ]


VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("vaddr", _u64),
        ("iova", _u64),
        ("size", _u64),
    ]


VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)


class vfio_bitmap(ctypes.Structure):
    _fields_ = [
        ("pgsize", _u64),
        ("size", _u64),  # bytes
        ("data", ctypes.POINTER(_u64)),  # one bit per page, zeroed by the caller
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iova", _u64),
        ("size", _u64),
        ("data", _u8 * 0),
    ]


VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

VFIO_IOMMU_ENABLE = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _IO(VFIO_TYPE, VFIO_BASE + 16)


class vfio_iommu_type1_dirty_bitmap(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("data", _u8 * 0),
    ]


VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2


class vfio_iommu_type1_dirty_bitmap_get(ctypes.Structure):
    _fields_ = [
        ("iova", _u64),
        ("size", _u64),
        ("bitmap", vfio_bitmap),
    ]


VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)

# -------- SPAPR TCE (POWER) IOMMU API --------
# Several request numbers below reuse Type1 ones on purpose: the container's
# IOMMU type decides how the kernel interprets them.


class vfio_iommu_spapr_tce_ddw_info(ctypes.Structure):
    _fields_ = [
        ("pgsizes", _u64),
        ("max_dynamic_windows_supported", _u32),
        ("levels", _u32),
    ]


class vfio_iommu_spapr_tce_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("dma32_window_start", _u32),
        ("dma32_window_size", _u32),
        ("ddw", vfio_iommu_spapr_tce_ddw_info),
    ]


VFIO_IOMMU_SPAPR_INFO_DDW = 1 << 0
VFIO_IOMMU_SPAPR_TCE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_eeh_pe_err(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("func", _u32),
        ("addr", _u64),
        ("mask", _u64),
    ]


class _vfio_eeh_pe_op_arg(ctypes.Union):
    # Anonymous union in C; only err exists so far.
    _fields_ = [
        ("err", vfio_eeh_pe_err),
    ]


class vfio_eeh_pe_op(ctypes.Structure):
    _anonymous_ = ("_arg",)
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("op", _u32),
        ("_arg", _vfio_eeh_pe_op_arg),
    ]


VFIO_EEH_PE_DISABLE = 0
VFIO_EEH_PE_ENABLE = 1
VFIO_EEH_PE_UNFREEZE_IO = 2
VFIO_EEH_PE_UNFREEZE_DMA = 3
VFIO_EEH_PE_GET_STATE = 4
VFIO_EEH_PE_STATE_NORMAL = 0
VFIO_EEH_PE_STATE_RESET = 1
VFIO_EEH_PE_STATE_STOPPED = 2
VFIO_EEH_PE_STATE_STOPPED_DMA = 4
VFIO_EEH_PE_STATE_UNAVAIL = 5
VFIO_EEH_PE_RESET_DEACTIVATE = 5
VFIO_EEH_PE_RESET_HOT = 6
VFIO_EEH_PE_RESET_FUNDAMENTAL = 7
VFIO_EEH_PE_CONFIGURE = 8
VFIO_EEH_PE_INJECT_ERR = 9
VFIO_EEH_PE_OP = _IO(VFIO_TYPE, VFIO_BASE + 21)


class vfio_iommu_spapr_register_memory(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("vaddr", _u64),
        ("size", _u64),
    ]


VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 18)


class vfio_iommu_spapr_tce_create(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("page_shift", _u32),
        ("__resv1", _u32),
        ("window_size", _u64),
        ("levels", _u32),
        ("__resv2", _u32),
        ("start_addr", _u64),
    ]


VFIO_IOMMU_SPAPR_TCE_CREATE = _IO(VFIO_TYPE, VFIO_BASE + 19)


class vfio_iommu_spapr_tce_remove(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("start_addr", _u64),
    ]


VFIO_IOMMU_SPAPR_TCE_REMOVE = _IO(VFIO_TYPE, VFIO_BASE + 20)


# -------- helpers for variable-length arguments --------
# The kernel reads argsz bytes starting at the header, so header and payload
# must be one contiguous buffer; a bytearray is mutable and ioctl-friendly
# (fcntl.ioctl writes results back into it).

_T = TypeVar("_T", bound=ctypes.Structure)


def _as_bytes(payload: ctypes.Structure | bytes | bytearray | int) -> bytes:
    # bytes(n) is n zero bytes, bytes(struct) its raw image.
    if isinstance(payload, int) and payload < 0:
        raise ValueError(f"payload size must be >= 0, got {payload}")
    return bytes(payload)


def _with_header(header: ctypes.Structure, payload: bytes) -> bytearray:
    # Every header used here starts with "__u32 argsz", covering header + payload.
    header.argsz = ctypes.sizeof(header) + len(payload)
    return bytearray(bytes(header) + payload)


def feature_buffer(
    flags: int, payload: ctypes.Structure | bytes | bytearray | int = b""
) -> bytearray:
    """VFIO_DEVICE_FEATURE argument: header with ``flags`` and argsz, then ``payload``.

    ``flags`` is the feature index OR'ed with VFIO_DEVICE_FEATURE_GET/SET/PROBE.
    An int ``payload`` reserves that many zero bytes (room for a GET result).
    """
    return _with_header(vfio_device_feature(flags=flags), _as_bytes(payload))


def feature_payload(buf: bytearray, cls: type[_T]) -> _T:
    """Writable ctypes view of the payload that follows the feature header in ``buf``."""
    return cls.from_buffer(buf, ctypes.sizeof(vfio_device_feature))


def dirty_pages_buffer(
    flags: int, get: vfio_iommu_type1_dirty_bitmap_get | None = None
) -> bytearray:
    """VFIO_IOMMU_DIRTY_PAGES argument; ``get`` is required exactly with FLAG_GET_BITMAP.

    argsz covers the vfio_iommu_type1_dirty_bitmap_get but not the bitmap itself,
    which lives in separate memory pointed to by ``get.bitmap.data``.
    """
    wants_bitmap = bool(flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
    if wants_bitmap != (get is not None):
        raise ValueError("pass `get` if and only if VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP is set")
    payload = b"" if get is None else bytes(get)
    return _with_header(vfio_iommu_type1_dirty_bitmap(flags=flags), payload)


def dirty_pages_get(buf: bytearray) -> vfio_iommu_type1_dirty_bitmap_get:
    """Writable view of the vfio_iommu_type1_dirty_bitmap_get inside ``buf``."""
    return vfio_iommu_type1_dirty_bitmap_get.from_buffer(
        buf, ctypes.sizeof(vfio_iommu_type1_dirty_bitmap)
    )


def unmap_dma_buffer(
    iova: int, size: int, flags: int = 0, bitmap: vfio_bitmap | None = None
) -> bytearray:
    """VFIO_IOMMU_UNMAP_DMA argument; ``bitmap`` is required exactly with GET_DIRTY_BITMAP.

    The kernel writes the unmapped size back into the header's ``size``; read
    it with ``vfio_iommu_type1_dma_unmap.from_buffer(buf).size``.
    """
    wants_bitmap = bool(flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
    if wants_bitmap != (bitmap is not None):
        raise ValueError("pass `bitmap` if and only if VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP is set")
    payload = b"" if bitmap is None else bytes(bitmap)
    return _with_header(vfio_iommu_type1_dma_unmap(flags=flags, iova=iova, size=size), payload)


def unmap_dma_bitmap(buf: bytearray) -> vfio_bitmap:
    """Writable view of the vfio_bitmap that follows the unmap header in ``buf``."""
    return vfio_bitmap.from_buffer(buf, ctypes.sizeof(vfio_iommu_type1_dma_unmap))


def alloc_bitmap(length: int, pgsize: int) -> tuple[vfio_bitmap, ctypes.Array[ctypes.c_uint64]]:
    """A zeroed dirty bitmap covering ``length`` bytes of IOVA at ``pgsize`` granularity.

    Returns the vfio_bitmap descriptor and the backing array. The descriptor
    only holds a raw pointer once copied into an ioctl buffer, so the caller
    must keep the array alive until the ioctl has returned.
    """
    if pgsize <= 0 or pgsize & (pgsize - 1):
        raise ValueError(f"pgsize must be a power of two, got {pgsize}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    pages = -(-length // pgsize)
    # The kernel sizes bitmaps in whole __u64 words.
    words = max(1, -(-pages // 64))
    backing = (ctypes.c_uint64 * words)()
    desc = vfio_bitmap(
        pgsize=pgsize,
        size=words * 8,
        data=ctypes.cast(backing, ctypes.POINTER(ctypes.c_uint64)),
    )
    return desc, backing
