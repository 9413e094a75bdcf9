"""CONFIG_IOMMUFD_TEST: IOMMU_TEST_CMD, the mock IOMMU and its devices
(drivers/iommu/iommufd/selftest.c; ABI: iommufd_test.h, vfiomig/uapi/iommufd_test.py).

ModelKernel(iommufd_test=True) is a kernel built with the test option: /dev/iommu then takes
IOMMU_TEST_CMD (registered in the ioctl table at IOMMUFD_CMD_BASE + 32, which the table
reaches only for such a kernel, main.ioctl_table_len), and fail-nth fault injection works
(kernel/fault_inject.py). The test interface is the selftests' own: this module speaks the
iommufd_test.h of the selftests the project runs (Linux 6.12, docs/selftests.md), while the
iommufd core around it is the model's Linux 7.2.

What the ops build on:

* mock devices (struct mock_dev) live on their own bus behind the mock IOMMU (mock_ops):
  they bind to an iommufd like a VFIO device (an iommufd DEVICE object), each owned by a
  SELFTEST object whose destruction unbinds it. `MockDev.iommu_ops` makes the iommufd core
  use the mock driver for them (iommu_drivers.dev_iommu_ops);
* the mock paging domain maps IOVA in MOCK_IO_PAGE_SIZE (PAGE_SIZE / 2) pages, and in
  MOCK_HUGE_PAGE_SIZE pages too for a MOCK_FLAGS_DEVICE_HUGE_IOVA device, inside
  [MOCK_APERTURE_START, MOCK_APERTURE_LAST]; each page holds the user address it maps (the
  model's "physical" address, as in hw/iommu.py) and a dirty bit. Dense numpy arrays over
  the aperture, so every op is vectorised;
* the nested mock domain only keeps a 4-entry "IOTLB" that invalidations clear;
* an access (IOMMU_TEST_OP_CREATE_ACCESS) is an iommufd ACCESS object owned by a file the
  program holds: closing the fd destroys it; the pages it pins are "items" with ids.

Page references (IOMMU_TEST_OP_MD_CHECK_REFS): the model pins nothing for real, so the
count is computed from what the model holds: one reference per page for every pinned
iopt_pages (an area filled into domains, or pinned by an access), across every live iommufd.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from errno import (
    EBADE,
    EBADFD,
    EFAULT,
    EINVAL,
    EIO,
    ENOENT,
    ENOMEM,
    EOPNOTSUPP,
    EOVERFLOW,
)
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SHIFT, PAGE_SIZE
from vfiomig.kernel.bitops import U64_MAX, ULONG_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.fault_inject import FaultInject, fail_nth_opener, fail_point
from vfiomig.kernel.fs import File
from vfiomig.kernel.iommufd.access import (
    IommufdAccess,
    iommufd_access_attach,
    iommufd_access_create,
    iommufd_access_destroy,
    iommufd_access_replace,
)
from vfiomig.kernel.iommufd.device import (
    IommufdDevice,
    iommufd_device_attach,
    iommufd_device_bind,
    iommufd_device_detach,
    iommufd_device_replace,
    iommufd_device_unbind,
)
from vfiomig.kernel.iommufd.eventq import (
    IopfFault,
    iommufd_ctx_get,
    iommufd_ctx_put,
    iommufd_report_device_fault,
)
from vfiomig.kernel.iommufd.hw_pagetable import IommufdHwptNested, IommufdHwptPaging
from vfiomig.kernel.iommufd.io_pagetable import Geometry
from vfiomig.kernel.iommufd.ioas import IommufdIoas, iommufd_get_ioas
from vfiomig.kernel.iommufd.main import (
    IommufdCtx,
    IommufdFile,
    IommufdObject,
    IommufdObjectType,
    Ucmd,
    load_ops,
    register,
)
from vfiomig.kernel.uaccess import user_read, user_write
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import iommufd_test as t

if TYPE_CHECKING:
    from pathlib import Path

    from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap
    from vfiomig.kernel.machine import ModelKernel

MOCK_IO_PAGE_SIZE = PAGE_SIZE // 2
MOCK_IO_PAGE_SHIFT = PAGE_SHIFT - 1
MOCK_HUGE_PAGE_SIZE = 512 * MOCK_IO_PAGE_SIZE
_MOCK_NPAGES = (t.MOCK_APERTURE_LAST + 1) >> MOCK_IO_PAGE_SHIFT  # entries up to the aperture

# Per-entry state of the mock page table (selftest.c MOCK_PFN_*_IOVA bits).
_PRESENT = 1
_DIRTY = 2  # MOCK_PFN_DIRTY_IOVA
_HUGE = 4  # MOCK_PFN_HUGE_IOVA

# iommufd_test_access_pages / _rw: "Prevent syzkaller from triggering a WARN_ON in kvzalloc()"
_MAX_ACCESS = 16 * 1024 * 1024
_DIRTY_MAX_BITS = 16 * 1024 * 1024 * 8  # SZ_16M * BITS_PER_BYTE
_MOCK_DEV_FLAGS = (
    t.MOCK_FLAGS_DEVICE_NO_DIRTY | t.MOCK_FLAGS_DEVICE_HUGE_IOVA | t.MOCK_FLAGS_DEVICE_PASID
)


# -- the mock IOMMU ---------------------------------------------------------------------


class MockDomain:
    """struct mock_iommu_domain: an UNMANAGED domain of the mock IOMMU (its xarray of
    pfns as two dense arrays over the IOVA up to the aperture's end)."""

    has_dirty_ops: bool

    def __init__(self, ops: MockIommuOps, huge: bool, dirty_ops: bool) -> None:
        self.owner = ops  # domain->owner: which driver made it
        self.mm = ops.kernel.mm
        self.geometry = ops.aperture
        self.pgsize_bitmap = MOCK_IO_PAGE_SIZE | (MOCK_HUGE_PAGE_SIZE if huge else 0)
        self.has_dirty_ops = dirty_ops
        self.dirty_tracking = False  # MOCK_DIRTY_TRACK
        self.uva = np.zeros(_MOCK_NPAGES, dtype=np.int64)
        self.flags = np.zeros(_MOCK_NPAGES, dtype=np.uint8)

    def _span(self, iova: int, length: int) -> slice:
        if iova % MOCK_IO_PAGE_SIZE or length % MOCK_IO_PAGE_SIZE:
            raise ValueError(f"mock domain: unaligned IOVA range {iova:#x}+{length:#x}")
        lo, hi = iova >> MOCK_IO_PAGE_SHIFT, (iova + length) >> MOCK_IO_PAGE_SHIFT
        if hi > _MOCK_NPAGES:
            raise ValueError(f"mock domain: IOVA {iova:#x}+{length:#x} past the aperture")
        return slice(lo, hi)

    # -- iommu_domain_ops ------------------------------------------------------------

    def map(self, iova: int, uva: int, length: int, *, read: bool, write: bool, huge: bool) -> None:
        """iommu_map -> mock_domain_map_pages: the largest page size the alignment of
        iova and paddr allows (__iommu_map / iommu_pgsize); HUGE pages only when the domain
        has them and the IOAS allows large pages."""
        fail_point(self.mm, "fail_iommufd", ENOENT)  # iommufd_should_fail()
        span = self._span(iova, length)
        if self.flags[span].any():
            raise ValueError(f"mock domain: {iova:#x}+{length:#x} is already partly mapped")
        n = span.stop - span.start
        self.uva[span] = uva + np.arange(n, dtype=np.int64) * MOCK_IO_PAGE_SIZE
        self.flags[span] = _PRESENT
        if (
            huge
            and self.pgsize_bitmap & MOCK_HUGE_PAGE_SIZE
            and not (iova - uva) % MOCK_HUGE_PAGE_SIZE
        ):
            lo = -(-iova // MOCK_HUGE_PAGE_SIZE) * MOCK_HUGE_PAGE_SIZE
            hi = (iova + length) // MOCK_HUGE_PAGE_SIZE * MOCK_HUGE_PAGE_SIZE
            if hi > lo:
                self.flags[lo >> MOCK_IO_PAGE_SHIFT : hi >> MOCK_IO_PAGE_SHIFT] |= _HUGE

    def unmap(self, iova: int, length: int) -> int:
        """mock_domain_unmap_pages: the entries go, whatever state they had."""
        span = self._span(iova, length)
        self.flags[span] = 0
        self.uva[span] = 0
        return length

    def iotlb_sync(self, iova: int, length: int) -> None:
        """The mock has no IOTLB."""

    def iova_to_phys(self, iova: int) -> int | None:
        i = iova >> MOCK_IO_PAGE_SHIFT
        if i >= _MOCK_NPAGES or not self.flags[i] & _PRESENT:
            return None
        return int(self.uva[i]) + iova % MOCK_IO_PAGE_SIZE

    # -- iommu_dirty_ops -------------------------------------------------------------

    def set_dirty_tracking(self, enable: bool) -> None:
        """mock_domain_set_dirty_tracking."""
        if enable and not self.has_dirty_ops:
            raise err(EINVAL)
        self.dirty_tracking = enable

    def read_and_clear_dirty(self, iova: int, length: int, *, clear: bool, out: Any = None) -> None:
        """read_and_clear_dirty without a bitmap (iopt_clear_dirty_data): clear."""
        if clear:
            self.flags[self._span(iova, length)] &= np.uint8(~_DIRTY & 0xFF)

    def clear_dirty(self, iova: int, length: int) -> None:
        """read_and_clear_dirty with a NULL bitmap (iopt_clear_dirty_data, the domain
        interface of io_pagetable.py): every dirty bit of the range cleared."""
        self.read_and_clear_dirty(iova, length, clear=True)

    def record_dirty(self, bitmap: IovaBitmap, iova: int, length: int, clear: bool) -> None:
        """mock_domain_read_and_clear_dirty: walk the range; a present entry is a
        MOCK_IO_PAGE_SIZE page, or a whole MOCK_HUGE_PAGE_SIZE one when marked huge; a
        dirty page is recorded from the walk's IOVA for its page size
        (iommu_dirty_bitmap_record(dirty, iova, pgsize)) and cleared unless NO_CLEAR.
        Without dirty tracking enabled the driver refuses (-EINVAL), which the core
        discards: nothing is recorded."""
        if not self.dirty_tracking:
            return
        end = iova + length
        cur_idx = iova >> MOCK_IO_PAGE_SHIFT
        hi_idx = min(-(-end >> MOCK_IO_PAGE_SHIFT), _MOCK_NPAGES)
        both = _PRESENT | _DIRTY
        while cur_idx < hi_idx:
            huge = np.flatnonzero(self.flags[cur_idx:hi_idx] & _HUGE)
            stop = cur_idx + int(huge[0]) if huge.size else hi_idx
            # the small pages before the next huge entry, all at once
            small = self.flags[cur_idx:stop]
            dirty = np.flatnonzero((small & both) == both)
            if dirty.size:
                starts = (cur_idx + dirty).astype(np.uint64) << np.uint64(MOCK_IO_PAGE_SHIFT)
                bitmap.set_ranges(starts, MOCK_IO_PAGE_SIZE)
                if clear:
                    small[dirty] &= np.uint8(~_DIRTY & 0xFF)
            if stop >= hi_idx:
                break
            # one huge page, entered at `stop`: tested and cleared whole, recorded from here
            cur = stop << MOCK_IO_PAGE_SHIFT
            head = cur & ~(MOCK_HUGE_PAGE_SIZE - 1)
            whole = self.flags[
                head >> MOCK_IO_PAGE_SHIFT : (head + MOCK_HUGE_PAGE_SIZE) >> MOCK_IO_PAGE_SHIFT
            ]
            if (whole & _DIRTY).any():
                bitmap.set(cur, MOCK_HUGE_PAGE_SIZE)
                if clear:
                    whole &= np.uint8(~_DIRTY & 0xFF)
            cur_idx = (cur + MOCK_HUGE_PAGE_SIZE) >> MOCK_IO_PAGE_SHIFT


class MockNestedDomain:
    """struct mock_iommu_domain_nested: a NESTED domain over a mock parent, with the mock
    "IOTLB" that IOMMU_HWPT_INVALIDATE clears."""

    has_dirty_ops = False
    pgsize_bitmap = MOCK_IO_PAGE_SIZE

    def __init__(self, ops: MockIommuOps, parent: MockDomain, iotlb: int) -> None:
        self.owner = ops
        self.mm = ops.kernel.mm
        self.parent = parent
        self.iotlb = [iotlb] * t.MOCK_NESTED_DOMAIN_IOTLB_NUM

    def cache_invalidate_user(
        self, data_type: int, uptr: int, entry_len: int, entry_num: int
    ) -> tuple[int, int]:
        """mock_domain_cache_invalidate_user: (errno or 0, entries processed)."""
        if data_type != t.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST:
            return EINVAL, 0
        size = ctypes.sizeof(t.iommu_hwpt_invalidate_selftest)
        processed = 0
        for i in range(entry_num):
            # iommu_copy_struct_from_user_array(..., iotlb_id): the entry must be at least
            # up to iotlb_id and no larger than the kernel's struct
            if entry_len < size or size < entry_len:
                return EINVAL, processed
            try:
                raw = user_read(self.mm, uptr + i * entry_len, entry_len)
            except OSError:
                return EFAULT, processed
            inv = t.iommu_hwpt_invalidate_selftest.from_buffer_copy(raw)
            if inv.flags & ~t.IOMMU_TEST_INVALIDATE_FLAG_ALL:
                return EOPNOTSUPP, processed
            if inv.iotlb_id > t.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX:
                return EINVAL, processed
            if inv.flags & t.IOMMU_TEST_INVALIDATE_FLAG_ALL:
                self.iotlb = [0] * t.MOCK_NESTED_DOMAIN_IOTLB_NUM
            else:
                self.iotlb[inv.iotlb_id] = 0
            processed += 1
        return 0, processed


class MockIommuOps:
    """mock_ops: the mock IOMMU driver, with the attributes the iommufd core asks of a
    driver (iommu_drivers.IommuDriver's)."""

    vendor = "mock"
    hw_info_type = t.IOMMU_HW_INFO_TYPE_SELFTEST
    aperture = Geometry(t.MOCK_APERTURE_START, t.MOCK_APERTURE_LAST)
    resv_regions: tuple[Any, ...] = ()  # no get_resv_regions

    def __init__(self, kernel: ModelKernel) -> None:
        self.kernel = kernel

    def hw_info(self, dirty: bool) -> bytes:
        """mock_domain_hw_info."""
        return bytes(t.iommu_test_hw_info(flags=0, test_reg=t.IOMMU_HW_INFO_SELFTEST_REGVAL))

    def check_paging_flags(self, flags: int, user_data: bool) -> None:
        """mock_domain_alloc_user without a parent: only NEST_PARENT and DIRTY_TRACKING,
        no user data."""
        if flags & ~(u.IOMMU_HWPT_ALLOC_NEST_PARENT | u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING):
            raise err(EOPNOTSUPP)
        if user_data:
            raise err(EOPNOTSUPP)

    def domain_alloc_paging(self, kernel: ModelKernel, vdev: Any, flags: int) -> MockDomain:
        """mock_domain_alloc_paging (+ dirty_ops with IOMMU_HWPT_ALLOC_DIRTY_TRACKING)."""
        fail_point(kernel.mm, "failslab", ENOMEM)
        huge = bool(getattr(vdev, "flags", 0) & t.MOCK_FLAGS_DEVICE_HUGE_IOVA)
        return MockDomain(self, huge, bool(flags & u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING))

    def domain_alloc_nested(self, parent: Any, flags: int, data: Any) -> MockNestedDomain:
        """mock_domain_alloc_user with a parent: IOMMU_HWPT_DATA_SELFTEST data only."""
        if data.type != t.IOMMU_HWPT_DATA_SELFTEST or flags:
            raise err(EOPNOTSUPP)
        if not isinstance(parent, MockDomain) or parent.owner is not self:
            raise err(EINVAL)
        # iommu_copy_struct_from_user(&user_cfg, user_data, IOMMU_HWPT_DATA_SELFTEST, iotlb)
        size = ctypes.sizeof(t.iommu_hwpt_selftest)
        if data.len < size or size < data.len:
            raise err(EINVAL)
        try:
            raw = user_read(self.kernel.mm, data.uptr, data.len)
        except OSError:
            raise err(EFAULT) from None
        fail_point(self.kernel.mm, "failslab", ENOMEM)
        cfg = t.iommu_hwpt_selftest.from_buffer_copy(raw)
        return MockNestedDomain(self, parent, cfg.iotlb)


@dataclass(eq=False)
class MockDev:
    """struct mock_dev: a device on the iommufd_mock bus."""

    iommu_ops: MockIommuOps
    flags: int
    id: int
    hw: Any = None  # no DMA engine: nothing attaches hardware

    @property
    def iommu_dirty(self) -> bool:
        """mock_domain_capable(IOMMU_CAP_DIRTY_TRACKING)."""
        return not self.flags & t.MOCK_FLAGS_DEVICE_NO_DIRTY

    @property
    def max_pasids(self) -> int:
        """dev->iommu->max_pasids of a MOCK_FLAGS_DEVICE_PASID device."""
        return 1 << t.MOCK_PASID_WIDTH if self.flags & t.MOCK_FLAGS_DEVICE_PASID else 0


# -- per-kernel state -------------------------------------------------------------------


@dataclass(eq=False)
class SelftestState:
    kernel: ModelKernel
    ops: MockIommuOps
    memory_limit: int = 65536  # iommufd_test_memory_limit (batch sizes only)
    dev_ids: set[int] = field(default_factory=set)  # mock_dev_ida
    ctxs: set[IommufdCtx] = field(default_factory=set)  # live iommufds, for CHECK_REFS

    def mock_dev_create(self, flags: int) -> MockDev:
        if flags & ~_MOCK_DEV_FLAGS:
            raise err(EINVAL)
        fail_point(self.kernel.mm, "failslab", ENOMEM)  # kzalloc(mdev)
        dev_id = 0
        while dev_id in self.dev_ids:
            dev_id += 1
        self.dev_ids.add(dev_id)
        return MockDev(self.ops, flags, dev_id)

    def mock_dev_destroy(self, mdev: MockDev) -> None:
        self.dev_ids.discard(mdev.id)


def _state(kernel: ModelKernel) -> SelftestState:
    st = getattr(kernel, "iommufd_selftest", None)
    if not isinstance(st, SelftestState):
        raise err(EOPNOTSUPP)
    return st


class _TestIommufdFile(IommufdFile):
    """/dev/iommu of a CONFIG_IOMMUFD_TEST kernel: the same file; the state keeps the
    live contexts so that CHECK_REFS sees every pin."""

    def __init__(self, state: SelftestState) -> None:
        super().__init__(state.kernel)
        self.state = state
        state.ctxs.add(self.ictx)

    def release(self) -> None:
        try:
            super().release()
        finally:
            self.state.ctxs.discard(self.ictx)


def iommufd_test_init(kernel: ModelKernel, debugfs: str | Path | None = None) -> None:
    """iommufd_test_init: the mock IOMMU is registered, /dev/iommu takes IOMMU_TEST_CMD,
    fault injection (fail-nth, and the attributes under `debugfs` if served) is on."""
    from pathlib import Path

    state = SelftestState(kernel, MockIommuOps(kernel))
    kernel.iommufd_selftest = state  # type: ignore[attr-defined]
    fi = FaultInject(kernel, Path(debugfs) if debugfs is not None else None)
    kernel.fault_inject = fi  # type: ignore[attr-defined]

    def open_iommufd(flags: int) -> File:
        """iommufd_fops_open: the kzalloc of the context can fail."""
        load_ops()
        fail_point(kernel.mm, "failslab", ENOMEM)
        return _TestIommufdFile(state)

    kernel.chrdevs["/dev/iommu"] = open_iommufd
    kernel.path_openers.append(lambda path, flags: fail_nth_opener(fi, path))


# -- SELFTEST objects: a mock device bound to the iommufd -------------------------------


class SelftestObj(IommufdObject):
    """struct selftest_obj (TYPE_IDEV)."""

    type = IommufdObjectType.SELFTEST

    def __init__(self, state: SelftestState) -> None:
        super().__init__()
        self.state = state
        self.idev: IommufdDevice | None = None
        self.mdev: MockDev | None = None

    def destroy(self) -> None:
        """iommufd_selftest_destroy: detach, unbind, drop the device."""
        if self.idev is not None:
            iommufd_device_unbind(self.idev)  # detaches first (iommufd_device_detach)
            self.idev = None
        if self.mdev is not None:
            self.state.mock_dev_destroy(self.mdev)
            self.mdev = None


def _mock_domain(ucmd: Ucmd, state: SelftestState) -> int:
    """iommufd_test_mock_domain: a mock device, bound and attached to cmd.id."""
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    sobj = ictx.alloc(SelftestObj(state))
    try:
        dev_flags = 0
        if cmd.op == t.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS:
            dev_flags = cmd.mock_domain_flags.dev_flags
        sobj.mdev = state.mock_dev_create(dev_flags)
        idev = iommufd_device_bind(ictx, sobj.mdev)
        sobj.idev = idev
        pt_id = iommufd_device_attach(idev, cmd.id)
        cmd.mock_domain.out_hwpt_id = pt_id
        cmd.mock_domain.out_stdev_id = sobj.id
        cmd.mock_domain.out_idev_id = idev.id
        try:
            ucmd.respond()
        except OSError:
            iommufd_device_detach(idev)
            raise
    except OSError:
        ictx.remove(sobj)  # unbinds and drops the device (the out_* labels)
        raise
    return 0


def _get_sobj(ucmd: Ucmd, oid: int) -> SelftestObj:
    return ucmd.ictx.get(oid, SelftestObj)


def _mock_domain_replace(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    sobj = _get_sobj(ucmd, cmd.id)
    if sobj.idev is None:
        raise err(EINVAL)
    cmd.mock_domain_replace.pt_id = iommufd_device_replace(sobj.idev, cmd.mock_domain_replace.pt_id)
    ucmd.respond()
    return 0


def _add_reserved(ucmd: Ucmd) -> int:
    """iommufd_test_add_reserved."""
    cmd = ucmd.cmd
    start, length = cmd.add_reserved.start, cmd.add_reserved.length
    if not length:
        raise err(EINVAL)
    last = start + length - 1
    if last > ULONG_MAX:  # check_add_overflow(start, length - 1, &last)
        raise err(EOVERFLOW)
    ioas = iommufd_get_ioas(ucmd.ictx, cmd.id)
    fail_point(ucmd.ictx.kernel.mm, "failslab", ENOMEM)  # iopt_reserve_iova's kzalloc
    ioas.iopt.reserve_iova(start, last, None)
    return 0


def _get_md_pagetable(ucmd: Ucmd, hwpt_id: int) -> MockDomain:
    hwpt = ucmd.ictx.get(hwpt_id, IommufdHwptPaging)
    if not isinstance(hwpt.domain, MockDomain):
        raise err(EINVAL)
    return hwpt.domain


def _first_unmapped(mm: Any, addr: int, npages: int) -> int | None:
    """get_user_pages_fast page by page: the index of the first page not mapped."""
    if mm.contains(addr, npages * PAGE_SIZE):
        return None
    for i in range(npages):
        if not mm.contains(addr + i * PAGE_SIZE, PAGE_SIZE):
            return i
    return None


def _md_check_map(ucmd: Ucmd) -> int:
    """iommufd_test_md_check_pa: every MOCK_IO_PAGE_SIZE page of the range maps the user
    address at the same offset of uptr (checked page by page: GUP of uptr first)."""
    cmd = ucmd.cmd
    iova, length, uptr = cmd.check_map.iova, cmd.check_map.length, cmd.check_map.uptr
    if iova % MOCK_IO_PAGE_SIZE or length % MOCK_IO_PAGE_SIZE or uptr % MOCK_IO_PAGE_SIZE:
        raise err(EINVAL)
    if uptr + length > U64_MAX:
        raise err(EINVAL)
    mock = _get_md_pagetable(ucmd, cmd.id)
    n = length // MOCK_IO_PAGE_SIZE
    if not n:
        return 0
    idx = (iova >> MOCK_IO_PAGE_SHIFT) + np.arange(n, dtype=np.int64)
    inside = idx < _MOCK_NPAGES
    ok = np.zeros(n, dtype=bool)
    good = idx[inside]
    want = uptr + np.arange(n, dtype=np.int64)[inside] * MOCK_IO_PAGE_SIZE
    ok[inside] = ((mock.flags[good] & _PRESENT) != 0) & (mock.uva[good] == want)
    bad = np.flatnonzero(~ok)
    upto = int(bad[0]) + 1 if bad.size else n  # pages looked at before the verdict
    first_page = uptr & ~(PAGE_SIZE - 1)
    last_byte = uptr + upto * MOCK_IO_PAGE_SIZE - 1
    npages = ((last_byte & ~(PAGE_SIZE - 1)) - first_page) // PAGE_SIZE + 1
    if _first_unmapped(ucmd.ictx.kernel.mm, first_page, npages) is not None:
        raise err(EFAULT)
    if bad.size:
        raise err(EINVAL)
    return 0


def page_pins(state: SelftestState, first_page: int, npages: int) -> npt.NDArray[np.int64]:
    """The pin count of each user page [first_page, +npages) (page numbers): one per
    pinned iopt_pages holding it, in every live iommufd (module docstring)."""
    by_pages: dict[int, list[tuple[int, int]]] = {}

    def hold(pages: Any, lo_uva: int, hi_uva: int) -> None:
        by_pages.setdefault(id(pages), []).append((lo_uva >> PAGE_SHIFT, hi_uva >> PAGE_SHIFT))

    for ictx in list(state.ctxs):
        for obj in list(ictx.objects.values()):
            if isinstance(obj, IommufdIoas):
                for area in obj.iopt.areas:
                    if area.pages is not None and area.filled:
                        hold(area.pages, area.uva(area.iova), area.uva(area.last))
            elif isinstance(obj, IommufdAccess) and obj.ioas is not None:
                for iova, length in obj.pins:
                    pieces, _ = obj.ioas.iopt.contig(iova, iova + length - 1)
                    for area, cur, plast in pieces:
                        if area.pages is not None:
                            hold(area.pages, area.uva(cur), area.uva(plast))
    counts = np.zeros(npages + 1, dtype=np.int64)
    last_page = first_page + npages - 1
    for spans in by_pages.values():
        spans.sort()
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            lo, hi = max(lo, first_page), min(hi, last_page)
            if lo <= hi:
                counts[lo - first_page] += 1
                counts[hi - first_page + 1] -= 1
    return np.cumsum(counts[:-1])


def _md_check_refs(ucmd: Ucmd, state: SelftestState) -> int:
    """iommufd_test_md_check_refs: every page of the range is pinned `refs` times (EIO
    otherwise), page by page (GUP first: EFAULT for an unmapped page)."""
    cmd = ucmd.cmd
    uptr, length, refs = cmd.check_refs.uptr, cmd.check_refs.length, cmd.check_refs.refs
    if length % PAGE_SIZE or uptr % PAGE_SIZE or uptr + length > U64_MAX:
        raise err(EINVAL)
    npages = length // PAGE_SIZE
    if not npages:
        return 0
    pins = page_pins(state, uptr >> PAGE_SHIFT, npages)
    bad = np.flatnonzero(pins != refs)
    upto = int(bad[0]) + 1 if bad.size else npages
    if _first_unmapped(ucmd.ictx.kernel.mm, uptr, upto) is not None:
        raise err(EFAULT)
    if bad.size:
        raise err(EIO)
    return 0


def _md_check_iotlb(ucmd: Ucmd) -> int:
    """iommufd_test_md_check_iotlb."""
    cmd = ucmd.cmd
    hwpt = ucmd.ictx.get(cmd.id, IommufdHwptNested)
    mock = hwpt.domain
    if not isinstance(mock, MockNestedDomain):
        raise err(EINVAL)
    iotlb_id = cmd.check_iotlb.id
    if (
        iotlb_id > t.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX
        or mock.iotlb[iotlb_id] != cmd.check_iotlb.iotlb
    ):
        raise err(EINVAL)
    return 0


# -- accesses ---------------------------------------------------------------------------


@dataclass
class _Item:
    """struct selftest_access_item: one ACCESS_PAGES pin."""

    iova: int
    length: int
    id: int


class StaccessFile(File):
    """struct selftest_access and its anon file ([iommufd_test_staccess]): no read or
    write; closing the last fd unpins everything and destroys the ACCESS."""

    def __init__(self) -> None:
        super().__init__()
        self.access: IommufdAccess | None = None
        self.needs_pin_pages = False
        self.items: list[_Item] = []
        self.next_id = 0
        self.ictx_file: File | None = None

    # access->ops->unmap (iommufd_test_access_unmap), called by the iommufd core
    def dma_unmap(self, iova: int, length: int) -> None:
        last = iova + length - 1
        for item in list(self.items):
            if iova > item.iova + item.length - 1 or last < item.iova:
                continue
            self.items.remove(item)
            if self.access is not None:
                self.access.unpin_pages(item.iova, item.length)

    def release(self) -> None:
        """iommufd_test_staccess_release."""
        if self.access is not None:
            self.dma_unmap(0, ULONG_MAX)
            _access_destroy(self.access, self)
            self.access = None


def _access_destroy(access: IommufdAccess, staccess: StaccessFile) -> None:
    """iommufd_access_destroy: the ACCESS goes, then its reference on the iommufd."""
    iommufd_access_destroy(access)
    if staccess.ictx_file is not None:
        f, staccess.ictx_file = staccess.ictx_file, None
        iommufd_ctx_put(f)


def _access_get(ucmd: Ucmd, fd: int) -> StaccessFile:
    """iommufd_access_get: the caller's fd must be an access file (EBADFD otherwise)."""
    f = ucmd.ictx.kernel.fdt.files.get(fd)
    if not isinstance(f, StaccessFile) or f.access is None:
        raise err(EBADFD)
    return f


def _create_access(ucmd: Ucmd) -> int:
    """iommufd_test_create_access."""
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    mm = ictx.kernel.mm
    flags = cmd.create_access.flags
    if flags & ~t.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES:
        raise err(EOPNOTSUPP)
    fail_point(mm, "failslab", ENOMEM)  # kzalloc(staccess)
    fail_point(mm, "failslab", ENOMEM)  # anon_inode_getfile
    staccess = StaccessFile()
    staccess.needs_pin_pages = bool(flags & t.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    fdt = ictx.kernel.fdt
    try:
        fdno = fdt.get_unused_fd()
    except OSError:
        raise err(ENOMEM) from None  # "if (fdno < 0) rc = -ENOMEM"
    access = iommufd_access_create(ictx, staccess)
    # selftest_access_ops{,_pin}: pinning needs page-aligned IOVA, rw alone does not
    access.iova_alignment = PAGE_SIZE if staccess.needs_pin_pages else 1
    staccess.ictx_file = iommufd_ctx_get(ictx)
    try:
        iommufd_access_attach(access, cmd.id)
        cmd.create_access.out_access_fd = fdno
        ucmd.respond()
    except OSError:
        _access_destroy(access, staccess)
        raise
    staccess.access = access
    fdt.fd_install(fdno, staccess)
    return 0


def _access_replace_ioas(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    staccess = _access_get(ucmd, cmd.id)
    assert staccess.access is not None
    iommufd_access_replace(staccess.access, cmd.access_replace_ioas.ioas_id)
    return 0


def _syz_conv_iova(access: IommufdAccess, iova: int) -> int:
    """iommufd_test_syz_conv_iova: the u64 is {u32 nth_area, u32 offset}."""
    nth, offset = iova & 0xFFFFFFFF, iova >> 32
    if access.ioas is None:
        return 0
    areas = access.ioas.iopt.areas
    return areas[nth].iova + offset if nth < len(areas) else 0


def _access_pages(ucmd: Ucmd) -> int:
    """iommufd_test_access_pages: pin, check the pages are uptr's, keep as an item."""
    cmd = ucmd.cmd
    mm = ucmd.ictx.kernel.mm
    ap = cmd.access_pages
    iova, length, uptr, flags = ap.iova, ap.length, ap.uptr, ap.flags
    if length > _MAX_ACCESS:
        raise err(ENOMEM)
    if flags & ~(t.MOCK_FLAGS_ACCESS_WRITE | t.MOCK_FLAGS_ACCESS_SYZ):
        raise err(EOPNOTSUPP)
    staccess = _access_get(ucmd, cmd.id)
    access = staccess.access
    assert access is not None
    if not staccess.needs_pin_pages:
        raise err(EOPNOTSUPP)
    if flags & t.MOCK_FLAGS_ACCESS_SYZ:
        iova = _syz_conv_iova(access, iova)
    first = iova & ~(PAGE_SIZE - 1)
    npages = (-(-(iova + length) // PAGE_SIZE) * PAGE_SIZE - first) // PAGE_SIZE
    fail_point(mm, "failslab", ENOMEM)  # kvcalloc(npages, sizeof(*pages))
    pinned = _access_pin_pages(access, iova, length, bool(flags & t.MOCK_FLAGS_ACCESS_WRITE))
    try:
        if uptr:
            _check_pages(mm, uptr - (iova - first), pinned, npages)
        fail_point(mm, "failslab", ENOMEM)  # kzalloc(item)
        item = _Item(iova, length, staccess.next_id)
        staccess.next_id += 1
        staccess.items.append(item)
        ap.out_access_pages_id = item.id
        try:
            ucmd.respond()
        except OSError:
            staccess.items.remove(item)
            raise
    except OSError:
        access.unpin_pages(iova, length)
        raise
    return 0


def _access_pin_pages(access: IommufdAccess, iova: int, length: int, write: bool) -> list[int]:
    """iommufd_access_pin_pages: the user page address of every page pinned, in order."""
    fail_point(access.ictx.kernel.mm, "fail_page_alloc", ENOMEM)
    pieces = access.pin_pages(iova, length, write)
    pages: list[int] = []
    for uva, n in pieces:
        lo = uva & ~(PAGE_SIZE - 1)
        hi = (uva + n - 1) & ~(PAGE_SIZE - 1)
        pages.extend(range(lo, hi + 1, PAGE_SIZE))
    return pages


def _check_pages(mm: Any, uptr: int, pinned: list[int], npages: int) -> None:
    """iommufd_test_check_pages: GUP each page of uptr (EFAULT), compare (EBADE)."""
    for i in range(npages):
        addr = uptr + i * PAGE_SIZE
        if not mm.contains(addr & ~(PAGE_SIZE - 1), PAGE_SIZE):
            raise err(EFAULT)
        if i >= len(pinned) or pinned[i] != addr & ~(PAGE_SIZE - 1):
            raise err(EBADE)


def _access_rw(ucmd: Ucmd) -> int:
    """iommufd_test_access_rw: copy between the IOAS and uptr through the access."""
    cmd = ucmd.cmd
    mm = ucmd.ictx.kernel.mm
    rw = cmd.access_rw
    iova, length, ubuf, flags = rw.iova, rw.length, rw.uptr, rw.flags
    if length > _MAX_ACCESS:
        raise err(ENOMEM)
    if flags & ~(t.MOCK_ACCESS_RW_WRITE | t.MOCK_ACCESS_RW_SLOW_PATH | t.MOCK_FLAGS_ACCESS_SYZ):
        raise err(EOPNOTSUPP)
    staccess = _access_get(ucmd, cmd.id)
    access = staccess.access
    assert access is not None
    fail_point(mm, "failslab", ENOMEM)  # kvzalloc(length)
    write = bool(flags & t.MOCK_ACCESS_RW_WRITE)
    data = b""
    if write:
        try:
            data = user_read(mm, ubuf, length)
        except OSError:
            raise err(EFAULT) from None
    if flags & t.MOCK_FLAGS_ACCESS_SYZ:
        iova = _syz_conv_iova(access, iova)
    if write:
        access.rw(iova, data if length else 0, True)
    else:
        got = access.rw(iova, length, False)
        try:
            user_write(mm, ubuf, got or b"")
        except OSError:
            raise err(EFAULT) from None
    return 0


def _destroy_access_pages(ucmd: Ucmd) -> int:
    """iommufd_test_access_item_destroy."""
    cmd = ucmd.cmd
    staccess = _access_get(ucmd, cmd.id)
    for item in staccess.items:
        if item.id == cmd.destroy_access_pages.access_pages_id:
            staccess.items.remove(item)
            assert staccess.access is not None
            staccess.access.unpin_pages(item.iova, item.length)
            return 0
    raise err(ENOENT)


# -- dirty, IOPF, memory limit -----------------------------------------------------------


def _dirty(ucmd: Ucmd) -> int:
    """iommufd_test_dirty: mark the mock pages under the set bits of the user's bitmap
    dirty; out_nr_dirty counts those present. The xarray is indexed by iova / page_size
    (the selftest's own indexing, for its page_size of MOCK_IO_PAGE_SIZE)."""
    cmd = ucmd.cmd
    mm = ucmd.ictx.kernel.mm
    d = cmd.dirty
    iova, length, page_size, uptr = d.iova, d.length, d.page_size, d.uptr
    if not page_size or not length or iova % page_size or length % page_size or not uptr:
        raise err(EINVAL)
    nbits = length // page_size
    if nbits > _DIRTY_MAX_BITS:
        raise err(EOVERFLOW)
    mock = _get_md_pagetable(ucmd, cmd.id)
    if not mock.dirty_tracking:
        raise err(EINVAL)
    fail_point(mm, "failslab", ENOMEM)  # kvzalloc(tmp)
    try:
        raw = user_read(mm, uptr, (nbits + 7) // 8)
    except OSError:
        raise err(EFAULT) from None
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=nbits, bitorder="little")
    idx = (iova // page_size) + np.flatnonzero(bits).astype(np.int64)
    idx = idx[idx < _MOCK_NPAGES]
    idx = idx[(mock.flags[idx] & _PRESENT) != 0]
    mock.flags[idx] |= _DIRTY
    d.out_nr_dirty = int(idx.size)
    ucmd.respond()
    return 0


def _trigger_iopf(ucmd: Ucmd) -> int:
    """iommufd_test_trigger_iopf: a one-fault page request group from a mock device."""
    cmd = ucmd.cmd
    tr = cmd.trigger_iopf
    idev = ucmd.ictx.get(tr.dev_id, IommufdDevice)
    if not isinstance(idev.vdev, MockDev):
        raise err(EINVAL)
    flags = int(u.IOMMU_PGFAULT_FLAGS_LAST_PAGE)  # IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE
    if tr.pasid != 0:  # IOMMU_NO_PASID
        flags |= u.IOMMU_PGFAULT_FLAGS_PASID_VALID
    iommufd_report_device_fault(idev, IopfFault(flags, tr.pasid, tr.grpid, tr.perm, tr.addr))
    return 0


def _set_memory_limit(ucmd: Ucmd, state: SelftestState) -> int:
    """IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: protects _batch_init() (it sizes the pin
    batches, which the model does not have)."""
    limit = ucmd.cmd.memory_limit.limit
    if limit < 8 + 4:  # sizeof(unsigned long) + sizeof(u32)
        raise err(EINVAL)
    state.memory_limit = limit
    return 0


@register(t.IOMMU_TEST_CMD, t.iommu_test_cmd, t.iommu_test_cmd.last.offset + 4)
def iommufd_test(ucmd: Ucmd) -> int:
    """iommufd_test: dispatch on the op (EOPNOTSUPP for an unknown one)."""
    state = _state(ucmd.ictx.kernel)
    op = ucmd.cmd.op
    if op == t.IOMMU_TEST_OP_ADD_RESERVED:
        return _add_reserved(ucmd)
    if op in (t.IOMMU_TEST_OP_MOCK_DOMAIN, t.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS):
        return _mock_domain(ucmd, state)
    if op == t.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE:
        return _mock_domain_replace(ucmd)
    if op == t.IOMMU_TEST_OP_MD_CHECK_MAP:
        return _md_check_map(ucmd)
    if op == t.IOMMU_TEST_OP_MD_CHECK_REFS:
        return _md_check_refs(ucmd, state)
    if op == t.IOMMU_TEST_OP_MD_CHECK_IOTLB:
        return _md_check_iotlb(ucmd)
    if op == t.IOMMU_TEST_OP_CREATE_ACCESS:
        return _create_access(ucmd)
    if op == t.IOMMU_TEST_OP_ACCESS_REPLACE_IOAS:
        return _access_replace_ioas(ucmd)
    if op == t.IOMMU_TEST_OP_ACCESS_PAGES:
        return _access_pages(ucmd)
    if op == t.IOMMU_TEST_OP_ACCESS_RW:
        return _access_rw(ucmd)
    if op == t.IOMMU_TEST_OP_DESTROY_ACCESS_PAGES:
        return _destroy_access_pages(ucmd)
    if op == t.IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT:
        return _set_memory_limit(ucmd, state)
    if op == t.IOMMU_TEST_OP_DIRTY:
        return _dirty(ucmd)
    if op == t.IOMMU_TEST_OP_TRIGGER_IOPF:
        return _trigger_iopf(ucmd)
    raise err(EOPNOTSUPP)
