"""ctypes mirror of Linux 7.2 include/uapi/linux/iommufd.h.

Every struct, enum and ioctl request number of the header is here under its C
name. Named C enums are ``enum.IntEnum`` classes whose members are also
module-level names; the anonymous IOMMUFD_CMD_* enum is plain ints. All
IOMMUFD structures start with ``__u32 size`` (the caller sets it to
``ctypes.sizeof`` of the structure) and carry user pointers as __aligned_u64.
"""

import ctypes
import enum

from vfiomig.uapi.ioctl import _IO

# Private aliases for the kernel integer types. __aligned_u64/__aligned_le64
# differ from __u64 only on hosts the package refuses to import on.
_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_s32 = ctypes.c_int32
_aligned_u64 = ctypes.c_uint64
_aligned_le64 = ctypes.c_uint64

IOMMUFD_TYPE = ord(";")

# Anonymous enum of command numbers (the ioctl "nr" byte).
IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C
IOMMUFD_CMD_HWPT_INVALIDATE = 0x8D
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F
IOMMUFD_CMD_VIOMMU_ALLOC = 0x90
IOMMUFD_CMD_VDEVICE_ALLOC = 0x91
IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92
IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93
IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94


class iommu_destroy(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("id", _u32),
    ]


IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("out_ioas_id", _u32),
    ]


IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)


class iommu_iova_range(ctypes.Structure):
    _fields_ = [
        ("start", _aligned_u64),
        ("last", _aligned_u64),  # inclusive
    ]


class iommu_ioas_iova_ranges(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("ioas_id", _u32),
        ("num_iovas", _u32),
        ("__reserved", _u32),
        ("allowed_iovas", _aligned_u64),  # user pointer to iommu_iova_range[]
        ("out_iova_alignment", _aligned_u64),
    ]


IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)


class iommu_ioas_allow_iovas(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("ioas_id", _u32),
        ("num_iovas", _u32),
        ("__reserved", _u32),
        ("allowed_iovas", _aligned_u64),  # user pointer to iommu_iova_range[]
    ]


IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)


class iommufd_ioas_map_flags(enum.IntEnum):
    IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
    IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
    IOMMU_IOAS_MAP_READABLE = 1 << 2


IOMMU_IOAS_MAP_FIXED_IOVA = iommufd_ioas_map_flags.IOMMU_IOAS_MAP_FIXED_IOVA
IOMMU_IOAS_MAP_WRITEABLE = iommufd_ioas_map_flags.IOMMU_IOAS_MAP_WRITEABLE
IOMMU_IOAS_MAP_READABLE = iommufd_ioas_map_flags.IOMMU_IOAS_MAP_READABLE


class iommu_ioas_map(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("ioas_id", _u32),
        ("__reserved", _u32),
        ("user_va", _aligned_u64),
        ("length", _aligned_u64),
        ("iova", _aligned_u64),
    ]


IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)


class iommu_ioas_map_file(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("ioas_id", _u32),
        ("fd", _s32),
        ("start", _aligned_u64),
        ("length", _aligned_u64),
        ("iova", _aligned_u64),
    ]


IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)


class iommu_ioas_copy(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("dst_ioas_id", _u32),
        ("src_ioas_id", _u32),
        ("length", _aligned_u64),
        ("dst_iova", _aligned_u64),
        ("src_iova", _aligned_u64),
    ]


IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)


class iommu_ioas_unmap(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("ioas_id", _u32),
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
    ]


IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)


class iommufd_option(enum.IntEnum):
    IOMMU_OPTION_RLIMIT_MODE = 0
    IOMMU_OPTION_HUGE_PAGES = 1


IOMMU_OPTION_RLIMIT_MODE = iommufd_option.IOMMU_OPTION_RLIMIT_MODE
IOMMU_OPTION_HUGE_PAGES = iommufd_option.IOMMU_OPTION_HUGE_PAGES


class iommufd_option_ops(enum.IntEnum):
    IOMMU_OPTION_OP_SET = 0
    IOMMU_OPTION_OP_GET = 1


IOMMU_OPTION_OP_SET = iommufd_option_ops.IOMMU_OPTION_OP_SET
IOMMU_OPTION_OP_GET = iommufd_option_ops.IOMMU_OPTION_OP_GET


class iommu_option(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("option_id", _u32),
        ("op", _u16),
        ("__reserved", _u16),
        ("object_id", _u32),
        ("val64", _aligned_u64),
    ]


IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)


class iommufd_vfio_ioas_op(enum.IntEnum):
    IOMMU_VFIO_IOAS_GET = 0
    IOMMU_VFIO_IOAS_SET = 1
    IOMMU_VFIO_IOAS_CLEAR = 2


IOMMU_VFIO_IOAS_GET = iommufd_vfio_ioas_op.IOMMU_VFIO_IOAS_GET
IOMMU_VFIO_IOAS_SET = iommufd_vfio_ioas_op.IOMMU_VFIO_IOAS_SET
IOMMU_VFIO_IOAS_CLEAR = iommufd_vfio_ioas_op.IOMMU_VFIO_IOAS_CLEAR


class iommu_vfio_ioas(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("ioas_id", _u32),
        ("op", _u16),
        ("__reserved", _u16),
    ]


IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)


class iommufd_hwpt_alloc_flags(enum.IntEnum):
    IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
    IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
    IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
    IOMMU_HWPT_ALLOC_PASID = 1 << 3


IOMMU_HWPT_ALLOC_NEST_PARENT = iommufd_hwpt_alloc_flags.IOMMU_HWPT_ALLOC_NEST_PARENT
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = iommufd_hwpt_alloc_flags.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
IOMMU_HWPT_FAULT_ID_VALID = iommufd_hwpt_alloc_flags.IOMMU_HWPT_FAULT_ID_VALID
IOMMU_HWPT_ALLOC_PASID = iommufd_hwpt_alloc_flags.IOMMU_HWPT_ALLOC_PASID


class iommu_hwpt_vtd_s1_flags(enum.IntEnum):
    IOMMU_VTD_S1_SRE = 1 << 0
    IOMMU_VTD_S1_EAFE = 1 << 1
    IOMMU_VTD_S1_WPE = 1 << 2


IOMMU_VTD_S1_SRE = iommu_hwpt_vtd_s1_flags.IOMMU_VTD_S1_SRE
IOMMU_VTD_S1_EAFE = iommu_hwpt_vtd_s1_flags.IOMMU_VTD_S1_EAFE
IOMMU_VTD_S1_WPE = iommu_hwpt_vtd_s1_flags.IOMMU_VTD_S1_WPE


class iommu_hwpt_vtd_s1(ctypes.Structure):
    _fields_ = [
        ("flags", _aligned_u64),
        ("pgtbl_addr", _aligned_u64),
        ("addr_width", _u32),
        ("__reserved", _u32),
    ]


class iommu_hwpt_arm_smmuv3(ctypes.Structure):
    _fields_ = [
        ("ste", _aligned_le64 * 2),
    ]


class iommu_hwpt_amd_guest(ctypes.Structure):
    _fields_ = [
        ("dte", _aligned_u64 * 4),
    ]


class iommu_hwpt_data_type(enum.IntEnum):
    IOMMU_HWPT_DATA_NONE = 0
    IOMMU_HWPT_DATA_VTD_S1 = 1
    IOMMU_HWPT_DATA_ARM_SMMUV3 = 2
    IOMMU_HWPT_DATA_AMD_GUEST = 3


IOMMU_HWPT_DATA_NONE = iommu_hwpt_data_type.IOMMU_HWPT_DATA_NONE
IOMMU_HWPT_DATA_VTD_S1 = iommu_hwpt_data_type.IOMMU_HWPT_DATA_VTD_S1
IOMMU_HWPT_DATA_ARM_SMMUV3 = iommu_hwpt_data_type.IOMMU_HWPT_DATA_ARM_SMMUV3
IOMMU_HWPT_DATA_AMD_GUEST = iommu_hwpt_data_type.IOMMU_HWPT_DATA_AMD_GUEST


class iommu_hwpt_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("dev_id", _u32),
        ("pt_id", _u32),
        ("out_hwpt_id", _u32),
        ("__reserved", _u32),
        ("data_type", _u32),
        ("data_len", _u32),
        ("data_uptr", _aligned_u64),
        ("fault_id", _u32),
        ("__reserved2", _u32),
    ]


IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)


class iommu_hw_info_vtd_flags(enum.IntEnum):
    IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0


IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = (
    iommu_hw_info_vtd_flags.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17
)


class iommu_hw_info_vtd(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("__reserved", _u32),
        ("cap_reg", _aligned_u64),
        ("ecap_reg", _aligned_u64),
    ]


class iommu_hw_info_arm_smmuv3(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("__reserved", _u32),
        ("idr", _u32 * 6),
        ("iidr", _u32),
        ("aidr", _u32),
    ]


class iommu_hw_info_tegra241_cmdqv(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("version", _u8),
        ("log2vcmdqs", _u8),
        ("log2vsids", _u8),
        ("__reserved", _u8),
    ]


class iommu_hw_info_amd(ctypes.Structure):
    _fields_ = [
        ("efr", _aligned_u64),
        ("efr2", _aligned_u64),
    ]


class iommu_hw_info_type(enum.IntEnum):
    IOMMU_HW_INFO_TYPE_NONE = 0
    # Same value as NONE in C, so IntEnum makes it an alias of NONE.
    IOMMU_HW_INFO_TYPE_DEFAULT = 0
    IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
    IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2
    IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3
    IOMMU_HW_INFO_TYPE_AMD = 4


IOMMU_HW_INFO_TYPE_NONE = iommu_hw_info_type.IOMMU_HW_INFO_TYPE_NONE
IOMMU_HW_INFO_TYPE_DEFAULT = iommu_hw_info_type.IOMMU_HW_INFO_TYPE_DEFAULT
IOMMU_HW_INFO_TYPE_INTEL_VTD = iommu_hw_info_type.IOMMU_HW_INFO_TYPE_INTEL_VTD
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = iommu_hw_info_type.IOMMU_HW_INFO_TYPE_ARM_SMMUV3
IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = iommu_hw_info_type.IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV
IOMMU_HW_INFO_TYPE_AMD = iommu_hw_info_type.IOMMU_HW_INFO_TYPE_AMD


class iommufd_hw_capabilities(enum.IntEnum):
    IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
    IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
    IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2
    IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = 1 << 3


IOMMU_HW_CAP_DIRTY_TRACKING = iommufd_hw_capabilities.IOMMU_HW_CAP_DIRTY_TRACKING
IOMMU_HW_CAP_PCI_PASID_EXEC = iommufd_hw_capabilities.IOMMU_HW_CAP_PCI_PASID_EXEC
IOMMU_HW_CAP_PCI_PASID_PRIV = iommufd_hw_capabilities.IOMMU_HW_CAP_PCI_PASID_PRIV
IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = iommufd_hw_capabilities.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED


class iommufd_hw_info_flags(enum.IntEnum):
    IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0


IOMMU_HW_INFO_FLAG_INPUT_TYPE = iommufd_hw_info_flags.IOMMU_HW_INFO_FLAG_INPUT_TYPE


class _iommu_hw_info_data_type(ctypes.Union):
    # Anonymous union: the requested type goes in, the reported type comes out.
    _fields_ = [
        ("in_data_type", _u32),
        ("out_data_type", _u32),
    ]


class iommu_hw_info(ctypes.Structure):
    _anonymous_ = ("_data_type",)
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("dev_id", _u32),
        ("data_len", _u32),
        ("data_uptr", _aligned_u64),
        ("_data_type", _iommu_hw_info_data_type),
        ("out_max_pasid_log2", _u8),
        ("__reserved", _u8 * 3),
        ("out_capabilities", _aligned_u64),
    ]


IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)


class iommufd_hwpt_set_dirty_tracking_flags(enum.IntEnum):
    IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1


IOMMU_HWPT_DIRTY_TRACKING_ENABLE = (
    iommufd_hwpt_set_dirty_tracking_flags.IOMMU_HWPT_DIRTY_TRACKING_ENABLE
)


class iommu_hwpt_set_dirty_tracking(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("hwpt_id", _u32),
        ("__reserved", _u32),
    ]


IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)


class iommufd_hwpt_get_dirty_bitmap_flags(enum.IntEnum):
    IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1


IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = (
    iommufd_hwpt_get_dirty_bitmap_flags.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
)


class iommu_hwpt_get_dirty_bitmap(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("hwpt_id", _u32),
        ("flags", _u32),
        ("__reserved", _u32),
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
        ("page_size", _aligned_u64),
        ("data", _aligned_u64),  # user pointer to the __u64 bitmap
    ]


IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)


class iommu_hwpt_invalidate_data_type(enum.IntEnum):
    IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0
    IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1


IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = (
    iommu_hwpt_invalidate_data_type.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1
)
IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = (
    iommu_hwpt_invalidate_data_type.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3
)


class iommu_hwpt_vtd_s1_invalidate_flags(enum.IntEnum):
    IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0


IOMMU_VTD_INV_FLAGS_LEAF = iommu_hwpt_vtd_s1_invalidate_flags.IOMMU_VTD_INV_FLAGS_LEAF


class iommu_hwpt_vtd_s1_invalidate(ctypes.Structure):
    _fields_ = [
        ("addr", _aligned_u64),
        ("npages", _aligned_u64),
        ("flags", _u32),
        ("__reserved", _u32),
    ]


class iommu_viommu_arm_smmuv3_invalidate(ctypes.Structure):
    _fields_ = [
        ("cmd", _aligned_le64 * 2),
    ]


class iommu_hwpt_invalidate(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("hwpt_id", _u32),
        ("data_uptr", _aligned_u64),
        ("data_type", _u32),
        ("entry_len", _u32),
        ("entry_num", _u32),
        ("__reserved", _u32),
    ]


IOMMU_HWPT_INVALIDATE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_INVALIDATE)


class iommu_hwpt_pgfault_flags(enum.IntEnum):
    IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
    IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1


IOMMU_PGFAULT_FLAGS_PASID_VALID = iommu_hwpt_pgfault_flags.IOMMU_PGFAULT_FLAGS_PASID_VALID
IOMMU_PGFAULT_FLAGS_LAST_PAGE = iommu_hwpt_pgfault_flags.IOMMU_PGFAULT_FLAGS_LAST_PAGE


class iommu_hwpt_pgfault_perm(enum.IntEnum):
    IOMMU_PGFAULT_PERM_READ = 1 << 0
    IOMMU_PGFAULT_PERM_WRITE = 1 << 1
    IOMMU_PGFAULT_PERM_EXEC = 1 << 2
    IOMMU_PGFAULT_PERM_PRIV = 1 << 3


IOMMU_PGFAULT_PERM_READ = iommu_hwpt_pgfault_perm.IOMMU_PGFAULT_PERM_READ
IOMMU_PGFAULT_PERM_WRITE = iommu_hwpt_pgfault_perm.IOMMU_PGFAULT_PERM_WRITE
IOMMU_PGFAULT_PERM_EXEC = iommu_hwpt_pgfault_perm.IOMMU_PGFAULT_PERM_EXEC
IOMMU_PGFAULT_PERM_PRIV = iommu_hwpt_pgfault_perm.IOMMU_PGFAULT_PERM_PRIV


class iommu_hwpt_pgfault(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("dev_id", _u32),
        ("pasid", _u32),
        ("grpid", _u32),
        ("perm", _u32),
        ("__reserved", _u32),
        ("addr", _aligned_u64),
        ("length", _u32),
        ("cookie", _u32),
    ]


class iommufd_page_response_code(enum.IntEnum):
    IOMMUFD_PAGE_RESP_SUCCESS = 0
    IOMMUFD_PAGE_RESP_INVALID = 1


IOMMUFD_PAGE_RESP_SUCCESS = iommufd_page_response_code.IOMMUFD_PAGE_RESP_SUCCESS
IOMMUFD_PAGE_RESP_INVALID = iommufd_page_response_code.IOMMUFD_PAGE_RESP_INVALID


class iommu_hwpt_page_response(ctypes.Structure):
    _fields_ = [
        ("cookie", _u32),
        ("code", _u32),
    ]


class iommu_fault_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("out_fault_id", _u32),
        ("out_fault_fd", _u32),
    ]


IOMMU_FAULT_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC)


class iommu_viommu_type(enum.IntEnum):
    IOMMU_VIOMMU_TYPE_DEFAULT = 0
    IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1
    IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = 2


IOMMU_VIOMMU_TYPE_DEFAULT = iommu_viommu_type.IOMMU_VIOMMU_TYPE_DEFAULT
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = iommu_viommu_type.IOMMU_VIOMMU_TYPE_ARM_SMMUV3
IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = iommu_viommu_type.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV


class iommu_viommu_tegra241_cmdqv(ctypes.Structure):
    _fields_ = [
        ("out_vintf_mmap_offset", _aligned_u64),
        ("out_vintf_mmap_length", _aligned_u64),
    ]


class iommu_viommu_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("type", _u32),
        ("dev_id", _u32),
        ("hwpt_id", _u32),
        ("out_viommu_id", _u32),
        ("data_len", _u32),
        ("__reserved", _u32),
        ("data_uptr", _aligned_u64),
    ]


IOMMU_VIOMMU_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VIOMMU_ALLOC)


class iommu_vdevice_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("viommu_id", _u32),
        ("dev_id", _u32),
        ("out_vdevice_id", _u32),
        ("virt_id", _aligned_u64),
    ]


IOMMU_VDEVICE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VDEVICE_ALLOC)


class iommu_ioas_change_process(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("__reserved", _u32),
    ]


IOMMU_IOAS_CHANGE_PROCESS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_CHANGE_PROCESS)


class iommu_veventq_flag(enum.IntEnum):
    IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 1 << 0


IOMMU_VEVENTQ_FLAG_LOST_EVENTS = iommu_veventq_flag.IOMMU_VEVENTQ_FLAG_LOST_EVENTS


class iommufd_vevent_header(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("sequence", _u32),
    ]


class iommu_veventq_type(enum.IntEnum):
    IOMMU_VEVENTQ_TYPE_DEFAULT = 0
    IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1
    IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = 2


IOMMU_VEVENTQ_TYPE_DEFAULT = iommu_veventq_type.IOMMU_VEVENTQ_TYPE_DEFAULT
IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = iommu_veventq_type.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3
IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = iommu_veventq_type.IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV


class iommu_vevent_arm_smmuv3(ctypes.Structure):
    _fields_ = [
        ("evt", _aligned_le64 * 4),
    ]


class iommu_vevent_tegra241_cmdqv(ctypes.Structure):
    _fields_ = [
        ("lvcmdq_err_map", _aligned_le64 * 2),
    ]


class iommu_veventq_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("viommu_id", _u32),
        ("type", _u32),
        ("veventq_depth", _u32),
        ("out_veventq_id", _u32),
        ("out_veventq_fd", _u32),
        ("__reserved", _u32),
    ]


IOMMU_VEVENTQ_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VEVENTQ_ALLOC)


class iommu_hw_queue_type(enum.IntEnum):
    IOMMU_HW_QUEUE_TYPE_DEFAULT = 0
    IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV = 1


IOMMU_HW_QUEUE_TYPE_DEFAULT = iommu_hw_queue_type.IOMMU_HW_QUEUE_TYPE_DEFAULT
IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV = iommu_hw_queue_type.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV


class iommu_hw_queue_alloc(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("viommu_id", _u32),
        ("type", _u32),
        ("index", _u32),
        ("out_hw_queue_id", _u32),
        ("nesting_parent_iova", _aligned_u64),
        ("length", _aligned_u64),
    ]


IOMMU_HW_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HW_QUEUE_ALLOC)
