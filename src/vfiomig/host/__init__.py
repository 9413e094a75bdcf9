"""vfiomig.host: drive VFIO and iommufd from userspace, on a real kernel or on the model.

Everything here reaches the kernel through a :class:`Transport` (``LinuxTransport`` or
``ModelTransport``) with the same bytes a C program would use. See docs/library.md.
"""

from vfiomig.host.bitmap import DirtyBitmap
from vfiomig.host.container import Container, Group, Type1Info
from vfiomig.host.device import (
    DeviceInfo,
    MigrationFlags,
    MigrationState,
    VfioDevice,
)
from vfiomig.host.errors import (
    ContainerError,
    DeviceError,
    DmaLoggingError,
    GroupError,
    HwptError,
    IoasError,
    IommufdError,
    MigrationDataError,
    MigrationError,
    MigrationStateError,
    OpenError,
    VfioError,
)
from vfiomig.host.iommufd import HwInfo, Hwpt, Ioas, Iommufd, IovaRanges
from vfiomig.host.memory import UserBuffer
from vfiomig.host.migration import MigrationFile, PrecopyInfo
from vfiomig.host.transport import LinuxTransport, ModelTransport, Syscalls, Transport

__all__ = [
    "Container",
    "ContainerError",
    "DeviceError",
    "DeviceInfo",
    "DirtyBitmap",
    "DmaLoggingError",
    "Group",
    "GroupError",
    "HwInfo",
    "Hwpt",
    "HwptError",
    "Ioas",
    "IoasError",
    "Iommufd",
    "IommufdError",
    "IovaRanges",
    "LinuxTransport",
    "MigrationDataError",
    "MigrationError",
    "MigrationFile",
    "MigrationFlags",
    "MigrationState",
    "MigrationStateError",
    "ModelTransport",
    "OpenError",
    "PrecopyInfo",
    "Syscalls",
    "Transport",
    "Type1Info",
    "UserBuffer",
    "VfioDevice",
    "VfioError",
]
