"""The mtty device (samples/vfio-mdev/mtty.c) through its uAPI bytes.

Every case drives the device cdev of a ModelKernel: bind to an iommufd, then
VFIO_DEVICE_FEATURE ioctls and read/write on the data fds. Python methods are used only to
set up and inspect the UART ports (the "hardware").
"""

from __future__ import annotations

import errno
import os
import struct

import numpy as np
import pytest
from conftest import GET, SET, Dev, errno_of, precopy, resuming

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.mtty import (
    UART_FCR,
    UART_IER,
    UART_LCR,
    UART_MCR,
    UART_SCR,
    MttyHw,
)
from vfiomig.kernel.vfio_fsm import (
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
)
from vfiomig.uapi import vfio as v

MAGIC = 0x7E9D09898C3E2C4E
HEADER = struct.Struct("<QIIII")  # magic, major, minor, nr_ports, flags
# struct serial_port: uart_reg[8], fifo[16], head, tail, count, dlab, overrun, pad,
# u16 divisor, fcr, max_fifo_size, intr_trigger_level, pad
PORT = struct.Struct("<8s16sBBB??xHBBBx")
assert HEADER.size == 24 and PORT.size == 36
READ = 7  # data fds are read in odd-sized pieces


# -- helpers ----------------------------------------------------------------------------------


def mtty(k: ModelKernel, nports: int = 2) -> Dev:
    """A bound mtty device; `Dev.hw` is its MttyHw (the UART ports)."""
    return Dev(k, "mtty", nr_ports=nports)


@pytest.fixture
def k() -> ModelKernel:
    return ModelKernel()


@pytest.fixture(params=[1, 2], ids=["1port", "2ports"])
def nports(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def dev(k: ModelKernel, nports: int) -> Dev:
    return mtty(k, nports)


def size_of(n: int) -> int:
    return 24 + 36 * n


def busy_uart(hw: MttyHw) -> None:
    """Put every port in a distinctive state: registers, divisor, a partly read FIFO."""
    for i in range(hw.nr_ports):
        hw.bar_write(i, UART_LCR, 0x80)  # DLAB: the next two writes set the divisor
        hw.bar_write(i, 0, 0x0C + i)
        hw.bar_write(i, UART_IER, 0x01)
        hw.bar_write(i, UART_LCR, 0x03)
        hw.bar_write(i, UART_FCR, 0x01)
        hw.bar_write(i, UART_IER, 0x05)
        hw.bar_write(i, UART_MCR, 0x0B)
        hw.bar_write(i, UART_SCR, 0x5A + i)
        hw.send(i, bytes(range(0x30 + i, 0x3A + i)))
        assert hw.recv(i, 3) == bytes(range(0x30 + i, 0x33 + i))


def expected_port(hw: MttyHw, i: int) -> bytes:
    """The documented serial_port layout, encoded independently of the driver's ctypes."""
    p = hw.ports[i]
    return PORT.pack(
        bytes(p.uart_reg),
        bytes(p.rxtx.fifo),
        p.rxtx.head,
        p.rxtx.tail,
        p.rxtx.count,
        p.dlab,
        p.overrun,
        p.divisor,
        p.fcr,
        p.max_fifo_size,
        p.intr_trigger_level,
    )


def expected_stream(hw: MttyHw) -> bytes:
    header = HEADER.pack(MAGIC, 1, 0, hw.nr_ports, 0)
    return header + b"".join(expected_port(hw, i) for i in range(hw.nr_ports))


# -- capabilities -------------------------------------------------------------------------------


def test_migration_flags_and_data_size(k: ModelKernel, dev: Dev, nports: int) -> None:
    buf = dev.feature(GET | v.VFIO_DEVICE_FEATURE_MIGRATION, 8)
    assert struct.unpack_from("<Q", buf, 8)[0] == 7  # STOP_COPY | P2P | PRE_COPY
    buf = dev.feature(GET | v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8)
    assert struct.unpack_from("<Q", buf, 8)[0] == size_of(nports)
    assert dev.get_state() == RUNNING


@pytest.mark.parametrize("nr_ports", [0, 3, -1, "2"])
def test_bad_nr_ports(k: ModelKernel, nr_ports: object) -> None:
    with pytest.raises(ValueError):
        k.add_device("mtty", nr_ports=nr_ports)


def test_get_info_copies_minsz(k: ModelKernel, dev: Dev) -> None:
    raw = bytearray(struct.pack("<IIII", 24, 0, 0, 0) + b"\xff" * 8)
    k.ioctl(dev.fd, v.VFIO_DEVICE_GET_INFO, raw)
    argsz, flags, nreg, nirq = struct.unpack_from("<IIII", raw)
    assert (flags, nreg, nirq) == (v.VFIO_DEVICE_FLAGS_PCI, 9, 5)  # no RESET flag
    assert raw[16:] == b"\xff" * 8  # mtty copies back only 16 bytes
    short = bytearray(struct.pack("<IIII", 15, 0, 0, 0))
    assert errno_of(k.ioctl, dev.fd, v.VFIO_DEVICE_GET_INFO, short) == errno.EINVAL


def test_dma_logging_is_a_noop(k: ModelKernel, dev: Dev) -> None:
    addr, mem = k.mmap(4096)
    assert mem is not None
    mem[:16] = list(struct.pack("<QQ", 0x10000, 0x4000))
    ctl = struct.pack("<QIIQ", 12345, 1, 0, addr)  # page size not even validated by the core
    buf = dev.feature(SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, ctl)
    assert struct.unpack_from("<Q", buf, 8)[0] == 12345  # mtty_log_start leaves it
    dev.feature(SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, ctl)  # twice: still 0
    mem[64:72] = list(b"\xaa" * 8)
    report = struct.pack("<QQQQ", 0x10000, 0x4000, 4096, addr + 64)
    dev.feature(GET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, report)
    assert bytes(mem[64:72]) == b"\xaa" * 8  # no bits set, none cleared
    dev.feature(SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP)
    dev.feature(SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP)


# -- the saving stream --------------------------------------------------------------------------


def test_precopy_offers_the_header_only(k: ModelKernel, dev: Dev, nports: int) -> None:
    hw = dev.hw
    busy_uart(hw)
    dfd = dev.set_state(PRE_COPY)
    assert dfd >= 0
    assert precopy(dev, dfd) == (0, 24, 0)
    head = k.read(dfd, 10)
    assert precopy(dev, dfd) == (0, 14, 0)
    head += k.read(dfd, 100)
    assert head == HEADER.pack(MAGIC, 1, 0, nports, 0)
    assert k.read(dfd, 100) == b""  # temporary end of stream: 0, not ENOMSG
    assert precopy(dev, dfd) == (0, 0, 0)
    assert dev.set_state(PRE_COPY_P2P) == -1  # same session
    assert precopy(dev, dfd) == (0, 0, 0)  # PRE_COPY_P2P answers too
    assert dev.set_state(STOP_COPY) == -1  # ports appended to the same fd
    rest = dev.read_all(dfd, READ)
    assert head + rest == expected_stream(hw)
    assert len(head + rest) == size_of(nports)
    assert k.read(dfd, 10) == b""


def test_stop_copy_from_stop_gives_everything(k: ModelKernel, dev: Dev) -> None:
    hw = dev.hw
    busy_uart(hw)
    assert dev.set_state(STOP) == -1
    dfd = dev.set_state(STOP_COPY)
    assert dfd >= 0
    assert dev.read_all(dfd, READ) == expected_stream(hw)


@pytest.mark.parametrize("state", [RUNNING, STOP, STOP_COPY])
def test_precopy_info_outside_precopy_is_einval(k: ModelKernel, dev: Dev, state: int) -> None:
    dfd = dev.set_state(PRE_COPY)
    if state == STOP_COPY:
        dev.set_state(STOP_COPY)
    else:
        dev.set_state(state)  # the session ended: the state check still comes first
    assert errno_of(precopy, dev, dfd) == errno.EINVAL


@pytest.mark.parametrize(
    "cmd, arg, expect",
    [
        (v.VFIO_MIG_GET_PRECOPY_INFO, struct.pack("<IIQQ", 23, 0, 0, 0), errno.EINVAL),
        (v.VFIO_MIG_GET_PRECOPY_INFO, bytes(20), errno.EFAULT),  # copy of 24 bytes faults
        (v.VFIO_DEVICE_GET_INFO, struct.pack("<IIQQ", 24, 0, 0, 0), errno.ENOTTY),
    ],
    ids=["argsz_23", "short_buffer", "other_cmd"],
)
def test_precopy_info_argument_errors(
    k: ModelKernel, dev: Dev, cmd: int, arg: bytes, expect: int
) -> None:
    dfd = dev.set_state(PRE_COPY)
    assert errno_of(k.ioctl, dfd, cmd, bytearray(arg)) == expect


def test_precopy_info_flags_v1_echo_v2_zero(k: ModelKernel, dev: Dev) -> None:
    dfd = dev.set_state(PRE_COPY)
    assert precopy(dev, dfd, flags=0xABCD)[0] == 0xABCD  # v1 echoes the caller's flags
    dev.feature(SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)
    assert precopy(dev, dfd, flags=0xABCD) == (0, 24, 0)


@pytest.mark.parametrize("end_state", [RUNNING, RUNNING_P2P])
def test_leaving_precopy_disables_the_fd(k: ModelKernel, dev: Dev, end_state: int) -> None:
    dfd = dev.set_state(PRE_COPY if end_state == RUNNING else PRE_COPY_P2P)
    assert dev.set_state(end_state) == -1
    assert errno_of(k.read, dfd, 1) == errno.ENODEV


def test_saving_fd_file_rules(k: ModelKernel, dev: Dev) -> None:
    dev.set_state(STOP)
    dfd = dev.set_state(STOP_COPY)
    assert errno_of(k.write, dfd, b"x") == errno.EBADF
    assert errno_of(k.lseek, dfd, 0) == errno.ESPIPE
    assert errno_of(k.pread, dfd, 1, 0) == errno.ESPIPE
    dev.read_all(dfd, READ)
    assert dev.set_state(STOP) == -1  # STOP_COPY -> STOP ends the session
    assert errno_of(k.read, dfd, 1) == errno.ENODEV


# -- resuming -----------------------------------------------------------------------------------


def saved_stream(k: ModelKernel, nports: int) -> tuple[bytes, MttyHw]:
    src = mtty(k, nports)
    busy_uart(src.hw)
    src.set_state(STOP)
    return src.read_all(src.set_state(STOP_COPY), READ), src.hw


def test_save_and_resume_on_a_second_device(k: ModelKernel, nports: int) -> None:
    stream, src_hw = saved_stream(k, nports)
    dst = mtty(k, nports)
    dfd = resuming(dst)
    for i in range(0, len(stream), 10):  # arbitrary chunking
        assert k.write(dfd, stream[i : i + 10]) == len(stream[i : i + 10])
    assert dst.set_state(STOP) == -1
    assert errno_of(k.write, dfd, b"") == errno.ENODEV  # session over
    for i in range(nports):
        assert dst.hw.port_bytes(i) == src_hw.port_bytes(i)
    dst.set_state(RUNNING)
    for i in range(nports):  # both continue with the same bytes
        assert dst.hw.recv(i, 100) == src_hw.recv(i, 100) == bytes(range(0x33 + i, 0x3A + i))


def test_write_beyond_the_stream_is_enomem(k: ModelKernel, nports: int) -> None:
    stream, _ = saved_stream(k, nports)
    dfd = resuming(mtty(k, nports))
    assert errno_of(k.write, dfd, stream + b"\0") == errno.ENOMEM
    assert k.write(dfd, stream[:-1]) == len(stream) - 1
    assert errno_of(k.write, dfd, b"ab") == errno.ENOMEM
    assert k.write(dfd, b"x") == 1
    assert errno_of(k.write, dfd, b"y") == errno.ENOMEM


def _bad_header(field: str, nports: int) -> bytes:
    values = {"magic": MAGIC, "major": 1, "minor": 0, "nr_ports": nports, "flags": 0}
    values[field] = {
        "magic": MAGIC ^ 1,
        "major": 2,
        "minor": 1,
        "nr_ports": 3 - nports,
        "flags": 1,
    }[field]
    return HEADER.pack(
        values["magic"], values["major"], values["minor"], values["nr_ports"], values["flags"]
    )


@pytest.mark.parametrize("field", ["magic", "major", "minor", "nr_ports", "flags"])
@pytest.mark.parametrize("split", [24, 10, 23], ids=["whole", "10+rest", "23+rest"])
def test_header_check_on_the_crossing_write(
    k: ModelKernel, nports: int, field: str, split: int
) -> None:
    stream, _ = saved_stream(k, nports)
    bad = _bad_header(field, nports) + stream[24:]
    dst = mtty(k, nports)
    dfd = resuming(dst)
    start = split if split < 24 else 0
    if start:
        assert k.write(dfd, bad[:start]) == start  # below byte 24: nothing checked
    assert errno_of(k.write, dfd, bad[start:30]) == errno.EFAULT
    # the bytes were counted: the stream continues at 30, later writes are not checked
    assert k.write(dfd, bad[30:]) == len(bad) - 30
    assert errno_of(k.write, dfd, b"x") == errno.ENOMEM
    assert dst.set_state(STOP) == -1  # mtty_load_state checks only the size


def _resume(k: ModelKernel, stream: bytes, nports: int) -> Dev:
    dst = mtty(k, nports)
    dfd = resuming(dst)
    assert k.write(dfd, stream) == len(stream)
    assert dst.set_state(STOP) == -1
    dst.set_state(RUNNING)
    return dst


def test_resume_accepts_ring_positions_outside_the_fifo(k: ModelKernel, nports: int) -> None:
    # mtty_resume_write checks the header only, mtty_load_state only the size: ring
    # positions outside fifo[16] load as they are. mtty.c then indexes fifo[head] unmasked
    # (an out-of-bounds access in the kernel); the model must not crash on state it took.
    stream, _ = saved_stream(k, nports)
    port = bytearray(stream[24:60])
    port[24:27] = bytes([200, 100, 3])  # head, tail, count
    bad = stream[:24] + bytes(port) + stream[60:]
    dst = _resume(k, bad, nports)
    p = dst.hw.ports[0]
    assert (p.rxtx.head, p.rxtx.tail, p.rxtx.count) == (200, 100, 3)  # loaded as sent
    dst.hw.send(0, b"xyz")
    assert dst.hw.recv(0, 100) != b""  # head != tail: the port reports data, and reads
    assert p.rxtx.head < 16 and p.rxtx.tail < 16  # CIRCULAR_BUF_INC_IDX masks once used
    assert any("outside" in w for w in dst.vdev.warnings)  # the model says what mtty did


def test_resume_of_arbitrary_port_bytes_never_crashes_the_uart(k: ModelKernel) -> None:
    stream, _ = saved_stream(k, 2)
    rng = np.random.default_rng(7)
    for _ in range(40):
        ports = rng.integers(0, 256, 72, dtype=np.uint8).tobytes()
        hw = _resume(k, stream[:24] + ports, 2).hw
        for i in range(2):
            for off in range(8):
                hw.bar_write(i, off, int(rng.integers(0, 256)))
                hw.bar_read(i, off)
            hw.send(i, bytes(range(20)))
            hw.recv(i, 40)


def test_resume_stop_with_a_short_stream_is_einval(k: ModelKernel, nports: int) -> None:
    stream, src_hw = saved_stream(k, nports)
    dst = mtty(k, nports)
    dfd = resuming(dst)
    k.write(dfd, stream[:-1])
    assert errno_of(dst.set_state, STOP) == errno.EINVAL
    assert dst.get_state() == RESUMING  # stays, and the fd is still usable
    k.write(dfd, stream[-1:])
    assert dst.set_state(STOP) == -1
    assert dst.hw.port_bytes(0) == src_hw.port_bytes(0)


def test_resume_stop_with_nothing_written_is_einval(k: ModelKernel) -> None:
    d = mtty(k)
    resuming(d)
    assert errno_of(d.set_state, RUNNING) == errno.EINVAL
    assert d.get_state() == RESUMING


def test_resuming_fd_file_rules(k: ModelKernel) -> None:
    dfd = resuming(mtty(k))
    assert errno_of(k.read, dfd, 1) == errno.EBADF
    assert errno_of(k.ioctl, dfd, v.VFIO_MIG_GET_PRECOPY_INFO, bytearray(24)) == errno.ENOTTY
    assert errno_of(k.lseek, dfd, 0, os.SEEK_CUR) == errno.ESPIPE


# -- reset and reopen ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", [PRE_COPY, STOP_COPY, RESUMING])
def test_reset_returns_to_running_and_disables_fds(k: ModelKernel, dev: Dev, state: int) -> None:
    hw = dev.hw
    busy_uart(hw)
    before = [hw.port_bytes(i) for i in range(hw.nr_ports)]
    if state != PRE_COPY:
        dev.set_state(STOP)
    dfd = dev.set_state(state)
    assert k.ioctl(dev.fd, v.VFIO_DEVICE_RESET) == 0
    assert dev.get_state() == RUNNING
    op = (lambda: k.write(dfd, b"x")) if state == RESUMING else (lambda: k.read(dfd, 1))
    assert errno_of(op) == errno.ENODEV
    assert [hw.port_bytes(i) for i in range(hw.nr_ports)] == before  # mtty_reset keeps ports


def test_state_survives_close_and_reopen(k: ModelKernel) -> None:
    d = mtty(k)
    dfd = d.set_state(PRE_COPY)
    d.close()  # close_device disables the file; mtty keeps its FSM state
    assert errno_of(k.read, dfd, 1) == errno.ENODEV
    d.reopen()
    assert d.get_state() == PRE_COPY
    # still PRE_COPY, so the state check passes and the disabled file answers ENODEV
    assert errno_of(precopy, d, dfd) == errno.ENODEV
    # with no saving file left, entering STOP_COPY opens a fresh one with everything
    new_dfd = d.set_state(STOP_COPY)
    assert new_dfd >= 0
    assert d.read_all(new_dfd, READ) == expected_stream(d.hw)


def test_reopened_in_resuming_has_no_file_to_load(k: ModelKernel) -> None:
    d = mtty(k)
    resuming(d)
    d.close()
    d.reopen()
    assert d.get_state() == RESUMING
    # the real driver oopses here (NULL resuming_migf); the model fails the arc instead
    assert errno_of(d.set_state, STOP) == errno.EINVAL
    assert d.get_state() == RESUMING
    d.reset()  # the way out
    assert d.get_state() == RUNNING


# -- the UART itself ----------------------------------------------------------------------------


def test_uart_fifo_loopback_and_overrun(k: ModelKernel) -> None:
    hw = mtty(k, 1).hw
    hw.bar_write(0, UART_FCR, 0x01)  # FIFO on: 16 entries
    hw.send(0, bytes(range(15)))
    assert hw.bar_read(0, 5) & 0x63 == 0x01  # data ready, no overrun, not empty
    assert hw.recv(0, 100) == bytes(range(15))
    assert hw.bar_read(0, 5) & 0x61 == 0x60  # THRE | TEMT once empty
    hw.send(0, bytes(range(20)))
    # 16 accepted, 4 overrun. mtty tests emptiness with head == tail, so a full FIFO (head
    # wrapped onto tail) reads as empty: LSR shows OE but no DR, and RX returns nothing.
    assert hw.bar_read(0, 5) & 0x63 == 0x62
    assert hw.recv(0, 100) == b""
    assert hw.ports[0].rxtx.count == 16
    hw.bar_write(0, UART_FCR, 0x07)  # clear the FIFOs, keep them enabled
    hw.bar_write(0, UART_FCR, 0x00)  # FIFO off: one entry
    hw.send(0, b"ab")
    assert hw.recv(0, 10) == b"a"
    with pytest.raises(ValueError):
        hw.send(1, b"x")  # a one-port device has no port 1
