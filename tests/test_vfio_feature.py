"""Errno rules of the device fd: cdev access, VFIO_DEVICE_FEATURE dispatch and
vfio_check_feature, the core feature handlers, DMA logging, GET_INFO and RESET
(spec kernel-uapi.md §2, §3, §4.4; drivers/vfio/vfio_main.c)."""

from __future__ import annotations

import ctypes
import struct
import tracemalloc
from collections.abc import Callable
from errno import E2BIG, EBADF, EBUSY, EFAULT, EINVAL, EMFILE, ENODEV, ENOTTY, EOPNOTSUPP, EOVERFLOW
from typing import Any

import pytest
from conftest import (
    GET,
    LOG_REPORT,
    LOG_START,
    MIG_STATE,
    PROBE,
    SET,
    Dev,
    Ranges,
    bits_of,
    errno_of,
    report,
    start,
)

from vfiomig.kernel.machine import DRIVERS, ModelKernel
from vfiomig.kernel.vfio_fsm import ERROR, PRE_COPY, RUNNING, STOP_COPY
from vfiomig.kernel.vfio_main import VfioDevice
from vfiomig.uapi import vfio as v

MIGRATION = v.VFIO_DEVICE_FEATURE_MIGRATION
DATA_SIZE = v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
V2 = v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2
LOG_STOP = v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP


class Plain(VfioDevice):
    """A device without mig_ops or log_ops (a plain vfio-pci function)."""

    kind = "plain"


class NoReset(Plain):
    kind = "noreset"
    reset_works = False
    info_flags = v.VFIO_DEVICE_FLAGS_PCI


@pytest.fixture(autouse=True)
def _test_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DRIVERS, "plain", Plain)
    monkeypatch.setitem(DRIVERS, "noreset", NoReset)


def feat(d: Dev, flags: int, payload: Any = b"") -> int:
    """errno of a VFIO_DEVICE_FEATURE call (0 = success)."""
    return errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_FEATURE, v.feature_buffer(flags, payload))


def raw_feature(d: Dev, argsz: int, flags: int, data: bytes = b"") -> int:
    buf = bytearray(struct.pack("<II", argsz, flags) + data)
    return errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_FEATURE, buf)


# ----------------------------------------------------------------- before bind (§2.2 #0)


@pytest.mark.parametrize(
    "cmd,arg",
    [
        (v.VFIO_DEVICE_FEATURE, v.feature_buffer(GET | MIG_STATE, 8)),
        (v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=24)),
        (v.VFIO_DEVICE_RESET, 0),
        (v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, v.vfio_device_attach_iommufd_pt(argsz=16)),
        (v.VFIO_DEVICE_DETACH_IOMMUFD_PT, v.vfio_device_detach_iommufd_pt(argsz=12)),
        (0x1234, 0),
    ],
)
def test_every_ioctl_before_bind_is_einval(
    make_dev: Callable[..., Dev], cmd: int, arg: Any
) -> None:
    d = make_dev(bind=False)
    assert errno_of(d.k.ioctl, d.fd, cmd, arg) == EINVAL
    d.bind()
    if cmd == 0x1234:
        assert errno_of(d.k.ioctl, d.fd, cmd, arg) == ENOTTY  # vfio_pci_core_ioctl default


def test_device_fd_read_needs_access_and_a_read_op(make_dev: Callable[..., Dev]) -> None:
    """vfio_device_fops_read: EINVAL before access is granted and for a driver without a
    read op; a vfio-pci device reads its regions (tests/test_vfio_pci_core.py)."""
    d = make_dev(bind=False)
    assert errno_of(d.k.read, d.fd, 4) == EINVAL
    d.bind()
    assert d.k.read(d.fd, 4) == bytes(4)  # f_pos 0: BAR0 offset 0
    plain = make_dev("plain")
    assert errno_of(plain.k.read, plain.fd, 4) == EINVAL
    assert errno_of(plain.k.write, plain.fd, b"x") == EINVAL


# ----------------------------------------------------------------- dispatcher (§2.2)


def test_dispatcher_header_fault(ref: Dev) -> None:
    assert errno_of(ref.k.ioctl, ref.fd, v.VFIO_DEVICE_FEATURE, bytearray(7)) == EFAULT
    assert errno_of(ref.k.ioctl, ref.fd, v.VFIO_DEVICE_FEATURE, 0) == EFAULT


@pytest.mark.parametrize("argsz", [0, 7])
def test_dispatcher_argsz_below_header(ref: Dev, argsz: int) -> None:
    # argsz is checked before the index: an unknown index still says EINVAL
    assert raw_feature(ref, argsz, GET | MIG_STATE, bytes(8)) == EINVAL
    assert raw_feature(ref, argsz, GET | 0x55) == EINVAL


@pytest.mark.parametrize("bit", [19, 20, 24, 31])
def test_dispatcher_unknown_flag_bits(ref: Dev, bit: int) -> None:
    assert feat(ref, GET | MIG_STATE | 1 << bit, 8) == EINVAL
    assert feat(ref, GET | 0x55 | 1 << bit) == EINVAL  # before the index lookup


def test_dispatcher_get_and_set_need_probe(ref: Dev) -> None:
    assert feat(ref, GET | SET | MIG_STATE, 8) == EINVAL
    assert feat(ref, GET | SET | 0x55) == EINVAL  # before the index lookup
    assert feat(ref, GET | SET | PROBE | MIG_STATE, 8) == 0


@pytest.mark.parametrize("index", [0, 10, 13, 0xFFFF])
def test_unknown_feature_index_is_enotty(ref: Dev, index: int) -> None:
    # vfio_pci_core_ioctl_feature: PCI_VF_TOKEN (0) needs an SR-IOV PF, BUS_MASTER (10) is
    # CDX's; LOW_POWER_* (3-5) and DMA_BUF (11) are answered (tests/test_vfio_pci_core.py)
    assert feat(ref, GET | index, 64) == ENOTTY
    assert feat(ref, SET | PROBE | index) == ENOTTY


@pytest.mark.parametrize("index", [0, 3, 4, 5, 10, 11, 13, 0xFFFF])
def test_driver_without_device_feature_is_enotty(make_dev: Callable[..., Dev], index: int) -> None:
    d = make_dev("plain")
    assert feat(d, GET | index, 64) == ENOTTY
    assert feat(d, SET | PROBE | index) == ENOTTY


# ----------------------------------------------------------------- vfio_check_feature (§2.3)


@pytest.mark.parametrize(
    "flags,payload,want",
    [
        (SET | PROBE | MIGRATION, b"", EINVAL),  # 1: unsupported direction, even with PROBE
        (PROBE | MIGRATION, b"", 0),  # 2: PROBE alone answers 0
        (GET | PROBE | MIGRATION, b"", 0),  # 2: argsz ignored under PROBE
        (MIGRATION, 8, EINVAL),  # 3: neither GET nor SET
        (GET | MIGRATION, 7, EINVAL),  # 4: data smaller than minsz
        (GET | MIGRATION, 8, 0),
        (SET | DATA_SIZE, 8, EINVAL),
        (GET | DATA_SIZE, 4, EINVAL),
        (GET | DATA_SIZE, 8, 0),
        (GET | MIG_STATE, 7, EINVAL),
        (GET | V2, b"", EINVAL),
        (SET | PROBE | V2, b"", 0),
        (GET | LOG_REPORT, 31, EINVAL),
        (SET | LOG_REPORT, 32, EINVAL),
        (GET | LOG_START, 24, EINVAL),
        (SET | LOG_START, 23, EINVAL),
        (SET | PROBE | LOG_START, b"", 0),
        (GET | LOG_STOP, b"", EINVAL),
        (SET | LOG_STOP, b"", 0),  # minsz 0; stopping what never started is fine
    ],
)
def test_check_feature_order(ref: Dev, flags: int, payload: Any, want: int) -> None:
    assert feat(ref, flags, payload) == want


def test_check_feature_before_data_copy(ref: Dev) -> None:
    # argsz claims 8 data bytes that are not there: EFAULT only after the checks pass
    assert raw_feature(ref, 16, GET | MIGRATION) == EFAULT
    assert raw_feature(ref, 16, GET | PROBE | MIGRATION) == 0
    assert raw_feature(ref, 15, GET | MIGRATION) == EINVAL


# ----------------------------------------------------------------- handler preconditions (§2.4)


@pytest.mark.parametrize("index", [MIGRATION, MIG_STATE, DATA_SIZE])
def test_no_mig_ops_is_enotty_even_for_probe(make_dev: Callable[..., Dev], index: int) -> None:
    d = make_dev("plain")
    assert feat(d, GET | index, 8) == ENOTTY
    assert feat(d, GET | PROBE | index) == ENOTTY
    assert feat(d, SET | GET | PROBE | index) == ENOTTY


@pytest.mark.parametrize("index", [LOG_START, LOG_STOP, LOG_REPORT])
def test_no_log_ops_is_enotty_even_for_probe(make_dev: Callable[..., Dev], index: int) -> None:
    d = make_dev(dma_logging=False)
    assert feat(d, SET | PROBE | index) == ENOTTY
    assert feat(d, GET | PROBE | index) == ENOTTY
    assert feat(make_dev("plain"), SET | PROBE | index) == ENOTTY


@pytest.mark.parametrize("flags", [1, 3])
def test_precopy_info_v2_without_pre_copy_is_einval(
    make_dev: Callable[..., Dev], flags: int
) -> None:
    assert feat(make_dev(migration_flags=flags), SET | V2) == EINVAL
    assert feat(make_dev(migration_flags=flags), SET | PROBE | V2) == EINVAL


def test_precopy_info_v2_on_plain_device_is_einval_not_enotty(make_dev: Callable[..., Dev]) -> None:
    assert feat(make_dev("plain"), SET | V2) == EINVAL


@pytest.mark.parametrize("flags", [1, 3, 5, 7])
def test_migration_reports_flags(make_dev: Callable[..., Dev], flags: int) -> None:
    d = make_dev(migration_flags=flags)
    buf = d.feature(GET | MIGRATION, 8)
    assert struct.unpack_from("<Q", buf, 8)[0] == flags


def test_mig_state_get_writes_state_and_minus_one(ref: Dev) -> None:
    buf = ref.feature(GET | MIG_STATE, v.vfio_device_feature_mig_state(device_state=7, data_fd=99))
    assert struct.unpack_from("<Ii", buf, 8) == (RUNNING, -1)


@pytest.mark.parametrize("state", [0, 8, 9, 255, 2**32 - 1])
def test_mig_state_set_invalid_echoes_request(ref: Dev, state: int) -> None:
    e, fd, echoed = ref.try_set_state(state)
    assert (e, fd) == (EINVAL, -1)
    assert struct.unpack("<Ii", echoed[:8]) == (state, -1)
    assert ref.get_state() == RUNNING


def test_mig_state_unsupported_optional_state(make_dev: Callable[..., Dev]) -> None:
    assert make_dev(migration_flags=1).try_set_state(5)[:2] == (EINVAL, -1)  # RUNNING_P2P
    assert make_dev(migration_flags=3).try_set_state(PRE_COPY)[:2] == (EINVAL, -1)
    assert make_dev(migration_flags=5).try_set_state(7)[:2] == (EINVAL, -1)


def test_mig_state_set_errno_from_arc_is_echoed(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(migration_flags=1, fail_arc=("RUNNING", "STOP", EBUSY))
    e, fd, echoed = d.try_set_state(STOP_COPY)
    assert (e, fd) == (EBUSY, -1) and echoed[:4] == struct.pack("<I", STOP_COPY)
    assert d.get_state() == RUNNING


def test_emfile_keeps_the_transition(kernel: ModelKernel, make_dev: Callable[..., Dev]) -> None:
    """§11: no fd left -> EMFILE, but the driver already moved and holds its file."""
    d = make_dev()
    fillers = []
    while True:
        try:
            fillers.append(kernel.open("/dev/iommu"))
        except OSError:
            break
    # vfio_ioct_mig_return_fd returns before any copy-out: data_fd keeps what we wrote
    assert d.try_set_state(PRE_COPY)[:2] == (EMFILE, -7)
    assert d.get_state() == PRE_COPY
    assert d.vdev.saving_file is not None and d.vdev.saving_file.live
    kernel.close(fillers.pop())
    assert d.try_set_state(RUNNING)[0] == 0
    assert d.vdev.saving_file is None


def test_mig_data_size(ref: Dev) -> None:
    buf = ref.feature(GET | DATA_SIZE, 8)
    assert struct.unpack_from("<Q", buf, 8)[0] > 64 * 1024


# ----------------------------------------------------------------- DMA logging START (§3.1)


MB = 1 << 20


@pytest.mark.parametrize(
    "ranges,page_size,num,want",
    [
        ([(0, MB)], 4096, 0, EINVAL),  # 2: no ranges
        ([(0, MB)], 4096, 257, E2BIG),  # 3: > LOG_MAX_RANGES, before reading any range
        ([(0, MB)], 4096, 2, EFAULT),  # 5: the second range is past the mapping
        ([(4097, 4096)], 4096, None, EINVAL),  # 6: iova not aligned
        ([(4096, 100)], 4096, None, EINVAL),  # 6: length not aligned
        ([((1 << 64) - 4096, 4096)], 4096, None, EOVERFLOW),  # 7: iova + length wraps
        ([(0, 2 * MB), (MB, MB)], 4096, None, EINVAL),  # 8: overlaps an earlier range
        ([(0, MB), (MB, MB)], 4096, None, 0),  # adjacent is fine
        ([(0, 0), (MB, MB)], 4096, None, EINVAL),  # zero length at 0 ends at ULONG_MAX
        ([(0, 0)], 0, None, 0),  # page_size 0 aligns only 0
        ([(4096, 4096)], 0, None, EINVAL),
        ([(4, 8)], 3, None, 0),  # a raw mask, not a power-of-two check: 4 & 2 == 0
        ([(2, 8)], 3, None, EINVAL),
        ([(5, 1), (5, 1)], 1, None, EINVAL),  # one-byte ranges: inclusive [start, last]
        ([(6, 1), (5, 2)], 1, None, EINVAL),
        ([(5, 1), (6, 1)], 1, None, 0),
    ],
)
def test_logging_start_validation(
    make_dev: Callable[..., Dev],
    ranges: list[tuple[int, int]],
    page_size: int,
    num: int | None,
    want: int,
) -> None:
    d = make_dev(log_addr_space=(0, 64))  # no driver limit on the tracked span here
    assert start(d, ranges, page_size, num)[0] == want


def test_logging_start_takes_exactly_log_max_ranges(make_dev: Callable[..., Dev]) -> None:
    """LOG_MAX_RANGES = PAGE_SIZE / sizeof(struct vfio_device_feature_dma_logging_range)
    = 256 (vfio_ioctl_device_feature_logging_start: `nnodes > LOG_MAX_RANGES` is E2BIG):
    256 ranges are accepted, 257 are not, and the 257th is never read."""
    ranges = [(2 * i * 4096, 4096) for i in range(257)]
    d = make_dev()
    assert start(d, ranges[:256]) == (0, 4096)
    d.hw.on_dma_write(2 * 255 * 4096, 8)  # the last range is tracked
    assert bits_of(report(d, 0, 2 * 256 * 4096)[1]) == [510]
    e = make_dev()
    assert start(e, ranges)[0] == E2BIG
    assert start(e, [], num=257, ptr=Ranges(e.k, ranges[:256]).addr)[0] == E2BIG


def test_logging_start_first_offending_range_decides(ref: Dev) -> None:
    # range 1 overlaps (EINVAL) before range 2 would fault (EFAULT)
    r = Ranges(ref.k, [(0, MB), (MB // 2, MB)])
    assert start(ref, [], num=3, ptr=r.addr)[0] == EINVAL
    # range 1 faults before range 2 would be misaligned
    r = Ranges(ref.k, [(0, MB)])
    assert start(ref, [], num=3, ptr=r.addr)[0] == EFAULT


def test_logging_start_bad_control_copy(ref: Dev) -> None:
    assert raw_feature(ref, 8 + 24, SET | LOG_START, bytes(16)) == EFAULT


def test_logging_start_twice_is_einval_and_stop_allows_restart(ref: Dev) -> None:
    assert start(ref, [(0, MB)])[0] == 0
    assert start(ref, [(0, MB)])[0] == EINVAL  # mlx5: log_active
    assert feat(ref, SET | LOG_STOP) == 0
    assert start(ref, [(0, MB)])[0] == 0


@pytest.mark.parametrize(
    "asked,used",
    [(4096, 4096), (8192, 8192), (512, 4096), (1 << 30, 1 << 21), (0, 1 << 21), (12288, 8192)],
)
def test_logging_page_size_negotiation(make_dev: Callable[..., Dev], asked: int, used: int) -> None:
    """mlx5: u8 ilog2 of the request (ilog2(0) = -1 = 255) clamped into the tracker's
    [2^12, 2^21], written back."""
    d = make_dev(log_addr_space=(0, 64))
    length = {0: 0, 1 << 30: 1 << 30, 12288: 4 * 12288}.get(asked, 4 * MB)
    assert start(d, [(0, length)], asked) == (0, used)


def test_logging_address_space_limits(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(log_addr_space=(20, 30))
    assert start(d, [(0, 4096)])[0] == EOPNOTSUPP  # 4 KiB < 2^20
    assert start(d, [(0, 2 * MB)])[0] == 0


@pytest.mark.parametrize(
    "length,addr_space", [(1 << 52, (12, 52)), (1 << 63, (0, 64))], ids=["2^52", "2^63"]
)
def test_logging_start_of_a_huge_range_costs_bounded_memory(
    make_dev: Callable[..., Dev], length: int, addr_space: tuple[int, int]
) -> None:
    """mlx5 hands the ranges to the device's page tracker; the kernel allocates nothing per
    page of them. The model's log holds state only where the device wrote."""
    d = make_dev(log_addr_space=addr_space)
    far = length // 2 + 5 * 4096
    tracemalloc.start()
    try:
        assert start(d, [(0, length)]) == (0, 4096)
        d.hw.on_dma_write(0x3000, 8)
        d.hw.on_dma_write(far, 8)
        assert bits_of(report(d, far - 5 * 4096, MB)[1]) == [5]
        assert bits_of(report(d, 0, MB)[1]) == [3]
        d.hw.on_dma_write(far, 8)  # a bitmap of one page over all of it: EFAULT after
        e, raw = report(d, 0, length)  # the part it covers was reported (and cleared)
        assert e == EFAULT and bits_of(raw) == []
        assert bits_of(report(d, far, 4096)[1]) == [0]  # still logged: past that part
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * MB


# ----------------------------------------------------------------- DMA logging REPORT (§3.3)


@pytest.mark.parametrize(
    "iova,length,page_size,want",
    [
        (0, MB, 2048, EINVAL),
        (0, MB, 4097, EINVAL),
        (0, MB, 3 * 4096, EINVAL),
        ((1 << 64) - 4096, 4096, 4096, EOVERFLOW),
        (0, MB, 4096, 0),
        (100, MB, 4096, 0),  # iova / length need no alignment
    ],
)
def test_logging_report_validation(
    ref: Dev, iova: int, length: int, page_size: int, want: int
) -> None:
    assert start(ref, [(0, 4 * MB)])[0] == 0
    assert report(ref, iova, length, page_size)[0] == want


def test_logging_report_order_and_driver_errors(ref: Dev) -> None:
    assert report(ref, 0, MB, 4096, bitmap=16)[0] == EFAULT  # pinned before the driver runs
    assert report(ref, 0, MB, 4096)[0] == EINVAL  # not started (mlx5)
    assert start(ref, [(0, 4 * MB)])[0] == 0
    assert report(ref, 0, MB, 2048, bitmap=16)[0] == EINVAL  # page size before the pointer
    assert report(ref, 0, MB, 4096, bitmap=16)[0] == EFAULT
    assert raw_feature(ref, 8 + 32, GET | LOG_REPORT, bytes(24)) == EFAULT


def test_logging_bits_relative_only_set_and_cleared_by_read(ref: Dev) -> None:
    assert start(ref, [(0, 4 * MB)])[0] == 0
    hw = ref.hw
    for iova in (0x3000, 0x10000, 0x10FFF, 0x200000):
        hw.on_dma_write(iova, 8)
    bitmap, _ = ref.k.mmap(4096)
    ref.k.mm.write(bitmap, b"\x00\x02")  # a stale bit 9 the caller left: never cleared
    e, raw = report(ref, 0x1000, 2 * MB, bitmap=bitmap)
    assert e == 0
    # bit = (addr - report.iova) / page_size; the write at 0x10FFF spans two pages
    assert bits_of(raw) == [2, 9, 15, 16, 511]
    assert bits_of(report(ref, 0x1000, 2 * MB)[1]) == []  # read-and-clear
    hw.on_dma_write(0x5000, 4096 * 3)  # a multi-page write
    assert bits_of(report(ref, 0, 4 * MB)[1]) == [5, 6, 7]


def test_logging_report_clears_only_the_reported_range(ref: Dev) -> None:
    assert start(ref, [(0, 4 * MB)])[0] == 0
    ref.hw.on_dma_write(0x1000, 8)
    ref.hw.on_dma_write(0x9000, 8)
    assert bits_of(report(ref, 0, 0x8000)[1]) == [1]
    assert bits_of(report(ref, 0, 4 * MB)[1]) == [9]


def test_logging_report_at_a_finer_page_size_replicates_bits(ref: Dev) -> None:
    assert start(ref, [(0, 4 * MB)], 2 * MB) == (0, 2 * MB)
    ref.hw.on_dma_write(2 * MB + 5, 1)
    assert bits_of(report(ref, 0, 4 * MB, 64 * 1024)[1]) == list(range(32, 64))


def test_logging_report_length_zero(ref: Dev) -> None:
    assert start(ref, [(0, 4 * MB)])[0] == 0
    ref.hw.on_dma_write(0, 8)
    assert report(ref, 0, 0) == (0, bytes(4096))


def test_logging_report_short_bitmap_reports_then_faults(ref: Dev) -> None:
    assert start(ref, [(0, 64 * MB)])[0] == 0
    ref.hw.on_dma_write(0, 8)  # bit 0: inside the pinned part
    ref.hw.on_dma_write(40 * MB, 8)  # bit 10240: past a 1-page bitmap (32768 bits = 128 MiB)
    addr, _ = ref.k.mmap(4096)
    e, raw = report(ref, 0, 1 << 40, bitmap=addr + 4095, nbytes=1)  # only 1 byte pinnable
    assert e == EFAULT and raw == b"\x01"


def test_logging_range_merging_like_mlx5(make_dev: Callable[..., Dev]) -> None:
    """More ranges than the tracker takes: the closest ones are merged, so a write in the
    closed gap is logged while one in a wide gap is not."""
    d = make_dev(log_max_ranges=2)
    assert start(d, [(0, 4096), (8192, 4096), (MB, 4096)])[0] == 0
    for iova in (4096, MB // 2, MB):
        d.hw.on_dma_write(iova, 8)
    assert bits_of(report(d, 0, 2 * MB)[1]) == [1, 256]


def test_logging_start_copy_back_fault_stops_tracking() -> None:
    """§3.1 #10 needs a control struct that can be read but not written back; a bytearray
    argument cannot express that, so the rule is checked on the handler directly."""
    from vfiomig.kernel.uaccess import UserArg
    from vfiomig.kernel.vfio_main import _feature_logging_start

    k = ModelKernel()
    d = Dev(k)
    r = Ranges(k, [(0, MB)])
    ctl = v.vfio_device_feature_dma_logging_control(page_size=4096, num_ranges=1, ranges=r.addr)
    arg = UserArg(v.feature_buffer(SET | LOG_START, ctl))

    def fail(off: int, data: bytes | bytearray) -> None:
        raise OSError(EFAULT, "fault")

    arg.write = fail  # type: ignore[method-assign]
    with pytest.raises(OSError) as e:
        _feature_logging_start(d.vdev, SET | LOG_START, arg, 24)
    assert e.value.errno == EFAULT and d.hw.log is None


# ----------------------------------------------------------------- GET_INFO, RESET


def test_get_info_rules(ref: Dev) -> None:
    k = ref.k
    assert errno_of(k.ioctl, ref.fd, v.VFIO_DEVICE_GET_INFO, bytearray(12)) == EFAULT
    assert errno_of(k.ioctl, ref.fd, v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=15)) == EINVAL
    short = bytearray(struct.pack("<IIII", 16, 0, 0, 0) + b"\xaa" * 8)
    k.ioctl(ref.fd, v.VFIO_DEVICE_GET_INFO, short)
    assert short[16:] == b"\xaa" * 8  # only min(argsz, sizeof) bytes are written back
    info = v.vfio_device_info(argsz=24, cap_offset=77)
    k.ioctl(ref.fd, v.VFIO_DEVICE_GET_INFO, info)
    assert info.flags == v.VFIO_DEVICE_FLAGS_PCI | v.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs, info.cap_offset) == (9, 5, 0)


def test_reset(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    ref.reset()
    assert ref.get_state() == RUNNING
    assert errno_of(ref.k.read, fd, 10) == ENODEV
    assert errno_of(ref.k.write, fd, b"x") == EBADF  # still a read-only file


def test_reset_not_supported(make_dev: Callable[..., Dev]) -> None:
    d = make_dev("noreset")
    assert errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_RESET, 0) == EINVAL
    info = v.vfio_device_info(argsz=24)
    d.k.ioctl(d.fd, v.VFIO_DEVICE_GET_INFO, info)
    assert info.flags == v.VFIO_DEVICE_FLAGS_PCI


def test_reset_leaves_error_state(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(migration_flags=1, fail_arc=("STOP", "STOP_COPY", "error"))
    assert d.try_set_state(STOP_COPY)[0] != 0
    assert d.get_state() == ERROR
    assert d.try_set_state(RUNNING)[0] == EINVAL
    d.reset()
    assert d.get_state() == RUNNING


def test_closing_the_device_clears_v2_and_ends_sessions(make_dev: Callable[..., Dev]) -> None:
    d = make_dev()
    assert feat(d, SET | V2) == 0
    assert d.vdev.precopy_info_v2
    fd = d.set_state(PRE_COPY)
    d.close()
    assert not d.vdev.precopy_info_v2
    assert errno_of(d.k.read, fd, 1) == ENODEV
    d.reopen()
    assert d.get_state() == RUNNING  # a new user starts at RUNNING


def test_ctypes_struct_argument(ref: Dev) -> None:
    class Arg(ctypes.Structure):
        _fields_ = [("hdr", v.vfio_device_feature), ("mig", v.vfio_device_feature_mig_state)]

    a = Arg()
    a.hdr.argsz, a.hdr.flags = ctypes.sizeof(Arg), GET | MIG_STATE
    ref.k.ioctl(ref.fd, v.VFIO_DEVICE_FEATURE, a)
    assert (a.mig.device_state, a.mig.data_fd) == (RUNNING, -1)


def test_cdev_opens_a_device_once(kernel: ModelKernel, make_dev: Callable[..., Dev]) -> None:
    """vfio_df_open: a second cdev fd cannot bind while the device is open."""
    d = make_dev()
    fd2 = kernel.open(d.path)
    b = v.vfio_device_bind_iommufd(argsz=24, iommufd=d.iommufd)
    assert errno_of(kernel.ioctl, fd2, v.VFIO_DEVICE_BIND_IOMMUFD, b) == EINVAL
    fd = d.set_state(PRE_COPY)
    kernel.close(fd2)  # closing the unbound fd changes nothing
    assert d.get_state() == PRE_COPY and kernel.read(fd, 10)
    d.close()
    d.reopen()  # free again after the last close
