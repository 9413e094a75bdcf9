"""ctypes mirrors of the Linux 7.2 VFIO and IOMMUFD user-space ABI.

- ``vfio``: include/uapi/linux/vfio.h
- ``iommufd``: include/uapi/linux/iommufd.h
- ``ioctl``: the generic _IOC request-number encoders

Names are the C names verbatim; tests/test_uapi_abi.py checks every export
against the real headers with a C compiler.
"""

import ctypes
import sys

from vfiomig.uapi import ioctl, iommufd, vfio

__all__ = ["ioctl", "iommufd", "vfio"]

# ctypes lays structures out like the host C compiler, which only equals the
# kernel ABI where __aligned_u64 and plain 64-bit integers are both 8-aligned and
# byte order is little-endian (x86-64, arm64). Refuse anything else loudly.
if sys.byteorder != "little" or ctypes.alignment(ctypes.c_uint64) != 8:
    raise ImportError("vfiomig.uapi needs a little-endian host with 8-byte aligned 64-bit integers")
