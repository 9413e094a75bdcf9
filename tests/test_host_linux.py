"""LinuxTransport through its syscall seam: the exact requests and bytes the library issues.

No hardware: a recording fake replaces `Syscalls`; it answers ioctls with small handlers that
write what a kernel would write (into the argument buffer, or through pointers in it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vfiomig.host import (
    Container,
    DeviceError,
    DmaLoggingError,
    Group,
    HwptError,
    IoasError,
    Iommufd,
    IommufdError,
    LinuxTransport,
    MigrationDataError,
    MigrationFile,
    MigrationState,
    MigrationStateError,
    OpenError,
    Syscalls,
    UserBuffer,
    VfioDevice,
    VfioError,
)
from vfiomig.host.transport import IoctlArg
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

Handler = Callable[[int, Any], int]


def session(f: MigrationFile | None) -> MigrationFile:
    """The data fd a SET must have returned."""
    assert f is not None, "the SET returned no data fd"
    return f


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class FakeSyscalls(Syscalls):
    """Records every call; ioctls answered by per-request handlers (fd, buffer) -> int."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.handlers: dict[int, Handler] = {}
        self.open_fds: set[int] = set()
        self.next_fd = 10
        self.reads: dict[int, list[bytes | OSError]] = {}
        self.written: dict[int, bytearray] = {}
        self.buffers: list[UserBuffer] = []
        self.missing: set[str] = set()

    def new_fd(self) -> int:
        fd = self.next_fd
        self.next_fd += 1
        self.open_fds.add(fd)
        return fd

    def open(self, path: str, flags: int) -> int:
        self.calls.append(("open", path, flags))
        if path in self.missing:
            raise _oserror(errno.ENOENT)
        return self.new_fd()

    def close(self, fd: int) -> None:
        self.calls.append(("close", fd))
        if fd not in self.open_fds:
            raise _oserror(errno.EBADF)
        self.open_fds.remove(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg) -> int:
        raw = arg if isinstance(arg, int) else bytes(memoryview(arg).cast("B"))
        self.calls.append(("ioctl", fd, request, raw))
        if fd not in self.open_fds:
            raise _oserror(errno.EBADF)
        h = self.handlers.get(request)
        if h is None:
            raise _oserror(errno.ENOTTY)
        return h(fd, arg)

    def read(self, fd: int, n: int) -> bytes:
        self.calls.append(("read", fd, n))
        q = self.reads.get(fd, [])
        if not q:
            return b""
        item = q.pop(0)
        if isinstance(item, OSError):
            raise item
        return item[:n]

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        self.calls.append(("write", fd, bytes(data)))
        n = min(len(data), 5)  # short writes: the library must continue
        self.written.setdefault(fd, bytearray()).extend(bytes(data)[:n])
        return n

    def mmap(self, length: int) -> UserBuffer:
        buf = super().mmap(length)  # real anonymous memory: pointers are real addresses
        self.buffers.append(buf)
        return buf

    def exists(self, path: str) -> bool:
        return path not in self.missing

    def ioctls(self, request: int | None = None) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == "ioctl" and (request is None or c[2] == request)]


def _feature_flags(raw: bytes) -> tuple[int, int]:
    argsz, flags = struct.unpack_from("<II", raw)
    return argsz, flags


@pytest.fixture
def fake() -> FakeSyscalls:
    return FakeSyscalls()


@pytest.fixture
def t(fake: FakeSyscalls) -> LinuxTransport:
    return LinuxTransport(fake)


# -- request numbers: the seam sees the kernel's numbers ---------------------------------


def test_request_numbers_are_the_kernels() -> None:
    # _IO(';', nr) = 0x3b00 | nr; VFIO_BASE 100, IOMMUFD_CMD_BASE 0x80.
    assert v.VFIO_DEVICE_FEATURE == 0x3B75
    assert v.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert v.VFIO_MIG_GET_PRECOPY_INFO == 0x3B79
    assert u.IOMMU_IOAS_MAP == 0x3B85
    assert u.IOMMU_HWPT_GET_DIRTY_BITMAP == 0x3B8C


# -- iommufd ---------------------------------------------------------------------------


def test_iommufd_open_alloc_map_exact_bytes(fake: FakeSyscalls, t: LinuxTransport) -> None:
    def ioas_alloc(fd: int, arg: Any) -> int:
        arg.out_ioas_id = 7
        return 0

    def ioas_map(fd: int, arg: Any) -> int:
        if not arg.flags & u.IOMMU_IOAS_MAP_FIXED_IOVA:
            arg.iova = 0x10000
        return 0

    fake.handlers[u.IOMMU_IOAS_ALLOC] = ioas_alloc
    fake.handlers[u.IOMMU_IOAS_MAP] = ioas_map
    with Iommufd(t) as ictx, t.mmap(1 << 16) as mem:
        assert fake.calls[0] == ("open", "/dev/iommu", os.O_RDWR)
        ioas = ictx.ioas_alloc()
        assert ioas.id == 7
        assert ioas.map(mem, iova=0x200000, readable=True, writeable=False) == 0x200000
        assert ioas.map(mem.addr, 4096) == 0x10000
    alloc = fake.ioctls(u.IOMMU_IOAS_ALLOC)[0]
    assert alloc[3] == struct.pack("<III", 12, 0, 0)
    fixed, auto = fake.ioctls(u.IOMMU_IOAS_MAP)
    assert fixed[3] == struct.pack(
        "<IIIIQQQ",
        40,
        u.IOMMU_IOAS_MAP_FIXED_IOVA | u.IOMMU_IOAS_MAP_READABLE,
        7,
        0,
        mem.addr,
        1 << 16,
        0x200000,
    )
    assert auto[3] == struct.pack(
        "<IIIIQQQ",
        40,
        u.IOMMU_IOAS_MAP_READABLE | u.IOMMU_IOAS_MAP_WRITEABLE,
        7,
        0,
        mem.addr,
        4096,
        0,
    )
    assert fake.open_fds == set()


def test_unmap_all_and_errors_name_the_operation(fake: FakeSyscalls, t: LinuxTransport) -> None:
    def unmap(fd: int, arg: Any) -> int:
        if arg.length != (1 << 64) - 1:
            raise _oserror(errno.ENOENT)
        arg.length = 0x3000
        return 0

    fake.handlers[u.IOMMU_IOAS_UNMAP] = unmap
    with Iommufd(t) as ictx:
        from vfiomig.host.iommufd import Ioas

        ioas = Ioas(ictx, 3)
        assert ioas.unmap_all() == 0x3000
        with pytest.raises(IoasError) as e:
            ioas.unmap(0x1000, 0x1000)
    assert e.value.errno == errno.ENOENT
    assert isinstance(e.value, IommufdError) and isinstance(e.value, OSError)
    assert "IOMMU_IOAS_UNMAP(0x1000, 0x1000)" in str(e.value) and "ENOENT" in str(e.value)
    raw = fake.ioctls(u.IOMMU_IOAS_UNMAP)[0][3]
    assert raw == struct.pack("<IIQQ", 24, 3, 0, (1 << 64) - 1)


def test_iova_ranges_retries_on_emsgsize(fake: FakeSyscalls, t: LinuxTransport) -> None:
    total = 20
    seen_capacity: list[int] = []

    def ranges(fd: int, arg: Any) -> int:
        seen_capacity.append(arg.num_iovas)
        cap = arg.num_iovas
        arr = (u.iommu_iova_range * min(cap, total))(
            *(
                u.iommu_iova_range(start=i << 20, last=(i << 20) + 0xFFF)
                for i in range(min(cap, total))
            )
        )
        ctypes.memmove(arg.allowed_iovas, ctypes.addressof(arr), ctypes.sizeof(arr))
        arg.num_iovas = total
        arg.out_iova_alignment = 4096
        if total > cap:
            raise _oserror(errno.EMSGSIZE)
        return 0

    fake.handlers[u.IOMMU_IOAS_IOVA_RANGES] = ranges
    with Iommufd(t) as ictx:
        from vfiomig.host.iommufd import Ioas

        r = Ioas(ictx, 1).iova_ranges()
    assert seen_capacity == [8, 20]
    assert r.alignment == 4096 and len(r.ranges) == total
    assert r.ranges[5] == (5 << 20, (5 << 20) + 0xFFF)


def test_allow_iovas_passes_ranges_through_user_memory(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    got: list[tuple[int, int]] = []

    def allow(fd: int, arg: Any) -> int:
        arr = (u.iommu_iova_range * arg.num_iovas).from_address(arg.allowed_iovas)
        got.extend((r.start, r.last) for r in arr)
        return 0

    fake.handlers[u.IOMMU_IOAS_ALLOW_IOVAS] = allow
    with Iommufd(t) as ictx:
        from vfiomig.host.iommufd import Ioas

        Ioas(ictx, 2).allow_iovas([(0x1000, 0x1FFF), (0x10000, 0xFFFFF)])
    assert got == [(0x1000, 0x1FFF), (0x10000, 0xFFFFF)]
    assert fake.open_fds == set()


def test_hwpt_alloc_and_dirty_bitmap(fake: FakeSyscalls, t: LinuxTransport) -> None:
    def hwpt_alloc(fd: int, arg: Any) -> int:
        arg.out_hwpt_id = 9
        return 0

    dirty_pages = [0, 1, 2, 63, 64, 200]

    def bitmap(fd: int, arg: Any) -> int:
        npages = arg.length // arg.page_size
        bits = np.zeros(-(-npages // 64) * 64, dtype=np.uint8)
        bits[dirty_pages] = 1
        packed = np.packbits(bits, bitorder="little").tobytes()
        ctypes.memmove(arg.data, packed, len(packed))
        return 0

    fake.handlers[u.IOMMU_HWPT_ALLOC] = hwpt_alloc
    fake.handlers[u.IOMMU_HWPT_GET_DIRTY_BITMAP] = bitmap
    fake.handlers[u.IOMMU_HWPT_SET_DIRTY_TRACKING] = lambda fd, arg: 0
    with Iommufd(t) as ictx:
        hwpt = ictx.hwpt_alloc(4, 2, dirty_tracking=True)
        assert hwpt.id == 9
        hwpt.set_dirty_tracking(True)
        bm = hwpt.get_dirty_bitmap(0x100000, 256 * 4096, 4096, no_clear=True)
    raw = fake.ioctls(u.IOMMU_HWPT_ALLOC)[0][3]
    assert raw[:20] == struct.pack("<IIIII", 48, u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 4, 2, 0)
    assert fake.ioctls(u.IOMMU_HWPT_SET_DIRTY_TRACKING)[0][3] == struct.pack("<IIII", 16, 1, 9, 0)
    gb = struct.unpack("<IIIIQQQQ", fake.ioctls(u.IOMMU_HWPT_GET_DIRTY_BITMAP)[0][3])
    assert gb[:7] == (48, 9, u.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, 0, 0x100000, 256 * 4096, 4096)
    assert gb[7] != 0  # a real user address
    assert bm.pages().tolist() == dirty_pages
    assert list(bm.ranges()) == [
        (0x100000, 3 * 4096),
        (0x100000 + 63 * 4096, 2 * 4096),
        (0x100000 + 200 * 4096, 4096),
    ]


def test_hw_info_reads_capabilities_and_data(fake: FakeSyscalls, t: LinuxTransport) -> None:
    def hw_info(fd: int, arg: Any) -> int:
        assert arg.dev_id == 5
        ctypes.memmove(arg.data_uptr, b"\xaa" * 16, 16)
        arg.data_len = 16
        arg.out_data_type = u.IOMMU_HW_INFO_TYPE_ARM_SMMUV3
        arg.out_capabilities = u.IOMMU_HW_CAP_DIRTY_TRACKING
        return 0

    fake.handlers[u.IOMMU_GET_HW_INFO] = hw_info
    with Iommufd(t) as ictx:
        info = ictx.hw_info(5)
    assert info.dirty_tracking and info.type_name == "arm-smmuv3" and info.data == b"\xaa" * 16


# -- device ----------------------------------------------------------------------------


def _device_handlers(fake: FakeSyscalls, state: list[int], data_fd: list[int]) -> None:
    def bind(fd: int, arg: Any) -> int:
        arg.out_devid = 3
        return 0

    def attach(fd: int, arg: Any) -> int:
        arg.pt_id = 11
        return 0

    def feature(fd: int, buf: Any) -> int:
        argsz, flags = _feature_flags(bytes(buf))
        index = flags & v.VFIO_DEVICE_FEATURE_MASK
        if flags & v.VFIO_DEVICE_FEATURE_PROBE:
            return 0 if index != v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START else _raise(errno.ENOTTY)
        if index == v.VFIO_DEVICE_FEATURE_MIGRATION:
            struct.pack_into("<Q", buf, 8, 7)
        elif index == v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE:
            if flags & v.VFIO_DEVICE_FEATURE_GET:
                struct.pack_into("<Ii", buf, 8, state[0], -1)
            else:
                req = struct.unpack_from("<I", buf, 8)[0]
                if req == MigrationState.ERROR:
                    struct.pack_into("<Ii", buf, 8, req, -1)
                    raise _oserror(errno.EINVAL)
                nfd = (
                    fake.new_fd()
                    if req in (MigrationState.PRE_COPY, MigrationState.RESUMING)
                    else -1
                )
                data_fd.append(nfd)
                state[0] = req
                struct.pack_into("<Ii", buf, 8, req, nfd)
        elif index == v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
            struct.pack_into("<Q", buf, 8, 176)
        elif index == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
            struct.pack_into("<Q", buf, 8, 0x10000)  # device rounds the page size up
        return 0

    fake.handlers[v.VFIO_DEVICE_BIND_IOMMUFD] = bind
    fake.handlers[v.VFIO_DEVICE_ATTACH_IOMMUFD_PT] = attach
    fake.handlers[v.VFIO_DEVICE_DETACH_IOMMUFD_PT] = lambda fd, arg: 0
    fake.handlers[v.VFIO_DEVICE_FEATURE] = feature
    fake.handlers[v.VFIO_DEVICE_RESET] = lambda fd, arg: 0


def _raise(code: int) -> int:
    raise _oserror(code)


def test_device_bind_attach_detach_bytes(fake: FakeSyscalls, t: LinuxTransport) -> None:
    _device_handlers(fake, [2], [])
    with Iommufd(t) as ictx, VfioDevice(t, "/dev/vfio/devices/vfio0") as dev:
        assert dev.bind(ictx) == 3
        assert dev.attach(5) == 11
        dev.detach()
        dev.reset()
    bind = fake.ioctls(v.VFIO_DEVICE_BIND_IOMMUFD)[0]
    assert bind[3] == struct.pack("<IIiIQ", 24, 0, ictx.fd, 0, 0)
    assert fake.ioctls(v.VFIO_DEVICE_ATTACH_IOMMUFD_PT)[0][3] == struct.pack("<IIII", 16, 0, 5, 0)
    assert fake.ioctls(v.VFIO_DEVICE_DETACH_IOMMUFD_PT)[0][3] == struct.pack("<III", 12, 0, 0)
    assert fake.ioctls(v.VFIO_DEVICE_RESET)[0][3] == 0  # an int argument, passed by value
    assert fake.open_fds == set()


def test_migration_feature_bytes_and_data_fd(fake: FakeSyscalls, t: LinuxTransport) -> None:
    state = [int(MigrationState.RUNNING)]
    fds: list[int] = []
    _device_handlers(fake, state, fds)
    with VfioDevice(t, "/dev/vfio/devices/vfio0") as dev:
        assert int(dev.migration_flags()) == 7
        assert dev.mig_data_size() == 176
        assert dev.get_state() == MigrationState.RUNNING
        with session(dev.set_state("PRE_COPY")) as f:
            assert f is not None and f.fd == fds[-1] and f.saving
        assert dev.set_state(MigrationState.RUNNING) is None
    mig, size, get, set1, set2 = fake.ioctls(v.VFIO_DEVICE_FEATURE)
    assert mig[3] == struct.pack("<IIQ", 16, v.VFIO_DEVICE_FEATURE_GET | 1, 0)
    assert size[3] == struct.pack("<IIQ", 16, v.VFIO_DEVICE_FEATURE_GET | 9, 0)
    assert get[3] == struct.pack("<IIIi", 16, v.VFIO_DEVICE_FEATURE_GET | 2, 0, -1)
    assert set1[3] == struct.pack("<IIIi", 16, v.VFIO_DEVICE_FEATURE_SET | 2, 6, -1)
    assert set2[3] == struct.pack("<IIIi", 16, v.VFIO_DEVICE_FEATURE_SET | 2, 2, -1)
    assert fake.open_fds == set()  # the data fd was closed by its context manager


def test_failed_set_state_reports_requested_and_current(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    _device_handlers(fake, [int(MigrationState.STOP)], [])
    with VfioDevice(t, "/dev/vfio/devices/vfio0") as dev, pytest.raises(MigrationStateError) as e:
        dev.set_state(MigrationState.ERROR)
    assert e.value.errno == errno.EINVAL
    assert e.value.requested == MigrationState.ERROR and e.value.current == MigrationState.STOP
    assert "MIG_DEVICE_STATE] SET ERROR" in str(e.value)
    assert isinstance(e.value, DeviceError)


def test_dma_logging_start_passes_ranges_and_returns_page_size(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    _device_handlers(fake, [2], [])
    seen: list[tuple[int, int]] = []
    inner = fake.handlers[v.VFIO_DEVICE_FEATURE]

    def feature(fd: int, buf: Any) -> int:
        _, flags = _feature_flags(bytes(buf))
        if flags == v.VFIO_DEVICE_FEATURE_SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
            page_size, n, _res, ptr = struct.unpack_from("<QIIQ", buf, 8)
            arr = (v.vfio_device_feature_dma_logging_range * n).from_address(ptr)
            seen.extend((r.iova, r.length) for r in arr)
        return inner(fd, buf)

    fake.handlers[v.VFIO_DEVICE_FEATURE] = feature
    with VfioDevice(t, "/dev/vfio/devices/vfio0") as dev:
        assert not dev.dma_logging_supported()
        assert dev.dma_logging_start([(0, 1 << 20), (1 << 30, 1 << 21)], 4096) == 0x10000
    assert seen == [(0, 1 << 20), (1 << 30, 1 << 21)]
    start = fake.ioctls(v.VFIO_DEVICE_FEATURE)[-1][3]
    assert _feature_flags(start) == (32, v.VFIO_DEVICE_FEATURE_SET | 6)


def test_dma_logging_errors_are_dma_logging_errors(fake: FakeSyscalls, t: LinuxTransport) -> None:
    fake.handlers[v.VFIO_DEVICE_FEATURE] = lambda fd, buf: _raise(errno.ENOTTY)
    with VfioDevice(t, "/dev/vfio/devices/vfio0") as dev, pytest.raises(DmaLoggingError) as e:
        dev.dma_logging_report(0, 1 << 20, 4096)
    assert e.value.errno == errno.ENOTTY and "DMA_LOGGING_REPORT] GET" in str(e.value)


# -- migration data fd ---------------------------------------------------------------


def test_migration_file_reads_writes_and_precopy_info(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    from vfiomig.host import MigrationFile

    fd = fake.new_fd()
    fake.reads[fd] = [b"abc", b"defg", _oserror(errno.ENOMSG), b"xyz", b""]

    def info(fd_: int, arg: Any) -> int:
        arg.initial_bytes, arg.dirty_bytes = 40, 8
        return 0

    fake.handlers[v.VFIO_MIG_GET_PRECOPY_INFO] = info
    with MigrationFile(t, fd, saving=True) as f:
        p = f.precopy_info(flags=0x55)
        assert (p.initial_bytes, p.dirty_bytes, p.flags) == (40, 8, 0x55)  # v1 echo
        assert f.read_available() == b"abcdefg"  # stops at ENOMSG
        assert f.read_available() == b"xyz"  # then at EOF
        with pytest.raises(MigrationDataError) as e:
            fake.reads[fd] = [_oserror(errno.ENODEV)]
            f.read()
        assert e.value.errno == errno.ENODEV
    raw = fake.ioctls(v.VFIO_MIG_GET_PRECOPY_INFO)[0][3]
    assert raw == struct.pack("<IIQQ", 24, 0x55, 0, 0)
    rfd = fake.new_fd()
    with MigrationFile(t, rfd, saving=False) as w:
        w.write_all(b"0123456789abcdef")  # fake takes 5 bytes a call
    assert bytes(fake.written[rfd]) == b"0123456789abcdef"
    assert fake.open_fds == set()


# -- legacy container / group ------------------------------------------------------------


def test_container_group_bytes(fake: FakeSyscalls, t: LinuxTransport) -> None:
    names: list[bytes] = []

    def get_device_fd(fd: int, arg: Any) -> int:
        names.append(bytes(arg))
        return fake.new_fd()

    def get_info(fd: int, buf: Any) -> int:
        # header, then a migration capability at offset 24
        hdr = v.vfio_iommu_type1_info.from_buffer(buf)
        hdr.flags = v.VFIO_IOMMU_INFO_PGSIZES | v.VFIO_IOMMU_INFO_CAPS
        hdr.iova_pgsizes = 0x40201000
        hdr.cap_offset = 24
        cap = v.vfio_iommu_type1_info_cap_migration(
            flags=0, pgsize_bitmap=0x1000, max_dirty_bitmap_size=256 << 20
        )
        cap.header.id = v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION
        cap.header.version = 1
        buf[24 : 24 + ctypes.sizeof(cap)] = bytes(cap)
        return 0

    fake.handlers[v.VFIO_GROUP_SET_CONTAINER] = lambda fd, arg: 0
    fake.handlers[v.VFIO_GROUP_GET_DEVICE_FD] = get_device_fd
    fake.handlers[v.VFIO_SET_IOMMU] = lambda fd, arg: 0
    fake.handlers[v.VFIO_IOMMU_GET_INFO] = get_info
    fake.handlers[v.VFIO_IOMMU_DIRTY_PAGES] = lambda fd, arg: 0
    with Container(t) as c, Group(t, "/dev/vfio/7") as g:
        g.set_container(c)
        c.set_iommu()
        info = c.iommu_info()
        assert info.min_page_size == 0x1000
        assert info.migration is not None and info.migration.max_dirty_bitmap_size == 256 << 20
        c.dirty_pages_start()
        with g.get_device("0000:65:00.1") as dev:
            assert dev.fd in fake.open_fds
    assert fake.ioctls(v.VFIO_GROUP_SET_CONTAINER)[0][3] == struct.pack("<i", c.fd)
    assert names == [b"0000:65:00.1\0"]
    assert fake.ioctls(v.VFIO_SET_IOMMU)[0][3] == v.VFIO_TYPE1v2_IOMMU
    assert fake.ioctls(v.VFIO_IOMMU_DIRTY_PAGES)[0][3] == struct.pack("<II", 8, 1)
    assert fake.open_fds == set()


def test_type1_dirty_bitmap_descriptor(fake: FakeSyscalls, t: LinuxTransport) -> None:
    def dirty(fd: int, buf: Any) -> int:
        argsz, flags = struct.unpack_from("<II", buf)
        if flags & v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP:
            get = v.dirty_pages_get(buf)
            ctypes.memmove(ctypes.addressof(get.bitmap.data.contents), b"\x05", 1)
        return 0

    fake.handlers[v.VFIO_IOMMU_DIRTY_PAGES] = dirty
    with Container(t) as c:
        bm = c.dirty_pages_bitmap(0, 64 * 4096, 4096)
    raw = fake.ioctls(v.VFIO_IOMMU_DIRTY_PAGES)[0][3]
    argsz, flags, iova, size, pgsize, bsize, _ptr = struct.unpack("<IIQQQQQ", raw)
    assert (argsz, flags, iova, size, pgsize, bsize) == (48, 4, 0, 64 * 4096, 4096, 8)
    assert bm.pages().tolist() == [0, 2]


# -- errors and leaks ----------------------------------------------------------------------


def test_open_failure_is_open_error(fake: FakeSyscalls, t: LinuxTransport) -> None:
    fake.missing.add("/dev/iommu")
    with pytest.raises(OpenError) as e:
        Iommufd(t)
    assert e.value.errno == errno.ENOENT and "open(/dev/iommu)" in str(e.value)
    assert isinstance(e.value, VfioError) and isinstance(e.value, OSError)


def test_hwpt_error_class(fake: FakeSyscalls, t: LinuxTransport) -> None:
    fake.handlers[u.IOMMU_HWPT_ALLOC] = lambda fd, arg: _raise(errno.EOPNOTSUPP)
    with Iommufd(t) as ictx, pytest.raises(HwptError) as e:
        ictx.hwpt_alloc(1, 2, dirty_tracking=True)
    assert e.value.errno == errno.EOPNOTSUPP and e.value.op.startswith("IOMMU_HWPT_ALLOC")


def test_nothing_leaks_when_an_ioctl_fails_inside_with(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    fake.handlers[v.VFIO_DEVICE_BIND_IOMMUFD] = lambda fd, arg: _raise(errno.EBUSY)
    with pytest.raises(DeviceError):
        with Iommufd(t) as ictx, VfioDevice(t, "/dev/vfio/devices/vfio3") as dev:
            with pytest.raises(DmaLoggingError):
                dev.dma_logging_start([(0, 4096)])  # maps scratch memory, then fails
            dev.bind(ictx)
    assert fake.open_fds == set()
    assert all(b.closed for b in fake.buffers)


def test_closed_objects_refuse_and_close_is_idempotent(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    dev = VfioDevice(t, "/dev/vfio/devices/vfio0")
    dev.close()
    dev.close()
    with pytest.raises(ValueError):
        dev.reset()
    assert [c[0] for c in fake.calls] == ["open", "close"]


# -- the real seam, on ordinary fds ------------------------------------------------------


def test_real_syscalls_on_a_pipe_and_anonymous_memory() -> None:
    t = LinuxTransport()
    r, w = os.pipe()
    try:
        assert t.write(w, b"hello") == 5
        assert t.poll(r, timeout_ms=0) & select.POLLIN
        assert t.read(r, 5) == b"hello"
        with pytest.raises(OSError) as e:
            t.lseek(r, 0)
        assert e.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)
    with t.mmap(10000) as buf:
        buf.write(b"xyz", 4096)
        assert ctypes.string_at(buf.addr + 4096, 3) == b"xyz"  # addr is a real address
        ctypes.memmove(buf.addr, b"ok", 2)
        assert buf.read(0, 2) == b"ok"
    assert buf.closed


# -- this machine's kernel (marked; CI has no /dev/iommu) -------------------------------------


@pytest.mark.hardware
@pytest.mark.skipif(not os.path.exists("/dev/iommu"), reason="no /dev/iommu on this machine")
def test_iommufd_on_this_host() -> None:
    t = LinuxTransport()
    try:
        ictx = Iommufd(t)
    except OpenError as e:
        pytest.skip(f"cannot open /dev/iommu: {e}")
    with ictx, ictx.ioas_alloc() as ioas, t.mmap(1 << 16) as mem:
        ranges = ioas.iova_ranges()
        assert ranges.ranges and ranges.alignment >= 1
        iova = ioas.map(mem)
        assert iova % ranges.alignment == 0
        assert ioas.unmap(iova, 1 << 16) == 1 << 16
        with pytest.raises(IoasError) as again:
            ioas.unmap(iova, 1 << 16)
        assert again.value.errno == errno.ENOENT


@pytest.mark.hardware
@pytest.mark.skipif(
    not os.path.isdir("/dev/vfio/devices"), reason="no /dev/vfio/devices on this machine"
)
def test_vfio_cdevs_on_this_host() -> None:
    from vfiomig.tools.probe import probe_host

    report = probe_host(LinuxTransport())
    for dev in report["devices"]:
        assert dev["path"].startswith("/dev/vfio/devices/vfio")
        assert "error" in dev or "migration" in dev


# -- bitmaps larger than the library maps ---------------------------------------------------


def test_an_oversized_dirty_bitmap_is_refused_before_the_kernel_writes_past_it(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    # 16 TiB at 4 KiB needs a 512 MiB bitmap; the library maps at most 256 MiB. iommufd and
    # DMA logging have no cap of their own: the kernel would write past the buffer.
    def hwpt_bitmap(fd: int, arg: Any) -> int:
        if arg.iova + arg.length - 1 > (1 << 64) - 1:
            raise _oserror(errno.EOVERFLOW)  # iommufd_check_iova_range
        return 0

    def report(fd: int, buf: Any) -> int:
        iova, length, page_size = struct.unpack_from("<QQQ", buf, 8)
        if page_size < 4096 or page_size & (page_size - 1):
            raise _oserror(errno.EINVAL)
        if iova + length > (1 << 64) - 1:
            raise _oserror(errno.EOVERFLOW)
        return 0

    fake.handlers[u.IOMMU_HWPT_GET_DIRTY_BITMAP] = hwpt_bitmap
    fake.handlers[v.VFIO_DEVICE_FEATURE] = report
    huge = 16 << 40
    with Iommufd(t) as ictx, VfioDevice(t, "/dev/vfio/devices/vfio0") as dev:
        from vfiomig.host.iommufd import Hwpt

        hwpt = Hwpt(ictx, 9)
        with pytest.raises(ValueError, match="ask in parts"):
            hwpt.get_dirty_bitmap(0, huge, 4096)
        with pytest.raises(ValueError, match="ask in parts"):
            dev.dma_logging_report(0, huge, 4096)
        assert fake.ioctls() == []  # nothing reached the kernel
        assert all(b.length <= 1 << 20 for b in fake.buffers)
        # An ordinary range goes through, and so do requests the kernel refuses before it
        # touches the bitmap: they are what overflow tests send.
        assert not hwpt.get_dirty_bitmap(0, 1 << 30, 4096)
        with pytest.raises(HwptError) as e:  # iova + length - 1 wraps
            hwpt.get_dirty_bitmap((1 << 63) + 4096, 1 << 63, 4096)
        assert e.value.errno == errno.EOVERFLOW
        with pytest.raises(ValueError):  # ends exactly at 2^64 - 1: the kernel takes it
            hwpt.get_dirty_bitmap(1 << 63, 1 << 63, 4096)
        with pytest.raises(DmaLoggingError) as le:  # iova + length passes 2^64 - 1
            dev.dma_logging_report(1 << 63, 1 << 63, 4096)
        assert le.value.errno == errno.EOVERFLOW
        with pytest.raises(DmaLoggingError) as le:  # a page size the kernel refuses
            dev.dma_logging_report(0, huge, 2048)
        assert le.value.errno == errno.EINVAL
    assert len(fake.ioctls(u.IOMMU_HWPT_GET_DIRTY_BITMAP)) == 2
    assert len(fake.ioctls(v.VFIO_DEVICE_FEATURE)) == 2


# -- every remaining call: request number and bytes, written out from the C headers ----------

# _IO(';', nr) = 0x3B00 | nr: VFIO_BASE is 100, IOMMUFD_CMD_BASE 0x80. Written out here (not
# taken from vfiomig.uapi) so that a wrong constant in the library fails this test.
IOMMU_DESTROY, IOMMU_IOAS_COPY, IOMMU_OPTION = 0x3B80, 0x3B83, 0x3B87
IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMU_GET_HW_INFO = 0x3B8C, 0x3B8A
VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION = 0x3B64, 0x3B65
VFIO_GROUP_GET_STATUS, VFIO_GROUP_UNSET_CONTAINER = 0x3B67, 0x3B69
VFIO_DEVICE_GET_INFO, VFIO_DEVICE_FEATURE = 0x3B6B, 0x3B75
VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA = 0x3B71, 0x3B72
FEATURE_GET, FEATURE_SET = 1 << 16, 1 << 17


def test_every_other_call_sends_the_kernels_request_and_bytes(
    fake: FakeSyscalls, t: LinuxTransport
) -> None:
    def ok(fd: int, arg: Any) -> int:
        return 0

    for req in (
        IOMMU_DESTROY,
        IOMMU_IOAS_COPY,
        IOMMU_OPTION,
        IOMMU_HWPT_GET_DIRTY_BITMAP,
        IOMMU_GET_HW_INFO,
        VFIO_GROUP_GET_STATUS,
        VFIO_GROUP_UNSET_CONTAINER,
        VFIO_DEVICE_GET_INFO,
        VFIO_DEVICE_FEATURE,
        VFIO_IOMMU_MAP_DMA,
        VFIO_IOMMU_UNMAP_DMA,
    ):
        fake.handlers[req] = ok
    fake.handlers[VFIO_GET_API_VERSION] = lambda fd, arg: 0
    fake.handlers[VFIO_CHECK_EXTENSION] = lambda fd, arg: 1

    def last() -> tuple[int, bytes | int]:
        call = fake.ioctls()[-1]
        return call[2], call[3]

    with (
        Iommufd(t) as ictx,
        VfioDevice(t, "/dev/vfio/devices/vfio0") as dev,
        Container(t) as c,
        Group(t, "/dev/vfio/7") as g,
        t.mmap(1 << 16) as mem,
    ):
        from vfiomig.host.iommufd import Hwpt, Ioas

        a, b = Ioas(ictx, 3), Ioas(ictx, 4)
        a.copy(0x1000, 0x2000, dst=b, dst_iova=0x9000, writeable=False)
        # struct iommu_ioas_copy {size, flags, dst_ioas_id, src_ioas_id, length, dst_iova,
        # src_iova}; flags FIXED_IOVA (1) | READABLE (4)
        assert last() == (
            IOMMU_IOAS_COPY,
            struct.pack("<IIIIQQQ", 40, 1 | 4, 4, 3, 0x2000, 0x9000, 0x1000),
        )
        a.set_huge_pages(False)  # struct iommu_option {size, option_id, op, rsvd, id, val64}
        assert last() == (IOMMU_OPTION, struct.pack("<IIHHIQ", 24, 1, 0, 0, 3, 0))
        a.huge_pages()
        assert last() == (IOMMU_OPTION, struct.pack("<IIHHIQ", 24, 1, 1, 0, 3, 0))
        b.destroy()  # struct iommu_destroy {size, id}
        assert last() == (IOMMU_DESTROY, struct.pack("<II", 8, 4))

        hwpt = Hwpt(ictx, 9)
        hwpt.get_dirty_bitmap(0x40000, 0x10000, 4096)
        # struct iommu_hwpt_get_dirty_bitmap {size, hwpt_id, flags, rsvd, iova, length,
        # page_size, data}
        req, raw = last()
        assert isinstance(raw, bytes) and req == IOMMU_HWPT_GET_DIRTY_BITMAP
        assert raw[:40] == struct.pack("<IIIIQQQ", 48, 9, 0, 0, 0x40000, 0x10000, 4096)
        ictx.hw_info(5, data_len=64)
        # struct iommu_hw_info {size, flags, dev_id, data_len, data_uptr, out_data_type,
        # out_max_pasid_log2, out_capabilities, in_data_type, rsvd}
        req, raw = last()
        assert isinstance(raw, bytes) and req == IOMMU_GET_HW_INFO
        assert struct.unpack_from("<IIII", raw) == (len(raw), 0, 5, 64)

        dev.info()  # struct vfio_device_info {argsz, flags, regions, irqs, cap_offset, pad}
        assert last() == (VFIO_DEVICE_GET_INFO, struct.pack("<IIIIII", 24, 0, 0, 0, 0, 0))
        dev.dma_logging_stop()  # struct vfio_device_feature {argsz, flags}, no payload
        assert last() == (VFIO_DEVICE_FEATURE, struct.pack("<II", 8, FEATURE_SET | 7))
        dev.enable_precopy_info_v2()
        assert last() == (VFIO_DEVICE_FEATURE, struct.pack("<II", 8, FEATURE_SET | 12))
        dev.dma_logging_report(0x100000, 0x40000, 0x2000)
        # + struct vfio_device_feature_dma_logging_report {iova, length, page_size, bitmap}
        req, raw = last()
        assert isinstance(raw, bytes) and req == VFIO_DEVICE_FEATURE
        assert (
            raw[:32] == struct.pack("<IIQQQ", 40, FEATURE_GET | 8, 0x100000, 0x40000, 0x2000)
            and len(raw) == 40
        )
        assert struct.unpack_from("<Q", raw, 32)[0] != 0  # a user address for the bitmap

        assert c.api_version() == 0
        assert last() == (VFIO_GET_API_VERSION, 0)
        assert c.check_extension(3) == 1
        assert last() == (VFIO_CHECK_EXTENSION, 3)
        c.map_dma(mem, iova=0x200000, writeable=False)
        # struct vfio_iommu_type1_dma_map {argsz, flags, vaddr, iova, size}; READ = 1
        assert last() == (
            VFIO_IOMMU_MAP_DMA,
            struct.pack("<IIQQQ", 32, 1, mem.addr, 0x200000, 1 << 16),
        )
        c.unmap_dma(
            0x200000, 0x1000
        )  # struct vfio_iommu_type1_dma_unmap {argsz, flags, iova, size}
        assert last() == (VFIO_IOMMU_UNMAP_DMA, struct.pack("<IIQQ", 24, 0, 0x200000, 0x1000))
        c.unmap_all()  # VFIO_DMA_UNMAP_FLAG_ALL = 2
        assert last() == (VFIO_IOMMU_UNMAP_DMA, struct.pack("<IIQQ", 24, 2, 0, 0))
        c.unmap_dma_dirty(0x200000, 0x10000, 4096)
        # + struct vfio_bitmap {pgsize, size, data}; GET_DIRTY_BITMAP = 1; 16 pages: 8 bytes
        req, raw = last()
        assert isinstance(raw, bytes) and req == VFIO_IOMMU_UNMAP_DMA
        assert raw[:40] == struct.pack("<IIQQQQ", 48, 1, 0x200000, 0x10000, 4096, 8)
        assert len(raw) == 48 and struct.unpack_from("<Q", raw, 40)[0] != 0

        g.status()  # struct vfio_group_status {argsz, flags}
        assert last() == (VFIO_GROUP_GET_STATUS, struct.pack("<II", 8, 0))
        g.unset_container()
        assert last() == (VFIO_GROUP_UNSET_CONTAINER, 0)
    assert fake.open_fds == set()
