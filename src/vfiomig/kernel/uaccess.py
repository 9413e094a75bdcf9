"""copy_from_user / copy_to_user for ioctl arguments and for pointers inside them.

An ioctl argument arrives as the caller's own buffer (a ctypes object or a bytearray), the
same object fcntl.ioctl(fd, req, buf, True) would take, and is mutated in place. Reading or
writing past its end is what a real kernel sees as touching unmapped memory: EFAULT.
Pointers *inside* structs are addresses of user memory from ModelKernel.mmap (vfiomig.hw.memory);
anything else is EFAULT too.

Under `vfiomig run` the argument is a C program's pointer instead: `UserPtr` is the same
interface over an address of the kernel's Memory (then a ProcessMemory, the program's own
memory), read and written as copy_from_user / copy_to_user do, with no length known up front.
"""

from __future__ import annotations

import ctypes
import struct
from errno import E2BIG, EFAULT, EINVAL
from typing import TypeVar

from vfiomig.hw.memory import PAGE_SIZE, TASK_SIZE_MAX, Memory
from vfiomig.kernel.errors import err

T = TypeVar("T", bound=ctypes.Structure)


def user_buffer(data: object) -> bytes:
    """The bytes of a write(2) buffer: any object with the buffer protocol; anything else
    is not a pointer to user memory (EFAULT)."""
    try:
        return memoryview(data).tobytes()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise err(EFAULT) from None


class UserArg:
    """The user buffer an ioctl's `arg` points at."""

    def __init__(self, arg: object) -> None:
        # Any writable buffer fcntl.ioctl(fd, req, buf, True) accepts: bytearray, a ctypes
        # struct, union, array or simple type (c_int32 for VFIO_GROUP_SET_CONTAINER), numpy.
        # Anything that is not one contiguous buffer (None, a str, a strided numpy view, a
        # released memoryview) is no pointer to user memory: EFAULT, as for a bad address.
        try:
            mv = memoryview(arg)  # type: ignore[arg-type]
            if mv.readonly:
                # fcntl.ioctl(fd, req, b"...") copies immutable input into a scratch buffer:
                # the kernel reads it, and what it writes back never reaches the caller.
                mv = memoryview(bytearray(mv))
            self.mv = mv.cast("B")
        except (TypeError, ValueError):
            raise err(EFAULT) from None  # an int is passed through as a value, never here
        self.len = len(self.mv)

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > self.len:
            raise err(EFAULT)
        return bytes(self.mv[off : off + n])

    def write(self, off: int, data: bytes | bytearray) -> None:
        if off < 0 or off + len(data) > self.len:
            raise err(EFAULT)
        self.mv[off : off + len(data)] = data

    def strndup(self, n: int) -> str:
        """strndup_user(arg, n) (mm/util.c): EFAULT if the string runs into unreadable
        memory before its NUL, EINVAL if there is no NUL within n bytes."""
        window = bytes(self.mv[: min(self.len, n)])
        nul = window.find(b"\0")
        if nul < 0:
            raise err(EFAULT if self.len < n else EINVAL)
        return window[:nul].decode("latin-1")

    def u32(self, off: int = 0) -> int:
        return int(struct.unpack_from("<I", self.read(off, 4))[0])

    def get(self, cls: type[T], off: int = 0, size: int | None = None) -> T:
        """copy_from_user of a struct; with `size` < sizeof, the missing tail reads as zero."""
        n = ctypes.sizeof(cls)
        raw = self.read(off, n if size is None else min(size, n))
        return cls.from_buffer_copy(raw.ljust(n, b"\0"))

    def put(self, obj: ctypes.Structure, off: int = 0, size: int | None = None) -> None:
        """copy_to_user of the first `size` bytes of a struct (all of it by default)."""
        raw = bytes(obj)
        self.write(off, raw if size is None else raw[: min(size, len(raw))])

    def copy_struct(self, cls: type[T], usize: int, minsz: int) -> T:
        """copy_struct_from_user() as iommufd uses it: size-first framing.

        usize < minsz is EINVAL; a larger struct than the kernel knows is accepted only when
        every extra byte is zero (E2BIG otherwise); a shorter one reads as zero-extended.
        (include/linux/uaccess.h copy_struct_from_user, drivers/iommu/iommufd/main.c)
        """
        if usize < minsz:
            raise err(EINVAL)
        ksize = ctypes.sizeof(cls)
        if usize > ksize and any(self.read(ksize, usize - ksize)):
            raise err(E2BIG)
        return self.get(cls, 0, min(usize, ksize))


class UserPtr(UserArg):
    """An ioctl's `arg` that is an address in user memory `mm` (a C program's pointer under
    `vfiomig run`), not a buffer: every access is copy_{from,to}_user at addr + off, EFAULT
    where the memory is not there. Nothing is read before the handler asks, as in the
    kernel, so the struct's size need not be known."""

    def __init__(self, mm: Memory, addr: int) -> None:
        self.mm = mm
        self.addr = addr
        self.len = TASK_SIZE_MAX  # the handler's own size checks come first, as in C

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or n < 0:
            raise err(EFAULT)
        return user_read(self.mm, self.addr + off, n)

    def write(self, off: int, data: bytes | bytearray) -> None:
        if off < 0:
            raise err(EFAULT)
        user_write(self.mm, self.addr + off, bytes(data))

    def u32(self, off: int = 0) -> int:
        """get_user of a u32 (the size word of an iommufd command): not a copy_from_user,
        so fail_usercopy does not reach it."""
        if off < 0:
            raise err(EFAULT)
        return int(struct.unpack_from("<I", self.mm.read(self.addr + off, 4))[0])

    def strndup(self, n: int) -> str:
        """strndup_user: read up to the NUL a page at a time (strnlen_user stops at the
        first unreadable byte), so a short string at the end of a mapping works."""
        out = bytearray()
        addr = self.addr
        while len(out) < n:
            chunk = min(n - len(out), PAGE_SIZE - addr % PAGE_SIZE)
            if not access_ok(addr, chunk):
                raise err(EFAULT)
            part = self.mm.read(addr, chunk)  # EFAULT: unreadable before the NUL
            nul = part.find(b"\0")
            if nul >= 0:
                return (out + part[:nul]).decode("latin-1")
            out += part
            addr += chunk
        raise err(EINVAL)


def access_ok(addr: int, size: int) -> bool:
    """access_ok(): the range lies below TASK_SIZE_MAX. Above it are kernel addresses (the
    model's pinned file pages, hw/memory.py KERNEL_BASE), never reached through a pointer."""
    return 0 <= addr and addr + size <= TASK_SIZE_MAX


def _usercopy_fails(mm: Memory) -> bool:
    """should_fail_usercopy() (lib/fault-inject-usercopy.c): under fail-nth, a copy can
    fail as a whole (fault_inject.py)."""
    from vfiomig.kernel.fault_inject import should_fail

    return should_fail(mm, "fail_usercopy")


def user_read(mm: Memory, addr: int, n: int) -> bytes:
    """copy_from_user through a pointer field."""
    if n == 0:
        return b""
    # _inline_copy_from_user: the usercopy fault point (should_fail_usercopy), then
    # access_ok (or the masked user address, which faults the same way), then the copy
    if _usercopy_fails(mm) or not access_ok(addr, n):
        raise err(EFAULT)
    return mm.read(addr, n)


def user_write(mm: Memory, addr: int, data: bytes) -> None:
    """copy_to_user through a pointer field."""
    if data:
        # _inline_copy_to_user: should_fail_usercopy, then access_ok, then the copy
        if _usercopy_fails(mm) or not access_ok(addr, len(data)):
            raise err(EFAULT)
        mm.write(addr, data)
