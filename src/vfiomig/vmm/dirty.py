"""QEMU's VFIO dirty-page trackers (hw/vfio/listener.c, container.c, iommufd.c).

A tracker ORs what the kernel reports for every mapped RAM section into the migration
bitmap at each sync (vfio_listener_log_sync -> physical_memory_set_dirty_lebitmap):

  DeviceLogging   VFIO_DEVICE_FEATURE_DMA_LOGGING_START/REPORT on every device
                  (vfio_devices_dma_logging_start, vfio_devices_query_dirty_bitmap)
  IommufdHwpt     IOMMU_HWPT_SET_DIRTY_TRACKING / IOMMU_HWPT_GET_DIRTY_BITMAP per HWPT
  Type1           VFIO_IOMMU_DIRTY_PAGES START / GET_BITMAP on the container (the kernel
                  answers with every pinned page: type1 is "all dirty" in practice)
  AllDirty        no kernel tracker at all: QEMU marks every mapped section dirty at every
                  sync (vfio_container_query_dirty_bitmap's physical_memory_set_dirty_range)
  NoTracker       only with --tracker cpu-only: device writes are never seen (unsafe)
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiomig.host import Container, Hwpt, VfioDevice
from vfiomig.host.bitmap import DirtyBitmap
from vfiomig.vmm.bitmap import PageBitmap

PAGE = 4096


@dataclass(frozen=True)
class RamSection:
    """A piece of guest RAM mapped for DMA: RAM pages [page, page+npages) at ``iova``."""

    page: int
    iova: int
    npages: int

    @property
    def length(self) -> int:
        return self.npages * PAGE


class Tracker:
    name = "none"
    #: what a user reads in the summary
    label = "no VFIO dirty tracking"

    def __init__(self, sections: list[RamSection]) -> None:
        self.sections = sections
        self.syncs = 0

    def start(self) -> None:
        """log_global_start."""

    def stop(self) -> None:
        """log_global_stop."""

    def sync(self, bmap: PageBitmap) -> None:
        """OR this tracker's dirty pages into ``bmap`` (read-and-clear in the kernel)."""
        self.syncs += 1

    @staticmethod
    def _or(bmap: PageBitmap, s: RamSection, bm: DirtyBitmap) -> None:
        bmap.or_words(s.page, bm.words, s.npages)


class NoTracker(Tracker):
    pass


class AllDirty(Tracker):
    name = "all-dirty"
    label = "none in the kernel: every mapped page dirty at every sync (QEMU fallback)"

    def sync(self, bmap: PageBitmap) -> None:
        super().sync(bmap)
        for s in self.sections:
            words = PageBitmap(s.npages, fill=True).words
            bmap.or_words(s.page, words, s.npages)


class DeviceLogging(Tracker):
    name = "device"
    label = "device DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*)"

    def __init__(self, sections: list[RamSection], devices: list[VfioDevice]) -> None:
        super().__init__(sections)
        self.devices = devices
        self.started: list[VfioDevice] = []

    def ranges(self) -> list[tuple[int, int]]:
        """vfio_dirty_tracking_init: at most two ranges, below and above 4 GiB (QEMU's third,
        the PCI 64-bit hole, holds no RAM here)."""
        out = []
        for lo, hi in ((0, 1 << 32), (1 << 32, 1 << 64)):
            inside = [s for s in self.sections if lo <= s.iova < hi]
            if inside:
                start = min(s.iova for s in inside)
                end = max(s.iova + s.length for s in inside)
                out.append((start, end - start))
        return out

    def start(self) -> None:
        for d in self.devices:
            d.dma_logging_start(self.ranges(), PAGE)
            self.started.append(d)

    def stop(self) -> None:
        while self.started:
            self.started.pop().dma_logging_stop()

    def sync(self, bmap: PageBitmap) -> None:
        super().sync(bmap)
        for d in self.devices:
            for s in self.sections:
                self._or(bmap, s, d.dma_logging_report(s.iova, s.length, PAGE))


class IommufdHwpt(Tracker):
    name = "iommufd"
    label = "IOMMU dirty bits (IOMMU_HWPT_GET_DIRTY_BITMAP)"

    def __init__(self, sections: list[RamSection], hwpts: list[Hwpt]) -> None:
        super().__init__(sections)
        self.hwpts = hwpts
        self.started: list[Hwpt] = []

    def start(self) -> None:
        for h in self.hwpts:
            h.set_dirty_tracking(True)
            self.started.append(h)

    def stop(self) -> None:
        while self.started:
            self.started.pop().set_dirty_tracking(False)

    def sync(self, bmap: PageBitmap) -> None:
        super().sync(bmap)
        for h in self.hwpts:
            for s in self.sections:
                self._or(bmap, s, h.get_dirty_bitmap(s.iova, s.length, PAGE))


class Type1(Tracker):
    name = "type1"
    label = "type1 VFIO_IOMMU_DIRTY_PAGES (every pinned page dirty)"

    def __init__(self, sections: list[RamSection], container: Container, pgsize: int) -> None:
        super().__init__(sections)
        self.container = container
        self.pgsize = pgsize
        self.running = False

    def start(self) -> None:
        self.container.dirty_pages_start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.container.dirty_pages_stop()

    def sync(self, bmap: PageBitmap) -> None:
        super().sync(bmap)
        for s in self.sections:
            self._or(bmap, s, self.container.dirty_pages_bitmap(s.iova, s.length, self.pgsize))
