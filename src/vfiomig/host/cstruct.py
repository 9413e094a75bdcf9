"""C structs filled from Python ints without ctypes' silent truncation.

ctypes stores ``2**64`` into a ``__u64`` as 0 and ``-1`` as ``2**64 - 1``, so a caller's
out-of-range IOVA would reach the kernel as a different, valid-looking one. Every struct the
library fills from a caller's value goes through :func:`fill`, which refuses a value that
does not fit its field with :class:`ArgumentError` (naming the operation, the struct member
and its C type) before any syscall, and a value that is not an integer with ``TypeError``.
"""

from __future__ import annotations

import ctypes
import functools
import operator
from typing import Any, TypeVar

from vfiomig.host.errors import ArgumentError

T = TypeVar("T", bound=ctypes.Structure)

ULONG_MAX = (1 << 64) - 1  # an ioctl's third argument is an unsigned long (64-bit)


@functools.cache
def _int_fields(cls: type[ctypes.Structure]) -> dict[str, type[Any]]:
    """Member name -> ctypes integer type, anonymous unions and structs flattened."""
    out: dict[str, type[Any]] = {}
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype, *_ in cls._fields_:
        if name in anonymous:
            out.update(_int_fields(ctype))
        elif getattr(ctype, "_type_", None) in tuple("bBhHiIlLqQ?"):
            out[name] = ctype
    return out


def c_range(ctype: type[Any]) -> tuple[int, int, str]:
    """(lowest, highest, C spelling) of a ctypes integer type."""
    bits = ctypes.sizeof(ctype) * 8
    if ctype._type_ == "?":
        return 0, 1, "bool"
    if ctype._type_.islower():  # b h i l q: signed
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1, f"__s{bits}"
    return 0, (1 << bits) - 1, f"__u{bits}"


def check_int(op: str, name: str, value: Any, lo: int, hi: int, cname: str) -> int:
    """``value`` as an int in [lo, hi], else ArgumentError / TypeError naming ``name``."""
    try:
        value = operator.index(value)  # ints, bools, numpy integers; not floats or strings
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        shown = f"{value:#x}" if value >= 0 else str(value)
        raise ArgumentError(op, name, f"{name}={shown} does not fit {cname}")
    return int(value)


def fill(cls: type[T], op: str, /, **fields: Any) -> T:
    """``cls(**fields)`` once every integer field is known to fit its C type."""
    types = _int_fields(cls)
    for name, value in fields.items():
        ctype = types.get(name)
        if ctype is not None:
            lo, hi, cname = c_range(ctype)
            fields[name] = check_int(op, f"{cls.__name__}.{name}", value, lo, hi, cname)
    return cls(**fields)


def ulong_arg(op: str, name: str, value: Any) -> int:
    """An ioctl argument passed by value (``unsigned long`` in the kernel)."""
    return check_int(op, name, value, 0, ULONG_MAX, "unsigned long")
