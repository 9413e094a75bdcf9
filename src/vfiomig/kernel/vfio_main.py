"""The VFIO device core: struct vfio_device, the device file and its ioctls.

Follows drivers/vfio/vfio_main.c (7.2) and include/linux/vfio.h:

* `VfioDeviceFile` is struct vfio_device_file, one open of /dev/vfio/devices/vfioN.
  vfio_device_fops_unl_ioctl: BIND_IOMMUFD first, then EINVAL until access is granted,
  then the cdev-only ATTACH/DETACH, then VFIO_DEVICE_FEATURE and GET_REGION_INFO (the
  core's, kernel/vfio_device_fops.py), then the driver's ioctl (GET_INFO, RESET, the
  driver's own, anything else ENOTTY as vfio_pci_core_ioctl's default).
* `vfio_ioctl_device_feature` + `vfio_check_feature` + the core feature handlers
  (MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE, MIG_PRECOPY_INFOv2, DMA_LOGGING_*), check
  for check in the kernel's order.
* DMA_LOGGING_REPORT hands the driver the user's bitmap as an `IovaBitmap`
  (kernel/iommufd/iova_bitmap.py, the one iova_bitmap.c that iommufd shares with VFIO):
  `bitmap.set_ranges(starts, length)` marks dirty IOVA ranges, vectorized.

Drivers subclass `VfioDevice` and implement the ops (all optional except `step` for a
migratable device):

    kind: str                          # "reference", "mtty", "hisi_acc"
    migration_flags: int = 0           # 0: no mig_ops, migration features ENOTTY
    has_log_ops: bool = False          # False: DMA_LOGGING_* ENOTTY
    emulated_iommu: bool = False       # mdev-like: iommufd uses an ACCESS, not a domain
    info_flags, num_regions, num_irqs  # VFIO_DEVICE_GET_INFO
    info_size: int = 24                # GET_INFO copies back min(argsz, info_size) bytes
    reset_works: bool = True           # VFIO_DEVICE_RESET allowed
    open_device() / close_device()     # ops->open_device (first open) / ->close_device (last
                                       # close); extend with super()
    step(cur, new) -> File | None      # execute ONE arc (see vfio_migration)
    migration_get_state() -> int       # default: self.mig_state
    migration_set_state(new)           # default: vfio_migration.mig_set_state loop
    get_data_size() -> int             # MIG_DATA_SIZE
    reset()                            # VFIO_DEVICE_RESET: RUNNING, data fds disabled
    log_start(ranges, page_size) -> int            # ranges: [(iova, length)] sorted by iova;
                                                   # returns the page size actually used
    log_stop()
    log_read_and_clear(iova, length, bitmap: IovaBitmap)
    device_feature(flags, arg, argsz)  # feature indexes the core does not handle (ENOTTY)
    device_ioctl(cmd, arg)             # device ioctls other than GET_INFO/RESET (ENOTTY)
    get_region_info_caps(info, caps)   # optional: VFIO_DEVICE_GET_REGION_INFO (else EINVAL)
    ops_read(n, pos) / ops_write(data, pos) / ops_mmap(mm, size, pgoff)
                                       # optional region access (else EINVAL)
    pm_runtime_get()                   # optional: runtime PM resume before every ioctl
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from errno import E2BIG, EFAULT, EINVAL, ENOTTY, EOVERFLOW
from typing import TYPE_CHECKING, Any

from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel import device_cdev
from vfiomig.kernel.bitops import U64_MAX, ULONG_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap
from vfiomig.kernel.uaccess import UserArg, user_read
from vfiomig.kernel.vfio_device_fops import (
    vfio_device_fops_mmap,
    vfio_device_fops_read,
    vfio_device_fops_write,
    vfio_get_region_info,
)
from vfiomig.kernel.vfio_fsm import MIG_PRE_COPY, RUNNING
from vfiomig.kernel.vfio_migration import ResumingFile, SavingFile, mig_set_state
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory, Region
    from vfiomig.kernel.machine import ModelKernel

FEATURE_HDR = 8  # offsetofend(struct vfio_device_feature, flags)
GET = v.VFIO_DEVICE_FEATURE_GET
SET = v.VFIO_DEVICE_FEATURE_SET
PROBE = v.VFIO_DEVICE_FEATURE_PROBE
_FEATURE_FLAGS_OK = v.VFIO_DEVICE_FEATURE_MASK | GET | SET | PROBE

# The hot path (MIG_DEVICE_STATE, which a VMM polls) packs with struct rather than ctypes.
_HDR = struct.Struct("<II")
_MIG_STATE = struct.Struct("<Ii")
_LOG_RANGE_SIZE = ctypes.sizeof(v.vfio_device_feature_dma_logging_range)
# LOG_MAX_RANGES: the ranges must fit one kernel page (vfio_main.c)
LOG_MAX_RANGES = PAGE_SIZE // _LOG_RANGE_SIZE
_DEVICE_INFO_MINSZ = 16  # offsetofend(struct vfio_device_info, num_irqs)


# ---------------------------------------------------------------------------------------
# struct vfio_device


class VfioDevice:
    """struct vfio_device plus the behaviour every modelled driver shares."""

    kind = "vfio"
    emulated_iommu = False
    migration_flags = 0
    has_log_ops = False
    info_flags = v.VFIO_DEVICE_FLAGS_PCI | v.VFIO_DEVICE_FLAGS_RESET
    num_regions = v.VFIO_PCI_NUM_REGIONS
    num_irqs = v.VFIO_PCI_NUM_IRQS
    info_size = ctypes.sizeof(v.vfio_device_info)  # vfio_pci_ioctl_get_info: min(argsz, 24)
    reset_works = True

    def __init__(self, kernel: ModelKernel, index: int, *, iommu_dirty: bool = True) -> None:
        self.kernel = kernel
        self.index = index
        self.path = f"/dev/vfio/devices/vfio{index}"
        self.group_path = f"/dev/vfio/{index}"
        self.iommu_dirty = iommu_dirty  # the device's IOMMU can track dirty IOVAs
        self.hw: Any = None  # the hardware side (a DmaDevice for DMA-capable devices)
        # set while bound to an iommufd (device_cdev.py)
        self.iommufd_access: Any = None  # the ACCESS of an emulated-IOMMU device
        self.iommufd_attached = False  # ATTACH_IOMMUFD_PT done (a second one replaces)
        self.mig_state = RUNNING
        self.precopy_info_v2 = False
        self.open_count = 0
        self.saving_file: SavingFile | None = None
        self.resuming_file: ResumingFile | None = None
        self.warnings: list[str] = []  # the kernel's WARN_ONs (dmesg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    # -- opening ---------------------------------------------------------------------

    def cdev_open(self, flags: int) -> File:
        """vfio_device_fops_cdev_open: a fresh, unbound device file."""
        return VfioDeviceFile(self, flags)

    def open_device(self) -> None:
        """ops->open_device on the first open (bind). Drivers extend with super()."""
        self.open_count += 1
        self.mig_state = RUNNING  # every migration driver starts a new user at RUNNING

    def close_device(self) -> None:
        """ops->close_device on the last close; the core clears precopy_info_v2 there too
        (vfio_df_device_last_close)."""
        self.open_count = max(0, self.open_count - 1)
        self.disable_fds()
        if self.has_log_ops:
            self.log_stop()  # mlx5vf_cmd_close_migratable frees the page tracker
        self.precopy_info_v2 = False

    # -- migration ops ---------------------------------------------------------------

    def disable_fds(self) -> None:
        """End any data session (the drivers' *_disable_fds)."""
        for f in (self.saving_file, self.resuming_file):
            if f is not None:
                f.disable()
        self.saving_file = None
        self.resuming_file = None

    def data_files(self) -> list[SavingFile | ResumingFile]:
        """Data files the device holds now (at most one is live)."""
        return [f for f in (self.saving_file, self.resuming_file) if f is not None]

    def migration_get_state(self) -> int:
        return self.mig_state

    def migration_set_state(self, new: int) -> File | None:
        return mig_set_state(self, new)

    def step(self, cur: int, new: int) -> File | None:
        """Execute the single arc cur -> new (driver)."""
        raise err(EINVAL)

    def get_data_size(self) -> int:
        raise err(ENOTTY)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET (the drivers' reset_done): back to RUNNING, fds disabled."""
        if self.migration_flags:
            self.mig_state = RUNNING
            self.disable_fds()

    # -- log ops ---------------------------------------------------------------------

    def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        raise err(ENOTTY)

    def log_stop(self) -> None:
        pass

    def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        raise err(EINVAL)

    # -- other ops -------------------------------------------------------------------

    def device_feature(self, flags: int, arg: UserArg, argsz: int) -> int:
        """ops->device_feature for indexes the core does not handle."""
        raise err(ENOTTY)

    def device_ioctl(self, cmd: int, arg: UserArg | int) -> int:
        """ops->ioctl for commands other than GET_INFO / RESET."""
        raise err(ENOTTY)

    def ioctl_get_info(self, arg: UserArg | int) -> int:
        """vfio_pci_ioctl_get_info: copy in minsz = 16 bytes, argsz >= 16, copy back
        min(argsz, info_size) bytes."""
        if isinstance(arg, int):
            raise err(EFAULT)
        argsz = arg.get(v.vfio_device_info, size=_DEVICE_INFO_MINSZ).argsz
        if argsz < _DEVICE_INFO_MINSZ:
            raise err(EINVAL)
        info = v.vfio_device_info(
            argsz=argsz, flags=self.info_flags, num_regions=self.num_regions, num_irqs=self.num_irqs
        )
        arg.put(info, size=min(argsz, self.info_size))
        return 0

    def ioctl_reset(self) -> int:
        if not self.reset_works:
            raise err(EINVAL)
        self.reset()
        return 0


def vfio_df_open(df: VfioDeviceFile) -> None:
    """Count an open; only the group path may open a device twice (vfio_df_open)."""
    dev = df.device
    if dev.open_count and df.group is None:
        raise err(EINVAL)
    if dev.open_count == 0:
        dev.open_device()
    else:
        dev.open_count += 1


def vfio_df_close(df: VfioDeviceFile) -> None:
    dev = df.device
    if dev.open_count <= 1:
        dev.close_device()
    else:
        dev.open_count -= 1


# ---------------------------------------------------------------------------------------
# struct vfio_device_file and its ioctl


class VfioDeviceFile(File):
    """struct vfio_device_file: one open of the device (cdev, or from a legacy group)."""

    def __init__(self, device: VfioDevice, flags: int = os.O_RDWR) -> None:
        super().__init__()
        self.device = device
        self.group: Any = None  # set by the legacy group path (VFIO_GROUP_GET_DEVICE_FD)
        self.access_granted = False
        self.iommufd: Any = None  # the IommufdFile this fd is bound to
        self.idev: Any = None  # its iommufd DEVICE object
        acc = flags & os.O_ACCMODE
        self.readable = acc in (os.O_RDONLY, os.O_RDWR)
        self.writable = acc in (os.O_WRONLY, os.O_RDWR)

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        return vfio_device_fops_unl_ioctl(self, cmd, arg)

    # read/write/mmap: vfio_device_fops_{read,write,mmap} (kernel/vfio_device_fops.py). The
    # file has no llseek (ESPIPE) but positional I/O: read()/write() use and advance the
    # file position on success, pread()/pwrite() do not touch it.
    pos = 0

    def read(self, n: int) -> bytes:
        data = vfio_device_fops_read(self, n, self.pos)
        self.pos += len(data)
        return data

    def write(self, data: bytes) -> int:
        done = vfio_device_fops_write(self, data, self.pos)
        self.pos += done
        return done

    def pread(self, n: int, offset: int) -> bytes:
        return vfio_device_fops_read(self, n, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        return vfio_device_fops_write(self, data, offset)

    def mmap(self, mm: Memory, size: int, offset: int) -> Region:
        return vfio_device_fops_mmap(self, mm, size, offset)

    def release(self) -> None:
        """vfio_device_fops_release: the cdev path unbinds (which closes the device)."""
        if self.group is None:
            device_cdev.vfio_df_unbind_iommufd(self)
        elif self.access_granted:
            self.access_granted = False
            vfio_df_close(self)


def vfio_device_fops_unl_ioctl(df: VfioDeviceFile, cmd: int, arg: UserArg | int) -> int:
    if cmd == v.VFIO_DEVICE_FEATURE:  # the hot path first; access is checked inside
        if not df.access_granted:
            raise err(EINVAL)
        vfio_device_pm_runtime_get(df.device)
        return vfio_ioctl_device_feature(df.device, arg)
    if cmd == v.VFIO_DEVICE_BIND_IOMMUFD:
        return device_cdev.vfio_df_ioctl_bind_iommufd(df, arg)
    if not df.access_granted:  # paired with the store after vfio_df_open()
        raise err(EINVAL)
    vfio_device_pm_runtime_get(df.device)
    if df.group is None and cmd in _CDEV_ONLY:  # cdev-only ioctls (device_cdev.py)
        return _CDEV_ONLY[cmd](df, arg)
    dev = df.device
    if cmd == v.VFIO_DEVICE_GET_REGION_INFO:  # answered by the core since 6.19
        return vfio_get_region_info(dev, arg)
    if cmd == v.VFIO_DEVICE_GET_INFO:
        return dev.ioctl_get_info(arg)
    if cmd == v.VFIO_DEVICE_RESET:
        return dev.ioctl_reset()
    return dev.device_ioctl(cmd, arg)


def vfio_device_pm_runtime_get(dev: VfioDevice) -> None:
    """vfio_device_pm_runtime_get: a driver with runtime PM (vfio-pci) resumes the device
    for the ioctl (pm_runtime_get in kernel/vfio_pci_core.py)."""
    resume = getattr(dev, "pm_runtime_get", None)
    if resume is not None:
        resume()


_CDEV_ONLY: dict[int, Callable[[Any, UserArg | int], int]] = {
    v.VFIO_DEVICE_ATTACH_IOMMUFD_PT: device_cdev.vfio_df_ioctl_attach_pt,
    v.VFIO_DEVICE_DETACH_IOMMUFD_PT: device_cdev.vfio_df_ioctl_detach_pt,
}


# ---------------------------------------------------------------------------------------
# VFIO_DEVICE_FEATURE


def vfio_check_feature(flags: int, argsz: int, supported_ops: int, minsz: int) -> bool:
    """include/linux/vfio.h vfio_check_feature: True = go on, False = PROBE answered (0)."""
    if flags & (GET | SET) & ~supported_ops:
        raise err(EINVAL)
    if flags & PROBE:
        return False
    if not flags & (GET | SET):
        raise err(EINVAL)
    if argsz < minsz:
        raise err(EINVAL)
    return True


FeatureHandler = Callable[[VfioDevice, int, UserArg, int], int]


def vfio_ioctl_device_feature(dev: VfioDevice, arg: UserArg | int) -> int:
    if isinstance(arg, int):
        raise err(EFAULT)
    argsz, flags = _HDR.unpack(arg.read(0, FEATURE_HDR))
    if argsz < FEATURE_HDR:
        raise err(EINVAL)
    if flags & ~_FEATURE_FLAGS_OK:
        raise err(EINVAL)
    if not flags & PROBE and flags & SET and flags & GET:
        raise err(EINVAL)
    handler = _CORE_FEATURES.get(flags & v.VFIO_DEVICE_FEATURE_MASK)
    if handler is None:
        return dev.device_feature(flags, arg, argsz - FEATURE_HDR)
    return handler(dev, flags, arg, argsz - FEATURE_HDR)


def _feature_migration(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    if not dev.migration_flags:
        raise err(ENOTTY)
    if vfio_check_feature(flags, argsz, GET, 8):
        arg.put(v.vfio_device_feature_migration(flags=dev.migration_flags), FEATURE_HDR)
    return 0


def _feature_mig_device_state(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    """vfio_ioctl_device_feature_mig_device_state."""
    if not dev.migration_flags:
        raise err(ENOTTY)
    if not vfio_check_feature(flags, argsz, GET | SET, 8):
        return 0
    state = _MIG_STATE.unpack(arg.read(FEATURE_HDR, 8))[0]
    if flags & GET:
        arg.write(FEATURE_HDR, _MIG_STATE.pack(dev.migration_get_state(), -1))
        return 0
    try:
        filp = dev.migration_set_state(state)
    except OSError:
        # The requested state is echoed with data_fd = -1 even on failure; a fault there
        # turns the error into EFAULT.
        arg.write(FEATURE_HDR, _MIG_STATE.pack(state, -1))
        raise
    if filp is None:
        arg.write(FEATURE_HDR, _MIG_STATE.pack(state, -1))
        return 0
    return _mig_return_fd(dev, filp, arg, state)


def _mig_return_fd(dev: VfioDevice, filp: File, arg: UserArg, state: int) -> int:
    """vfio_ioct_mig_return_fd: reserve an fd, copy out, then install. On EMFILE/EFAULT the
    user's reference is dropped but the driver keeps its file and its new state."""
    fdt = dev.kernel.fdt
    fd = fdt.get_unused_fd()  # EMFILE
    arg.write(FEATURE_HDR, _MIG_STATE.pack(state, fd))  # EFAULT
    fdt.fd_install(fd, filp)  # O_CLOEXEC is not modelled: no exec here
    return 0


def _feature_mig_data_size(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    if not dev.migration_flags:
        raise err(ENOTTY)
    if vfio_check_feature(flags, argsz, GET, 8):
        size = v.vfio_device_feature_mig_data_size(stop_copy_length=dev.get_data_size() & U64_MAX)
        arg.put(size, FEATURE_HDR)
    return 0


def _feature_precopy_info_v2(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    # EINVAL (not ENOTTY) without PRE_COPY, even for a device with no migration at all.
    if not dev.migration_flags & MIG_PRE_COPY:
        raise err(EINVAL)
    if vfio_check_feature(flags, argsz, SET, 0):
        dev.precopy_info_v2 = True
    return 0


def _is_aligned(x: int, a: int) -> bool:
    """IS_ALIGNED(x, a) on u64: a raw mask, so a = 0 only aligns x = 0."""
    return x & ((a - 1) & U64_MAX) == 0


def _feature_logging_start(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    """vfio_ioctl_device_feature_logging_start."""
    if not dev.has_log_ops:
        raise err(ENOTTY)
    control_cls = v.vfio_device_feature_dma_logging_control
    if not vfio_check_feature(flags, argsz, SET, ctypes.sizeof(control_cls)):
        return 0
    control = arg.get(control_cls, FEATURE_HDR)
    nnodes = control.num_ranges
    if not nnodes:
        raise err(EINVAL)
    if nnodes > LOG_MAX_RANGES:
        raise err(E2BIG)
    nodes = _read_log_ranges(dev, control.ranges, nnodes, control.page_size)
    ranges = [(start, length) for start, _last, length in sorted(nodes, key=lambda n: n[0])]
    control.page_size = dev.log_start(ranges, control.page_size) & U64_MAX
    try:
        arg.put(control, FEATURE_HDR)
    except OSError:
        dev.log_stop()
        raise
    return 0


def _read_log_ranges(
    dev: VfioDevice, ptr: int, nnodes: int, page_size: int
) -> list[tuple[int, int, int]]:
    """Copy, validate and overlap-check the ranges in array order: [(start, last, length)]."""
    mm = dev.kernel.mm
    nodes: list[tuple[int, int, int]] = []
    for i in range(nnodes):
        try:
            raw = user_read(mm, ptr + _LOG_RANGE_SIZE * i, _LOG_RANGE_SIZE)
        except OSError:
            raise err(EFAULT) from None
        node = v.vfio_device_feature_dma_logging_range.from_buffer_copy(raw)
        iova, length = node.iova, node.length
        if not _is_aligned(iova, page_size) or not _is_aligned(length, page_size):
            raise err(EINVAL)
        if iova + length > ULONG_MAX:  # check_add_overflow || iova_end > ULONG_MAX
            raise err(EOVERFLOW)
        last = (iova + length - 1) & U64_MAX  # a zero-length range at 0 ends at ULONG_MAX
        # interval_tree_iter_first(root, start, last): any earlier node intersecting
        if any(s <= last and iova <= l_ for s, l_, _ in nodes):
            raise err(EINVAL)
        nodes.append((iova, last, length))
    return nodes


def _feature_logging_stop(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    if not dev.has_log_ops:
        raise err(ENOTTY)
    if vfio_check_feature(flags, argsz, SET, 0):
        dev.log_stop()
    return 0


def _feature_logging_report(dev: VfioDevice, flags: int, arg: UserArg, argsz: int) -> int:
    """vfio_ioctl_device_feature_logging_report + iova_bitmap_for_each."""
    if not dev.has_log_ops:
        raise err(ENOTTY)
    report_cls = v.vfio_device_feature_dma_logging_report
    if not vfio_check_feature(flags, argsz, GET, ctypes.sizeof(report_cls)):
        return 0
    report = arg.get(report_cls, FEATURE_HDR)
    iova, length, page_size, bitmap = report.iova, report.length, report.page_size, report.bitmap
    if page_size < 4096 or page_size & (page_size - 1):
        raise err(EINVAL)
    if iova + length > ULONG_MAX:
        raise err(EOVERFLOW)
    bm = IovaBitmap(dev.kernel.mm, iova, length, page_size, bitmap)
    # iova_bitmap_for_each, whose error VFIO returns (iommufd drops it): the driver sees
    # the part whose bitmap could be pinned; a bitmap that stops short faults after that
    # part was reported (and cleared).
    covered = bm.pin_run(length)  # EFAULT: not even the bitmap's first page
    dev.log_read_and_clear(iova, covered, bm)
    if covered < length:
        raise err(EFAULT)
    return 0


_CORE_FEATURES: dict[int, FeatureHandler] = {
    v.VFIO_DEVICE_FEATURE_MIGRATION: _feature_migration,
    v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: _feature_mig_device_state,
    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START: _feature_logging_start,
    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: _feature_logging_stop,
    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: _feature_logging_report,
    v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: _feature_mig_data_size,
    v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2: _feature_precopy_info_v2,
}
