"""ctypes mirror of drivers/iommu/iommufd/iommufd_test.h as of Linux 6.12 (CONFIG_IOMMUFD_TEST).

IOMMU_TEST_CMD is the selftests' private interface to the kernel, not a stable uAPI: it
changes between kernel versions, and the model speaks the version of the selftests it
runs (Debian's linux-source-6.12, see docs/selftests.md). Two names of it are not in that
header but are used by the selftests it ships with (a backport of the PASID tests):
MOCK_FLAGS_DEVICE_PASID and MOCK_PASID_WIDTH, with upstream's values.
"""

import ctypes

from vfiomig.uapi.ioctl import _IO
from vfiomig.uapi.iommufd import IOMMUFD_CMD_BASE, IOMMUFD_TYPE

_u32 = ctypes.c_uint32
_aligned_u64 = ctypes.c_uint64

IOMMU_TEST_OP_ADD_RESERVED = 1
IOMMU_TEST_OP_MOCK_DOMAIN = 2
IOMMU_TEST_OP_MD_CHECK_MAP = 3
IOMMU_TEST_OP_MD_CHECK_REFS = 4
IOMMU_TEST_OP_CREATE_ACCESS = 5
IOMMU_TEST_OP_DESTROY_ACCESS_PAGES = 6
IOMMU_TEST_OP_ACCESS_PAGES = 7
IOMMU_TEST_OP_ACCESS_RW = 8
IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT = 9
IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE = 10
IOMMU_TEST_OP_ACCESS_REPLACE_IOAS = 11
IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS = 12
IOMMU_TEST_OP_DIRTY = 13
IOMMU_TEST_OP_MD_CHECK_IOTLB = 14
IOMMU_TEST_OP_TRIGGER_IOPF = 15

MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1

MOCK_FLAGS_ACCESS_WRITE = 1 << 0
MOCK_FLAGS_ACCESS_SYZ = 1 << 16

MOCK_ACCESS_RW_WRITE = 1 << 0
MOCK_ACCESS_RW_SLOW_PATH = 1 << 2

MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES = 1 << 0

MOCK_FLAGS_DEVICE_NO_DIRTY = 1 << 0
MOCK_FLAGS_DEVICE_HUGE_IOVA = 1 << 1
MOCK_FLAGS_DEVICE_PASID = 1 << 2  # upstream's value (not in 6.12's header)
MOCK_PASID_WIDTH = 20  # upstream's value (not in 6.12's header)

MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4


class _add_reserved(ctypes.Structure):
    _fields_ = [("start", _aligned_u64), ("length", _aligned_u64)]


class _mock_domain(ctypes.Structure):
    _fields_ = [("out_stdev_id", _u32), ("out_hwpt_id", _u32), ("out_idev_id", _u32)]


class _mock_domain_flags(ctypes.Structure):
    _fields_ = [
        ("out_stdev_id", _u32),
        ("out_hwpt_id", _u32),
        ("out_idev_id", _u32),
        ("dev_flags", _u32),
    ]


class _mock_domain_replace(ctypes.Structure):
    _fields_ = [("pt_id", _u32)]


class _check_map(ctypes.Structure):
    _fields_ = [("iova", _aligned_u64), ("length", _aligned_u64), ("uptr", _aligned_u64)]


class _check_refs(ctypes.Structure):
    _fields_ = [("length", _aligned_u64), ("uptr", _aligned_u64), ("refs", _u32)]


class _create_access(ctypes.Structure):
    _fields_ = [("out_access_fd", _u32), ("flags", _u32)]


class _destroy_access_pages(ctypes.Structure):
    _fields_ = [("access_pages_id", _u32)]


class _access_pages(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("out_access_pages_id", _u32),
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
        ("uptr", _aligned_u64),
    ]


class _access_rw(ctypes.Structure):
    _fields_ = [
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
        ("uptr", _aligned_u64),
        ("flags", _u32),
    ]


class _memory_limit(ctypes.Structure):
    _fields_ = [("limit", _u32)]


class _access_replace_ioas(ctypes.Structure):
    _fields_ = [("ioas_id", _u32)]


class _dirty(ctypes.Structure):
    _fields_ = [
        ("flags", _u32),
        ("iova", _aligned_u64),
        ("length", _aligned_u64),
        ("page_size", _aligned_u64),
        ("uptr", _aligned_u64),
        ("out_nr_dirty", _aligned_u64),
    ]


class _check_iotlb(ctypes.Structure):
    _fields_ = [("id", _u32), ("iotlb", _u32)]


class _trigger_iopf(ctypes.Structure):
    _fields_ = [
        ("dev_id", _u32),
        ("pasid", _u32),
        ("grpid", _u32),
        ("perm", _u32),
        ("addr", ctypes.c_uint64),
    ]


class _iommu_test_cmd_u(ctypes.Union):
    _fields_ = [
        ("add_reserved", _add_reserved),
        ("mock_domain", _mock_domain),
        ("mock_domain_flags", _mock_domain_flags),
        ("mock_domain_replace", _mock_domain_replace),
        ("check_map", _check_map),
        ("check_refs", _check_refs),
        ("create_access", _create_access),
        ("destroy_access_pages", _destroy_access_pages),
        ("access_pages", _access_pages),
        ("access_rw", _access_rw),
        ("memory_limit", _memory_limit),
        ("access_replace_ioas", _access_replace_ioas),
        ("dirty", _dirty),
        ("check_iotlb", _check_iotlb),
        ("trigger_iopf", _trigger_iopf),
    ]


class iommu_test_cmd(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("size", _u32),
        ("op", _u32),
        ("id", _u32),
        ("__reserved", _u32),
        ("_u", _iommu_test_cmd_u),
        ("last", _u32),
    ]


IOMMU_TEST_CMD = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32)

# Mock structs for IOMMU_GET_HW_INFO
IOMMU_HW_INFO_TYPE_SELFTEST = 0xFEEDBEEF
IOMMU_HW_INFO_SELFTEST_REGVAL = 0xDEADBEEF


class iommu_test_hw_info(ctypes.Structure):
    _fields_ = [("flags", _u32), ("test_reg", _u32)]


# Not equal to any value of enum iommu_hwpt_data_type
IOMMU_HWPT_DATA_SELFTEST = 0xDEAD
IOMMU_TEST_IOTLB_DEFAULT = 0xBADBEEF


class iommu_hwpt_selftest(ctypes.Structure):
    _fields_ = [("iotlb", _u32)]


# Not equal to any value of enum iommu_hwpt_invalidate_data_type
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0


class iommu_hwpt_invalidate_selftest(ctypes.Structure):
    _fields_ = [("flags", _u32), ("iotlb_id", _u32)]
