"""FAULT objects and their fds, and IOMMU_VEVENTQ_ALLOC (drivers/iommu/iommufd/eventq.c).

IOMMU_FAULT_QUEUE_ALLOC needs nothing of the hardware: it makes a FAULT object and an fd
("[iommufd-pgfault]") to read I/O page faults from and write page responses to. A HWPT
allocated with IOMMU_HWPT_FAULT_ID_VALID delivers its faults there (hw_pagetable.py). The
model's devices never issue page requests (no PCI PRI, no stall), so the queue stays empty:
read() returns 0 bytes, poll() is writable only, and every response written names a cookie
nobody handed out (EINVAL). The fd holds the FAULT (IOMMU_DESTROY is EBUSY until it is
closed) and the iommufd file, as iommufd_eventq_init does.

IOMMU_VEVENTQ_ALLOC hangs off a vIOMMU, which no modelled IOMMU can make (viommu.py): its
checks end at the vIOMMU lookup, ENOENT.
"""

from __future__ import annotations

import select
import struct
from errno import EINVAL, EOPNOTSUPP, ESPIPE

from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.iommufd.main import (
    IommufdCtx,
    IommufdObject,
    IommufdObjectType,
    Ucmd,
    register,
)
from vfiomig.kernel.iommufd.viommu import iommufd_get_viommu
from vfiomig.uapi import iommufd as u

_FAULT_SIZE = 40  # sizeof(struct iommu_hwpt_pgfault)
_RESPONSE = struct.Struct("<II")  # struct iommu_hwpt_page_response {cookie, code}


class IommufdFault(IommufdObject):
    """struct iommufd_fault: its eventq's deliver list and the response xarray."""

    type = IommufdObjectType.FAULT

    def __init__(self, ictx: IommufdCtx) -> None:
        super().__init__()
        self.ictx = ictx
        self.deliver: list[bytes] = []  # fault groups not read yet (none ever in the model)
        self.response: dict[int, bytes] = {}  # cookie -> fault group read, not answered


class FaultFile(File):
    """The "[iommufd-pgfault]" anon file (iommufd_fault_fops, opened by nonseekable_open:
    lseek and pread are ESPIPE, as File's defaults)."""

    def __init__(self, fault: IommufdFault) -> None:
        super().__init__()
        self.fault = fault
        self.ictx_file = fault.ictx.file
        fault.users += 1  # iommufd_eventq_init: refcount_inc(&eventq->obj.users)
        if self.ictx_file is not None:
            self.ictx_file.refs += 1  # iommufd_ctx_get

    def read(self, n: int) -> bytes:
        """iommufd_fault_fops_read: whole iommu_hwpt_pgfault records only (ESPIPE)."""
        if n % _FAULT_SIZE:
            raise err(ESPIPE)
        return b""  # nothing to deliver: 0 bytes

    def write(self, data: bytes) -> int:
        """iommufd_fault_fops_write: whole iommu_hwpt_page_response records only (ESPIPE);
        a bad code or a cookie not handed out by read() is EINVAL, unless some responses
        before it were taken (then their byte count)."""
        if len(data) % _RESPONSE.size:
            raise err(ESPIPE)
        done = 0
        while done < len(data):
            cookie, code = _RESPONSE.unpack_from(data, done)
            if code not in (u.IOMMUFD_PAGE_RESP_SUCCESS, u.IOMMUFD_PAGE_RESP_INVALID):
                break
            if self.fault.response.pop(cookie, None) is None:
                break
            done += _RESPONSE.size
        else:
            return done
        if done:
            return done
        raise err(EINVAL)

    def poll(self, events: int) -> int:
        """iommufd_eventq_fops_poll: a FAULT queue is always writable; readable when a fault
        waits."""
        ready = select.POLLOUT
        if self.fault.deliver:
            ready |= select.POLLIN | select.POLLRDNORM
        return events & ready

    def release(self) -> None:
        """iommufd_eventq_fops_release: drop the object's user and the iommufd file."""
        self.fault.users -= 1
        f = self.ictx_file
        if f is not None:
            f.refs -= 1
            if f.refs == 0:
                f.release()


def iommufd_get_fault(ictx: IommufdCtx, fault_id: int) -> IommufdFault:
    """iommufd_get_fault: missing or of another type, ENOENT."""
    return ictx.get(fault_id, IommufdFault)


@register(u.IOMMU_FAULT_QUEUE_ALLOC, u.iommu_fault_alloc, 16)
def iommufd_fault_alloc(ucmd: Ucmd) -> int:
    """eventq.c iommufd_fault_alloc: flags must be 0 (EOPNOTSUPP); the object, then a free
    fd (EMFILE), then the answer (EFAULT); any failure takes the object back (the ucmd
    allocator's abort) and the fd is installed last."""
    cmd = ucmd.cmd
    if cmd.flags:
        raise err(EOPNOTSUPP)
    ictx = ucmd.ictx
    fault = ictx.alloc(IommufdFault(ictx))
    fdt = ictx.kernel.fdt
    try:
        fdno = fdt.get_unused_fd()
        cmd.out_fault_id = fault.id
        cmd.out_fault_fd = fdno
        ucmd.respond()
    except OSError:
        ictx.remove(fault)
        raise
    fdt.fd_install(fdno, FaultFile(fault))
    return 0


@register(u.IOMMU_VEVENTQ_ALLOC, u.iommu_veventq_alloc, 28)
def iommufd_veventq_alloc(ucmd: Ucmd) -> int:
    """eventq.c iommufd_veventq_alloc: flags, __reserved or the DEFAULT type EOPNOTSUPP; a
    zero depth EINVAL; then the vIOMMU (ENOENT, always: viommu.py). What follows in the
    kernel (one queue per type: EEXIST) needs a vIOMMU."""
    cmd = ucmd.cmd
    if cmd.flags or cmd.__reserved or cmd.type == u.IOMMU_VEVENTQ_TYPE_DEFAULT:
        raise err(EOPNOTSUPP)
    if not cmd.veventq_depth:
        raise err(EINVAL)
    iommufd_get_viommu(ucmd.ictx, cmd.viommu_id)
