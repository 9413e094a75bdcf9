"""The few integer limits and bit helpers the kernel code shares (include/linux/limits.h,
include/asm-generic/bitops/__ffs.h). The model is a 64-bit kernel: unsigned long is u64."""

from __future__ import annotations

U64_MAX = (1 << 64) - 1
ULONG_MAX = U64_MAX


def __ffs(x: int) -> int:
    """Index of the lowest set bit; x must be non-zero (undefined in the kernel otherwise)."""
    return (x & -x).bit_length() - 1
