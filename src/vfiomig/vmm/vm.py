"""One VMM process on one host: guest RAM mapped for DMA, passthrough devices bound and
attached, and QEMU's choice of dirty tracker and migration blockers.

Everything below the guest's own memory is reached through vfiomig.host, exactly as QEMU
reaches Linux: iommufd (IOAS + a HWPT per device, dirty-tracking capable when the IOMMU
reports IOMMU_HW_CAP_DIRTY_TRACKING, as hw/vfio/iommufd.c allocates it) or a legacy type1
container (hw/vfio/container.c).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from vfiomig.host import (
    Container,
    Group,
    Hwpt,
    Ioas,
    Iommufd,
    MigrationFlags,
    Transport,
    Type1Info,
    VfioDevice,
    VfioError,
)
from vfiomig.vmm.dirty import (
    AllDirty,
    DeviceLogging,
    IommufdHwpt,
    NoTracker,
    RamSection,
    Tracker,
    Type1,
)
from vfiomig.vmm.guest_ram import PAGE, GuestRam
from vfiomig.vmm.vfio import VfioMigration

ALIGN = 2 << 20  # RAM sections start 2 MiB aligned in IOVA (huge IOPTEs stay possible)


@dataclass
class DeviceConfig:
    """One ``--device KIND[,opts]``: the model options and QEMU's per-device properties."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    dirty_page_tracking: bool = True  # x-device-dirty-page-tracking
    workload: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassthroughDevice:
    config: DeviceConfig
    path: str
    name: str
    dev: VfioDevice
    mig: VfioMigration | None = None
    dma_logging: bool = False
    iommu_dirty_tracking: bool = False  # QEMU's vbasedev->iommu_dirty_tracking


def layout(ram: GuestRam, ranges: tuple[tuple[int, int], ...]) -> list[RamSection]:
    """Guest RAM laid out in IOVA from 0 upwards, skipping what the IOMMU reserves (the MSI
    window, AMD's HyperTransport hole): ``ranges`` are the usable inclusive IOVA ranges.
    Sections never cross a user mapping either, so each maps one piece of one buffer."""
    out: list[RamSection] = []
    iova = 0
    for c in ram.chunks:
        page, left = c.first_page, c.npages
        while left:
            usable = [(s, e) for s, e in ranges if e >= iova and e - max(s, iova) + 1 >= ALIGN]
            if not usable:
                raise ValueError("guest RAM does not fit in the IOMMU's usable IOVA ranges")
            s, e = usable[0]
            iova = max(iova, -(-s // ALIGN) * ALIGN)
            n = min(left, ((e + 1 - iova) // ALIGN) * ALIGN // PAGE)
            if n == 0:
                iova = e + 1
                continue
            out.append(RamSection(page, iova, n))
            page, left, iova = page + n, left - n, iova + n * PAGE
    return out


class Vm:
    """A VMM on one host. ``setup()`` does what QEMU does between -device and migrate."""

    def __init__(
        self,
        t: Transport,
        kernel: Any,
        ram: GuestRam,
        devices: list[tuple[DeviceConfig, str]],
        *,
        backend: str = "iommufd",
        hugepages: bool = False,
    ) -> None:
        self.t = t
        self.kernel = kernel
        self.ram = ram
        self.backend = backend
        self.hugepages = hugepages
        self.devices: list[PassthroughDevice] = []
        self._wanted = devices
        self.ictx: Iommufd | None = None
        self.ioas: Ioas | None = None
        self.hwpts: list[Hwpt] = []
        self.container: Container | None = None
        self.type1_info: Type1Info | None = None
        self.groups: list[Group] = []
        self.sections: list[RamSection] = []
        self.warnings: list[str] = []

    # -- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        if self.backend == "iommufd":
            self._setup_iommufd()
        else:
            self._setup_type1()
        for i, pd in enumerate(self.devices):
            flags = self._migration_flags(pd)
            pd.mig = VfioMigration(f"{pd.config.kind}{i}", pd.config.kind, pd.dev, flags)
            pd.dma_logging = pd.config.dirty_page_tracking and pd.dev.dma_logging_supported()

    @staticmethod
    def _migration_flags(pd: PassthroughDevice) -> MigrationFlags:
        """VFIO_DEVICE_FEATURE_MIGRATION; no flags when the device has no migration uAPI
        (QEMU then blocks migration: vfio_migration_init's -ENOTTY)."""
        try:
            return pd.dev.migration_flags()
        except VfioError:
            return MigrationFlags(0)

    def _setup_iommufd(self) -> None:
        self.ictx = Iommufd(self.t)
        self.ioas = self.ictx.ioas_alloc()
        self.ioas.set_huge_pages(self.hugepages)
        for i, (cfg, path) in enumerate(self._wanted):
            dev = VfioDevice(self.t, path)
            dev_id = dev.bind(self.ictx)
            pd = PassthroughDevice(cfg, path, f"{cfg.kind}{i}", dev)
            if self._iommu_dirty_capable(dev_id):
                pd.iommu_dirty_tracking = True
                hwpt = self._attach_shared(dev, dev_id)
                if hwpt not in self.hwpts:
                    self.hwpts.append(hwpt)
            else:
                dev.attach(self.ioas)
            self.devices.append(pd)
        ranges = self.ioas.iova_ranges().ranges
        self.sections = layout(self.ram, ranges)
        for s in self.sections:
            c = self.ram.chunk_of(s.page)
            self.ioas.map(c.buf.addr + (s.page - c.first_page) * PAGE, s.length, iova=s.iova)

    def _iommu_dirty_capable(self, dev_id: int) -> bool:
        """IOMMU_GET_HW_INFO's IOMMU_HW_CAP_DIRTY_TRACKING. An emulated (mdev) device has no
        IOMMU behind it (ENOENT / EOPNOTSUPP): QEMU skips host IOMMU info for it and attaches
        it to the IOAS, where the kernel's access path serves its pins."""
        assert self.ictx is not None
        try:
            return self.ictx.hw_info(dev_id).dirty_tracking
        except VfioError as e:
            if e.errno in (errno.ENOENT, errno.EOPNOTSUPP):
                return False
            raise

    def _attach_shared(self, dev: VfioDevice, dev_id: int) -> Hwpt:
        """hw/vfio/iommufd.c: attach to an existing dirty-tracking HWPT if the device can,
        else allocate one for it."""
        assert self.ictx is not None and self.ioas is not None
        for h in self.hwpts:
            try:
                dev.attach(h)
                return h
            except VfioError:
                continue
        h = self.ictx.hwpt_alloc(dev_id, self.ioas, dirty_tracking=True)
        dev.attach(h)
        return h

    def _setup_type1(self) -> None:
        self.container = Container(self.t)
        for i, (cfg, path) in enumerate(self._wanted):
            g = Group(self.t, self.kernel.group_of(path))
            g.set_container(self.container)
            self.groups.append(g)
            if i == 0:
                self.container.set_iommu()
            dev = g.get_device(path.rsplit("/", 1)[1])
            self.devices.append(PassthroughDevice(cfg, path, f"{cfg.kind}{i}", dev))
        if not self._wanted:  # a plain VM behind type1: nothing to map
            self.sections = layout(self.ram, ((0, (1 << 64) - 1),))
            return
        info = self.container.iommu_info()
        ranges = info.iova_ranges or ((0, (1 << 64) - 1),)
        self.sections = layout(self.ram, ranges)
        for s in self.sections:
            c = self.ram.chunk_of(s.page)
            self.container.map_dma(c.buf.addr + (s.page - c.first_page) * PAGE, s.iova, s.length)
        self.type1_info = info

    # -- QEMU's migration policy checks (vfio_migration_realize, vfio_block_*) -----------

    def blockers(self, enable_migration: str) -> list[str]:
        """Migration blockers, in QEMU's words; warnings go to self.warnings."""
        reasons: list[str] = []
        for pd in self.devices:
            assert pd.mig is not None
            if enable_migration == "off":
                reasons.append(f"{pd.name}: VFIO device doesn't support migration")
                continue
            if not pd.mig.flags & MigrationFlags.STOP_COPY:
                reasons.append(f"{pd.name}: VFIO migration is not supported in kernel")
                continue
            if not pd.dma_logging and not pd.iommu_dirty_tracking:
                msg = f"{pd.name}: VFIO device doesn't support device and IOMMU dirty tracking"
                if enable_migration == "auto":
                    reasons.append(msg)
                else:
                    self.warnings.append(msg + " (enable-migration=on: migrating anyway)")
        migratable = [pd for pd in self.devices if pd.mig and pd.mig.flags]
        if len(migratable) > 1 and not all(pd.mig and pd.mig.p2p for pd in migratable):
            reasons.append(
                "Multiple VFIO devices migration is supported only if all of them support P2P migration"
            )
        return reasons

    def tracker(self, choice: str = "auto") -> Tracker:
        """vfio_listener_log_global_start / vfio_container_query_dirty_bitmap: device logging
        if every device can, else the container's (iommufd HWPTs, type1 with its migration
        capability), else everything dirty at every sync."""
        if choice == "cpu-only" or not self.devices:
            return NoTracker(self.sections)
        if all(pd.dma_logging for pd in self.devices):
            return DeviceLogging(self.sections, [pd.dev for pd in self.devices])
        if self.backend == "iommufd":
            if self.hwpts and all(pd.iommu_dirty_tracking for pd in self.devices):
                return IommufdHwpt(self.sections, self.hwpts)
            return AllDirty(self.sections)
        info, c = self.type1_info, self.container
        if info is not None and info.migration is not None and c is not None:
            return Type1(self.sections, c, info.min_page_size)
        return AllDirty(self.sections)

    def close(self) -> None:
        """Tear down in the order the kernel allows: devices, objects, fds."""
        for pd in self.devices:
            if pd.mig is not None:
                pd.mig.close_data()
            pd.dev.close()
        for g in self.groups:
            g.close()
        if self.container is not None:
            self.container.close()
        if self.ictx is not None:
            self.ictx.close()
        self.ram.close()
