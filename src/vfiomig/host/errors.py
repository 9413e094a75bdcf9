"""One exception hierarchy for everything the library asks of the kernel.

Every failure of a syscall made on the caller's behalf is raised as a :class:`VfioError`: an
``OSError`` (so ``except OSError`` and ``e.errno`` keep working) that also names the operation
that failed, e.g. ``IOMMU_IOAS_MAP`` or ``VFIO_DEVICE_FEATURE[MIG_DEVICE_STATE] SET STOP_COPY``.
The subclass says which family of objects failed::

    VfioError
    ├── OpenError              open() of a device node (/dev/iommu, /dev/vfio/...)
    ├── IommufdError           an IOMMU_* ioctl on /dev/iommu
    │   ├── IoasError          IOAS alloc / map / unmap / copy / iova ranges / allow iovas
    │   └── HwptError          HWPT alloc / dirty tracking / dirty bitmap
    ├── DeviceError            a VFIO device ioctl (bind, attach, info, reset, features)
    │   ├── MigrationError     migration features (flags, MIG_DATA_SIZE, PRECOPY_INFOv2)
    │   │   ├── MigrationStateError   MIG_DEVICE_STATE SET/GET (knows the requested state)
    │   │   └── MigrationDataError    read / write / PRECOPY_INFO on a migration data fd
    │   └── DmaLoggingError    DMA_LOGGING_START / STOP / REPORT
    ├── ContainerError         legacy /dev/vfio/vfio container (type1)
    │   └── GroupError         legacy /dev/vfio/N group
    ├── ClosedError            a handle used after close() / destroy() (no syscall made)
    └── ArgumentError          a value that does not fit its C field (no syscall made)

Arguments the library rejects before any syscall are ``ValueError``: they are the caller's
bug, not the kernel's answer. The two the library can name an operation for are both:
``ClosedError`` and ``ArgumentError`` derive from ``VfioError`` *and* ``ValueError``, so
``except VfioError`` sees every failure of a call and ``except ValueError`` every refusal.
Anything else (an unknown state name, a bitmap larger than the library maps) is a plain
``ValueError``; an argument of the wrong type is a ``TypeError``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def errno_name(code: int) -> str:
    """``EINVAL`` for 22; the number itself for an errno Python does not know."""
    return _errno.errorcode.get(code, str(code))


class VfioError(OSError):
    """A syscall the library made failed; ``errno`` is the kernel's, ``op`` what was asked."""

    def __init__(self, errno: int, op: str, detail: str = "") -> None:
        text = f"{op}: {errno_name(errno)} ({os.strerror(errno)})"
        if detail:
            text += f": {detail}"
        super().__init__(errno, text)
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[VfioError], tuple[Any, ...]]:
        return (type(self), (self.errno or 0, self.op, self.detail))


class OpenError(VfioError):
    """open() of a device node failed."""


class IommufdError(VfioError):
    """An IOMMU_* ioctl on /dev/iommu failed."""


class IoasError(IommufdError):
    """An IOAS operation failed."""


class HwptError(IommufdError):
    """A HW page table operation failed."""


class DeviceError(VfioError):
    """A VFIO device ioctl failed."""


class MigrationError(DeviceError):
    """A migration feature of a VFIO device failed."""


class MigrationStateError(MigrationError):
    """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE failed.

    ``requested`` is the state asked for (None for GET). The kernel never reports where a
    failed SET stopped; ``current`` holds the state a follow-up GET found, or None when that
    GET failed too (a device in ERROR answers GET normally).
    """

    def __init__(
        self,
        errno: int,
        op: str,
        detail: str = "",
        *,
        requested: int | None = None,
        current: int | None = None,
    ) -> None:
        super().__init__(errno, op, detail)
        self.requested = requested
        self.current = current


class MigrationDataError(MigrationError):
    """read / write / VFIO_MIG_GET_PRECOPY_INFO on a migration data fd failed."""


class DmaLoggingError(DeviceError):
    """Device DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*) failed."""


class ContainerError(VfioError):
    """A legacy VFIO container (type1) ioctl failed."""


class GroupError(ContainerError):
    """A legacy VFIO group ioctl failed."""


class ClosedError(VfioError, ValueError):
    """An operation on a handle whose object is gone: an fd the library closed (EBADF), an
    iommufd object destroyed or whose iommufd was closed (ENOENT), user memory unmapped
    (EFAULT). Refused before any syscall: the number it held may name another object now."""


class ArgumentError(VfioError, ValueError):
    """An integer that does not fit the C field it is for (ERANGE): ctypes would silently
    truncate it (an IOVA of 2^64 would become 0). Refused before any syscall; ``field`` is
    the struct member's name."""

    def __init__(self, op: str, field: str, detail: str) -> None:
        super().__init__(_errno.ERANGE, op, detail)
        self.field = field

    def __reduce__(self) -> tuple[type[VfioError], tuple[Any, ...]]:
        return (type(self), (self.op, self.field, self.detail))


def call(cls: type[VfioError], op: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run one syscall; an ``OSError`` with an errno comes back as ``cls(errno, op)``."""
    try:
        return fn(*args, **kwargs)
    except VfioError:
        raise
    except OSError as e:
        if e.errno is None:
            raise
        raise cls(e.errno, op) from e
