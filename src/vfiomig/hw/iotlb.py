"""The IOTLB of one domain: which leaves it holds cached as writable-dirty.

Only one fact about a cached translation changes what the hardware does: whether it already
carries "writable and dirty". A write that hits such an entry goes straight to memory with no
page-table access, so the dirty bit software cleared in the meantime is *not* set again
(kernel-uapi.md §9.3; the reason iommufd issues iommu_iotlb_sync after every clearing walk,
drivers/iommu/iommufd/io_pagetable.c iopt_read_and_clear_dirty_data). A cached entry that is
clean, or no entry at all, makes the walker do the atomic update, which the model does
directly. Translation itself never goes stale in the model: unmap and break-before-make
invalidate their range, and permissions never change under a mapping.

The state is a PackedBits replicated per leaf, like the dirty bit: an entry caches a whole
leaf, and an invalidation by range drops every entry overlapping the range (TLBI by VA).
"""

from __future__ import annotations

from vfiomig.hw.io_pgtable import PackedBits


class Iotlb(PackedBits):
    """Bit per page: the leaf holding it is cached as writable-dirty."""

    def fill_from(self, dirty: PackedBits, p0: int, p1: int) -> None:
        """A walk of whole leaves [p0, p1) caches them with their current dirty state."""
        for (t, sl, m), (d, _, _) in zip(
            self.parts(p0, p1, create=True), dirty.parts(p0, p1, create=True), strict=True
        ):
            t[sl] |= d[sl] & m

    def invalidate(self, p0: int, p1: int) -> None:
        """Invalidate entries for pages [p0, p1) (callers pass whole leaves)."""
        self.clear(p0, p1)

    def invalidate_all(self) -> None:
        self.clear_all()
