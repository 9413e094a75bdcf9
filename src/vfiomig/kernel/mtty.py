"""The `mtty` device: samples/vfio-mdev/mtty.c (Linux >= 6.7, with migration).

An mdev that emulates one or two 16550 UARTs whose transmitter loops back into its own
receive FIFO. Because the device is pure software, its "hardware" is the driver's
`struct serial_port` array; `MttyHw` keeps exactly those bytes and implements the register
semantics of handle_bar_write / handle_bar_read, so what migrates is the real port state.

Migration (mtty_step_state and friends):

* flags STOP_COPY | P2P | PRE_COPY; DMA logging ops present but no-ops (mtty_log_*);
* stream = struct mtty_data: a 24-byte header {magic, major, minor, nr_ports, flags} then
  nr_ports x 36-byte struct serial_port; PRE_COPY offers only the header (initial_bytes =
  24 - pos, dirty_bytes 0, read returns 0 after it); entering STOP_COPY appends the ports to
  the same file;
* resume: writes past 24 + 36n are ENOMEM; the header is checked only by the write that
  crosses byte 24 (EFAULT, bytes still counted); RESUMING -> STOP with fewer than 24 + 36n
  bytes is EINVAL and the device stays RESUMING; the ports are copied as they came (ring
  positions unchecked, as mtty.c does); one outside the FIFO is logged when the UART uses it;
* VFIO_DEVICE_RESET (mtty_reset): state RUNNING, data files disabled; the ports keep their
  contents (mtty resets no UART state).
* the device fd (mtty_ioctl, mtty_read / mtty_write): GET_INFO (kept in dev_info, whose
  num_irqs bounds the IRQ ioctls), GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS with the UART's
  interrupts delivered to eventfds, config space and BAR access through mdev_access;
  docs/kernel-vfio.md has the rules and where the model stops.
"""

from __future__ import annotations

import ctypes
import struct
from errno import EFAULT, EINVAL, ENOTTY
from typing import TYPE_CHECKING

from vfiomig.hw.device import DmaDevice
from vfiomig.kernel.errors import err
from vfiomig.kernel.eventfd import EventfdCtx, eventfd_ctx_fdget
from vfiomig.kernel.fs import File
from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap
from vfiomig.kernel.machine import DRIVERS
from vfiomig.kernel.uaccess import UserArg
from vfiomig.kernel.vfio_device_fops import (
    IRQ_SET_MINSZ,
    VfioInfoCap,
    memdup_user,
    vfio_set_irqs_validate_and_prepare,
)
from vfiomig.kernel.vfio_fsm import (
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
    state_name,
)
from vfiomig.kernel.vfio_main import VfioDevice
from vfiomig.kernel.vfio_migration import ResumingFile, SavingFile
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.kernel.machine import ModelKernel

_INFO_MINSZ = 16  # offsetofend(struct vfio_device_info, num_irqs)
_IRQ_INFO_MINSZ = 16  # offsetofend(struct vfio_irq_info, count)

# -- the emulated 16550 (include/uapi/linux/serial_reg.h, mtty.c) ------------------------------

MAX_FIFO_SIZE = 16
UART_RX = UART_TX = 0
UART_IER = 1
UART_IIR = UART_FCR = 2
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7
UART_IER_RDI, UART_IER_THRI, UART_IER_RLSI, UART_IER_MSI = 0x01, 0x02, 0x04, 0x08
UART_IIR_NO_INT, UART_IIR_THRI, UART_IIR_RDI, UART_IIR_RLSI = 0x01, 0x02, 0x04, 0x06
UART_IIR_MSI = 0x00
UART_FCR_ENABLE_FIFO, UART_FCR_CLEAR_RCVR, UART_FCR_CLEAR_XMIT = 0x01, 0x02, 0x04
UART_LCR_DLAB = 0x80
UART_MCR_DTR, UART_MCR_RTS, UART_MCR_OUT2, UART_MCR_AFE = 0x01, 0x02, 0x08, 0x20
UART_LSR_DR, UART_LSR_OE, UART_LSR_THRE, UART_LSR_TEMT = 0x01, 0x02, 0x20, 0x40
UART_MSR_DCTS, UART_MSR_DDSR, UART_MSR_CTS = 0x01, 0x02, 0x10
UART_MSR_DSR, UART_MSR_DCD = 0x20, 0x80


class rxtx(ctypes.LittleEndianStructure):
    """struct rxtx: the loop-back FIFO (what the guest transmits comes back as RX)."""

    _fields_ = [
        ("fifo", ctypes.c_uint8 * MAX_FIFO_SIZE),
        ("head", ctypes.c_uint8),
        ("tail", ctypes.c_uint8),
        ("count", ctypes.c_uint8),
    ]


class serial_port(ctypes.LittleEndianStructure):
    """struct serial_port: one port's whole state, saved as is into the stream."""

    _fields_ = [
        ("uart_reg", ctypes.c_uint8 * 8),
        ("rxtx", rxtx),
        ("dlab", ctypes.c_bool),
        ("overrun", ctypes.c_bool),
        ("divisor", ctypes.c_uint16),
        ("fcr", ctypes.c_uint8),
        ("max_fifo_size", ctypes.c_uint8),
        ("intr_trigger_level", ctypes.c_uint8),
    ]


MTTY_MAGIC = 0x7E9D09898C3E2C4E
MTTY_MAJOR_VER = 1
MTTY_MINOR_VER = 0


class mtty_data(ctypes.LittleEndianStructure):
    """struct mtty_data: the migration stream (room for two ports whatever nr_ports is)."""

    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("major_ver", ctypes.c_uint32),
        ("minor_ver", ctypes.c_uint32),
        ("nr_ports", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ports", serial_port * 2),
    ]


HEADER_SIZE = mtty_data.ports.offset  # offsetof(struct mtty_data, ports)
PORT_SIZE = ctypes.sizeof(serial_port)
assert HEADER_SIZE == 24 and PORT_SIZE == 36 and ctypes.sizeof(mtty_data) == 96


def mtty_data_size(nr_ports: int) -> int:
    """mtty_data_size(): the stream of a device with nr_ports ports (60 or 96 bytes)."""
    return HEADER_SIZE + nr_ports * PORT_SIZE


class MttyHw(DmaDevice):
    """The ports of one mtty device (mdev_state->s[]); port i is BAR i.

    mtty does no DMA; deriving from DmaDevice only gives it the common hardware face.
    `interrupts` counts mtty_trigger_interrupt() calls; each is delivered to the INTx or MSI
    eventfd VFIO_DEVICE_SET_IRQS set up (MttyDevice.trigger_interrupt).
    """

    def __init__(self, dev: MttyDevice, nr_ports: int) -> None:
        super().__init__(dev.kernel.mm, f"mtty{dev.index}")
        self.dev = dev
        self.nr_ports = nr_ports
        self.ports = [serial_port(), serial_port()]
        for p in self.ports:  # mtty_init_dev
            p.max_fifo_size = MAX_FIFO_SIZE
        self.interrupts = 0

    def _port(self, index: int) -> serial_port:
        if not 0 <= index < self.nr_ports:
            raise ValueError(f"port {index} does not exist (nr_ports={self.nr_ports})")
        return self.ports[index]

    def _irq(self) -> None:
        self.interrupts += 1
        self.dev.trigger_interrupt()

    # -- guest register access (handle_bar_write / handle_bar_read) ---------------------------

    def bar_write(self, index: int, offset: int, data: int) -> None:
        self.handle_bar_write(self._port(index), offset, data)

    def bar_read(self, index: int, offset: int) -> int:
        return self.handle_bar_read(self._port(index), offset)

    def handle_bar_write(self, s: serial_port, offset: int, data: int) -> None:
        handler = _BAR_WRITE.get(offset)
        if handler is not None:
            handler(self, s, data & 0xFF)

    def handle_bar_read(self, s: serial_port, offset: int) -> int:
        handler = _BAR_READ.get(offset)
        return handler(self, s) if handler is not None else 0

    # -- conveniences for workloads and tests -------------------------------------------------

    def send(self, index: int, data: bytes) -> None:
        """The guest writes each byte to THR (it loops back into the RX FIFO)."""
        for b in data:
            self.bar_write(index, UART_TX, b)

    def recv(self, index: int, n: int) -> bytes:
        """The guest reads RBR while LSR says data is ready, at most n bytes."""
        out = bytearray()
        while len(out) < n and self.bar_read(index, UART_LSR) & UART_LSR_DR:
            out.append(self.bar_read(index, UART_RX))
        return bytes(out)

    def port_bytes(self, index: int) -> bytes:
        return bytes(self._port(index))


def _fifo_empty(s: serial_port) -> bool:
    return bool(s.rxtx.head == s.rxtx.tail)


def _slot(hw: MttyHw, pos: int, what: str) -> int:
    """The FIFO slot mtty.c uses for rxtx.head / rxtx.tail. It indexes fifo[pos] without a
    mask: positions are only masked by CIRCULAR_BUF_INC_IDX after use. The port's own
    writes keep them below 16, but mtty_load_state copies a resumed port as it came (it
    checks only the stream's size), so a crafted stream can make the driver read or write
    outside fifo[] (an out-of-bounds access in the kernel). The model cannot reproduce
    memory corruption: it logs what the driver did and uses the slot the mask would."""
    if pos >= MAX_FIFO_SIZE:
        hw.dev.warn(
            f"mtty: rxtx.{what} = {pos} is outside fifo[{MAX_FIFO_SIZE}]: "
            "the driver accesses memory past its FIFO"
        )
    return pos & (MAX_FIFO_SIZE - 1)


def _w_tx(hw: MttyHw, s: serial_port, data: int) -> None:
    if s.dlab:  # DLAB: data is the divisor's LSB (OR-ed in, as mtty does)
        s.divisor |= data
        return
    if s.rxtx.count < s.max_fifo_size:
        s.rxtx.fifo[_slot(hw, s.rxtx.head, "head")] = data
        s.rxtx.count += 1
        s.rxtx.head = (s.rxtx.head + 1) & (MAX_FIFO_SIZE - 1)
        s.overrun = False
        if s.uart_reg[UART_IER] & UART_IER_RDI and s.rxtx.count == s.intr_trigger_level:
            hw._irq()
    else:
        s.overrun = True
        if s.uart_reg[UART_IER] & UART_IER_RLSI:
            hw._irq()


def _w_ier(hw: MttyHw, s: serial_port, data: int) -> None:
    if s.dlab:
        s.divisor |= data << 8
        return
    s.uart_reg[UART_IER] = data
    if data & UART_IER_THRI and _fifo_empty(s):
        hw._irq()


def _w_fcr(hw: MttyHw, s: serial_port, data: int) -> None:
    s.fcr = data
    if data & (UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT):
        s.rxtx.count = s.rxtx.head = s.rxtx.tail = 0
    # mtty decodes the FCR trigger bits (1/4/8/14) and then overrides the result with 1, as
    # it emulates no character-timeout timer: the effective level is always 1.
    s.intr_trigger_level = 1
    s.max_fifo_size = MAX_FIFO_SIZE if data & UART_FCR_ENABLE_FIFO else 1


def _w_lcr(hw: MttyHw, s: serial_port, data: int) -> None:
    if data & UART_LCR_DLAB:
        s.dlab = True
        s.divisor = 0
    else:
        s.dlab = False
    s.uart_reg[UART_LCR] = data


def _w_mcr(hw: MttyHw, s: serial_port, data: int) -> None:
    s.uart_reg[UART_MCR] = data
    msi = s.uart_reg[UART_IER] & UART_IER_MSI
    if msi and data & UART_MCR_OUT2:
        hw._irq()
    if msi and data & (UART_MCR_RTS | UART_MCR_DTR):
        hw._irq()


def _w_scr(hw: MttyHw, s: serial_port, data: int) -> None:
    s.uart_reg[UART_SCR] = data


def _r_rx(hw: MttyHw, s: serial_port) -> int:
    if s.dlab:
        return int(s.divisor) & 0xFF
    val = 0
    if not _fifo_empty(s):
        val = s.rxtx.fifo[_slot(hw, s.rxtx.tail, "tail")]
        s.rxtx.count -= 1
        s.rxtx.tail = (s.rxtx.tail + 1) & (MAX_FIFO_SIZE - 1)
    if _fifo_empty(s) and s.uart_reg[UART_IER] & UART_IER_THRI:
        hw._irq()
    return int(val)


def _r_ier(hw: MttyHw, s: serial_port) -> int:
    if s.dlab:
        return int(s.divisor) >> 8
    return int(s.uart_reg[UART_IER]) & 0x0F


def _r_iir(hw: MttyHw, s: serial_port) -> int:
    ier = s.uart_reg[UART_IER]
    val = 0
    if ier & UART_IER_RLSI and s.overrun:
        val |= UART_IIR_RLSI
    if ier & UART_IER_RDI and s.rxtx.count >= s.intr_trigger_level:
        val |= UART_IIR_RDI
    if ier & UART_IER_THRI and _fifo_empty(s):
        val |= UART_IIR_THRI
    if ier & UART_IER_MSI and s.uart_reg[UART_MCR] & (UART_MCR_RTS | UART_MCR_DTR):
        val |= UART_IIR_MSI
    return (val or UART_IIR_NO_INT) | 0xC0  # bits 6-7: 16550 compatible


def _r_reg(hw: MttyHw, s: serial_port, offset: int) -> int:
    return int(s.uart_reg[offset])


def _r_lsr(hw: MttyHw, s: serial_port) -> int:
    lsr = 0
    if not _fifo_empty(s):
        lsr |= UART_LSR_DR
    if s.overrun:
        lsr |= UART_LSR_OE
    if _fifo_empty(s):
        lsr |= UART_LSR_TEMT | UART_LSR_THRE
    return lsr


def _r_msr(hw: MttyHw, s: serial_port) -> int:
    val = UART_MSR_DSR | UART_MSR_DDSR | UART_MSR_DCD
    # CTS: with auto flow control only while the FIFO has room (both branches as in mtty)
    if not s.uart_reg[UART_MCR] & UART_MCR_AFE or s.rxtx.count < s.max_fifo_size:
        val |= UART_MSR_CTS | UART_MSR_DCTS
    return val


_BAR_WRITE = {
    UART_TX: _w_tx,
    UART_IER: _w_ier,
    UART_FCR: _w_fcr,
    UART_LCR: _w_lcr,
    UART_MCR: _w_mcr,
    UART_SCR: _w_scr,
}
_BAR_READ = {
    UART_RX: _r_rx,
    UART_IER: _r_ier,
    UART_IIR: _r_iir,
    UART_LCR: lambda hw, s: _r_reg(hw, s, UART_LCR),
    UART_MCR: lambda hw, s: _r_reg(hw, s, UART_MCR),
    UART_LSR: _r_lsr,
    UART_MSR: _r_msr,
    UART_SCR: lambda hw, s: _r_reg(hw, s, UART_SCR),
}


# -- migration files (mtty_save_fops / mtty_resume_fops) -----------------------------------------


class MttySavingFile(SavingFile):
    """struct mtty_migration_file, saving side: `data` filled up to `filled_size`."""

    def __init__(self, dev: MttyDevice) -> None:
        super().__init__(dev)
        self.data = mtty_data(
            magic=MTTY_MAGIC,
            major_ver=MTTY_MAJOR_VER,
            minor_ver=MTTY_MINOR_VER,
            nr_ports=dev.nr_ports,
        )
        self.filled_size = HEADER_SIZE

    def save_state(self, hw: MttyHw) -> None:
        """mtty_save_state: append every port to the stream."""
        for i in range(hw.nr_ports):
            self.data.ports[i] = serial_port.from_buffer_copy(bytes(hw.ports[i]))
            self.filled_size += PORT_SIZE

    def produce(self, n: int) -> bytes:
        """mtty_save_read: 0 bytes once everything filled so far is read (also in PRE_COPY)."""
        if self.pos > self.filled_size:
            raise err(EINVAL)
        n = min(self.filled_size - self.pos, n)
        return bytes(self.data)[self.pos : self.pos + n]

    def precopy_info(self, info: v.vfio_precopy_info) -> None:
        """mtty_precopy_ioctl: the unread header is the initial data; never dirty."""
        if self.pos > self.filled_size:
            raise err(EINVAL)
        info.dirty_bytes = 0
        info.initial_bytes = self.filled_size - self.pos

    def disable(self) -> None:
        """mtty_disable_file: also forgets the data and rewinds f_pos."""
        super().disable()
        self.filled_size = 0
        self.pos = 0


class MttyResumingFile(ResumingFile):
    def __init__(self, dev: MttyDevice) -> None:
        super().__init__(dev)
        self.nr_ports = dev.nr_ports
        self.data_size = mtty_data_size(dev.nr_ports)
        self.max_size = self.data_size
        self.buf = bytearray(ctypes.sizeof(mtty_data))
        self.data = mtty_data.from_buffer(self.buf)  # a view: what consume() stores
        self.filled_size = 0

    def consume(self, data: bytes) -> int:
        """mtty_resume_write after its size checks (ENOMEM, ENODEV in ResumingFile.write)."""
        self.buf[self.pos : self.pos + len(data)] = data
        crosses = self.filled_size < HEADER_SIZE <= self.filled_size + len(data)
        self.filled_size += len(data)
        if crosses and not self._header_ok():
            self.pos += len(data)  # the bytes stay counted; only this write reports EFAULT
            raise err(EFAULT)
        return len(data)

    def _header_ok(self) -> bool:
        d = self.data
        return bool(
            d.magic == MTTY_MAGIC
            and not d.flags
            and d.major_ver == MTTY_MAJOR_VER
            and d.minor_ver == MTTY_MINOR_VER
            and d.nr_ports == self.nr_ports
        )

    def load_state(self, hw: MttyHw) -> None:
        """mtty_load_state: only the size is checked here (the header was checked on write).
        The ports are copied as they came: nothing bounds their FIFO positions (see _slot)."""
        if self.filled_size < self.data_size:
            raise err(EINVAL)
        for i in range(self.nr_ports):
            hw.ports[i] = serial_port.from_buffer_copy(self.data.ports[i])

    def disable(self) -> None:
        super().disable()
        self.filled_size = 0
        self.pos = 0


# -- the emulated PCI function (mtty_create_config_space, handle_pci_cfg_write, mdev_access) --

MTTY_CONFIG_SPACE_SIZE = 0xFF  # kzalloc'd: offsets from 0xff on are past the buffer
MTTY_IO_BAR_SIZE = 0x8
MTTY_VFIO_PCI_OFFSET_SHIFT = 40
MTTY_VFIO_PCI_OFFSET_MASK = (1 << MTTY_VFIO_PCI_OFFSET_SHIFT) - 1
MTTY_BAR_MASK = (~MTTY_IO_BAR_SIZE + 1) & 0xFFFFFFFF  # bar_mask[i] = ~(MTTY_IO_BAR_SIZE) + 1
MAX_RW_COUNT = 0x7FFFF000  # fs/read_write.c: INT_MAX & PAGE_MASK
# The model answers at most this many bytes per read/write of an mtty region (a short
# count, which read(2)/write(2) allow): mtty_read would go on through the registers'
# 64 KiB aliases and uninitialized stack bytes (see MttyDevice.ops_read).
MTTY_RW_MODEL_MAX = 1 << 20
_UNSET = -1  # irq_index when neither INTx nor MSI is set up


def mtty_create_config_space(nr_ports: int) -> bytearray:
    """mtty_create_config_space: the 0xff-byte virtual config space."""
    c = bytearray(MTTY_CONFIG_SPACE_SIZE)
    struct.pack_into("<I", c, 0x0, 0x32534348)  # PCI dev ID
    struct.pack_into("<H", c, 0x4, 0x0001)  # Control: I/O+, Mem-, BusMaster-
    struct.pack_into("<H", c, 0x6, 0x0200)  # Status: capabilities list absent
    c[0x8], c[0x9], c[0xA], c[0xB] = 0x10, 0x02, 0x00, 0x07  # rev, 16550, serial
    struct.pack_into("<I", c, 0x10, 0x000001)  # BAR0: I/O space
    if nr_ports == 2:
        struct.pack_into("<I", c, 0x14, 0x000001)  # BAR1: I/O space
    struct.pack_into("<I", c, 0x2C, 0x32534348)  # Subsystem ID
    c[0x34] = 0x00  # Cap Ptr
    c[0x3D] = 0x01  # interrupt pin (INTA#)
    c[0x40], c[0x43], c[0x44], c[0x48], c[0x4C] = 0x23, 0x80, 0x23, 0x23, 0x23
    c[0x60:0x6F] = b"PCI Serial/UART"
    return c


# -- the vfio_device (mtty_dev_ops, mtty_migration_ops, mtty_log_ops) -----------------------------

# Arcs that only change the state (mtty does no DMA and needs no explicit start/stop).
_NOOP_ARCS = {
    (RUNNING, RUNNING_P2P),
    (RUNNING_P2P, RUNNING),
    (RUNNING_P2P, STOP),
    (PRE_COPY, PRE_COPY_P2P),
    (PRE_COPY_P2P, PRE_COPY),
    (STOP, RUNNING_P2P),
}
# Arcs that end the session.
_CLOSE_ARCS = {(PRE_COPY, RUNNING), (PRE_COPY_P2P, RUNNING_P2P), (STOP_COPY, STOP)}
# Arcs that open (or, into STOP_COPY, fill) the saving file.
_SAVE_ARCS = {
    (RUNNING, PRE_COPY),
    (RUNNING_P2P, PRE_COPY_P2P),
    (STOP, STOP_COPY),
    (PRE_COPY_P2P, STOP_COPY),
}


class MttyDevice(VfioDevice):
    kind = "mtty"
    emulated_iommu = True  # an mdev: iommufd gives it an ACCESS, not a domain
    migration_flags = v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P | v.VFIO_MIGRATION_PRE_COPY
    has_log_ops = True
    info_flags = v.VFIO_DEVICE_FLAGS_PCI  # mtty_get_device_info: no RESET flag
    info_size = 16  # mtty_ioctl(VFIO_DEVICE_GET_INFO) copies exactly minsz = 16 bytes back

    def __init__(
        self, kernel: ModelKernel, index: int, *, nr_ports: int = 2, iommu_dirty: bool = True
    ) -> None:
        if nr_ports not in (1, 2):  # mtty_types[]: "1" and "2" port types only
            raise ValueError(f"nr_ports must be 1 or 2, got {nr_ports!r}")
        # An mdev has no IOMMU of its own (iommufd gives it an ACCESS, not a domain), so
        # `iommu_dirty` is accepted, as for every kind, and means nothing here.
        super().__init__(kernel, index, iommu_dirty=False)
        self.nr_ports = nr_ports
        self.mtty_hw = MttyHw(self, nr_ports)
        self.hw = self.mtty_hw
        # mdev_state lives as long as the mdev: none of this is reset on open or close
        self.vconfig = mtty_create_config_space(nr_ports)
        self.num_irqs = 0  # mdev_state->dev_info.num_irqs: set by VFIO_DEVICE_GET_INFO
        self.irq_index = _UNSET
        self.intx_evtfd: EventfdCtx | None = None
        self.msi_evtfd: EventfdCtx | None = None
        self.intx_mask = False

    # -- open ------------------------------------------------------------------------

    def open_device(self) -> None:
        # mtty has no open_device op: its state is set once in mtty_init_dev and survives
        # close/open (mtty_close only disables the files).
        state = self.mig_state
        super().open_device()
        self.mig_state = state

    # -- migration -------------------------------------------------------------------

    def step(self, cur: int, new: int) -> File | None:
        """mtty_step_state."""
        arc = (cur, new)
        if arc in _NOOP_ARCS:
            return None
        if arc == (RESUMING, STOP):
            f = self.resuming_file
            if not isinstance(f, MttyResumingFile):
                # Closed and reopened while RESUMING: the state survived, the file did not,
                # and mtty_load_state would dereference a NULL resuming_migf (a kernel oops).
                # The model logs it and fails the arc as an empty stream would (EINVAL).
                self.warn("BUG: NULL pointer dereference in mtty_load_state")
                raise err(EINVAL)
            f.load_state(self.mtty_hw)  # EINVAL: the SET fails, the state stays RESUMING
            self.disable_fds()
            return None
        if arc in _CLOSE_ARCS:
            self.disable_fds()
            return None
        if arc in _SAVE_ARCS:
            return self._save_device_data(new)
        if arc == (STOP, RESUMING):
            self.resuming_file = MttyResumingFile(self)
            return self.resuming_file
        self.warn(f"mtty_step_state: unexpected arc {state_name(cur)} -> {state_name(new)}")
        raise err(EINVAL)

    def _save_device_data(self, new: int) -> File | None:
        """mtty_save_device_data: an existing file is filled on STOP_COPY, else a new one."""
        f = self.saving_file
        if f is not None:
            assert isinstance(f, MttySavingFile)
            if new == STOP_COPY:
                f.save_state(self.mtty_hw)
            return None
        f = MttySavingFile(self)
        self.saving_file = f
        if new == STOP_COPY:
            f.save_state(self.mtty_hw)
        return f

    def get_data_size(self) -> int:
        return mtty_data_size(self.nr_ports)

    # reset(): VfioDevice.reset is mtty_reset -> mtty_state_mutex_unlock's deferred reset:
    # RUNNING, files disabled (deferral only matters with a concurrent state change, which
    # the model has not). The UART ports keep their contents.

    def close_device(self) -> None:
        """mtty_close: files disabled, INTx and MSI eventfds dropped."""
        self.mtty_disable_intx()
        self.mtty_disable_msi()
        super().close_device()

    # -- mtty_ioctl ---------------------------------------------------------------------

    def ioctl_get_info(self, arg: UserArg | int) -> int:
        """VFIO_DEVICE_GET_INFO: the answer is also kept in mdev_state->dev_info, whose
        num_irqs bounds GET_IRQ_INFO and SET_IRQS (0 until the first GET_INFO)."""
        if isinstance(arg, int):
            raise err(EFAULT)
        argsz = arg.get(v.vfio_device_info, size=_INFO_MINSZ).argsz
        if argsz < _INFO_MINSZ:
            raise err(EINVAL)
        info = v.vfio_device_info(
            argsz=argsz, flags=self.info_flags, num_regions=self.num_regions, num_irqs=self.num_irqs
        )
        info.num_irqs = v.VFIO_PCI_NUM_IRQS  # mtty_get_device_info
        self.num_irqs = info.num_irqs  # memcpy(&mdev_state->dev_info, &info, ...)
        arg.put(info, size=_INFO_MINSZ)
        return 0

    def device_ioctl(self, cmd: int, arg: UserArg | int) -> int:
        if cmd == v.VFIO_DEVICE_GET_IRQ_INFO:
            return self._ioctl_get_irq_info(arg)
        if cmd == v.VFIO_DEVICE_SET_IRQS:
            return self._ioctl_set_irqs(arg)
        raise err(ENOTTY)  # no hot reset, no IOEVENTFD: mtty_ioctl's default

    def _ioctl_get_irq_info(self, arg: UserArg | int) -> int:
        if isinstance(arg, int):
            raise err(EFAULT)
        info = arg.get(v.vfio_irq_info, size=_IRQ_INFO_MINSZ)
        if info.argsz < _IRQ_INFO_MINSZ or info.index >= self.num_irqs:
            raise err(EINVAL)
        # mtty_get_irq_info: INTx and MSI only, one vector each
        if info.index not in (v.VFIO_PCI_INTX_IRQ_INDEX, v.VFIO_PCI_MSI_IRQ_INDEX):
            raise err(EINVAL)
        info.flags = v.VFIO_IRQ_INFO_EVENTFD
        info.count = 1
        if info.index == v.VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= v.VFIO_IRQ_INFO_MASKABLE | v.VFIO_IRQ_INFO_AUTOMASKED
        else:
            info.flags |= v.VFIO_IRQ_INFO_NORESIZE
        arg.put(info, size=_IRQ_INFO_MINSZ)
        return 0

    def _ioctl_set_irqs(self, arg: UserArg | int) -> int:
        if isinstance(arg, int):
            raise err(EFAULT)
        hdr = arg.get(v.vfio_irq_set, size=IRQ_SET_MINSZ)
        # the bound on start + count is dev_info.num_irqs (5 after GET_INFO), not a vector count
        data_size = vfio_set_irqs_validate_and_prepare(hdr, self.num_irqs, v.VFIO_PCI_NUM_IRQS)
        data = memdup_user(arg, IRQ_SET_MINSZ, data_size) if data_size else b""
        self.mtty_set_irqs(hdr.flags, hdr.index, hdr.start, hdr.count, data)
        return 0

    # -- interrupts (mtty_set_irqs, mtty_trigger_interrupt) ----------------------------

    def trigger_interrupt(self) -> None:
        """mtty_trigger_interrupt: MSI signals its eventfd; INTx signals once, then stays
        masked until unmasked (auto-masked)."""
        if self.irq_index == v.VFIO_PCI_MSI_IRQ_INDEX:
            if self.msi_evtfd is not None:
                self.msi_evtfd.signal()
        elif self.irq_index == v.VFIO_PCI_INTX_IRQ_INDEX:
            if self.intx_evtfd is not None and not self.intx_mask:
                self.intx_evtfd.signal()
                self.intx_mask = True

    def mtty_disable_intx(self) -> None:
        if self.intx_evtfd is not None:
            self.intx_evtfd = None
            self.intx_mask = False
            self.irq_index = _UNSET

    def mtty_disable_msi(self) -> None:
        if self.msi_evtfd is not None:
            self.msi_evtfd = None
            self.irq_index = _UNSET

    def mtty_set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes) -> None:
        """mtty_set_irqs. An action the switch does not name (none, or several bits) falls
        through to success for INTx and MSI."""
        action = flags & v.VFIO_IRQ_SET_ACTION_TYPE_MASK
        is_intx = self.irq_index == v.VFIO_PCI_INTX_IRQ_INDEX
        is_msi = self.irq_index == v.VFIO_PCI_MSI_IRQ_INDEX
        is_noirq = not is_intx and not is_msi
        if index == v.VFIO_PCI_INTX_IRQ_INDEX:
            if action in (v.VFIO_IRQ_SET_ACTION_MASK, v.VFIO_IRQ_SET_ACTION_UNMASK):
                if not is_intx or start != 0 or count != 1:
                    raise err(EINVAL)
                masked = action == v.VFIO_IRQ_SET_ACTION_MASK
                if flags & v.VFIO_IRQ_SET_DATA_NONE:
                    self.intx_mask = masked
                elif flags & v.VFIO_IRQ_SET_DATA_BOOL:
                    if data[0]:
                        self.intx_mask = masked
                elif flags & v.VFIO_IRQ_SET_DATA_EVENTFD:
                    raise err(ENOTTY)  # no support for (un)mask fds
            elif action == v.VFIO_IRQ_SET_ACTION_TRIGGER:
                self._set_trigger(
                    flags, start, count, data, msi=False, is_mine=is_intx, is_noirq=is_noirq
                )
        elif index == v.VFIO_PCI_MSI_IRQ_INDEX:
            if action in (v.VFIO_IRQ_SET_ACTION_MASK, v.VFIO_IRQ_SET_ACTION_UNMASK):
                raise err(ENOTTY)
            if action == v.VFIO_IRQ_SET_ACTION_TRIGGER:
                self._set_trigger(
                    flags, start, count, data, msi=True, is_mine=is_msi, is_noirq=is_noirq
                )
        else:  # MSI-X, ERR, REQ
            raise err(ENOTTY)

    def _set_trigger(
        self,
        flags: int,
        start: int,
        count: int,
        data: bytes,
        *,
        msi: bool,
        is_mine: bool,
        is_noirq: bool,
    ) -> None:
        disable = self.mtty_disable_msi if msi else self.mtty_disable_intx
        if is_mine and not count and flags & v.VFIO_IRQ_SET_DATA_NONE:
            disable()
            return
        if not (is_mine or is_noirq) or start != 0 or count != 1:
            raise err(EINVAL)
        if flags & v.VFIO_IRQ_SET_DATA_EVENTFD:
            fd = struct.unpack_from("<i", data)[0]
            disable()
            if fd < 0:
                return
            evt = eventfd_ctx_fdget(self.kernel.fdt.files, fd)  # EBADF / EINVAL
            if msi:
                self.msi_evtfd = evt
                self.irq_index = v.VFIO_PCI_MSI_IRQ_INDEX
            else:
                self.intx_evtfd = evt
                self.irq_index = v.VFIO_PCI_INTX_IRQ_INDEX
            return
        if not is_mine:
            raise err(EINVAL)
        if flags & v.VFIO_IRQ_SET_DATA_NONE or flags & v.VFIO_IRQ_SET_DATA_BOOL and data[0]:
            self.trigger_interrupt()

    # -- VFIO_DEVICE_GET_REGION_INFO (mtty_ioctl_get_region_info) -----------------------

    def get_region_info_caps(self, info: v.vfio_region_info, caps: VfioInfoCap) -> None:
        """Config space 0xff bytes, BAR0 (and BAR1 with two ports) 8 bytes of I/O, every
        other region of the nine size 0; READ|WRITE for all of them, never MMAP."""
        index = info.index
        if index >= v.VFIO_PCI_NUM_REGIONS:
            raise err(EINVAL)
        size = 0
        if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
            size = MTTY_CONFIG_SPACE_SIZE
        elif index == v.VFIO_PCI_BAR0_REGION_INDEX:
            size = MTTY_IO_BAR_SIZE
        elif index == v.VFIO_PCI_BAR1_REGION_INDEX and self.nr_ports == 2:
            size = MTTY_IO_BAR_SIZE
        info.size = size
        info.offset = index << MTTY_VFIO_PCI_OFFSET_SHIFT
        info.flags = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE

    # -- read / write (mtty_read / mtty_write -> mdev_access) --------------------------

    def ops_read(self, n: int, pos: int) -> bytes:
        """mtty_read: 4/2/1-byte pieces by alignment, each through mdev_access; a region
        mdev_access does not know (ROM, VGA, past the nine) is EFAULT. Reading a BAR fills
        only the first byte of a piece from the register at (u16) offset: the rest of the
        piece is uninitialized kernel stack in mtty.c, zeros here."""
        out = bytearray()
        self._access(pos, min(n, MAX_RW_COUNT, MTTY_RW_MODEL_MAX), out, None)
        return bytes(out)

    def ops_write(self, data: bytes, pos: int) -> int:
        """mtty_write: as mtty_read; a BAR piece writes its first byte to the register."""
        data = data[: min(MAX_RW_COUNT, MTTY_RW_MODEL_MAX)]
        return self._access(pos, len(data), None, data)

    def _access(self, pos: int, count: int, out: bytearray | None, data: bytes | None) -> int:
        done = 0
        while count:
            index = pos >> MTTY_VFIO_PCI_OFFSET_SHIFT
            offset = pos & MTTY_VFIO_PCI_OFFSET_MASK
            if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
                n = self._config_piece(offset, count, out, data, done)
            elif index <= v.VFIO_PCI_BAR5_REGION_INDEX:
                n = self._bar_piece(index, offset, count, out, data, done)
            else:
                raise err(EFAULT)  # mdev_access returns -1: mtty_read/_write say EFAULT
            pos += n
            done += n
            count -= n
        return done

    @staticmethod
    def _piece(pos: int, count: int) -> int:
        return 4 if count >= 4 and not pos % 4 else 2 if count >= 2 and not pos % 2 else 1

    def _config_piece(
        self, offset: int, count: int, out: bytearray | None, data: bytes | None, done: int
    ) -> int:
        if data is None:
            assert out is not None
            if offset >= MTTY_CONFIG_SPACE_SIZE:
                # memcpy from vconfig + offset: past the 0xff-byte buffer, up to the next
                # region (a kernel out-of-bounds read). Zeros here, in one stretch.
                n = min(count, (1 << MTTY_VFIO_PCI_OFFSET_SHIFT) - offset)
                self.warn(
                    f"mtty: config read at {offset:#x} is past vconfig[{MTTY_CONFIG_SPACE_SIZE:#x}]"
                )
                out += bytes(n)
                return n
            n = self._piece(offset, count)
            piece = self.vconfig[offset : offset + n]
            if len(piece) < n:
                self.warn(
                    f"mtty: config read at {offset:#x} runs past vconfig[{MTTY_CONFIG_SPACE_SIZE:#x}]"
                )
            out += piece.ljust(n, b"\0")
            return n
        n = self._piece(offset, count)
        self.handle_pci_cfg_write(offset & 0xFFFF, data[done : done + n])
        return n

    def handle_pci_cfg_write(self, offset: int, buf: bytes) -> None:
        """handle_pci_cfg_write (offset is a u16): only the interrupt line and BARs 0-4
        change; a BAR write takes 4 bytes from the buffer whatever its size (the missing
        ones are stack bytes in mtty.c, zeros here)."""
        c = self.vconfig
        if offset == 0x3C:
            c[0x3C] = buf[0]
        elif offset in (0x10, 0x14):
            bar_index = 0 if offset == 0x10 else 1
            if self.nr_ports == 1 and bar_index == 1:
                struct.pack_into("<I", c, offset, 0)
                return
            cfg_addr = int.from_bytes(buf[:4].ljust(4, b"\0"), "little")
            if cfg_addr == 0xFFFFFFFF:
                cfg_addr &= MTTY_BAR_MASK
            cfg_addr |= c[offset] & 0x3
            struct.pack_into("<I", c, offset, cfg_addr)
        elif offset in (0x18, 0x1C, 0x20):
            struct.pack_into("<I", c, offset, 0)
        # 0x04, 0x06, 0x3d and anything else: "not handled"

    def _bar_piece(
        self,
        index: int,
        offset: int,
        count: int,
        out: bytearray | None,
        data: bytes | None,
        done: int,
    ) -> int:
        reg = offset & 0xFFFF  # handle_bar_{read,write} take a u16 offset: 64 KiB aliases
        port = self.mtty_hw.ports[index] if index < len(self.mtty_hw.ports) else None
        if port is None or reg >= 8:
            # No register here: nothing happens (past s[1] mtty.c reads or corrupts the
            # rest of mdev_state; the model logs that). Skip to the next register alias.
            if port is None:
                self.warn(f"mtty: BAR{index} access uses s[{index}], past the 2 ports")
                n = min(count, (1 << MTTY_VFIO_PCI_OFFSET_SHIFT) - offset)
            else:
                n = min(count, 0x10000 - reg)
            if out is not None:
                out += bytes(n)
            return n
        n = self._piece(offset, count)
        hw = self.mtty_hw
        if data is None:
            assert out is not None
            out += bytes([hw.handle_bar_read(port, reg)]) + bytes(n - 1)
        else:
            hw.handle_bar_write(port, reg, data[done])
        return n

    # -- DMA logging: present, does nothing (mtty_log_start/stop/read_and_clear) --------

    def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        return page_size

    def log_stop(self) -> None:
        pass

    def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        pass


DRIVERS["mtty"] = MttyDevice
