"""FAULT objects and their fds, and IOMMU_VEVENTQ_ALLOC (drivers/iommu/iommufd/eventq.c in
7.x; fault.c in 6.12, the same uAPI).

IOMMU_FAULT_QUEUE_ALLOC makes a FAULT object and a file ("[iommufd-pgfault]"): a HWPT
allocated with IOMMU_HWPT_FAULT_ID_VALID points its faults at the object (hw_pagetable.py);
each fault group the IOMMU reports for a device attached to that HWPT is queued
(iommufd_fault_iopf_handler), read() hands out one struct iommu_hwpt_pgfault per fault of
whole groups (counts that are no multiple of the record size: ESPIPE; a first group that
does not fit: EINVAL; an empty queue: 0 bytes), each group under a cookie, and write() takes
struct iommu_hwpt_page_response for those cookies (counts no multiple of the response size:
ESPIPE; an unknown cookie or code: EINVAL unless responses before it were taken). poll() is
always POLLOUT, POLLIN while a group waits. The file holds a user of the object (IOMMU_DESTROY
is EBUSY while it is open) and the iommufd itself (iommufd_ctx_get). A device leaving the
HWPT (detach, replace) gets its pending groups answered (iommufd_auto_response_faults).

In the model only the selftest's mock devices raise page requests
(IOMMU_TEST_OP_TRIGGER_IOPF, selftest.py); the modelled PCI devices have no PRI and no stall,
so for them the queue stays empty. A response goes nowhere further.

IOMMU_VEVENTQ_ALLOC hangs off a vIOMMU, which no modelled IOMMU can make (viommu.py): its
checks end at the vIOMMU lookup, ENOENT.
"""

from __future__ import annotations

import ctypes
import select
from dataclasses import dataclass, field
from errno import EINVAL, EMFILE, ENODEV, ENOMEM, EOPNOTSUPP, ESPIPE
from typing import TYPE_CHECKING

from vfiomig.kernel.errors import err
from vfiomig.kernel.fault_inject import fail_point
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

if TYPE_CHECKING:
    from vfiomig.kernel.iommufd.device import IommufdDevice

U32_MAX = (1 << 32) - 1
_FAULT_SIZE = ctypes.sizeof(u.iommu_hwpt_pgfault)
_RESPONSE_SIZE = ctypes.sizeof(u.iommu_hwpt_page_response)


@dataclass
class IopfFault:
    """struct iommu_fault_page_request (what the IOMMU reported)."""

    flags: int
    pasid: int
    grpid: int
    perm: int
    addr: int


@dataclass(eq=False)
class IopfGroup:
    """struct iopf_group: the faults of one page request group of one device."""

    idev: IommufdDevice
    faults: list[IopfFault] = field(default_factory=list)
    cookie: int = 0
    response: int | None = None  # the code it was answered with (iopf_group_response)


class IommufdFault(IommufdObject):
    """struct iommufd_fault."""

    type = IommufdObjectType.FAULT

    def __init__(self, ictx: IommufdCtx) -> None:
        super().__init__()
        self.ictx = ictx
        self.deliver: list[IopfGroup] = []
        self.response: dict[int, IopfGroup] = {}  # xarray, XA_FLAGS_ALLOC1

    def destroy(self) -> None:
        """iommufd_fault_destroy: whatever is still pending is answered INVALID."""
        for group in self.deliver + list(self.response.values()):
            group.response = u.IOMMUFD_PAGE_RESP_INVALID
        self.deliver.clear()
        self.response.clear()

    def auto_response(self, idev: IommufdDevice) -> None:
        """iommufd_auto_response_faults: a device leaving the HWPT gets its pending
        groups answered INVALID."""
        for group in [g for g in self.deliver if g.idev is idev]:
            self.deliver.remove(group)
            group.response = u.IOMMUFD_PAGE_RESP_INVALID
        for cookie, group in list(self.response.items()):
            if group.idev is idev:
                del self.response[cookie]
                group.response = u.IOMMUFD_PAGE_RESP_INVALID

    def iopf_handler(self, group: IopfGroup) -> None:
        """iommufd_fault_iopf_handler: queue the group for read()."""
        self.deliver.append(group)

    def _cookie(self) -> int:
        """xa_alloc(&fault->response, ..., xa_limit_32b): the lowest free from 1."""
        cookie = 1
        while cookie in self.response:
            cookie += 1
        if cookie > U32_MAX:
            raise err(ENOMEM)  # -EBUSY in xa_alloc; never reached
        return cookie


class FaultFile(File):
    """The fault queue's anon file ([iommufd-pgfault], nonseekable: read and write take no
    position; counts must be whole records, ESPIPE otherwise)."""

    def __init__(self, fault: IommufdFault, ictx_file: File) -> None:
        super().__init__()
        self.fault = fault
        self.ictx_file = ictx_file

    def read(self, n: int) -> bytes:
        """iommufd_fault_fops_read: whole groups, each under a new cookie; EINVAL when
        the first group does not fit."""
        if n % _FAULT_SIZE:
            raise err(ESPIPE)
        fault = self.fault
        out = bytearray()
        while fault.deliver:
            group = fault.deliver[0]
            if len(out) >= n or len(group.faults) * _FAULT_SIZE > n - len(out):
                if not out:
                    raise err(EINVAL)
                break
            fault.deliver.pop(0)
            group.cookie = fault._cookie()
            fault.response[group.cookie] = group
            for f in group.faults:
                msg = u.iommu_hwpt_pgfault(
                    flags=f.flags,
                    dev_id=group.idev.id,
                    pasid=f.pasid,
                    grpid=f.grpid,
                    perm=f.perm,
                    addr=f.addr,
                    length=0,
                    cookie=group.cookie,
                )
                out += bytes(msg)
        return bytes(out)

    def write(self, data: bytes) -> int:
        """iommufd_fault_fops_write: responses by cookie; what was done before an error
        counts (EINVAL for an unknown cookie or code)."""
        if len(data) % _RESPONSE_SIZE:
            raise err(ESPIPE)
        fault = self.fault
        done = 0
        while done < len(data):
            resp = u.iommu_hwpt_page_response.from_buffer_copy(data[done : done + _RESPONSE_SIZE])
            if resp.code not in (u.IOMMUFD_PAGE_RESP_SUCCESS, u.IOMMUFD_PAGE_RESP_INVALID):
                break
            group = fault.response.pop(resp.cookie, None)
            if group is None:
                break
            group.response = resp.code  # iopf_group_response
            done += _RESPONSE_SIZE
        if not done and data:
            raise err(EINVAL)
        return done

    def poll(self, events: int) -> int:
        """iommufd_fault_fops_poll: always writable, readable while groups wait."""
        mask = select.POLLOUT
        if self.fault.deliver:
            mask |= select.POLLIN | select.POLLRDNORM
        return events & mask

    def release(self) -> None:
        """iommufd_fault_fops_release: drop the object's user and the iommufd."""
        self.fault.users -= 1
        iommufd_ctx_put(self.ictx_file)


def iommufd_ctx_get(ictx: IommufdCtx) -> File:
    """iommufd_ctx_get: a reference on the iommufd's file, so that closing its last fd
    does not release the context while this object needs it. Returns the file."""
    f = ictx.file
    if f is None:
        raise err(EINVAL)  # the ictx was not made by a /dev/iommu open
    f.refs += 1
    return f


def iommufd_ctx_put(f: File) -> None:
    """iommufd_ctx_put: the last reference releases the context (fput)."""
    f.refs -= 1
    if f.refs == 0:
        f.release()


def iommufd_get_fault(ictx: IommufdCtx, fault_id: int) -> IommufdFault:
    """iommufd_get_fault: missing or of another type, ENOENT."""
    return ictx.get(fault_id, IommufdFault)


@register(u.IOMMU_FAULT_QUEUE_ALLOC, u.iommu_fault_alloc, 16)
def iommufd_fault_alloc(ucmd: Ucmd) -> int:
    """iommufd_fault_alloc: flags must be 0 (EOPNOTSUPP); the object, its file (failslab
    under fault injection), then a free fd (EMFILE), then the answer (EFAULT); any failure
    takes the object back (iommufd_object_abort_and_destroy) and the fd is installed last."""
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if cmd.flags:
        raise err(EOPNOTSUPP)
    fault = ictx.alloc(IommufdFault(ictx))
    try:
        fail_point(ictx.kernel.mm, "failslab", ENOMEM)  # anon_inode_getfile
        fdt = ictx.kernel.fdt
        try:
            fdno = fdt.get_unused_fd()
        except OSError:
            raise err(EMFILE) from None
        cmd.out_fault_id = fault.id
        cmd.out_fault_fd = fdno
        ucmd.respond()
    except OSError:
        ictx.remove(fault)  # iommufd_object_abort_and_destroy
        raise
    fault.users += 1  # the file's
    fdt.fd_install(fdno, FaultFile(fault, iommufd_ctx_get(ictx)))
    return 0


def iommufd_report_device_fault(idev: IommufdDevice, fault: IopfFault) -> int:
    """iommu_report_device_fault for a page request with LAST_PAGE (a whole group): to the
    fault queue of the HWPT the device is attached to; ENODEV (returned, as the kernel
    returns it to a caller that ignores it) when nothing takes page requests there."""
    hwpt = idev.hwpt
    queue = getattr(hwpt, "fault", None) if hwpt is not None else None
    if queue is None:
        return ENODEV  # no iopf handler for the attached domain
    queue.iopf_handler(IopfGroup(idev, [fault]))
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
