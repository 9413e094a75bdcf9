"""mtty's own device ioctls and region access (samples/vfio-mdev/mtty.c: mtty_ioctl,
mtty_ioctl_get_region_info, mtty_get_irq_info, mtty_set_irqs, mtty_read / mtty_write ->
mdev_access, handle_pci_cfg_write, mtty_reset)."""

from __future__ import annotations

import struct
from errno import EAGAIN, EBADF, EFAULT, EINVAL, ENOTTY

import pytest
from conftest import Dev, errno_of

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.mtty import UART_IER, UART_IER_THRI, UART_LSR, UART_LSR_DR
from vfiomig.kernel.vfio_fsm import RUNNING, STOP
from vfiomig.uapi import vfio as v

NONE_ = v.VFIO_IRQ_SET_DATA_NONE
BOOL_ = v.VFIO_IRQ_SET_DATA_BOOL
EFD = v.VFIO_IRQ_SET_DATA_EVENTFD
MASK = v.VFIO_IRQ_SET_ACTION_MASK
UNMASK = v.VFIO_IRQ_SET_ACTION_UNMASK
TRIGGER = v.VFIO_IRQ_SET_ACTION_TRIGGER
INTX, MSI, MSIX, ERR, REQ = range(5)
CONFIG = 7 << 40
BAR0, BAR1 = 0, 1 << 40
U64 = struct.Struct("<Q")


@pytest.fixture
def mtty() -> Dev:
    d = Dev(ModelKernel(), "mtty")
    d.k.ioctl(d.fd, v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=16))
    return d


def irq_info(d: Dev, index: int, argsz: int = 16) -> tuple[int, int, int]:
    info = v.vfio_irq_info(argsz=argsz, index=index)
    e = errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_GET_IRQ_INFO, info)
    return e, int(info.flags), int(info.count)


def set_irqs(d: Dev, flags: int, index: int, start: int, count: int, data: bytes = b"") -> int:
    hdr = struct.pack("<IIIII", 20 + len(data), flags, index, start, count)
    return errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_SET_IRQS, bytearray(hdr + data))


def count_of(k: ModelKernel, efd: int) -> int:
    try:
        return int(U64.unpack(k.read(efd, 8))[0])
    except OSError as e:
        assert e.errno == EAGAIN
        return 0


def test_irq_ioctls_need_get_info_first() -> None:
    """GET_IRQ_INFO and SET_IRQS check against mdev_state->dev_info.num_irqs, which only
    VFIO_DEVICE_GET_INFO fills (zero from kzalloc until then)."""
    d = Dev(ModelKernel(), "mtty")
    assert irq_info(d, INTX)[0] == EINVAL
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 1) == EINVAL  # start >= num_irqs (0)
    d.k.ioctl(d.fd, v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=16))
    assert irq_info(d, INTX)[0] == 0
    d.close()
    d.reopen()  # dev_info lives with the mdev, not the open
    assert irq_info(d, INTX)[0] == 0


def test_irq_info(mtty: Dev) -> None:
    """mtty_get_irq_info: INTx (maskable, automasked) and MSI (noresize), one each."""
    assert irq_info(mtty, INTX) == (0, 0x7, 1)
    assert irq_info(mtty, MSI) == (0, 0x9, 1)
    for index in (MSIX, ERR, REQ, 5):
        assert irq_info(mtty, index)[0] == EINVAL
    assert irq_info(mtty, INTX, argsz=15)[0] == EINVAL
    assert errno_of(mtty.k.ioctl, mtty.fd, v.VFIO_DEVICE_GET_IRQ_INFO, bytearray(15)) == EFAULT


@pytest.mark.parametrize("nr_ports,bar1", [(1, 0), (2, 8)])
def test_region_info(nr_ports: int, bar1: int) -> None:
    """mtty_ioctl_get_region_info: READ|WRITE always, sizes config 0xff, BAR0 8, BAR1 8
    with two ports, the rest 0; no MMAP, no capabilities (cap_offset echoed)."""
    d = Dev(ModelKernel(), "mtty", nr_ports=nr_ports)
    sizes = {7: 0xFF, 0: 8, 1: bar1}
    for index in range(9):
        info = v.vfio_region_info(argsz=32, index=index, cap_offset=0x99)
        d.k.ioctl(d.fd, v.VFIO_DEVICE_GET_REGION_INFO, info)
        assert (info.size, info.flags, info.offset) == (sizes.get(index, 0), 3, index << 40)
        assert info.cap_offset == 0x99
    info = v.vfio_region_info(argsz=32, index=9)
    assert errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_GET_REGION_INFO, info) == EINVAL


@pytest.mark.parametrize(
    "flags,index,start,count,data,want",
    [
        (NONE_ | MASK, INTX, 0, 1, b"", EINVAL),  # not INTx yet
        (NONE_ | TRIGGER, INTX, 0, 1, b"", EINVAL),  # !is_intx for a loopback
        (EFD | TRIGGER, INTX, 0, 2, b"\xff" * 8, EINVAL),  # count != 1
        (EFD | TRIGGER, INTX, 0, 1, struct.pack("<i", 99), EBADF),
        (EFD | TRIGGER, INTX, 0, 1, struct.pack("<i", -1), 0),  # fd < 0: nothing set
        (NONE_, INTX, 0, 1, b"", 0),  # no action: mtty's switch has no default
        (NONE_ | MASK | TRIGGER, MSI, 0, 1, b"", 0),
        (NONE_ | MASK, MSI, 0, 1, b"", ENOTTY),
        (NONE_ | TRIGGER, MSIX, 0, 1, b"", ENOTTY),
        (NONE_ | TRIGGER, ERR, 0, 1, b"", ENOTTY),
        (NONE_ | TRIGGER, REQ, 0, 1, b"", ENOTTY),
        (NONE_ | TRIGGER, INTX, 0, 5, b"", EINVAL),  # validate: num_irqs (5) bounds count
        (NONE_ | TRIGGER, INTX, 0, 6, b"", EINVAL),  # start + count > num_irqs
    ],
)
def test_set_irqs_table(
    mtty: Dev, flags: int, index: int, start: int, count: int, data: bytes, want: int
) -> None:
    assert set_irqs(mtty, flags, index, start, count, data) == want


def test_intx_delivery_automask(mtty: Dev) -> None:
    """mtty_trigger_interrupt: INTx signals once and masks itself until unmasked."""
    d, k = mtty, mtty.k
    efd = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, INTX, 0, 1, struct.pack("<i", efd)) == 0
    assert set_irqs(d, EFD | MASK, INTX, 0, 1, struct.pack("<i", efd)) == ENOTTY
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 1) == 0
    assert set_irqs(d, BOOL_ | TRIGGER, INTX, 0, 1, b"\1") == 0  # masked: not signalled
    assert count_of(k, efd) == 1
    assert set_irqs(d, NONE_ | UNMASK, INTX, 0, 1) == 0
    # the UART itself: enabling THRI with an empty FIFO raises the interrupt
    k.pwrite(d.fd, bytes([UART_IER_THRI]), BAR0 + UART_IER)
    assert count_of(k, efd) == 1
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, struct.pack("<i", efd)) == EINVAL  # INTx on
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 0) == 0  # count 0: mtty_disable_intx
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 1) == EINVAL


def test_msi_delivery(mtty: Dev) -> None:
    d, k = mtty, mtty.k
    efd = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, struct.pack("<i", efd)) == 0
    k.pwrite(d.fd, bytes([UART_IER_THRI]), BAR0 + UART_IER)
    k.pwrite(d.fd, bytes([UART_IER_THRI]), BAR0 + UART_IER)
    assert count_of(k, efd) == 2  # MSI is not masked
    d.close()  # mtty_close drops the eventfds
    assert d.vdev.msi_evtfd is None and d.vdev.irq_index == -1


def test_bar_access(mtty: Dev) -> None:
    """mdev_access: pieces of 4/2/1 bytes; only each piece's first byte reaches the
    register (at its u16 offset, so every 64 KiB aliases the 8 registers)."""
    d, k = mtty, mtty.k
    k.pwrite(d.fd, b"h", BAR0)
    k.pwrite(d.fd, b"i", BAR0 + 0x10000)  # the TX register again
    assert k.pread(d.fd, 1, BAR0 + UART_LSR)[0] & UART_LSR_DR
    assert k.pread(d.fd, 4, BAR0) == b"h\0\0\0"  # one 4-byte piece: RX only
    assert k.pread(d.fd, 1, BAR0 + 0x10000) == b"i"
    assert d.hw.recv(0, 4) == b""
    assert k.pread(d.fd, 16, BAR0 + 0x100) == bytes(16)  # no register there
    # BAR1 of a two-port device is port 1; ROM, VGA, beyond: mdev_access -1 -> EFAULT
    assert k.pread(d.fd, 1, BAR1 + UART_LSR)[0] & 0x60
    for index in (6, 8, 9):
        assert errno_of(k.pread, d.fd, 1, index << 40) == EFAULT
        assert errno_of(k.pwrite, d.fd, b"x", index << 40) == EFAULT
    assert errno_of(lambda: k.mmap(4096, fd=d.fd)) == EINVAL  # no mmap op


def test_bar_past_the_ports_is_logged(mtty: Dev) -> None:
    """BAR2..5 index s[2..5], past the two ports: memory corruption in mtty.c; the model
    logs it and moves nothing."""
    d = mtty
    assert d.k.pread(d.fd, 4, 2 << 40) == bytes(4)
    assert any("s[2]" in w for w in d.vdev.warnings)


def test_config_space(mtty: Dev) -> None:
    """mtty_create_config_space, handle_pci_cfg_write (BAR sizing with bar_mask, the
    interrupt line; everything else ignored); reads past 0xff are logged."""
    d, k = mtty, mtty.k
    cfg = k.pread(d.fd, 0xFF, CONFIG)
    assert struct.unpack_from("<IHH", cfg) == (0x32534348, 1, 0x200)
    assert cfg[0x60:0x6F] == b"PCI Serial/UART"
    k.pwrite(d.fd, b"\xff\xff\xff\xff", CONFIG + 0x10)
    assert struct.unpack("<I", k.pread(d.fd, 4, CONFIG + 0x10))[0] == 0xFFFFFFF9
    k.pwrite(d.fd, b"\x05", CONFIG + 0x3C)
    k.pwrite(d.fd, b"\x00\x00", CONFIG + 0x00)  # vendor id: not handled
    assert k.pread(d.fd, 1, CONFIG + 0x3C) == b"\x05"
    assert k.pread(d.fd, 2, CONFIG) == cfg[:2]
    assert k.pread(d.fd, 4, CONFIG + 0x100) == bytes(4)
    assert any("past vconfig" in w for w in d.vdev.warnings)


def test_reads_are_capped_in_the_model(mtty: Dev) -> None:
    """A read larger than MTTY_RW_MODEL_MAX is a short read (documented departure)."""
    assert len(mtty.k.pread(mtty.fd, 1 << 30, BAR0 + 8)) == 1 << 20


def test_reset(mtty: Dev) -> None:
    """VFIO_DEVICE_RESET (mtty_reset): RUNNING, files disabled; interrupts stay set up."""
    d, k = mtty, mtty.k
    efd = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, struct.pack("<i", efd)) == 0
    d.set_state(STOP)
    d.reset()
    assert d.get_state() == RUNNING and d.vdev.msi_evtfd is not None


@pytest.mark.parametrize(
    "cmd", [v.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, v.VFIO_DEVICE_PCI_HOT_RESET,
            v.VFIO_DEVICE_IOEVENTFD]
)  # fmt: skip
def test_pci_only_ioctls_are_enotty(mtty: Dev, cmd: int) -> None:
    """mtty_ioctl's default: an mdev has no hot reset and no ioeventfds."""
    assert errno_of(mtty.k.ioctl, mtty.fd, cmd, bytearray(64)) == ENOTTY
