"""drivers/vfio/pci/vfio_pci_intrs.c (7.2): VFIO_DEVICE_SET_IRQS actions of vfio-pci.

After vfio_set_irqs_validate_and_prepare, `vfio_pci_set_irqs_ioctl` picks the handler by
index and action (none: ENOTTY): INTx mask / unmask / trigger, MSI and MSI-X trigger (their
mask and unmask are ENOTTY: "Need masking support exported"), ERR and REQ trigger (PCIe
functions only for ERR).

Interrupts are delivered to eventfds (kernel/eventfd.py). What the model keeps per device
(`IrqState`) is the kernel's: irq_type, the INTx context (trigger, masked, the unmask virqfd),
the MSI/MSI-X contexts by vector (xarray ctx), the vectors allocated, err/req triggers.
The platform is modelled as allocating every vector asked for (interrupt remapping / ITS
multi-MSI), so pci_alloc_irq_vectors never comes back short; dynamic MSI-X allocation
(`has_dyn_msix`) follows the platform (x86 yes, arm64 GICv3 ITS no).
Hardware raises interrupts through `vfio_pci_raise_intx` / `vfio_pci_raise_msi` (the
devices' own models do not call them yet: their hardware raises no interrupts).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from errno import EINVAL, ENODEV, ENOTTY, ERANGE
from typing import TYPE_CHECKING

from vfiomig.kernel.errors import err
from vfiomig.kernel.eventfd import EventfdCtx, eventfd_ctx_fdget
from vfiomig.kernel.vfio_virqfd import VirqfdSlot, vfio_virqfd_disable, vfio_virqfd_enable
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.kernel.vfio_pci_core import VfioPciCoreDevice

INTX = v.VFIO_PCI_INTX_IRQ_INDEX
MSI = v.VFIO_PCI_MSI_IRQ_INDEX
MSIX = v.VFIO_PCI_MSIX_IRQ_INDEX
ERR = v.VFIO_PCI_ERR_IRQ_INDEX
REQ = v.VFIO_PCI_REQ_IRQ_INDEX
NONE_TYPE = v.VFIO_PCI_NUM_IRQS  # irq_type when nothing is enabled
DATA_NONE = v.VFIO_IRQ_SET_DATA_NONE
DATA_BOOL = v.VFIO_IRQ_SET_DATA_BOOL
DATA_EVENTFD = v.VFIO_IRQ_SET_DATA_EVENTFD
ACTION_MASK = v.VFIO_IRQ_SET_ACTION_MASK
ACTION_UNMASK = v.VFIO_IRQ_SET_ACTION_UNMASK
ACTION_TRIGGER = v.VFIO_IRQ_SET_ACTION_TRIGGER


@dataclass
class IntxCtx:
    """struct vfio_pci_irq_ctx of INTx (ctx 0)."""

    trigger: EventfdCtx | None
    masked: bool
    unmask: VirqfdSlot = field(default_factory=VirqfdSlot)
    mask: VirqfdSlot = field(default_factory=VirqfdSlot)
    pending: bool = False  # the line asserted while masked (pci_check_and_unmask_intx)


@dataclass
class IrqState:
    irq_type: int = NONE_TYPE
    intx: IntxCtx | None = None
    msi: dict[int, EventfdCtx] = field(default_factory=dict)  # vector -> trigger
    nvec: int = 0  # vectors allocated by vfio_msi_enable (pci_alloc_irq_vectors)
    dyn: set[int] = field(default_factory=set)  # MSI-X vectors allocated later (dynamic)
    virq_disabled: bool = False  # the guest's DisINTx bit (vfio_pci_config.c)
    err_trigger: EventfdCtx | None = None
    req_trigger: EventfdCtx | None = None


def _is_irq_none(s: IrqState) -> bool:
    return s.irq_type not in (INTX, MSI, MSIX)


# -- INTx ------------------------------------------------------------------------------------


def vfio_send_intx_eventfd(vdev: VfioPciCoreDevice) -> None:
    s = vdev.irqs
    if s.irq_type == INTX and not s.virq_disabled and s.intx and s.intx.trigger:
        s.intx.trigger.signal()


def vfio_pci_intx_mask(vdev: VfioPciCoreDevice) -> bool:
    """__vfio_pci_intx_mask: True if the masked state changed (DisINTx on the device when
    INTx is not in use is not modelled: the physical bit has no observer here)."""
    s = vdev.irqs
    if s.irq_type != INTX or s.intx is None:
        return False
    if not s.intx.masked:
        s.intx.masked = True
        return True
    return False


def vfio_pci_intx_unmask_handler(vdev: VfioPciCoreDevice) -> bool:
    """vfio_pci_intx_unmask_handler: True when the interrupt must be re-sent (it was still
    pending: pci_check_and_unmask_intx fails and INTx stays masked)."""
    s = vdev.irqs
    ctx = s.intx
    if s.irq_type != INTX or ctx is None:
        return False
    resend = False
    if ctx.masked and not s.virq_disabled:
        resend = ctx.pending
        ctx.pending = False
        ctx.masked = resend
    return resend


def vfio_pci_intx_unmask(vdev: VfioPciCoreDevice) -> None:
    """__vfio_pci_intx_unmask."""
    if vfio_pci_intx_unmask_handler(vdev):
        vfio_send_intx_eventfd(vdev)


def vfio_pci_raise_intx(vdev: VfioPciCoreDevice) -> None:
    """The device asserts INTx: vfio_intx_handler masks it (DisINTx) and signals."""
    ctx = vdev.irqs.intx
    if vdev.irqs.irq_type != INTX or ctx is None:
        return
    if ctx.masked:
        ctx.pending = True
        return
    ctx.masked = True
    vfio_send_intx_eventfd(vdev)


def vfio_intx_enable(vdev: VfioPciCoreDevice, trigger: EventfdCtx | None) -> None:
    s = vdev.irqs
    if not _is_irq_none(s):
        raise err(EINVAL)
    if not vdev.pci.intx_pin:  # !pdev->irq
        raise err(ENODEV)
    s.intx = IntxCtx(trigger=trigger, masked=s.virq_disabled)
    s.irq_type = INTX


def vfio_intx_disable(vdev: VfioPciCoreDevice) -> None:
    s = vdev.irqs
    if s.intx is not None:
        vfio_virqfd_disable(s.intx.unmask)
        vfio_virqfd_disable(s.intx.mask)
    s.intx = None
    s.irq_type = NONE_TYPE


def _u8(data: bytes, i: int = 0) -> int:
    return data[i]


def _s32(data: bytes, i: int = 0) -> int:
    return int(struct.unpack_from("<i", data, 4 * i)[0])


def vfio_pci_set_intx_unmask(
    vdev: VfioPciCoreDevice, start: int, count: int, flags: int, data: bytes
) -> None:
    s = vdev.irqs
    if s.irq_type != INTX or start != 0 or count != 1:
        raise err(EINVAL)
    assert s.intx is not None
    if flags & DATA_NONE:
        vfio_pci_intx_unmask(vdev)
    elif flags & DATA_BOOL:
        if _u8(data):
            vfio_pci_intx_unmask(vdev)
    elif flags & DATA_EVENTFD:
        fd = _s32(data)
        if fd >= 0:
            vfio_virqfd_enable(
                vdev.kernel.fdt.files,
                s.intx.unmask,
                fd,
                lambda: vfio_pci_intx_unmask_handler(vdev),
                lambda: vfio_send_intx_eventfd(vdev),
            )
            return
        vfio_virqfd_disable(s.intx.unmask)


def vfio_pci_set_intx_mask(
    vdev: VfioPciCoreDevice, start: int, count: int, flags: int, data: bytes
) -> None:
    if vdev.irqs.irq_type != INTX or start != 0 or count != 1:
        raise err(EINVAL)
    if flags & DATA_NONE:
        vfio_pci_intx_mask(vdev)
    elif flags & DATA_BOOL:
        if _u8(data):
            vfio_pci_intx_mask(vdev)
    elif flags & DATA_EVENTFD:
        raise err(ENOTTY)  # vfio_pci_set_intx_mask: masking INTx by eventfd is not implemented


def vfio_pci_set_intx_trigger(
    vdev: VfioPciCoreDevice, start: int, count: int, flags: int, data: bytes
) -> None:
    s = vdev.irqs
    is_intx = s.irq_type == INTX
    if is_intx and not count and flags & DATA_NONE:
        vfio_intx_disable(vdev)
        return
    if not (is_intx or _is_irq_none(s)) or start != 0 or count != 1:
        raise err(EINVAL)
    if flags & DATA_EVENTFD:
        fd = _s32(data)
        trigger = eventfd_ctx_fdget(vdev.kernel.fdt.files, fd) if fd >= 0 else None
        if is_intx:
            assert s.intx is not None
            s.intx.trigger = trigger  # vfio_intx_set_signal (fd < 0: no trigger, INTx stays)
        else:
            vfio_intx_enable(vdev, trigger)
        return
    if not is_intx:
        raise err(EINVAL)
    if flags & DATA_NONE or flags & DATA_BOOL and _u8(data):
        vfio_send_intx_eventfd(vdev)


# -- MSI / MSI-X -------------------------------------------------------------------------------


def vfio_pci_raise_msi(vdev: VfioPciCoreDevice, vector: int) -> None:
    """The device sends MSI/MSI-X `vector`: vfio_msihandler signals its trigger."""
    trigger = vdev.irqs.msi.get(vector)
    if vdev.irqs.irq_type in (MSI, MSIX) and trigger is not None:
        trigger.signal()


def vfio_msi_enable(vdev: VfioPciCoreDevice, nvec: int, msix: bool) -> None:
    """vfio_msi_enable: pci_alloc_irq_vectors(pdev, 1, nvec): no vectors at all -ERANGE."""
    s = vdev.irqs
    if not _is_irq_none(s):
        raise err(EINVAL)
    if nvec < 1:
        raise err(ERANGE)  # __pci_enable_msi{,x}_range: maxvec < minvec
    s.nvec = nvec
    s.dyn = set()
    s.irq_type = MSIX if msix else MSI


def _vector_allocated(vdev: VfioPciCoreDevice, vector: int, msix: bool) -> bool:
    """vfio_msi_alloc_irq: an allocated vector, or (MSI-X with dynamic allocation) a new one;
    anything else is pci_irq_vector's -EINVAL."""
    s = vdev.irqs
    if vector < s.nvec or vector in s.dyn:
        return True
    if msix and vdev.has_dyn_msix:
        s.dyn.add(vector)  # pci_msix_alloc_irq_at; stays allocated until MSI-X is disabled
        return True
    return False


def vfio_msi_set_vector_signal(vdev: VfioPciCoreDevice, vector: int, fd: int, msix: bool) -> None:
    s = vdev.irqs
    had = s.msi.pop(vector, None) is not None  # free_irq + eventfd_ctx_put
    if fd < 0:
        return
    if not had and not _vector_allocated(vdev, vector, msix):
        raise err(EINVAL)
    s.msi[vector] = eventfd_ctx_fdget(vdev.kernel.fdt.files, fd)  # EBADF / EINVAL


def vfio_msi_set_block(
    vdev: VfioPciCoreDevice, start: int, count: int, fds: list[int] | None, msix: bool
) -> None:
    j = start
    try:
        for i in range(count):
            vfio_msi_set_vector_signal(vdev, j, fds[i] if fds is not None else -1, msix)
            j += 1
    except OSError:
        for i in range(start, j + 1):  # undo this call's vectors
            vfio_msi_set_vector_signal(vdev, i, -1, msix)
        raise


def vfio_msi_disable(vdev: VfioPciCoreDevice, msix: bool) -> None:
    s = vdev.irqs
    s.msi.clear()
    s.nvec = 0
    s.dyn = set()
    s.irq_type = NONE_TYPE


def vfio_pci_set_msi_trigger(
    vdev: VfioPciCoreDevice, index: int, start: int, count: int, flags: int, data: bytes
) -> None:
    s = vdev.irqs
    msix = index == MSIX
    if s.irq_type == index and not count and flags & DATA_NONE:
        vfio_msi_disable(vdev, msix)
        return
    if not (s.irq_type == index or _is_irq_none(s)):
        raise err(EINVAL)
    if flags & DATA_EVENTFD:
        fds = [_s32(data, i) for i in range(count)]
        if s.irq_type == index:
            vfio_msi_set_block(vdev, start, count, fds, msix)
            return
        vfio_msi_enable(vdev, start + count, msix)
        try:
            vfio_msi_set_block(vdev, start, count, fds, msix)
        except OSError:
            vfio_msi_disable(vdev, msix)
            raise
        return
    if s.irq_type != index:
        raise err(EINVAL)
    for i in range(start, start + count):
        trigger = s.msi.get(i)
        if trigger is None:
            continue
        if flags & DATA_NONE or flags & DATA_BOOL and _u8(data, i - start):
            trigger.signal()


# -- ERR / REQ ---------------------------------------------------------------------------------


def vfio_pci_set_ctx_trigger_single(
    vdev: VfioPciCoreDevice, slot: str, count: int, flags: int, data: bytes
) -> None:
    """vfio_pci_set_ctx_trigger_single (the RCU `vfio_pci_eventfd_replace_locked` version):
    DATA_NONE without a trigger EINVAL, count 0 removes it, else a loopback signal; BOOL and
    EVENTFD need count 1; fd -1 removes, fd >= 0 replaces, other fds EINVAL."""
    s = vdev.irqs
    cur: EventfdCtx | None = getattr(s, slot)
    if flags & DATA_NONE:
        if cur is None:
            raise err(EINVAL)
        if count:
            cur.signal()
        else:
            setattr(s, slot, None)
        return
    if flags & DATA_BOOL:
        if not count:
            raise err(EINVAL)
        if _u8(data) and cur is not None:
            cur.signal()
        return
    if flags & DATA_EVENTFD:
        if not count:
            raise err(EINVAL)
        fd = _s32(data)
        if fd == -1:
            setattr(s, slot, None)
            return
        if fd >= 0:
            setattr(s, slot, eventfd_ctx_fdget(vdev.kernel.fdt.files, fd))
            return
    raise err(EINVAL)


def vfio_pci_set_err_trigger(
    vdev: VfioPciCoreDevice, index: int, start: int, count: int, flags: int, data: bytes
) -> None:
    if index != ERR or start != 0 or count > 1:
        raise err(EINVAL)
    vfio_pci_set_ctx_trigger_single(vdev, "err_trigger", count, flags, data)


def vfio_pci_set_req_trigger(
    vdev: VfioPciCoreDevice, index: int, start: int, count: int, flags: int, data: bytes
) -> None:
    if index != REQ or start != 0 or count > 1:
        raise err(EINVAL)
    vfio_pci_set_ctx_trigger_single(vdev, "req_trigger", count, flags, data)


def vfio_pci_set_irqs_ioctl(
    vdev: VfioPciCoreDevice, flags: int, index: int, start: int, count: int, data: bytes
) -> None:
    """vfio_pci_set_irqs_ioctl: no handler for the index and action ENOTTY."""
    action = flags & v.VFIO_IRQ_SET_ACTION_TYPE_MASK
    if index == INTX:
        intx = {
            ACTION_MASK: vfio_pci_set_intx_mask,
            ACTION_UNMASK: vfio_pci_set_intx_unmask,
            ACTION_TRIGGER: vfio_pci_set_intx_trigger,
        }.get(action)
        if intx is not None:
            intx(vdev, start, count, flags, data)
            return
    elif index in (MSI, MSIX):
        if action == ACTION_TRIGGER:  # MASK / UNMASK: "Need masking support exported"
            vfio_pci_set_msi_trigger(vdev, index, start, count, flags, data)
            return
    elif index == ERR:
        if action == ACTION_TRIGGER and vdev.pci.is_pcie:
            vfio_pci_set_err_trigger(vdev, index, start, count, flags, data)
            return
    elif index == REQ:
        if action == ACTION_TRIGGER:
            vfio_pci_set_req_trigger(vdev, index, start, count, flags, data)
            return
    raise err(ENOTTY)


def vfio_pci_irqs_release(vdev: VfioPciCoreDevice) -> None:
    """vfio_pci_core_disable / close_device: the enabled type is torn down (DATA_NONE |
    ACTION_TRIGGER with count 0) and err/req triggers dropped."""
    s = vdev.irqs
    if s.irq_type == INTX:
        vfio_intx_disable(vdev)
    elif s.irq_type in (MSI, MSIX):
        vfio_msi_disable(vdev, s.irq_type == MSIX)
    s.err_trigger = None
    s.req_trigger = None
