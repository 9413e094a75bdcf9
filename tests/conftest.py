"""Shared test helpers: a ModelKernel with bound VFIO devices driven through the uAPI only.

`Dev` speaks bytes to ModelKernel exactly as a C program would (ioctl on buffers, read and
write on fds). Tests look below the uAPI only through `Dev.vdev` / `Dev.hw`, and say so.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from vfiomig.kernel import ModelKernel
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

GET = v.VFIO_DEVICE_FEATURE_GET
SET = v.VFIO_DEVICE_FEATURE_SET
PROBE = v.VFIO_DEVICE_FEATURE_PROBE
MIG_STATE = v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
LOG_START = v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START
LOG_REPORT = v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    """0 if fn(*args) succeeds, else the errno of the OSError it raises."""
    try:
        fn(*args)
    except OSError as e:
        return int(e.errno or -1)
    return 0


class Dev:
    """One device of a ModelKernel, opened and bound to an iommufd (a new one, or the
    `iommufd` given, to share it with another device)."""

    def __init__(
        self,
        k: ModelKernel,
        kind: str = "reference",
        bind: bool = True,
        *,
        iommufd: int | None = None,
        **opts: Any,
    ):
        self.k = k
        self.path = k.add_device(kind, **opts)
        self.fd = k.open(self.path)
        self.iommufd = k.open("/dev/iommu") if iommufd is None else iommufd
        if bind:
            self.bind()

    def bind(self) -> None:
        b = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
        b.iommufd = self.iommufd
        self.k.ioctl(self.fd, v.VFIO_DEVICE_BIND_IOMMUFD, b)
        self.devid = int(b.out_devid)

    def reopen(self) -> None:
        """Open and bind a new device fd (after close(), the device's last close)."""
        self.fd = self.k.open(self.path)
        self.bind()

    def attach(self, pt_id: int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT; returns the pt_id written back."""
        at = v.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(v.vfio_device_attach_iommufd_pt), pt_id=pt_id
        )
        self.k.ioctl(self.fd, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, at)
        return int(at.pt_id)

    # below the uAPI (ground truth for checks only)
    @property
    def vdev(self) -> Any:
        return self.k.devices[self.path]

    @property
    def hw(self) -> Any:
        return self.k.device(self.path)

    # uAPI
    def feature(self, flags: int, payload: Any = b"") -> bytearray:
        buf = v.feature_buffer(flags, payload)
        self.k.ioctl(self.fd, v.VFIO_DEVICE_FEATURE, buf)
        return buf

    def set_state(self, state: int) -> int:
        """SET MIG_DEVICE_STATE; returns data_fd (-1 when none)."""
        mig = v.vfio_device_feature_mig_state(device_state=state, data_fd=-7)
        buf = self.feature(SET | MIG_STATE, mig)
        out = v.feature_payload(buf, v.vfio_device_feature_mig_state)
        assert out.device_state == state  # the request is echoed
        return int(out.data_fd)

    def try_set_state(self, state: int) -> tuple[int, int, bytes]:
        """(errno or 0, data_fd, payload bytes after the call): failures also echo."""
        mig = v.vfio_device_feature_mig_state(device_state=state, data_fd=-7)
        buf = v.feature_buffer(SET | MIG_STATE, mig)
        e = errno_of(self.k.ioctl, self.fd, v.VFIO_DEVICE_FEATURE, buf)
        out = v.feature_payload(buf, v.vfio_device_feature_mig_state)
        return e, int(out.data_fd), bytes(buf[8:])

    def get_state(self) -> int:
        buf = self.feature(GET | MIG_STATE, 8)
        return int(v.feature_payload(buf, v.vfio_device_feature_mig_state).device_state)

    def precopy_info(self, data_fd: int, flags: int = 0) -> v.vfio_precopy_info:
        info = v.vfio_precopy_info(argsz=ctypes.sizeof(v.vfio_precopy_info), flags=flags)
        self.k.ioctl(data_fd, v.VFIO_MIG_GET_PRECOPY_INFO, info)
        return info

    def read_all(self, data_fd: int, chunk: int = 1 << 20) -> bytes:
        """Read until EOF (STOP_COPY) or ENOMSG (PRE_COPY's temporary end)."""
        parts = []
        while True:
            try:
                d = self.k.read(data_fd, chunk)
            except OSError as e:
                if e.errno == errno.ENOMSG:
                    break
                raise
            if not d:
                break
            parts.append(d)
        return b"".join(parts)

    def reset(self) -> None:
        self.k.ioctl(self.fd, v.VFIO_DEVICE_RESET, 0)

    def close(self) -> None:
        self.k.close(self.fd)


def precopy(dev: Dev, data_fd: int, flags: int = 0) -> tuple[int, int, int]:
    """VFIO_MIG_GET_PRECOPY_INFO as (flags, initial_bytes, dirty_bytes)."""
    i = dev.precopy_info(data_fd, flags)
    return int(i.flags), int(i.initial_bytes), int(i.dirty_bytes)


def ioas_map(k: ModelKernel, iommufd: int, user_va: int, length: int, iova: int) -> int:
    """A new IOAS with [user_va, user_va + length) mapped read-write at `iova`; its id."""
    alloc = u.iommu_ioas_alloc(size=ctypes.sizeof(u.iommu_ioas_alloc))
    k.ioctl(iommufd, u.IOMMU_IOAS_ALLOC, alloc)
    rw = u.IOMMU_IOAS_MAP_FIXED_IOVA | u.IOMMU_IOAS_MAP_READABLE | u.IOMMU_IOAS_MAP_WRITEABLE
    m = u.iommu_ioas_map(
        size=ctypes.sizeof(u.iommu_ioas_map),
        flags=rw,
        ioas_id=alloc.out_ioas_id,
        user_va=user_va,
        length=length,
        iova=iova,
    )
    k.ioctl(iommufd, u.IOMMU_IOAS_MAP, m)
    return int(alloc.out_ioas_id)


def save_stream(dev: Dev) -> bytes:
    """RUNNING -> STOP_COPY, read everything, -> STOP. Returns the stream."""
    fd = dev.set_state(v.VFIO_DEVICE_STATE_STOP_COPY)
    data = dev.read_all(fd)
    dev.set_state(v.VFIO_DEVICE_STATE_STOP)
    dev.k.close(fd)
    return data


def resuming(dev: Dev) -> int:
    """-> RESUMING (through STOP); returns the resuming data fd."""
    fd = dev.set_state(v.VFIO_DEVICE_STATE_RESUMING)
    assert fd >= 0
    return fd


def resume_stream(dev: Dev, data: bytes, chunk: int = 1 << 20) -> None:
    """-> RESUMING, write the stream, -> STOP."""
    fd = resuming(dev)
    for off in range(0, len(data), chunk):
        assert dev.k.write(fd, data[off : off + chunk]) == len(data[off : off + chunk])
    dev.set_state(v.VFIO_DEVICE_STATE_STOP)
    dev.k.close(fd)


# ---------------------------------------------------------------- DMA logging helpers


class Ranges:
    """An array of dma_logging_range in user memory, ending at the end of its mapping
    (so reading one entry past it faults)."""

    def __init__(self, k: ModelKernel, ranges: list[tuple[int, int]], slack: int = 0) -> None:
        size = 16 * (len(ranges) + slack)
        alloc = max(4096, -(-size // 4096) * 4096)
        addr, mem = k.mmap(alloc)
        assert mem is not None
        self.addr = addr + alloc - 16 * (len(ranges) + slack)
        raw = b"".join(struct.pack("<QQ", a, n) for a, n in ranges)
        k.mm.write(self.addr, raw)


def start(
    d: Dev,
    ranges: list[tuple[int, int]],
    page_size: int = 4096,
    num: int | None = None,
    ptr: int | None = None,
) -> tuple[int, int]:
    """(errno, page size written back)."""
    r = Ranges(d.k, ranges)
    ctl = v.vfio_device_feature_dma_logging_control(
        page_size=page_size,
        num_ranges=len(ranges) if num is None else num,
        ranges=r.addr if ptr is None else ptr,
    )
    buf = v.feature_buffer(SET | LOG_START, ctl)
    e = errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_FEATURE, buf)
    return e, v.feature_payload(buf, v.vfio_device_feature_dma_logging_control).page_size


def report(
    d: Dev,
    iova: int,
    length: int,
    page_size: int = 4096,
    bitmap: int | None = None,
    nbytes: int = 4096,
) -> tuple[int, bytes]:
    if bitmap is None:
        bitmap, _ = d.k.mmap(nbytes)
        d.k.mm.write(bitmap, bytes(nbytes))
    rep = v.vfio_device_feature_dma_logging_report(
        iova=iova, length=length, page_size=page_size, bitmap=bitmap
    )
    e = errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_FEATURE, v.feature_buffer(GET | LOG_REPORT, rep))
    try:
        return e, d.k.mm.read(bitmap, nbytes)
    except OSError:
        return e, b""


def bits_of(raw: bytes) -> list[int]:
    a = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return [int(i) for i in np.flatnonzero(a)]


@pytest.fixture
def kernel() -> Iterator[ModelKernel]:
    yield ModelKernel()


@pytest.fixture
def make_dev(kernel: ModelKernel) -> Callable[..., Dev]:
    """make_dev(kind="reference", bind=True, **options) -> a Dev on the test's kernel."""

    def make(kind: str = "reference", bind: bool = True, **opts: Any) -> Dev:
        return Dev(kernel, kind, bind, **opts)

    return make


@pytest.fixture
def ref(make_dev: Callable[..., Dev]) -> Dev:
    """A bound reference device with every migration flag and DMA logging."""
    return make_dev(migration_flags=7, dma_logging=True, state_size=64 * 1024, chunk_size=4096)


def cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """Exit status, stdout, stderr of ``vfiomig ARGV`` (argparse's usage errors exit)."""
    from vfiomig.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err
