"""vfio-pci core (drivers/vfio/pci/vfio_pci_core.c, vfio_pci_rdwr.c, vfio_pci_config.c, 7.2)
for the modelled PCI functions: the device ioctls, features, region access and mmap that
the `reference` device and hisi_acc share (a variant driver built on vfio_pci_core).

`VfioPciCoreDevice` is struct vfio_pci_core_device over a `PciFunction`, the modelled
hardware function (BARs, capabilities, reset scope). What it answers:

* GET_REGION_INFO (`get_region_info_caps` = vfio_pci_ioctl_get_region_info, called by the
  core, kernel/vfio_device_fops.py): config space (READ|WRITE, cfg_size), BARs (READ|WRITE,
  MMAP for memory BARs, the MSIX_MAPPABLE capability on the MSI-X BAR; size 0 and flags 0
  for an absent BAR), ROM (offset only: size 0, flags 0: no ROM), VGA (EINVAL: no VGA),
  anything past VFIO_PCI_NUM_REGIONS EINVAL (no device-specific regions).
* GET_IRQ_INFO, SET_IRQS (kernel/vfio_pci_intrs.py), GET_PCI_HOT_RESET_INFO,
  PCI_HOT_RESET, IOEVENTFD, in vfio_pci_core_ioctl's switch; anything else ENOTTY.
* device features (vfio_pci_core_ioctl_feature): LOW_POWER_ENTRY(_WITH_WAKEUP) / EXIT,
  PCI_VF_TOKEN (ENOTTY: no vf_token, the function is no SR-IOV PF), DMA_BUF (EOPNOTSUPP:
  variant drivers have no pci_ops->get_dmabuf_phys), others ENOTTY.
* read/write (vfio_pci_rw): config space through a virtual config (vconfig, below), BARs
  through `mmio_read` / `mmio_write` (plain memory unless the driver models registers),
  the MSI-X table excluded (reads 0xff, writes dropped), EIO while memory decode is off.
* mmap (vfio_pci_core_mmap): memory BARs; a plain-memory BAR maps its bytes, a register
  BAR maps address space only (CPU access to MMIO is not modelled: the mapping is unbacked).

Config space (vfio_pci_config.c perm bits, reduced): reads return vconfig; writes change
only the fields the model virtualizes: COMMAND (I/O, memory, bus master, parity, SERR,
INTx disable: virq_disabled masks INTx), the BARs (sized: bits below the BAR size read as
the BAR's type flags, vfio_bar_fixup), the ROM BAR (no ROM: reads 0) and the interrupt line.
Other writes are dropped (the kernel passes some through to hardware the model does not
have: status RW1C bits, cache line size, capability registers).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field, replace
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOSPC, ENOTTY, EOPNOTSUPP
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE
from vfiomig.kernel.errors import err
from vfiomig.kernel.eventfd import EventfdCtx, eventfd_ctx_fdget
from vfiomig.kernel.uaccess import UserArg
from vfiomig.kernel.vfio_device_fops import (
    IRQ_SET_MINSZ,
    VfioInfoCap,
    memdup_user,
    vfio_set_irqs_validate_and_prepare,
)
from vfiomig.kernel.vfio_main import VfioDevice, vfio_check_feature
from vfiomig.kernel.vfio_pci_intrs import (
    IrqState,
    vfio_pci_intx_mask,
    vfio_pci_intx_unmask,
    vfio_pci_irqs_release,
    vfio_pci_set_irqs_ioctl,
)
from vfiomig.kernel.vfio_virqfd import VirqfdSlot, vfio_virqfd_disable, vfio_virqfd_enable
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory, Region
    from vfiomig.kernel.machine import ModelKernel

# include/linux/vfio_pci_core.h
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
VFIO_PCI_IOEVENTFD_MAX = 1000  # vfio_pci_priv.h


def VFIO_PCI_INDEX_TO_OFFSET(index: int) -> int:  # noqa: N802 (the kernel's macro name)
    return index << VFIO_PCI_OFFSET_SHIFT


# include/uapi/linux/pci_regs.h
PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_COMMAND, PCI_STATUS = 0x00, 0x02, 0x04, 0x06
PCI_REVISION_ID, PCI_CLASS_PROG, PCI_HEADER_TYPE = 0x08, 0x09, 0x0E
PCI_BASE_ADDRESS_0, PCI_SUBSYSTEM_VENDOR_ID, PCI_SUBSYSTEM_ID = 0x10, 0x2C, 0x2E
PCI_ROM_ADDRESS, PCI_CAPABILITY_LIST, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN = 0x30, 0x34, 0x3C, 0x3D
PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x1, 0x2, 0x4
PCI_COMMAND_PARITY, PCI_COMMAND_SERR, PCI_COMMAND_INTX_DISABLE = 0x40, 0x100, 0x400
PCI_STATUS_CAP_LIST = 0x10
PCI_BASE_ADDRESS_SPACE_IO, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_MEM_PREFETCH = 1, 4, 8
PCI_CAP_ID_PM, PCI_CAP_ID_MSI, PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX = 0x01, 0x05, 0x10, 0x11
PCI_EXP_TYPE_ENDPOINT, PCI_EXP_TYPE_RC_END = 0x0, 0x9
PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE = 256, 4096
_COMMAND_WRITABLE = (
    PCI_COMMAND_IO
    | PCI_COMMAND_MEMORY
    | PCI_COMMAND_MASTER
    | PCI_COMMAND_PARITY
    | PCI_COMMAND_SERR
    | PCI_COMMAND_INTX_DISABLE
)
_CAP_PM, _CAP_MSI, _CAP_MSIX, _CAP_EXP = 0x40, 0x50, 0x70, 0x80  # the model's layout

GET = v.VFIO_DEVICE_FEATURE_GET
SET = v.VFIO_DEVICE_FEATURE_SET
FEATURE_HDR = 8
_IRQ_INFO_MINSZ = 16  # offsetofend(struct vfio_irq_info, count)
_HOT_RESET_MINSZ = 12  # offsetofend(struct vfio_pci_hot_reset{,_info}, count)
_IOEVENTFD_MINSZ = 28  # offsetofend(struct vfio_device_ioeventfd, fd)
_DEP_DEV = ctypes.sizeof(v.vfio_pci_dependent_device)  # 8


@dataclass(frozen=True)
class PciBar:
    """One BAR of the function: its size (pci_resource_len, 0 = no BAR) and type."""

    size: int = 0
    start: int = 0  # pci_resource_start (host physical address)
    io: bool = False  # an I/O port BAR (no IORESOURCE_MEM: no mmap, no memory-enable test)
    mem64: bool = False
    prefetch: bool = False
    plain: bool = True  # plain memory behind it (else the driver models its registers)


@dataclass(frozen=True)
class PciFunction:
    """The PCI function as hardware presents it (config space, BARs, reset scope)."""

    vendor: int
    device: int
    class_code: int  # 24-bit class / subclass / prog-if
    revision: int
    bars: tuple[PciBar, ...]  # six entries; a 64-bit BAR leaves the next one empty
    subsys_vendor: int = 0
    subsys_device: int = 0
    is_pcie: bool = True
    pcie_type: int = PCI_EXP_TYPE_ENDPOINT
    is_virtfn: bool = False  # an SR-IOV VF: no INTx, no command-register memory enable
    intx_pin: int = 0  # 1 = INTA#; 0 = none
    msi_vectors: int = 0  # 0: no MSI capability, else 1..32 (Multiple Message Capable)
    msix_vectors: int = 0  # 0: no MSI-X capability
    msix_bar: int = 0
    msix_offset: int = 0
    pba_offset: int = 0
    # "bus": the function sits alone below a bridge that can reset the bus (a hot reset
    # resets only it); None: neither slot nor bus reset (an integrated endpoint on a root
    # bus): pci_probe_reset_slot and pci_probe_reset_bus fail, the hot reset ioctls ENODEV.
    reset_scope: str | None = "bus"
    segment: int = 0
    bus: int = 0x01
    devfn: int = 0x00

    @property
    def cfg_size(self) -> int:
        return PCI_CFG_SPACE_EXP_SIZE if self.is_pcie else PCI_CFG_SPACE_SIZE

    @property
    def msix_size(self) -> int:
        return self.msix_vectors * 16  # vdev->msix_size: (QSIZE + 1) * 16


def build_vconfig(pci: PciFunction) -> bytearray:
    """The config space vfio_config_init presents: the standard header, then PM, MSI, MSI-X
    and PCI Express capabilities (those the function has); VFs read the pin as 0."""
    cfg = bytearray(pci.cfg_size)
    struct.pack_into("<HH", cfg, PCI_VENDOR_ID, pci.vendor, pci.device)
    cmd = PCI_COMMAND_MEMORY | (PCI_COMMAND_IO if any(b.io and b.size for b in pci.bars) else 0)
    struct.pack_into("<HH", cfg, PCI_COMMAND, cmd, PCI_STATUS_CAP_LIST)
    struct.pack_into("<I", cfg, PCI_REVISION_ID, pci.revision | pci.class_code << 8)
    for i, bar in enumerate(pci.bars):
        if not bar.size:
            continue
        struct.pack_into("<I", cfg, PCI_BASE_ADDRESS_0 + 4 * i, bar.start & 0xFFFFFFFF)
        if bar.mem64:
            struct.pack_into("<I", cfg, PCI_BASE_ADDRESS_0 + 4 * i + 4, bar.start >> 32)
    struct.pack_into("<HH", cfg, PCI_SUBSYSTEM_VENDOR_ID, pci.subsys_vendor, pci.subsys_device)
    cfg[PCI_INTERRUPT_PIN] = 0 if pci.is_virtfn else pci.intx_pin
    caps: list[tuple[int, bytes]] = [(_CAP_PM, struct.pack("<BBHH", PCI_CAP_ID_PM, 0, 3, 0x8))]
    if pci.msi_vectors:
        qmask = (pci.msi_vectors.bit_length() - 1) << 1  # Multiple Message Capable
        caps.append((_CAP_MSI, struct.pack("<BBH", PCI_CAP_ID_MSI, 0, qmask | 0x80)))
    if pci.msix_vectors:
        msix = struct.pack(
            "<BBHII",
            PCI_CAP_ID_MSIX,
            0,
            pci.msix_vectors - 1,
            pci.msix_offset | pci.msix_bar,
            pci.pba_offset | pci.msix_bar,
        )
        caps.append((_CAP_MSIX, msix))
    if pci.is_pcie:
        caps.append((_CAP_EXP, struct.pack("<BBH", PCI_CAP_ID_EXP, 0, 2 | pci.pcie_type << 4)))
    cfg[PCI_CAPABILITY_LIST] = caps[0][0]
    for n, (pos, body) in enumerate(caps):
        cfg[pos : pos + len(body)] = body
        cfg[pos + 1] = caps[n + 1][0] if n + 1 < len(caps) else 0
    _bar_fixup(pci, cfg)
    return cfg


def _bar_flags(bar: PciBar) -> int:
    """vfio_generate_bar_flags."""
    if bar.io:
        return PCI_BASE_ADDRESS_SPACE_IO
    return (PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.mem64 else 0) | (
        PCI_BASE_ADDRESS_MEM_PREFETCH if bar.prefetch else 0
    )


def _bar_fixup(pci: PciFunction, cfg: bytearray) -> None:
    """vfio_bar_fixup: each BAR keeps only the address bits its size allows, plus its type
    flags; absent BARs and the ROM BAR (no ROM) read 0."""
    i = 0
    while i < 6:
        bar = pci.bars[i]
        off = PCI_BASE_ADDRESS_0 + 4 * i
        if not bar.size:
            struct.pack_into("<I", cfg, off, 0)
            i += 1
            continue
        mask = ~(bar.size - 1) & ((1 << 64) - 1)
        lo = struct.unpack_from("<I", cfg, off)[0] & mask & ~0xF & 0xFFFFFFFF
        if bar.io:
            lo = struct.unpack_from("<I", cfg, off)[0] & mask & ~0x3 & 0xFFFFFFFF
        struct.pack_into("<I", cfg, off, lo | _bar_flags(bar))
        if bar.mem64 and i < 5:
            hi = struct.unpack_from("<I", cfg, off + 4)[0] & (mask >> 32)
            struct.pack_into("<I", cfg, off + 4, hi)
            i += 1
        i += 1
    struct.pack_into("<I", cfg, PCI_ROM_ADDRESS, 0)


def _wmask(pci: PciFunction) -> bytearray:
    """Per-byte writable bits of vconfig (the model's reduced perm bits)."""
    m = bytearray(pci.cfg_size)
    struct.pack_into("<H", m, PCI_COMMAND, _COMMAND_WRITABLE)
    for off in range(PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_0 + 24):
        m[off] = 0xFF
    for off in range(PCI_ROM_ADDRESS, PCI_ROM_ADDRESS + 4):
        m[off] = 0xFF
    m[PCI_INTERRUPT_LINE] = 0xFF
    return m


@dataclass
class IoEventfd:
    """struct vfio_pci_ioeventfd."""

    pos: int
    bar: int
    data: int
    count: int
    test_mem: bool
    virqfd: VirqfdSlot = field(default_factory=VirqfdSlot)


class VfioPciCoreDevice(VfioDevice):
    """struct vfio_pci_core_device with the vfio_pci_core ops."""

    pci_function: PciFunction  # the function's layout (a driver sets it)
    cdev_df: Any = None  # the bound cdev file (device->cdev_opened, kernel/device_cdev.py)

    def __init__(
        self,
        kernel: ModelKernel,
        index: int,
        *,
        iommu_dirty: bool = True,
        pci: PciFunction | None = None,
    ) -> None:
        super().__init__(kernel, index, iommu_dirty=iommu_dirty)
        if pci is None:  # the driver's layout, one bus per modelled function
            pci = replace(self.pci_function, bus=(self.pci_function.bus + index) & 0xFF)
        self.pci = pci
        # pci_msix_can_alloc_dyn: the x86 vector domain can (MSI_FLAG_PCI_MSIX_ALLOC_DYN);
        # the arm64 GICv3 ITS (ITS_MSI_FLAGS_SUPPORTED) cannot.
        self.has_dyn_msix = bool(self.pci.msix_vectors) and kernel.iommu.vendor != "smmuv3"
        self.vconfig = build_vconfig(self.pci)
        self.cfg_wmask = _wmask(self.pci)
        self.irqs = IrqState()
        self.ioeventfds: list[IoEventfd] = []
        self.pm_runtime_engaged = False
        self.pm_wake_eventfd_ctx: EventfdCtx | None = None
        self.bar_mem: dict[int, npt.NDArray[np.uint8]] = {}

    # -- PCI helpers -------------------------------------------------------------------

    def bar_mmap_supported(self, index: int) -> bool:
        """vfio_pci_probe_mmaps: memory BARs (page-aligned in the model, so also the small
        ones, through the dummy resource) are mmap-able; I/O BARs are not."""
        bar = self.pci.bars[index]
        return bool(bar.size) and not bar.io

    def memory_enabled(self) -> bool:
        """__vfio_pci_memory_enabled: VFs have no memory enable bit (no_command_memory)."""
        cmd = struct.unpack_from("<H", self.vconfig, PCI_COMMAND)[0]
        return self.pci.is_virtfn or bool(cmd & PCI_COMMAND_MEMORY)

    def irq_count(self, index: int) -> int:
        """vfio_pci_get_irq_count."""
        pci = self.pci
        if index == v.VFIO_PCI_INTX_IRQ_INDEX:
            return 0 if pci.is_virtfn else int(bool(pci.intx_pin))
        if index == v.VFIO_PCI_MSI_IRQ_INDEX:
            return pci.msi_vectors
        if index == v.VFIO_PCI_MSIX_IRQ_INDEX:
            return pci.msix_vectors
        if index == v.VFIO_PCI_ERR_IRQ_INDEX:
            return int(pci.is_pcie)
        if index == v.VFIO_PCI_REQ_IRQ_INDEX:
            return 1
        return 0

    def _bar_backing(self, index: int) -> npt.NDArray[np.uint8]:
        mem = self.bar_mem.get(index)
        if mem is None:
            size = self.pci.bars[index].size
            mem = self.bar_mem[index] = np.zeros(-(-size // PAGE_SIZE) * PAGE_SIZE, np.uint8)
        return mem

    def mmio_read(self, bar: int, off: int, size: int) -> int:
        """ioread{8,16,32,64} at BAR offset `off`: plain memory by default."""
        mem = self._bar_backing(bar)
        return int.from_bytes(mem[off : off + size].tobytes(), "little")

    def mmio_write(self, bar: int, off: int, size: int, val: int) -> None:
        """iowrite{8,16,32,64}."""
        mem = self._bar_backing(bar)
        mem[off : off + size] = np.frombuffer(val.to_bytes(size, "little"), np.uint8)

    def mmio_backing(self, bar: int) -> npt.NDArray[np.uint8] | None:
        """The bytes an mmap of the BAR shares, or None for register BARs (unbacked)."""
        return self._bar_backing(bar) if self.pci.bars[bar].plain else None

    # -- runtime PM (vfio_pci_core_pm_entry / _exit, vfio_pci_core_runtime_resume) -----

    def pm_runtime_get(self) -> None:
        """Every ioctl and region access resumes the device; with a wakeup eventfd the
        resume signals it and leaves low power (vfio_pci_core_runtime_resume)."""
        if self.pm_runtime_engaged and self.pm_wake_eventfd_ctx is not None:
            self.pm_wake_eventfd_ctx.signal()
            self._pm_runtime_exit()

    def _pm_runtime_exit(self) -> None:
        """__vfio_pci_runtime_pm_exit."""
        self.pm_runtime_engaged = False
        self.pm_wake_eventfd_ctx = None

    def _pm_runtime_entry(self, ctx: EventfdCtx | None) -> None:
        if self.pm_runtime_engaged:
            raise err(EINVAL)
        self.pm_runtime_engaged = True
        self.pm_wake_eventfd_ctx = ctx

    # -- open / close ------------------------------------------------------------------

    def close_device(self) -> None:
        """vfio_pci_core_close_device -> vfio_pci_core_disable: low power left, interrupts
        torn down, ioeventfds freed, err/req triggers dropped; the config space is
        rebuilt at the next open (vfio_config_init)."""
        self._pm_runtime_exit()
        vfio_pci_irqs_release(self)
        for ioeventfd in self.ioeventfds:
            vfio_virqfd_disable(ioeventfd.virqfd)
        self.ioeventfds.clear()
        self.vconfig = build_vconfig(self.pci)
        self.irqs = IrqState()
        super().close_device()

    # -- VFIO_DEVICE_GET_REGION_INFO (vfio_pci_ioctl_get_region_info) -------------------

    def get_region_info_caps(self, info: v.vfio_region_info, caps: VfioInfoCap) -> None:
        index = info.index
        pci = self.pci
        if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
            info.offset = VFIO_PCI_INDEX_TO_OFFSET(index)
            info.size = pci.cfg_size
            info.flags = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE
        elif index <= v.VFIO_PCI_BAR5_REGION_INDEX:
            info.offset = VFIO_PCI_INDEX_TO_OFFSET(index)
            info.size = pci.bars[index].size
            if not info.size:
                info.flags = 0
                return
            info.flags = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE
            if self.bar_mmap_supported(index):
                info.flags |= v.VFIO_REGION_INFO_FLAG_MMAP
                if pci.msix_vectors and index == pci.msix_bar:
                    # msix_mmappable_cap: the MSI-X table may be mmap'd (interrupt
                    # remapping protects it), so no sparse areas
                    caps.add(v.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1)
        elif index == v.VFIO_PCI_ROM_REGION_INDEX:
            info.offset = VFIO_PCI_INDEX_TO_OFFSET(index)
            info.flags = 0  # no ROM BAR and no shadow ROM: size 0
            info.size = 0
        elif index == v.VFIO_PCI_VGA_REGION_INDEX:
            raise err(EINVAL)  # !vdev->has_vga
        else:  # index >= VFIO_PCI_NUM_REGIONS + vdev->num_regions (no device regions)
            raise err(EINVAL)

    # -- vfio_pci_core_ioctl -----------------------------------------------------------

    def device_ioctl(self, cmd: int, arg: UserArg | int) -> int:
        handler = _IOCTLS.get(cmd)
        if handler is None:
            raise err(ENOTTY)
        if isinstance(arg, int):
            raise err(EFAULT)  # each handler starts with copy_from_user of its header
        return handler(self, arg)

    def ioctl_get_irq_info(self, arg: UserArg) -> int:
        """vfio_pci_ioctl_get_irq_info."""
        info = arg.get(v.vfio_irq_info, size=_IRQ_INFO_MINSZ)
        if info.argsz < _IRQ_INFO_MINSZ or info.index >= v.VFIO_PCI_NUM_IRQS:
            raise err(EINVAL)
        if info.index == v.VFIO_PCI_ERR_IRQ_INDEX and not self.pci.is_pcie:
            raise err(EINVAL)
        info.flags = v.VFIO_IRQ_INFO_EVENTFD
        info.count = self.irq_count(info.index)
        if info.index == v.VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= v.VFIO_IRQ_INFO_MASKABLE | v.VFIO_IRQ_INFO_AUTOMASKED
        elif info.index != v.VFIO_PCI_MSIX_IRQ_INDEX or not self.has_dyn_msix:
            info.flags |= v.VFIO_IRQ_INFO_NORESIZE
        arg.put(info, size=_IRQ_INFO_MINSZ)
        return 0

    def ioctl_set_irqs(self, arg: UserArg) -> int:
        """vfio_pci_ioctl_set_irqs."""
        hdr = arg.get(v.vfio_irq_set, size=IRQ_SET_MINSZ)
        max_irqs = self.irq_count(hdr.index)
        data_size = vfio_set_irqs_validate_and_prepare(hdr, max_irqs, v.VFIO_PCI_NUM_IRQS)
        data = memdup_user(arg, IRQ_SET_MINSZ, data_size) if data_size else b""
        vfio_pci_set_irqs_ioctl(self, hdr.flags, hdr.index, hdr.start, hdr.count, data)
        return 0

    def _reset_probe(self) -> None:
        """pci_probe_reset_slot / pci_probe_reset_bus: neither possible is ENODEV."""
        if self.pci.reset_scope is None:
            raise err(ENODEV)

    def _dev_set(self) -> list[VfioPciCoreDevice]:
        """The devices a slot/bus reset reaches (vfio_pci_for_each_slot_or_bus): the model's
        functions each sit alone in their reset scope, so only this one."""
        return [self]

    def _cdev_opened(self) -> bool:
        return self.cdev_df is not None

    def ioctl_get_pci_hot_reset_info(self, arg: UserArg) -> int:
        """vfio_pci_ioctl_get_pci_hot_reset_info."""
        hdr = arg.get(v.vfio_pci_hot_reset_info, size=_HOT_RESET_MINSZ)
        if hdr.argsz < _HOT_RESET_MINSZ:
            raise err(EINVAL)
        hdr.flags = 0
        self._reset_probe()
        room = (hdr.argsz - ctypes.sizeof(hdr)) // _DEP_DEV
        flags = 0
        if self._cdev_opened():
            flags = v.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | v.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
        count = written = 0
        for dev in self._dev_set():  # vfio_pci_fill_devs, device by device
            count += 1
            if written >= room:
                continue
            info = v.vfio_pci_dependent_device(
                segment=dev.pci.segment, bus=dev.pci.bus, devfn=dev.pci.devfn
            )
            if flags & v.VFIO_PCI_HOT_RESET_FLAG_DEV_ID:
                devid = self._dev_id(dev)
                info.devid = devid & 0xFFFFFFFF
                if devid == v.VFIO_PCI_DEVID_NOT_OWNED:
                    flags &= ~v.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
            else:
                info.group_id = dev.index  # iommu_group_id: /dev/vfio/<index>
            arg.put(info, ctypes.sizeof(hdr) + written * _DEP_DEV)  # EFAULT
            written += 1
        hdr.count = count
        hdr.flags = flags
        arg.put(hdr, size=_HOT_RESET_MINSZ)
        if count > written:
            raise err(ENOSPC)
        return 0

    def _dev_id(self, dev: VfioPciCoreDevice) -> int:
        """vfio_iommufd_get_dev_id(dev, this device's iommufd ctx): the device's iommufd
        object id when it is bound to the same ctx, else not owned."""
        mine = self.cdev_df
        theirs = dev.cdev_df
        if mine is not None and theirs is not None and theirs.iommufd is mine.iommufd:
            return int(theirs.idev.id)
        return v.VFIO_PCI_DEVID_NOT_OWNED

    def ioctl_pci_hot_reset(self, arg: UserArg) -> int:
        """vfio_pci_ioctl_pci_hot_reset: a cdev-opened device takes count 0 (ownership
        through its iommufd), a group-opened one group fds."""
        hdr = arg.get(v.vfio_pci_hot_reset, size=_HOT_RESET_MINSZ)
        if hdr.argsz < _HOT_RESET_MINSZ or hdr.flags:
            raise err(EINVAL)
        if bool(hdr.count) == self._cdev_opened():
            raise err(EINVAL)
        self._reset_probe()
        if hdr.count:
            return self._hot_reset_groups(hdr.count, arg)
        return self._dev_set_hot_reset(groups=None)

    def _hot_reset_groups(self, array_count: int, arg: UserArg) -> int:
        """vfio_pci_ioctl_pci_hot_reset_groups."""
        from vfiomig.kernel.group import VfioGroupFile

        if array_count > len(self._dev_set()):
            raise err(EINVAL)
        raw = memdup_user(arg, _HOT_RESET_MINSZ, 4 * array_count)
        fds = struct.unpack(f"<{array_count}i", raw)
        groups = []
        for fd in fds:
            f = self.kernel.fdt.files.get(fd)
            if f is None:
                raise err(EBADF)
            if not isinstance(f, VfioGroupFile):  # vfio_file_is_group
                raise err(EINVAL)
            groups.append(f.group)
        return self._dev_set_hot_reset(groups=groups)

    def _dev_set_hot_reset(self, groups: list[Any] | None) -> int:
        """vfio_pci_dev_set_hot_reset: every device of the set must be owned by the caller
        (in one of the groups, or bound to the caller's iommufd), else EINVAL; then
        pci_reset_bus resets each function (and runs its driver's reset_done)."""
        from vfiomig.kernel.group import vfio_group_of

        for dev in self._dev_set():
            if groups is None:
                owned = self._dev_id(dev) > 0
            else:
                owned = vfio_group_of(dev) in groups
            if not owned:
                raise err(EINVAL)
        for dev in self._dev_set():
            dev.reset()
        return 0

    def ioctl_ioeventfd(self, arg: UserArg) -> int:
        """vfio_pci_ioctl_ioeventfd + vfio_pci_ioeventfd."""
        ioe = arg.get(v.vfio_device_ioeventfd, size=_IOEVENTFD_MINSZ)
        if ioe.argsz < _IOEVENTFD_MINSZ:
            raise err(EINVAL)
        if ioe.flags & ~v.VFIO_DEVICE_IOEVENTFD_SIZE_MASK:
            raise err(EINVAL)
        count = ioe.flags & v.VFIO_DEVICE_IOEVENTFD_SIZE_MASK
        if bin(count).count("1") != 1 or ioe.fd < -1:
            raise err(EINVAL)
        return self._ioeventfd(ioe.offset, ioe.data, count, ioe.fd)

    def _ioeventfd(self, offset: int, data: int, count: int, fd: int) -> int:
        pos = offset & VFIO_PCI_OFFSET_MASK
        bar = offset >> VFIO_PCI_OFFSET_SHIFT
        if offset >= 1 << 63:
            # loff_t offset < 0: the arithmetic shift gives a negative bar that passes
            # `bar > VFIO_PCI_BAR5_REGION_INDEX` and pci_resource_len() reads outside
            # pdev->resource[]. The model cannot read that memory: it logs the kernel's
            # out-of-bounds read and answers as for a BAR of length 0.
            self.warn(f"vfio_pci_ioeventfd: pdev->resource[{bar - (1 << 24)}] out of bounds")
            raise err(EINVAL)
        if bar > v.VFIO_PCI_BAR5_REGION_INDEX:  # only ioeventfds into BARs
            raise err(EINVAL)
        if pos + count > self.pci.bars[bar].size:
            raise err(EINVAL)
        pci = self.pci
        if (
            pci.msix_vectors
            and bar == pci.msix_bar
            and not (pos + count <= pci.msix_offset or pos >= pci.msix_offset + pci.msix_size)
        ):
            raise err(EINVAL)  # no ioeventfds working around MSI-X table writes
        for ioe in self.ioeventfds:
            if (ioe.pos, ioe.bar, ioe.data, ioe.count) == (pos, bar, data, count):
                if fd != -1:
                    raise err(EEXIST)
                vfio_virqfd_disable(ioe.virqfd)
                self.ioeventfds.remove(ioe)
                return 0
        if fd < 0:
            raise err(ENODEV)
        if len(self.ioeventfds) >= VFIO_PCI_IOEVENTFD_MAX:
            raise err(ENOSPC)
        ioe = IoEventfd(pos, bar, data, count, test_mem=not pci.bars[bar].io)

        def handler(ioe: IoEventfd = ioe) -> bool:  # vfio_pci_ioeventfd_handler
            if not ioe.test_mem or self.memory_enabled():
                self.mmio_write(ioe.bar, ioe.pos, ioe.count, ioe.data & ((1 << 8 * ioe.count) - 1))
            return False

        vfio_virqfd_enable(self.kernel.fdt.files, ioe.virqfd, fd, handler, None)
        self.ioeventfds.insert(0, ioe)  # list_add
        return 0

    # -- vfio_pci_core_ioctl_feature ---------------------------------------------------

    def device_feature(self, flags: int, arg: UserArg, argsz: int) -> int:
        index = flags & v.VFIO_DEVICE_FEATURE_MASK
        if index == v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY:
            # vfio_pci_core_pm_entry
            if vfio_check_feature(flags, argsz, SET, 0):
                self._pm_runtime_entry(None)
            return 0
        if index == v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP:
            return self._pm_entry_with_wakeup(flags, arg, argsz)
        if index == v.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT:
            # vfio_pci_core_pm_exit
            if vfio_check_feature(flags, argsz, SET, 0):
                self._pm_runtime_exit()
            return 0
        if index == v.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN:
            # vfio_pci_core_feature_token: vf_token exists only for SR-IOV PFs
            raise err(ENOTTY)
        if index == v.VFIO_DEVICE_FEATURE_DMA_BUF:
            # vfio_pci_core_feature_dma_buf: !vdev->pci_ops->get_dmabuf_phys (only plain
            # vfio-pci and nvgrace-gpu set it), before vfio_check_feature
            raise err(EOPNOTSUPP)
        raise err(ENOTTY)

    def _pm_entry_with_wakeup(self, flags: int, arg: UserArg, argsz: int) -> int:
        """vfio_pci_core_pm_entry_with_wakeup."""
        entry_cls = v.vfio_device_low_power_entry_with_wakeup
        if not vfio_check_feature(flags, argsz, SET, ctypes.sizeof(entry_cls)):
            return 0
        entry = arg.get(entry_cls, FEATURE_HDR)  # EFAULT
        if entry.wakeup_eventfd < 0:
            raise err(EINVAL)
        ctx = eventfd_ctx_fdget(self.kernel.fdt.files, entry.wakeup_eventfd)
        self._pm_runtime_entry(ctx)
        return 0

    # -- read / write (vfio_pci_core_read / _write -> vfio_pci_rw) ---------------------

    def ops_read(self, n: int, pos: int) -> bytes:
        if not n:
            return b""
        out = bytearray()
        self._rw(pos, n, out, None)
        return bytes(out)

    def ops_write(self, data: bytes, pos: int) -> int:
        if not data:
            return 0
        return self._rw(pos, len(data), None, data)

    def _rw(self, pos: int, count: int, out: bytearray | None, data: bytes | None) -> int:
        """vfio_pci_rw: index check, pm resume, then the region."""
        index = pos >> VFIO_PCI_OFFSET_SHIFT
        if index >= v.VFIO_PCI_NUM_REGIONS:  # + vdev->num_regions (none)
            raise err(EINVAL)
        self.pm_runtime_get()  # pm_runtime_resume_and_get
        off = pos & VFIO_PCI_OFFSET_MASK
        if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
            return self._config_rw(off, count, out, data)
        if index == v.VFIO_PCI_ROM_REGION_INDEX:
            # a write EINVAL; a read reaches vfio_pci_bar_rw: no ROM BAR, no pdev->rom: EINVAL
            raise err(EINVAL)
        if index == v.VFIO_PCI_VGA_REGION_INDEX:
            raise err(EINVAL)  # vfio_pci_vga_rw: !vdev->has_vga
        return self._bar_rw(index, off, count, out, data)

    def _config_rw(self, off: int, count: int, out: bytearray | None, data: bytes | None) -> int:
        """vfio_pci_config_rw: vfio_config_do_rw in aligned 4/2/1-byte pieces; the whole
        remaining access must fit cfg_size (EFAULT)."""
        size = self.pci.cfg_size
        done = 0
        while count:
            if off >= size or off + count > size:
                raise err(EFAULT)
            n = 4 if count >= 4 and not off % 4 else 2 if count >= 2 and not off % 2 else 1
            if data is None:
                assert out is not None
                out += self.vconfig[off : off + n]
            else:
                self._config_write(off, data[done : done + n])
            off += n
            done += n
            count -= n
        return done

    def _config_write(self, off: int, chunk: bytes) -> None:
        cfg, wm = self.vconfig, self.cfg_wmask
        for i, b in enumerate(chunk):
            cfg[off + i] = (cfg[off + i] & ~wm[off + i]) | (b & wm[off + i])
        end = off + len(chunk)
        if off < PCI_COMMAND + 2 and end > PCI_COMMAND:
            # vfio_basic_config_write: the virtual INTx disable bit masks INTx
            disable = bool(struct.unpack_from("<H", cfg, PCI_COMMAND)[0] & PCI_COMMAND_INTX_DISABLE)
            if disable and not self.irqs.virq_disabled:
                self.irqs.virq_disabled = True
                vfio_pci_intx_mask(self)
            elif not disable and self.irqs.virq_disabled:
                self.irqs.virq_disabled = False
                vfio_pci_intx_unmask(self)
        if off < PCI_ROM_ADDRESS + 4 and end > PCI_BASE_ADDRESS_0:
            _bar_fixup(self.pci, cfg)

    def _bar_rw(
        self, bar: int, pos: int, count: int, out: bytearray | None, data: bytes | None
    ) -> int:
        """vfio_pci_bar_rw + vfio_pci_core_do_io_rw."""
        b = self.pci.bars[bar]
        if not b.start or not b.size:
            raise err(EINVAL)
        end = b.size
        if pos >= end:
            raise err(EINVAL)
        count = min(count, end - pos)
        x_start = x_end = 0
        if self.pci.msix_vectors and bar == self.pci.msix_bar:
            x_start, x_end = self.pci.msix_offset, self.pci.msix_offset + self.pci.msix_size
        test_mem = not b.io
        done = 0
        while count:
            if pos < x_start:
                fillable = min(count, x_start - pos)
            elif pos >= x_end:
                fillable = count
            else:
                fillable = 0
            if fillable:
                n = next(s for s in (8, 4, 2, 1) if fillable >= s and not pos % s)
                if test_mem and not self.memory_enabled():
                    raise err(EIO)
                if data is None:
                    assert out is not None
                    out += self.mmio_read(bar, pos, n).to_bytes(n, "little")
                else:
                    self.mmio_write(bar, pos, n, int.from_bytes(data[done : done + n], "little"))
            else:  # inside the MSI-X table: reads -1, writes dropped
                n = min(count, x_end - pos)
                if data is None:
                    assert out is not None
                    out += b"\xff" * n
            pos += n
            done += n
            count -= n
        return done

    # -- mmap (vfio_pci_core_mmap) -----------------------------------------------------

    def ops_mmap(self, mm: Memory, size: int, pgoff: int) -> Region:
        index = pgoff >> (VFIO_PCI_OFFSET_SHIFT - PAGE_SHIFT)
        if index >= v.VFIO_PCI_NUM_REGIONS:
            raise err(EINVAL)
        # vm_end < vm_start cannot happen; every model mapping is MAP_SHARED (VM_SHARED)
        if index >= v.VFIO_PCI_ROM_REGION_INDEX:
            raise err(EINVAL)
        if not self.bar_mmap_supported(index):
            raise err(EINVAL)
        phys_len = -(-self.pci.bars[index].size // PAGE_SIZE) * PAGE_SIZE
        req_start = (pgoff & ((1 << (VFIO_PCI_OFFSET_SHIFT - PAGE_SHIFT)) - 1)) << PAGE_SHIFT
        if req_start + size > phys_len:
            raise err(EINVAL)
        return self.map_bar(mm, index, req_start, size)

    def map_bar(self, mm: Memory, bar: int, start: int, size: int) -> Region:
        backing = self.mmio_backing(bar)
        if backing is None:
            return mm.mmap(size, backed=False)  # MMIO registers: address space only
        return mm.map_data(backing[start : start + size], start)


_IOCTLS = {
    v.VFIO_DEVICE_GET_IRQ_INFO: VfioPciCoreDevice.ioctl_get_irq_info,
    v.VFIO_DEVICE_SET_IRQS: VfioPciCoreDevice.ioctl_set_irqs,
    v.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: VfioPciCoreDevice.ioctl_get_pci_hot_reset_info,
    v.VFIO_DEVICE_PCI_HOT_RESET: VfioPciCoreDevice.ioctl_pci_hot_reset,
    v.VFIO_DEVICE_IOEVENTFD: VfioPciCoreDevice.ioctl_ioeventfd,
}
