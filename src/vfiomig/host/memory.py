"""User memory the kernel reaches through pointers inside ioctl structs.

Several VFIO / iommufd ioctls carry a *pointer* (an array of IOVA ranges, a dirty bitmap, a
HW-info blob, the memory an IOAS maps). On a real kernel that pointer is an address in this
process; on the model it is an address from ``ModelKernel.mmap``. A :class:`UserBuffer` is
such a range of memory, whichever transport handed it out: ``addr`` is what goes into the
struct, ``array`` is a writable numpy view of its bytes (``None`` for the model's unbacked
address space, which has no bytes behind it).

:class:`Scratch` keeps a few named, reusable buffers per object, so that a migration loop
that asks for a dirty bitmap hundreds of times does not map new memory each time.
"""

from __future__ import annotations

from collections.abc import Callable
from errno import EFAULT

import numpy as np
import numpy.typing as npt

from vfiomig.host.errors import VfioError, call
from vfiomig.host.resource import Resource

PAGE_SIZE = 4096


class UserBuffer(Resource):
    """A range ``[addr, addr + length)`` of user memory; a context manager that unmaps it.
    Once unmapped it refuses use (ClosedError, EFAULT): its address may be reused."""

    _closed_errno = EFAULT

    def __init__(
        self,
        addr: int,
        length: int,
        array: npt.NDArray[np.uint8] | None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.addr = addr
        self.length = length
        self._array = array
        self._unmap = release

    @property
    def backed(self) -> bool:
        return self._array is not None

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """Writable numpy view of the bytes (ValueError for unbacked memory)."""
        self._check_open("user memory access")
        if self._array is None:
            raise ValueError(f"user memory at {self.addr:#x} is unbacked (no bytes behind it)")
        return self._array

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        end = self.length if n is None else offset + n
        self._check(offset, end)
        return self.array[offset:end].tobytes()

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self._check(offset, offset + len(data))
        self.array[offset : offset + len(data)] = np.frombuffer(bytes(data), dtype=np.uint8)

    def zero(self, n: int | None = None) -> None:
        """Zero the first ``n`` bytes (all of them by default)."""
        end = self.length if n is None else n
        self._check(0, end)
        self.array[:end] = 0

    def words(self, nbytes: int) -> npt.NDArray[np.uint64]:
        """A copy of the first ``nbytes`` (a multiple of 8) as little-endian u64 words."""
        self._check(0, nbytes)
        return self.array[:nbytes].copy().view("<u8").astype(np.uint64, copy=False)

    def _check(self, start: int, end: int) -> None:
        if start < 0 or end < start or end > self.length:
            raise ValueError(f"range [{start}, {end}) outside a {self.length}-byte user buffer")

    def _release(self) -> None:
        self._array = None
        if self._unmap is not None:
            self._unmap()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("backed" if self.backed else "unbacked")
        return f"UserBuffer(addr={self.addr:#x}, length={self.length}, {state})"


def user_range(
    user: UserBuffer | int, length: int | None, what: str, op: str
) -> tuple[int, int]:
    """(address, length) of what a map call was given: a whole buffer, a part of one
    (``length``), or a raw address with ``length`` (``what`` names that argument). A buffer
    already unmapped is refused (ClosedError): its address may hold other memory now."""
    if isinstance(user, UserBuffer):
        user._check_open(op)
        return user.addr, user.length if length is None else length
    if length is None:
        raise ValueError(f"{what} is required when mapping a raw address")
    return user, length


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Scratch:
    """Named user buffers reused across calls; grown (never shrunk) on demand."""

    def __init__(self, mmap: Callable[[int], UserBuffer]) -> None:
        self._mmap = mmap
        self._bufs: dict[str, UserBuffer] = {}

    def get(self, name: str, n: int, *, zero: bool = True) -> UserBuffer:
        """A buffer of at least ``n`` bytes (zeroed entirely unless ``zero=False``)."""
        n = max(n, 1)
        buf = self._bufs.get(name)
        if buf is None or buf.closed or buf.length < n:
            if buf is not None:
                buf.close()
            size = _round_up(n, PAGE_SIZE)
            buf = call(VfioError, f"mmap({size:#x})", self._mmap, size)
            self._bufs[name] = buf
        elif zero:
            buf.zero()
        return buf

    def close(self) -> None:
        for buf in self._bufs.values():
            buf.close()
        self._bufs.clear()
