"""A VFIO device from userspace: its cdev, iommufd binding, features and migration.

``VfioDevice`` wraps one device fd (``/dev/vfio/devices/vfioN``, or one obtained from a legacy
group) and speaks the device ioctls of linux/vfio.h::

    with Iommufd(t) as ictx, VfioDevice(t, "/dev/vfio/devices/vfio0") as dev:
        dev.bind(ictx)
        dev.attach(ictx.ioas_alloc())
        flags = dev.migration_flags()                # MigrationFlags.STOP_COPY | ...
        with dev.set_state(MigrationState.PRE_COPY) as f:   # RUNNING -> PRE_COPY opens a fd
            f.precopy_info(); f.read_available()
            dev.set_state(MigrationState.STOP_COPY)  # same session continues: returns None
            rest = f.read_available()

The library passes arguments through as given (no client-side validation of ranges, page
sizes or states) so that it can also be used to test how a kernel rejects bad input.
"""

from __future__ import annotations

import ctypes
import enum
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from errno import EINVAL
from typing import Any

from vfiomig.host.bitmap import DirtyBitmap, check_bitmap_size, iova_bitmap_bytes
from vfiomig.host.cstruct import check_int, fill
from vfiomig.host.errors import (
    DeviceError,
    DmaLoggingError,
    MigrationError,
    MigrationStateError,
    OpenError,
    VfioError,
    call,
)
from vfiomig.host.iommufd import U64_MAX, Hwpt, Ioas, Iommufd
from vfiomig.host.memory import Scratch
from vfiomig.host.migration import MigrationFile
from vfiomig.host.resource import Resource
from vfiomig.host.transport import Transport
from vfiomig.uapi import vfio as v

U32_MAX = (1 << 32) - 1


class MigrationState(enum.IntEnum):
    """enum vfio_device_mig_state, with the VFIO_DEVICE_STATE_ prefix dropped."""

    ERROR = v.VFIO_DEVICE_STATE_ERROR
    STOP = v.VFIO_DEVICE_STATE_STOP
    RUNNING = v.VFIO_DEVICE_STATE_RUNNING
    STOP_COPY = v.VFIO_DEVICE_STATE_STOP_COPY
    RESUMING = v.VFIO_DEVICE_STATE_RESUMING
    RUNNING_P2P = v.VFIO_DEVICE_STATE_RUNNING_P2P
    PRE_COPY = v.VFIO_DEVICE_STATE_PRE_COPY
    PRE_COPY_P2P = v.VFIO_DEVICE_STATE_PRE_COPY_P2P

    @classmethod
    def parse(cls, value: str | int) -> MigrationState:
        if isinstance(value, int):
            return cls(value)
        name = value.upper().removeprefix("VFIO_DEVICE_STATE_")
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown migration state {value!r}") from None


def state_name(value: int) -> str:
    """``STOP_COPY`` for 3; ``state 9`` for a value outside the enum."""
    try:
        return MigrationState(value).name
    except ValueError:
        return f"state {value}"


class MigrationFlags(enum.IntFlag):
    """vfio_device_feature_migration.flags."""

    STOP_COPY = v.VFIO_MIGRATION_STOP_COPY
    P2P = v.VFIO_MIGRATION_P2P
    PRE_COPY = v.VFIO_MIGRATION_PRE_COPY


def flag_names(flags: int) -> list[str]:
    """``["STOP_COPY", "PRE_COPY"]`` for 5: the migration flags set in ``flags``."""
    return [f.name for f in MigrationFlags if f & flags and f.name is not None]


FEATURE_NAMES = {
    v.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: "PCI_VF_TOKEN",
    v.VFIO_DEVICE_FEATURE_MIGRATION: "MIGRATION",
    v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: "MIG_DEVICE_STATE",
    v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY: "LOW_POWER_ENTRY",
    v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: "LOW_POWER_ENTRY_WITH_WAKEUP",
    v.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT: "LOW_POWER_EXIT",
    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START: "DMA_LOGGING_START",
    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: "DMA_LOGGING_STOP",
    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: "DMA_LOGGING_REPORT",
    v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: "MIG_DATA_SIZE",
    v.VFIO_DEVICE_FEATURE_BUS_MASTER: "BUS_MASTER",
    v.VFIO_DEVICE_FEATURE_DMA_BUF: "DMA_BUF",
    v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2: "MIG_PRECOPY_INFOv2",
}

GET = v.VFIO_DEVICE_FEATURE_GET
SET = v.VFIO_DEVICE_FEATURE_SET
PROBE = v.VFIO_DEVICE_FEATURE_PROBE


def feature_op(flags: int) -> str:
    """``VFIO_DEVICE_FEATURE[MIG_DEVICE_STATE] SET`` for a feature flags word."""
    index = flags & v.VFIO_DEVICE_FEATURE_MASK
    name = FEATURE_NAMES.get(index, str(index))
    ops = [n for bit, n in ((PROBE, "PROBE"), (GET, "GET"), (SET, "SET")) if flags & bit]
    return f"VFIO_DEVICE_FEATURE[{name}] {' '.join(ops) or 'no-op'}"


@dataclass(frozen=True)
class DeviceInfo:
    """VFIO_DEVICE_GET_INFO."""

    flags: int
    num_regions: int
    num_irqs: int

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & v.VFIO_DEVICE_FLAGS_RESET)

    @property
    def bus(self) -> str:
        for bit, name in (
            (v.VFIO_DEVICE_FLAGS_PCI, "pci"),
            (v.VFIO_DEVICE_FLAGS_PLATFORM, "platform"),
            (v.VFIO_DEVICE_FLAGS_AMBA, "amba"),
            (v.VFIO_DEVICE_FLAGS_CCW, "ccw"),
            (v.VFIO_DEVICE_FLAGS_AP, "ap"),
            (v.VFIO_DEVICE_FLAGS_FSL_MC, "fsl-mc"),
            (v.VFIO_DEVICE_FLAGS_CDX, "cdx"),
        ):
            if self.flags & bit:
                return name
        return "unknown"


class VfioDevice(Resource):
    """One VFIO device fd; a context manager that closes it.

    ``VfioDevice(transport, path)`` opens the cdev. A device obtained from a legacy group is
    built with ``fd=`` (see :meth:`vfiomig.host.container.Group.get_device`).
    """

    _owns_fd = True

    def __init__(self, transport: Transport, path: str, *, fd: int | None = None) -> None:
        self.transport = transport
        self.path = path
        if fd is None:
            fd = call(OpenError, f"open({path})", transport.open, path, os.O_RDWR)
        self.fd = fd
        self.scratch = Scratch(transport.mmap)

    # -- plumbing -----------------------------------------------------------------------

    def ioctl(self, request: int, arg: Any, op: str, cls: type[VfioError] = DeviceError) -> int:
        self._check_open(op)
        return call(cls, op, self.transport.ioctl, self.fd, request, arg)

    def feature(
        self,
        flags: int,
        payload: ctypes.Structure | bytes | bytearray | int = b"",
        *,
        cls: type[VfioError] = DeviceError,
        what: str = "",
    ) -> bytearray:
        """One VFIO_DEVICE_FEATURE ioctl; returns the (mutated) argument buffer."""
        flags = fill(v.vfio_device_feature, "VFIO_DEVICE_FEATURE", flags=flags).flags
        if isinstance(payload, int):  # room for the answer: argsz (a __u32) must cover it
            room = U32_MAX - ctypes.sizeof(v.vfio_device_feature)
            payload = check_int("VFIO_DEVICE_FEATURE", "argsz", payload, 0, room, "__u32")
        buf = v.feature_buffer(flags, payload)
        op = feature_op(flags) + (f" {what}" if what else "")
        self.ioctl(v.VFIO_DEVICE_FEATURE, buf, op, cls)
        return buf

    def probe_feature(self, index: int, op: int) -> int:
        """VFIO_DEVICE_FEATURE with PROBE: 0 when supported, else the errno (ENOTTY: the
        driver lacks the feature; EINVAL: not in that direction)."""
        try:
            self.feature(index | op | PROBE)
        except DeviceError as e:
            return e.errno or EINVAL
        return 0

    def supports(self, index: int, op: int) -> bool:
        return self.probe_feature(index, op) == 0

    # -- iommufd ------------------------------------------------------------------------

    def bind(self, iommufd: Iommufd) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the device's iommufd object id."""
        op = "VFIO_DEVICE_BIND_IOMMUFD"
        self._check_open(op)
        if not isinstance(iommufd, Iommufd):
            raise TypeError(f"{op}: an Iommufd, not {iommufd!r}")
        iommufd._check_open(op)  # its fd number may belong to another file now
        bind = v.vfio_device_bind_iommufd(
            argsz=ctypes.sizeof(v.vfio_device_bind_iommufd), flags=0, iommufd=iommufd.fd
        )
        self.ioctl(v.VFIO_DEVICE_BIND_IOMMUFD, bind, op)
        self._iommufd = weakref.ref(iommufd)  # to check handles against; not kept alive
        return int(bind.out_devid)

    def attach(self, pt: Ioas | Hwpt | int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT to an IOAS (automatic domain) or a HWPT; a second
        attach replaces the first. Returns the id of the HWPT actually attached. A handle
        must be live and belong to the iommufd the device was bound to."""
        op = "VFIO_DEVICE_ATTACH_IOMMUFD_PT"
        self._check_open(op)
        if isinstance(pt, Ioas | Hwpt):
            ref = getattr(self, "_iommufd", None)
            bound = ref() if ref is not None else None
            pt_id = (bound if bound is not None else pt.ictx)._own(pt, op)
        else:
            pt_id = pt
        attach = fill(
            v.vfio_device_attach_iommufd_pt,
            op,
            argsz=ctypes.sizeof(v.vfio_device_attach_iommufd_pt),
            flags=0,
            pt_id=pt_id,
        )
        self.ioctl(v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach, f"{op}({attach.pt_id})")
        return int(attach.pt_id)

    def detach(self) -> None:
        detach = v.vfio_device_detach_iommufd_pt(
            argsz=ctypes.sizeof(v.vfio_device_detach_iommufd_pt), flags=0
        )
        self.ioctl(v.VFIO_DEVICE_DETACH_IOMMUFD_PT, detach, "VFIO_DEVICE_DETACH_IOMMUFD_PT")

    # -- device -------------------------------------------------------------------------

    def info(self) -> DeviceInfo:
        info = v.vfio_device_info(argsz=ctypes.sizeof(v.vfio_device_info))
        self.ioctl(v.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        return DeviceInfo(int(info.flags), int(info.num_regions), int(info.num_irqs))

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: migration state back to RUNNING, data fds disabled."""
        self.ioctl(v.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")

    # -- migration ----------------------------------------------------------------------

    def migration_flags(self) -> MigrationFlags:
        """VFIO_DEVICE_FEATURE_MIGRATION (ENOTTY: the device cannot migrate)."""
        buf = self.feature(
            GET | v.VFIO_DEVICE_FEATURE_MIGRATION,
            ctypes.sizeof(v.vfio_device_feature_migration),
            cls=MigrationError,
        )
        return MigrationFlags(int(v.feature_payload(buf, v.vfio_device_feature_migration).flags))

    def get_state(self) -> MigrationState | int:
        """The device's migration state (an int if the kernel reports a value outside the enum)."""
        buf = self.feature(
            GET | v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            v.vfio_device_feature_mig_state(device_state=0, data_fd=-1),
            cls=MigrationStateError,
        )
        raw = int(v.feature_payload(buf, v.vfio_device_feature_mig_state).device_state)
        try:
            return MigrationState(raw)
        except ValueError:
            return raw

    def set_state(self, state: MigrationState | int | str) -> MigrationFile | None:
        """Move the device to ``state``; the kernel walks the combination path.

        Returns a :class:`MigrationFile` when the last arc opens a data session, else None.
        On failure raises :class:`MigrationStateError` with ``requested`` and ``current``
        (the state a follow-up GET found; the kernel itself only echoes the request).
        """
        op_flags = SET | v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
        if isinstance(state, str):
            target = int(MigrationState.parse(state))
        else:
            target = check_int(feature_op(op_flags), "device_state", state, 0, U32_MAX, "__u32")
        op = f"{feature_op(op_flags)} {state_name(target)}"
        self._check_open(op)
        buf = v.feature_buffer(
            op_flags, v.vfio_device_feature_mig_state(device_state=target, data_fd=-1)
        )
        try:
            self.transport.ioctl(self.fd, v.VFIO_DEVICE_FEATURE, buf)
        except OSError as e:
            if e.errno is None:
                raise
            current: int | None
            try:
                current = int(self.get_state())
            except VfioError:
                current = None
            raise MigrationStateError(e.errno, op, requested=target, current=current) from e
        data_fd = int(v.feature_payload(buf, v.vfio_device_feature_mig_state).data_fd)
        if data_fd < 0:
            return None
        return MigrationFile(self.transport, data_fd, saving=target != MigrationState.RESUMING)

    def mig_data_size(self) -> int:
        """VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the device's estimate of its STOP_COPY data."""
        buf = self.feature(
            GET | v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            ctypes.sizeof(v.vfio_device_feature_mig_data_size),
            cls=MigrationError,
        )
        return int(v.feature_payload(buf, v.vfio_device_feature_mig_data_size).stop_copy_length)

    def enable_precopy_info_v2(self) -> None:
        """VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2: from now on PRECOPY_INFO reports real
        flags (REINIT) instead of echoing the caller's. Lasts until the device's last close."""
        self.feature(SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, cls=MigrationError)

    # -- device DMA logging ---------------------------------------------------------------

    def dma_logging_supported(self) -> bool:
        return self.supports(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET)

    def dma_logging_start(self, ranges: Sequence[tuple[int, int]], page_size: int = 4096) -> int:
        """Start the device's own dirty log over ``(iova, length)`` ranges.

        Returns the page size the device chose (it may round the request)."""
        op = "VFIO_DEVICE_FEATURE[DMA_LOGGING_START]"
        self._check_open(op)
        items = []
        for r in ranges:
            try:
                i, n = r
            except (TypeError, ValueError):
                raise TypeError(f"{op}: each range must be an (iova, length) pair") from None
            items.append(fill(v.vfio_device_feature_dma_logging_range, op, iova=i, length=n))
        control = v.vfio_device_feature_dma_logging_control
        fill(control, op, page_size=page_size, num_ranges=len(items))
        arr = (v.vfio_device_feature_dma_logging_range * len(items))(*items)
        mem = self.scratch.get("log_ranges", ctypes.sizeof(arr))
        if items:
            mem.write(bytes(arr))
        ctl = v.vfio_device_feature_dma_logging_control(
            page_size=page_size, num_ranges=len(items), ranges=mem.addr if items else 0
        )
        buf = self.feature(
            SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            ctl,
            cls=DmaLoggingError,
            what=f"({len(ranges)} ranges, page_size={page_size:#x})",
        )
        return int(v.feature_payload(buf, v.vfio_device_feature_dma_logging_control).page_size)

    def dma_logging_stop(self) -> None:
        self.feature(SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, cls=DmaLoggingError)

    def dma_logging_report(self, iova: int, length: int, page_size: int = 4096) -> DirtyBitmap:
        """Read-and-clear the device's dirty log for ``[iova, iova+length)``.

        The bitmap is sized as the kernel uses it (iova_bitmap_alloc: u64 words up to the
        bit of ``length - 1``); a length of 0 asks the driver about nothing."""
        op = "VFIO_DEVICE_FEATURE[DMA_LOGGING_REPORT]"
        self._check_open(op)
        rep = fill(
            v.vfio_device_feature_dma_logging_report,
            op,
            iova=iova,
            length=length,
            page_size=page_size,
        )
        iova, length, page_size = int(rep.iova), int(rep.length), int(rep.page_size)
        # vfio_ioctl_device_feature_logging_report: EINVAL for a page size under 4 KiB or not
        # a power of two, EOVERFLOW when iova + length passes 2^64 - 1, both before the bitmap
        rejected = page_size < 4096 or page_size & (page_size - 1) or iova + length > U64_MAX
        if rejected or length == 0:
            nbytes = 8
        else:
            nbytes = iova_bitmap_bytes(length, page_size)
        check_bitmap_size(nbytes, length, page_size, rejected=bool(rejected))
        mem = self.scratch.get("log_bitmap", nbytes)
        rep.bitmap = mem.addr
        self.feature(
            GET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            rep,
            cls=DmaLoggingError,
            what=f"({iova:#x}, {length:#x}, page_size={page_size:#x})",
        )
        return DirtyBitmap.from_words(iova, length, page_size, mem.words(nbytes))

    # -- lifetime -----------------------------------------------------------------------

    def _release(self) -> None:
        """Close the device fd (the kernel unbinds it; data fds stay valid until closed)."""
        self.scratch.close()
        call(DeviceError, f"close({self.path})", self.transport.close, self.fd)

    def __repr__(self) -> str:
        return f"VfioDevice({self.path!r}, fd={self.fd}{', closed' if self.closed else ''})"
