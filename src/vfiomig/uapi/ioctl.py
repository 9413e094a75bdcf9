"""ioctl request-number encoders, as in Linux include/uapi/asm-generic/ioctl.h.

This is the generic layout used by x86-64 and arm64: nr in bits 0-7, type in
bits 8-15, size in bits 16-29 and direction in bits 30-31. (Alpha, MIPS, PowerPC
and SPARC use other widths; they are not supported here.)
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Anything ctypes.sizeof accepts as a type; the C macros take a type here.
    _CType = type[ctypes.Structure | ctypes.Union | ctypes.Array[Any] | ctypes._SimpleCData[Any]]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

IOC_IN = _IOC_WRITE << _IOC_DIRSHIFT
IOC_OUT = _IOC_READ << _IOC_DIRSHIFT
IOC_INOUT = (_IOC_WRITE | _IOC_READ) << _IOC_DIRSHIFT
IOCSIZE_MASK = _IOC_SIZEMASK << _IOC_SIZESHIFT
IOCSIZE_SHIFT = _IOC_SIZESHIFT


def _field(name: str, value: int, mask: int) -> int:
    # The C macros silently truncate; an out-of-range field is always a bug here.
    if not 0 <= value <= mask:
        raise ValueError(f"ioctl {name} {value:#x} does not fit in {mask.bit_length()} bits")
    return value


def _type_code(type_: int | str) -> int:
    # C passes a char literal such as ';', which is just its code point.
    if isinstance(type_, str):
        if len(type_) != 1:
            raise ValueError(f"ioctl type must be a single character, got {type_!r}")
        return ord(type_)
    return type_


def _size_of(size: int | _CType) -> int:
    return size if isinstance(size, int) else ctypes.sizeof(size)


def _IOC(dir: int, type_: int | str, nr: int, size: int) -> int:
    """Pack direction, type, number and argument size into a request number."""
    return (
        (_field("dir", dir, _IOC_DIRMASK) << _IOC_DIRSHIFT)
        | (_field("type", _type_code(type_), _IOC_TYPEMASK) << _IOC_TYPESHIFT)
        | (_field("nr", nr, _IOC_NRMASK) << _IOC_NRSHIFT)
        | (_field("size", size, _IOC_SIZEMASK) << _IOC_SIZESHIFT)
    )


def _IO(type_: int | str, nr: int) -> int:
    """Request without an encoded argument size (what every VFIO/IOMMUFD ioctl uses)."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int | str, nr: int, size: int | _CType) -> int:
    """Kernel-to-user request; ``size`` is a byte count or a ctypes type."""
    return _IOC(_IOC_READ, type_, nr, _size_of(size))


def _IOW(type_: int | str, nr: int, size: int | _CType) -> int:
    """User-to-kernel request; ``size`` is a byte count or a ctypes type."""
    return _IOC(_IOC_WRITE, type_, nr, _size_of(size))


def _IOWR(type_: int | str, nr: int, size: int | _CType) -> int:
    """Bidirectional request; ``size`` is a byte count or a ctypes type."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size_of(size))


def _IOC_DIR(nr: int) -> int:
    return (nr >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(nr: int) -> int:
    return (nr >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(nr: int) -> int:
    return (nr >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(nr: int) -> int:
    return (nr >> _IOC_SIZESHIFT) & _IOC_SIZEMASK
