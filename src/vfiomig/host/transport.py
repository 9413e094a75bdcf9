"""How the library reaches a kernel: a handful of syscalls on integers and buffers.

Everything in ``vfiomig.host`` talks to the kernel only through a :class:`Transport`, exactly
as a C program talks to Linux: ``open`` a node, ``ioctl`` with a mutable argument buffer,
``read`` / ``write`` / ``lseek`` / ``poll`` / ``close`` an fd, and ``mmap`` anonymous memory
for the pointers inside structs. Two transports exist:

* :class:`LinuxTransport` drives the running kernel. Every raw syscall it makes goes through
  one small seam object, :class:`Syscalls`; tests hand it a recording fake and check the exact
  request numbers and argument bytes without any hardware.
* :class:`ModelTransport` drives a :class:`vfiomig.kernel.ModelKernel` through its syscall
  surface (``k.open`` / ``k.ioctl`` / ``k.read`` / ...), never its objects.

An ioctl argument is a ``bytearray`` or a ctypes object and is mutated in place, as
``fcntl.ioctl(fd, request, buf, True)`` does; an ``int`` argument is passed by value.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap as _mmap
import os
import select
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vfiomig.host.memory import UserBuffer

IoctlArg = bytearray | ctypes.Structure | ctypes.Union | ctypes.Array[Any] | int

POLLIN = select.POLLIN

# Where the kernel keeps what this library opens (the same on every Linux).
IOMMUFD_PATH = "/dev/iommu"
VFIO_CONTAINER_PATH = "/dev/vfio/vfio"
VFIO_DIR = "/dev/vfio"
VFIO_DEVICES_DIR = "/dev/vfio/devices"


@runtime_checkable
class Transport(Protocol):
    """The syscalls the library needs, on fds and user memory of one process."""

    name: str

    def open(self, path: str, flags: int = os.O_RDWR) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int: ...

    def read(self, fd: int, n: int) -> bytes: ...

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int: ...

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int: ...

    def poll(self, fd: int, events: int = POLLIN, timeout_ms: int = 0) -> int:
        """Ready events of ``fd`` (0 when none within ``timeout_ms``)."""
        ...

    def mmap(self, length: int, *, backed: bool = True) -> UserBuffer:
        """Anonymous read/write user memory; ``addr`` goes into struct pointer fields."""
        ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]:
        """Names in a directory of device nodes (empty when it does not exist)."""
        ...

    def describe(self, path: str) -> dict[str, str]:
        """What the host says about a device node beyond its uAPI (sysfs on Linux)."""
        ...


# --------------------------------------------------------------------------------------
# Linux


class Syscalls:
    """The seam: every raw syscall LinuxTransport makes, and nothing else.

    Replace it with a fake (same methods) to test the library's exact ioctl traffic.
    """

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg) -> int:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        # mutate_flag=True: the kernel writes straight into the caller's buffer.
        return int(fcntl.ioctl(fd, request, arg, True))

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        return os.lseek(fd, offset, whence)

    def poll(self, fd: int, events: int, timeout_ms: int) -> int:
        p = select.poll()
        p.register(fd, events)
        ready = p.poll(timeout_ms)
        return int(ready[0][1]) if ready else 0

    def mmap(self, length: int) -> UserBuffer:
        m = _mmap.mmap(-1, length, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS)
        probe = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(probe)
        del probe  # release the export, or the mapping could never be closed
        array = np.frombuffer(m, dtype=np.uint8)

        def release() -> None:
            nonlocal array
            del array
            try:
                m.close()
            except BufferError:
                pass  # a caller still holds a view: the mapping goes when that view does

        return UserBuffer(addr, length, array, release)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)


class LinuxTransport:
    """The running Linux kernel (fcntl.ioctl on /dev/iommu and /dev/vfio/...)."""

    name = "linux"

    def __init__(self, syscalls: Syscalls | None = None) -> None:
        self.sys = syscalls if syscalls is not None else Syscalls()

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        return self.sys.open(path, flags)

    def close(self, fd: int) -> None:
        self.sys.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        return self.sys.ioctl(fd, request, arg)

    def read(self, fd: int, n: int) -> bytes:
        return self.sys.read(fd, n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return self.sys.write(fd, data)

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.sys.lseek(fd, offset, whence)

    def poll(self, fd: int, events: int = POLLIN, timeout_ms: int = 0) -> int:
        return self.sys.poll(fd, events, timeout_ms)

    def mmap(self, length: int, *, backed: bool = True) -> UserBuffer:
        if length <= 0:
            raise ValueError(f"mmap length must be positive, got {length}")
        # A real process has no unbacked memory: `backed` only matters on the model.
        return self.sys.mmap(length)

    def exists(self, path: str) -> bool:
        return self.sys.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(self.sys.listdir(path), key=_natural_key)

    def describe(self, path: str) -> dict[str, str]:
        """PCI address and bound driver of a VFIO cdev, from /sys/class/vfio-dev/vfioN."""
        name = os.path.basename(path)
        if not name.startswith("vfio") or not name[4:].isdigit():
            return {}
        dev = self.sys.realpath(f"/sys/class/vfio-dev/{name}/device")
        out: dict[str, str] = {}
        if dev.startswith("/sys/"):
            out["sysfs"] = dev
            out["address"] = os.path.basename(dev)
            drv = self.sys.realpath(f"{dev}/driver")
            if drv != f"{dev}/driver":
                out["driver"] = os.path.basename(drv)
        return out


# --------------------------------------------------------------------------------------
# Model


class ModelTransport:
    """A :class:`vfiomig.kernel.ModelKernel`, through its syscall surface only."""

    name = "model"

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        return int(self.kernel.open(path, flags))

    def close(self, fd: int) -> None:
        self.kernel.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        return int(self.kernel.ioctl(fd, request, arg))

    def read(self, fd: int, n: int) -> bytes:
        return bytes(self.kernel.read(fd, n))

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return int(self.kernel.write(fd, data))

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        return int(self.kernel.lseek(fd, offset, whence))

    def poll(self, fd: int, events: int = POLLIN, timeout_ms: int = 0) -> int:
        # The model never blocks (a read or write answers at once: data, 0 or an errno), so
        # there is nothing to wait for: ModelKernel.poll(fd, events) takes no timeout.
        return int(self.kernel.poll(fd, events))

    def mmap(self, length: int, *, backed: bool = True) -> UserBuffer:
        if length <= 0:
            raise ValueError(f"mmap length must be positive, got {length}")
        addr, mem = self.kernel.mmap(length, backed)
        return UserBuffer(int(addr), length, mem, lambda: self.kernel.munmap(addr))

    # The model's device namespace: the paths ModelKernel.open() accepts.
    def _paths(self) -> list[str]:
        k = self.kernel
        return [*k.devices, *k.groups, *k.chrdevs]

    def exists(self, path: str) -> bool:
        path = path.rstrip("/")
        return any(p == path or p.startswith(path + "/") for p in self._paths())

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix) :].split("/", 1)[0] for p in self._paths() if p.startswith(prefix)}
        return sorted(names, key=_natural_key)

    def describe(self, path: str) -> dict[str, str]:
        return {}


def _natural_key(name: str) -> tuple[str, int]:
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return (head, int(tail) if tail else -1)
