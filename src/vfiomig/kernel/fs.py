"""Open files and the fd table of the one modelled process (fs/file.c, fs/read_write.c)."""

from __future__ import annotations

import os
import select
from errno import EBADF, EINVAL, EMFILE, ENODEV, ENOTTY, ESPIPE
from typing import TYPE_CHECKING

from vfiomig.kernel.errors import err
from vfiomig.kernel.uaccess import UserArg

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory, Region

# RLIMIT_NOFILE of a typical process; a leak shows up as EMFILE rather than unbounded growth.
NR_OPEN_DEFAULT = 1024
DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM


class File:
    """struct file: what an fd refers to. Subclasses implement the file_operations they have.

    A missing operation answers as the VFS does: no ->read or ->write is EINVAL, except that
    a file opened without that access mode is EBADF (checked in fs/read_write.c vfs_read /
    vfs_write before the op); no ->unlocked_ioctl is ENOTTY; stream files have no llseek
    (ESPIPE).
    """

    readable = True
    writable = True

    def __init__(self) -> None:
        self.refs = 0  # number of fds pointing here; release() runs when it drops to 0

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        raise err(ENOTTY)

    def read(self, n: int) -> bytes:
        raise err(EINVAL)

    def write(self, data: bytes) -> int:
        raise err(EINVAL)

    def llseek(self, offset: int, whence: int) -> int:
        raise err(ESPIPE)

    def pread(self, n: int, offset: int) -> bytes:
        """pread(2) at `offset`. By default a file without positional I/O of its own is read
        after llseek (stream files: ESPIPE, as ksys_pread64 without FMODE_PREAD)."""
        self.llseek(offset, os.SEEK_SET)
        return self.read(n)

    def pwrite(self, data: bytes, offset: int) -> int:
        """pwrite(2) at `offset`, like pread."""
        self.llseek(offset, os.SEEK_SET)
        return self.write(data)

    def mmap(self, mm: Memory, size: int, offset: int) -> Region:
        """->mmap of a MAP_SHARED mapping of `size` bytes at file `offset`; no op: ENODEV
        (do_mmap)."""
        raise err(ENODEV)

    def poll(self, events: int) -> int:
        """vfs_poll without a ->poll op: DEFAULT_POLLMASK (in, out, rdnorm, wrnorm)."""
        return events & DEFAULT_POLLMASK

    def release(self) -> None:
        """The last fd to this file was closed."""


class FdTable:
    def __init__(self, limit: int = NR_OPEN_DEFAULT) -> None:
        self.files: dict[int, File] = {}
        self.limit = limit

    def get_unused_fd(self) -> int:
        """Lowest free fd number, as get_unused_fd_flags() picks (0-2 are the stdio fds)."""
        fd = 3
        while fd in self.files:
            fd += 1
        if fd >= self.limit:
            raise err(EMFILE)
        return fd

    def fd_install(self, fd: int, file: File) -> None:
        """Point a reserved fd (get_unused_fd) at `file`."""
        self.files[fd] = file
        file.refs += 1

    def install(self, file: File) -> int:
        fd = self.get_unused_fd()
        self.fd_install(fd, file)
        return fd

    def get(self, fd: int) -> File:
        f = self.files.get(fd) if isinstance(fd, int) else None
        if f is None:
            raise err(EBADF)
        return f

    def close(self, fd: int) -> None:
        f = self.get(fd)
        del self.files[fd]
        f.refs -= 1
        if f.refs == 0:
            f.release()
