"""drivers/vfio/virqfd.c: run a handler when userspace signals an eventfd.

vfio_virqfd_enable registers on the eventfd's wait queue (vfs_poll). When the count is raised
(EPOLLIN) the wakeup reads the count (eventfd_ctx_do_read) and calls `handler`; a non-zero
result (or no handler) runs `thread` (the kernel queues it on a workqueue; the model runs it
at once). An event already pending at enable runs the handler too, without consuming the
count. Closing the eventfd (EPOLLHUP) deactivates the virqfd: the owner's slot is cleared.
"""

from __future__ import annotations

from collections.abc import Callable
from errno import EBADF, EBUSY

from vfiomig.kernel.errors import err
from vfiomig.kernel.eventfd import EPOLLHUP, EPOLLIN, EventfdCtx, eventfd_ctx_fileget
from vfiomig.kernel.fs import File


class Virqfd:
    """struct virqfd, kept in a `VirqfdSlot` (the driver's `struct virqfd **pvirqfd`)."""

    def __init__(
        self,
        slot: VirqfdSlot,
        ctx: EventfdCtx,
        handler: Callable[[], bool] | None,
        thread: Callable[[], None] | None,
    ) -> None:
        self.slot = slot
        self.ctx = ctx
        self.handler = handler
        self.thread = thread

    def fire(self) -> None:
        if (self.handler is None or self.handler()) and self.thread is not None:
            self.thread()  # schedule_work(&virqfd->inject)

    def wakeup(self, events: int) -> None:
        """virqfd_wakeup."""
        if events & EPOLLIN:
            self.ctx.do_read()
            self.fire()
        if events & EPOLLHUP and self.slot.virqfd is self:
            self.slot.virqfd = None
            self.shutdown()

    def shutdown(self) -> None:
        """virqfd_shutdown: off the wait queue."""
        if self.wakeup in self.ctx.waiters:
            self.ctx.waiters.remove(self.wakeup)


class VirqfdSlot:
    """A `struct virqfd *` a driver owns (ctx->unmask, ioeventfd->virqfd)."""

    def __init__(self) -> None:
        self.virqfd: Virqfd | None = None


def vfio_virqfd_enable(
    files: dict[int, File],
    slot: VirqfdSlot,
    fd: int,
    handler: Callable[[], bool] | None,
    thread: Callable[[], None] | None,
) -> None:
    """vfio_virqfd_enable: no such fd EBADF, not an eventfd EINVAL, slot in use EBUSY."""
    f = files.get(fd)
    if f is None:
        raise err(EBADF)
    ctx = eventfd_ctx_fileget(f)
    if slot.virqfd is not None:
        raise err(EBUSY)
    virqfd = Virqfd(slot, ctx, handler, thread)
    slot.virqfd = virqfd
    ctx.waiters.append(virqfd.wakeup)
    if ctx.poll() & EPOLLIN:  # an event pending before we registered
        virqfd.fire()


def vfio_virqfd_disable(slot: VirqfdSlot) -> None:
    """vfio_virqfd_disable."""
    if slot.virqfd is not None:
        slot.virqfd.shutdown()
        slot.virqfd = None
