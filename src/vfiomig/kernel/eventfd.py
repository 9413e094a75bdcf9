"""eventfd(2) in the model kernel (fs/eventfd.c), and the kernel side VFIO uses.

An eventfd is a 64-bit counter behind a file. The kernel side is `EventfdCtx` (struct
eventfd_ctx): drivers hold it after `eventfd_ctx_fdget(fd)` and keep it past the fd's close
(the ctx is reference counted in the kernel; here the Python object simply lives on).
`eventfd_signal` adds 1 (saturating at ULLONG_MAX, eventfd_signal_mask); `waiters` stand for
the ctx's wait queue: callbacks a kernel user (VFIO's virqfd) registered with vfs_poll, called
with EPOLLIN when the count is raised and EPOLLHUP when the file is released
(eventfd_release -> wake_up_poll(&ctx->wqh, EPOLLHUP)).

The model has one thread: a read of a zero counter or a write that would overflow cannot
block, so without EFD_NONBLOCK they answer EAGAIN too, as the O_NONBLOCK path does.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from errno import EAGAIN, EBADF, EINVAL

from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File

ULLONG_MAX = (1 << 64) - 1
EFD_SEMAPHORE = 1  # include/linux/eventfd.h
EFD_CLOEXEC = os.O_CLOEXEC
EFD_NONBLOCK = os.O_NONBLOCK
EFD_FLAGS_SET = EFD_SEMAPHORE | EFD_CLOEXEC | EFD_NONBLOCK  # EFD_SHARED_FCNTL_FLAGS | SEMAPHORE
EPOLLIN = select.POLLIN
EPOLLOUT = select.POLLOUT
EPOLLERR = select.POLLERR
EPOLLHUP = select.POLLHUP
_U64 = struct.Struct("<Q")

Waiter = Callable[[int], None]


class EventfdCtx:
    """struct eventfd_ctx: the counter and its wait queue."""

    def __init__(self, count: int, flags: int) -> None:
        self.count = count
        self.flags = flags
        self.waiters: list[Waiter] = []
        self.signals = 0  # how many times eventfd_signal ran (for tests: interrupts seen)

    def wake(self, events: int) -> None:
        """wake_up_locked_poll: every waiter sees the event (a copy: waiters may leave)."""
        for w in list(self.waiters):
            w(events)

    def signal(self) -> None:
        """eventfd_signal (fs/eventfd.c eventfd_signal_mask): count + 1, saturating."""
        self.signals += 1
        if self.count < ULLONG_MAX:
            self.count += 1
        self.wake(EPOLLIN)

    def do_read(self) -> int:
        """eventfd_ctx_do_read: take the whole count (1 in semaphore mode)."""
        cnt = 1 if self.flags & EFD_SEMAPHORE else self.count
        self.count -= cnt
        return cnt

    def poll(self) -> int:
        """eventfd_poll: readable while count > 0, writable below ULLONG_MAX - 1."""
        events = 0
        if self.count > 0:
            events |= EPOLLIN
        if self.count == ULLONG_MAX:
            events |= EPOLLERR
        if ULLONG_MAX - 1 > self.count:
            events |= EPOLLOUT
        return events


class EventfdFile(File):
    """The anon-inode file of an eventfd (eventfd_fops)."""

    def __init__(self, ctx: EventfdCtx, flags: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.nonblock = bool(flags & EFD_NONBLOCK)

    def read(self, n: int) -> bytes:
        """eventfd_read: fewer than 8 bytes EINVAL; zero count EAGAIN (see module doc)."""
        if n < 8:
            raise err(EINVAL)
        if self.ctx.count == 0:
            raise err(EAGAIN)
        cnt = self.ctx.do_read()
        self.ctx.wake(EPOLLOUT)
        return _U64.pack(cnt)

    def write(self, data: bytes) -> int:
        """eventfd_write: fewer than 8 bytes or the value ULLONG_MAX EINVAL; a sum that
        would reach ULLONG_MAX EAGAIN; only the first 8 bytes count."""
        if len(data) < 8:
            raise err(EINVAL)
        ucnt = _U64.unpack_from(data)[0]
        if ucnt == ULLONG_MAX:
            raise err(EINVAL)
        if ULLONG_MAX - self.ctx.count <= ucnt:
            raise err(EAGAIN)
        self.ctx.count += ucnt
        self.ctx.wake(EPOLLIN)  # even for 0: a waiter (virqfd) runs its handler
        return 8

    def llseek(self, offset: int, whence: int) -> int:
        return 0  # noop_llseek: the position never moves

    def poll(self, events: int) -> int:
        return self.ctx.poll() & (events | EPOLLERR | EPOLLHUP)

    def release(self) -> None:
        """eventfd_release: waiters see EPOLLHUP; kernel users keep their ctx."""
        self.ctx.wake(EPOLLHUP)


def eventfd_create(initval: object, flags: object) -> EventfdFile:
    """do_eventfd: flags other than EFD_SEMAPHORE | EFD_CLOEXEC | EFD_NONBLOCK are EINVAL.
    `initval` is the syscall's unsigned int (an int wraps to 32 bits, as in C)."""
    if not isinstance(initval, int) or not isinstance(flags, int):
        raise err(EINVAL)
    if flags & ~EFD_FLAGS_SET:
        raise err(EINVAL)
    return EventfdFile(EventfdCtx(initval & 0xFFFFFFFF, flags), flags)


def eventfd_ctx_fileget(f: File) -> EventfdCtx:
    """eventfd_ctx_fileget: a file that is not an eventfd is EINVAL."""
    if not isinstance(f, EventfdFile):
        raise err(EINVAL)
    return f.ctx


def eventfd_ctx_fdget(files: dict[int, File], fd: int) -> EventfdCtx:
    """eventfd_ctx_fdget: no such fd EBADF, another kind of file EINVAL."""
    f = files.get(fd)
    if f is None:
        raise err(EBADF)
    return eventfd_ctx_fileget(f)
