"""The HiSilicon accelerator VF behind hisi_acc_vfio_pci: its queue manager (QM).

A Kunpeng SEC/HPRE/ZIP virtual function is driven through a QM (drivers/crypto/hisilicon/qm.c,
include/linux/hisi_acc_qm.h). What the model keeps is what hisi_acc migrates:

* per-function 32-bit registers in BAR2 (interrupt masks, the PF<->VF "IFC" registers, page
  size, isolation config, QM_VF_STATE) and the EQ/AEQ contexts (7 dwords each at 0x8000 and
  0x8020, in the half of BAR2 that hisi_acc hides from the guest);
* a mailbox (one 16-byte write at QM_MB_CMD_SEND_BASE, busy bit 13) for the commands the
  driver uses: SQC_BT/CQC_BT (queue-context table bases), SQC_VFT_V2 (this VF's queue range),
  PAUSE_QM;
* doorbells (SQ/CQ at 0x1000, EQ/AEQ at 0x2000) that move queue positions (qm_db_v2 layout:
  queue number in bits 0-11, command at 12, index at 32, priority at 48);
* the queue contexts (struct qm_sqc / qm_cqc, 32 bytes each). As on the real chip they live in
  host memory at the SQC/CQC table bases and are cached on chip; QM_CACHE_WB_START writes the
  cache back through the IOMMU. So SQ/CQ positions migrate through guest RAM, and the 176-byte
  acc_vf_data blob carries only the registers and the table bases.
* the PF side the driver consults (HisiQmPf): the VF function table (VFT: each VF's queue base
  and count), the PF isolation config, RAS and engine interrupt status;
* the job engine (HisiQmVf.engine_step, the one place SQ heads and CQ tails advance): for
  every queue an SQ doorbell armed, SQEs between sqc.head and sqc.tail are read from the SQ,
  done by the VF type's engine (ZIP: vfiomig.hw.hisi_zip; SEC/HPRE have none), completed
  with a struct qm_cqe at cqc.tail (phase in w7 bit 0, flipped on each lap of the CQ, the
  phase kept in cqc dw6 bit 0) and, for a CQ with its interrupt flag, a qm_eqe at the EQ's
  tail (EQC dword 0 high half; the EQ phase in EQC dword 6 bit 16, so both travel in
  acc_vf_data). Paused (PAUSE_QM) means idle; a refused DMA is a RAS error on the PF and
  the job stays queued.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Protocol

from vfiomig.hw.device import DmaDevice
from vfiomig.hw.memory import Memory

# -- PCI device ids of the VFs hisi_acc binds to (include/linux/pci_ids.h) -------------------
PCI_DEVICE_ID_HUAWEI_ZIP_VF = 0xA251
PCI_DEVICE_ID_HUAWEI_SEC_VF = 0xA256
PCI_DEVICE_ID_HUAWEI_HPRE_VF = 0xA259

# -- VF registers (qm.c, hisi_acc_qm.h, hisi_acc_vfio_pci.h) ---------------------------------
QM_VF_AEQ_INT_SOURCE = 0x0000
QM_VF_AEQ_INT_MASK = 0x0004
QM_VF_EQ_INT_SOURCE = 0x0008
QM_VF_EQ_INT_MASK = 0x000C
QM_IFC_INT_SOURCE_V = 0x0020
QM_IFC_INT_MASK = 0x0024
QM_IFC_INT_STATUS = 0x0028
QM_IFC_INT_SET_V = 0x002C
QM_QUE_ISO_CFG_V = 0x0030
QM_PAGE_SIZE = 0x0034
QM_VF_STATE = 0x0060
QM_CACHE_WB_START = 0x0204
QM_CACHE_WB_DONE = 0x0208
QM_MB_CMD_SEND_BASE = 0x0300
QM_MB_CMD_DATA_ADDR_L = 0x0304
QM_MB_CMD_DATA_ADDR_H = 0x0308
QM_DOORBELL_SQ_CQ_BASE_V2 = 0x1000
QM_DOORBELL_EQ_AEQ_BASE_V2 = 0x2000
QM_EQC_DW0 = 0x8000
QM_AEQC_DW0 = 0x8020
QM_XQC_DWORDS = 7  # QM_REGS_MAX_LEN: EQC/AEQC are 7 registers each

# -- PF registers ----------------------------------------------------------------------------
QM_ABNORMAL_INT_STATUS = 0x100008
QM_VFT_CFG_OP_ENABLE = 0x100054
QM_VFT_CFG_OP_WR = 0x100058
QM_VFT_CFG_TYPE = 0x10005C
QM_VFT_CFG = 0x100060
QM_VFT_CFG_DATA_L = 0x100064
QM_VFT_CFG_DATA_H = 0x100068
QM_VFT_CFG_RDY = 0x10006C
SEC_CORE_INT_STATUS = 0x301008
HPRE_HAC_INT_STATUS = 0x301800
HZIP_CORE_INT_STATUS = 0x3010AC
# Which engine status register belongs to which VF type (hisi_acc_check_int_state).
ENGINE_INT_STATUS = {
    PCI_DEVICE_ID_HUAWEI_SEC_VF: SEC_CORE_INT_STATUS,
    PCI_DEVICE_ID_HUAWEI_HPRE_VF: HPRE_HAC_INT_STATUS,
    PCI_DEVICE_ID_HUAWEI_ZIP_VF: HZIP_CORE_INT_STATUS,
}
# RAS bits the model raises itself (qm.c qm_hw_error[]).
QM_AXI_BRESP = 1 << 1  # a write (cache write-back) the IOMMU refused
QM_AXI_RRESP = 1 << 0  # a read (context fetch) the IOMMU refused

# -- mailbox ---------------------------------------------------------------------------------
QM_MB_CMD_SQC = 0x0
QM_MB_CMD_CQC = 0x1
QM_MB_CMD_EQC = 0x2
QM_MB_CMD_AEQC = 0x3
QM_MB_CMD_SQC_BT = 0x4
QM_MB_CMD_CQC_BT = 0x5
QM_MB_CMD_SQC_VFT_V2 = 0x6
QM_MB_CMD_PAUSE_QM = 0xE  # hisi_acc_vfio_pci.h
QM_MB_BUSY_SHIFT = 13
QM_MB_OP_SHIFT = 14

# -- doorbells -------------------------------------------------------------------------------
QM_DOORBELL_CMD_SQ = 0
QM_DOORBELL_CMD_CQ = 1
QM_DOORBELL_CMD_EQ = 2
QM_DOORBELL_CMD_AEQ = 3
QM_DB_CMD_SHIFT_V2 = 12
QM_DB_INDEX_SHIFT_V2 = 32
QM_DB_PRIORITY_SHIFT_V2 = 48

# -- VFT encoding (qm.c qm_vft_data_cfg, hisi_acc_vfio_pci.h) --------------------------------
QM_SQC_VFT_START_SQN_SHIFT = 28
QM_SQC_VFT_VALID = 1 << 44
QM_SQC_VFT_SQN_SHIFT = 45
QM_SQC_VFT_BASE_MASK_V2 = 0xFFFF
QM_SQC_VFT_NUM_MASK_V2 = 0x3FF

# enum qm_vf_state: zero means READY.
QM_READY = 0
QM_NOT_READY = 1

# Queue depths of V2/V3 hardware, from the capability registers the driver reads
# (qm.c qm_basic_info[]: QM_QP_DEPTH_CAP 0x4000400 -> sq/cq depth 1024; QM_XEQ_DEPTH_CAP
# 0x4000800 -> eq depth 2048 in the low half, aeq depth 1024 in the high half; qm_get_xqc_depth).
QM_Q_DEPTH = 1024
QM_EQ_DEPTH = 2048
QM_AEQ_DEPTH = 1024
XQC_SIZE = 32  # sizeof(struct qm_sqc) == sizeof(struct qm_cqc)
QM_MAX_QP_NUM = QM_SQC_VFT_NUM_MASK_V2 + 1  # the most queues a VFT entry can give a function

# -- context and element encodings (qm.c) ----------------------------------------------------
# sqc/cqc dw3 on V2+: depth - 1 in the low bits, log2 of the element size at bit 12
# (QM_MK_SQC_DW3_V2, QM_MK_CQC_DW3_V2; the CQE size code QM_QC_CQE_SIZE is 4: 16 bytes).
QM_SQ_SQE_SIZE_SHIFT = 12
QM_CQ_CQE_SIZE_SHIFT = 12
QM_QC_CQE_SIZE = 4
QM_XQC_DEPTH_MASK = 0xFFF
# sqc w13 (QM_MK_SQC_W13): priority | orders << 4 | alg_type << 8 (ZIP: 0 comp, 1 decomp)
QM_SQ_PRIORITY_SHIFT = 0
QM_SQ_ORDERS_SHIFT = 4
QM_SQ_TYPE_SHIFT = 8
QM_SQ_TYPE_MASK = 0xF
# cqc dw6: the phase the next CQE carries (bit 0) and "post an EQE per completion" (bit 1)
QM_CQ_PHASE_SHIFT = 0
QM_CQ_FLAG_SHIFT = 1
# EQC/AEQC dw6: depth - 1 in the low 16 bits, the phase of the next element at bit 16
QM_EQC_PHASE_SHIFT = 16
QM_XQ_DEPTH_MASK = 0xFFFF
# qm_eqe / qm_aeqe dw0: queue number in bits 0-15, phase at bit 16, AEQE type from bit 17
QM_EQE_CQN_MASK = 0xFFFF
QM_EQE_PHASE_SHIFT = 16
QM_AEQE_TYPE_SHIFT = 17
QM_CQ_OVERFLOW = 0
QM_EQ_OVERFLOW = 1
QM_CQE_ERROR = 2
QM_CQE_SIZE = 16  # sizeof(struct qm_cqe)
QM_EQE_SIZE = 4  # sizeof(struct qm_eqe) == sizeof(struct qm_aeqe)


class qm_sqc(ctypes.LittleEndianStructure):
    """struct qm_sqc (qm.c): one SQ context, 32 bytes in the SQC table."""

    _fields_ = [
        ("head", ctypes.c_uint16),
        ("tail", ctypes.c_uint16),
        ("base_l", ctypes.c_uint32),
        ("base_h", ctypes.c_uint32),
        ("dw3", ctypes.c_uint32),
        ("w8", ctypes.c_uint16),
        ("rsvd0", ctypes.c_uint16),
        ("pasid", ctypes.c_uint16),
        ("w11", ctypes.c_uint16),
        ("cq_num", ctypes.c_uint16),
        ("w13", ctypes.c_uint16),
        ("rsvd1", ctypes.c_uint32),
    ]


class qm_cqc(ctypes.LittleEndianStructure):
    """struct qm_cqc (qm.c): one CQ context, 32 bytes in the CQC table."""

    _fields_ = [
        ("head", ctypes.c_uint16),
        ("tail", ctypes.c_uint16),
        ("base_l", ctypes.c_uint32),
        ("base_h", ctypes.c_uint32),
        ("dw3", ctypes.c_uint32),
        ("w8", ctypes.c_uint16),
        ("rsvd0", ctypes.c_uint16),
        ("pasid", ctypes.c_uint16),
        ("w11", ctypes.c_uint16),
        ("dw6", ctypes.c_uint32),
        ("rsvd1", ctypes.c_uint32),
    ]


class qm_cqe(ctypes.LittleEndianStructure):
    """struct qm_cqe (qm_common.h): one completion, 16 bytes. `sq_head` is the SQ index of
    the SQE it completes (qm_poll_req_cb hands qp->sqe + sqe_size * sq_head to req_cb);
    bit 0 of w7 is the phase (QM_CQE_PHASE)."""

    _fields_ = [
        ("rsvd0", ctypes.c_uint32),
        ("cmd_id", ctypes.c_uint16),
        ("rsvd1", ctypes.c_uint16),
        ("sq_head", ctypes.c_uint16),
        ("sq_num", ctypes.c_uint16),
        ("rsvd2", ctypes.c_uint16),
        ("w7", ctypes.c_uint16),
    ]


assert ctypes.sizeof(qm_sqc) == XQC_SIZE and ctypes.sizeof(qm_cqc) == XQC_SIZE
assert ctypes.sizeof(qm_cqe) == QM_CQE_SIZE


class QmBusError(Exception):
    """A DMA of the QM or its engine that the IOMMU refused (or that reached memory without
    bytes): on the chip an AXI error response, which the QM reports as a RAS error."""

    def __init__(self, iova: int, write: bool) -> None:
        super().__init__(f"QM bus error: {'write' if write else 'read'} at {iova:#x}")
        self.iova = iova
        self.write = write


class QmEngine(Protocol):
    """The accelerator behind a QM: what one SQE asks, done through the VF's DMA."""

    sqe_size: int  # bytes of one SQE the engine reads (sizeof its struct)

    def do_job(self, vf: HisiQmVf, sqe: bytes, alg_type: int) -> bytes:
        """Carry out the SQE (its DMA through vf.bus_read / vf.bus_write) and return the
        bytes the engine writes back over the start of the SQE (status, lengths). Raises
        QmBusError for a refused DMA."""
        ...


def qm_engine(dev_id: int) -> QmEngine | None:
    """The job engine of a VF type: ZIP's deflate engine (vfiomig.hw.hisi_zip); SEC and HPRE
    have none in the model, so their SQEs stay queued."""
    if dev_id == PCI_DEVICE_ID_HUAWEI_ZIP_VF:
        from vfiomig.hw.hisi_zip import HisiZipEngine  # hisi_zip builds on this module

        return HisiZipEngine()
    return None


@dataclass
class QpContext:
    """One queue pair's contexts as the on-chip cache holds them."""

    sqc: qm_sqc
    cqc: qm_cqc
    dirty: bool = True  # changed since the last write-back to the SQC/CQC tables


def mb_pack(cmd: int, base: int, queue: int, op: bool) -> bytes:
    """struct qm_mailbox as qm_mb_pre_init builds it (busy bit set by the sender)."""
    w0 = cmd | (int(op) << QM_MB_OP_SHIFT) | (1 << QM_MB_BUSY_SHIFT)
    return struct.pack("<HHIII", w0, queue, base & 0xFFFFFFFF, base >> 32, 0)


class HisiQmPf:
    """The PF's QM as the VF migration driver sees it (hisi_acc_vdev->pf_qm)."""

    def __init__(self, que_iso_cfg: int = 0) -> None:
        self.regs: dict[int, int] = {QM_VFT_CFG_RDY: 1}
        self.vft: dict[int, tuple[int, int]] = {}  # vf_id -> (qp_base, qp_num)
        self.que_iso_cfg = que_iso_cfg

    def set_vft(self, vf_id: int, qp_base: int, qp_num: int) -> None:
        """What the PF driver's qm_set_vft() programs for a VF at sriov_enable time."""
        if not 1 <= qp_num <= QM_SQC_VFT_NUM_MASK_V2 + 1 or not 0 <= qp_base <= 0xFFFF:
            raise ValueError("qp_num must be 1..1024 and qp_base 0..65535")
        self.vft[vf_id] = (qp_base, qp_num)

    def sqc_vft(self, vf_id: int) -> int:
        """The 64-bit SQC VFT entry (qm_vft_data_cfg, V2+ layout); 0 if never programmed."""
        if vf_id not in self.vft:
            return 0
        base, num = self.vft[vf_id]
        return (
            base << QM_SQC_VFT_START_SQN_SHIFT
            | QM_SQC_VFT_VALID
            | (num - 1) << QM_SQC_VFT_SQN_SHIFT
        )

    def readl(self, off: int) -> int:
        if off == QM_QUE_ISO_CFG_V:  # the PF's isolation config
            return self.que_iso_cfg
        return self.regs.get(off, 0)

    def writel(self, val: int, off: int) -> None:
        self.regs[off] = val & 0xFFFFFFFF
        if off == QM_VFT_CFG_OP_ENABLE and val & 1:
            self._vft_op()

    def _vft_op(self) -> None:
        """A VFT_CFG read op (pf_qm_get_qp_num): the entry appears in DATA_L/H, RDY rises."""
        if self.regs.get(QM_VFT_CFG_OP_WR) == 1 and self.regs.get(QM_VFT_CFG_TYPE, 0) == 0:
            entry = self.sqc_vft(self.regs.get(QM_VFT_CFG, 0))
            self.regs[QM_VFT_CFG_DATA_L] = entry & 0xFFFFFFFF
            self.regs[QM_VFT_CFG_DATA_H] = entry >> 32
        self.regs[QM_VFT_CFG_RDY] = 1

    # -- fault injection for tests: interrupts that make the driver's stop fail -------------

    def inject_ras_error(self, bits: int = 1) -> None:
        self.regs[QM_ABNORMAL_INT_STATUS] = self.regs.get(QM_ABNORMAL_INT_STATUS, 0) | bits

    def inject_engine_interrupt(self, dev_id: int) -> None:
        self.regs[ENGINE_INT_STATUS[dev_id]] = 1

    def clear_interrupts(self) -> None:
        for off in (QM_ABNORMAL_INT_STATUS, *ENGINE_INT_STATUS.values()):
            self.regs.pop(off, None)


def _vf_reset_regs(pf: HisiQmPf) -> dict[int, int]:
    """Register values after an FLR. QM_VF_STATE reads NOT_READY until a guest driver's
    hisi_qm_start() writes QM_READY (qm.c hisi_qm_set_state), and the VF mirrors the PF's
    isolation config in its QUE_ISO_CFG_V."""
    return {
        QM_VF_AEQ_INT_MASK: 1,
        QM_VF_EQ_INT_MASK: 1,
        QM_IFC_INT_MASK: 1,
        QM_QUE_ISO_CFG_V: pf.que_iso_cfg,
        QM_VF_STATE: QM_NOT_READY,
    }


class HisiQmVf(DmaDevice):
    """One accelerator VF: BAR2 registers, mailbox, doorbells, queue-context cache."""

    def __init__(self, mem: Memory, name: str, pf: HisiQmPf, vf_id: int, dev_id: int) -> None:
        super().__init__(mem, name)
        if dev_id not in ENGINE_INT_STATUS:
            raise ValueError(f"dev_id {dev_id:#x} is not a SEC/HPRE/ZIP VF")
        self.pf = pf
        self.vf_id = vf_id
        self.dev_id = dev_id  # PCI device id (hisi_acc_vdev->vf_dev->device)
        self.wb_stuck = False  # fault injection: QM_CACHE_WB_DONE never rises
        self.engine = qm_engine(dev_id)
        self.flr()

    def flr(self) -> None:
        """Function-level reset: registers to reset values, cache dropped (not written back)."""
        self.regs = _vf_reset_regs(self.pf)
        self._mb_stuck = False
        self.sqc_bt = 0
        self.cqc_bt = 0
        self.cache: dict[int, QpContext] = {}
        self.paused = False
        # Queues an SQ doorbell has pointed the engine at (the guest's submits, or the
        # priority-1 doorbells of vf_qm_fun_reset after a migration): the ones it serves.
        self.armed: set[int] = set()

    # -- MMIO --------------------------------------------------------------------------------

    def readl(self, off: int) -> int:
        return self.regs.get(off, 0)

    def writel(self, val: int, off: int) -> None:
        val &= 0xFFFFFFFF
        if off == QM_IFC_INT_SOURCE_V:  # write-one-to-clear status (qm_dev_cmd_init)
            self.regs[off] = self.regs.get(off, 0) & ~val
        elif off == QM_CACHE_WB_START:
            if val & 1:
                self._cache_writeback()
        else:
            self.regs[off] = val

    def writeq(self, val: int, off: int) -> None:
        """64-bit doorbell write (qm_db_v2: qn in bits 0-11, cmd at 12, rand_data at 16,
        index at 32, priority at 48)."""
        qn = val & ((1 << QM_DB_CMD_SHIFT_V2) - 1)
        cmd = (val >> QM_DB_CMD_SHIFT_V2) & 0xF
        index = (val >> QM_DB_INDEX_SHIFT_V2) & 0xFFFF
        priority = (val >> QM_DB_PRIORITY_SHIFT_V2) & 0xFF
        if off == QM_DOORBELL_EQ_AEQ_BASE_V2 and cmd in (QM_DOORBELL_CMD_EQ, QM_DOORBELL_CMD_AEQ):
            self._xeq_head(QM_EQC_DW0 if cmd == QM_DOORBELL_CMD_EQ else QM_AEQC_DW0, index)
        elif off == QM_DOORBELL_SQ_CQ_BASE_V2 and cmd in (QM_DOORBELL_CMD_SQ, QM_DOORBELL_CMD_CQ):
            self._qp_doorbell(qn, cmd, index, priority)
        # any other doorbell is ignored

    def mb_write(self, raw: bytes) -> None:
        """The 128-bit mailbox write (qm_mb_write). A stuck mailbox keeps busy set."""
        w0, queue, base_l, base_h, _ = struct.unpack("<HHIII", raw)
        if self.mb_stuck:
            self.regs[QM_MB_CMD_SEND_BASE] = w0 | 1 << QM_MB_BUSY_SHIFT
            return
        cmd, op = w0 & 0xFF, bool(w0 >> QM_MB_OP_SHIFT & 1)
        self._mailbox(cmd, base_h << 32 | base_l, queue, op)
        self.regs[QM_MB_CMD_SEND_BASE] = w0 & ~(1 << QM_MB_BUSY_SHIFT)

    def mb_busy(self) -> bool:
        return bool(self.readl(QM_MB_CMD_SEND_BASE) >> QM_MB_BUSY_SHIFT & 1)

    @property
    def mb_stuck(self) -> bool:
        """Fault injection: the mailbox is busy now and never completes a command."""
        return self._mb_stuck

    @mb_stuck.setter
    def mb_stuck(self, stuck: bool) -> None:
        self._mb_stuck = stuck
        w0 = self.regs.get(QM_MB_CMD_SEND_BASE, 0) & ~(1 << QM_MB_BUSY_SHIFT)
        self.regs[QM_MB_CMD_SEND_BASE] = w0 | int(stuck) << QM_MB_BUSY_SHIFT

    # -- mailbox commands ---------------------------------------------------------------------

    def _mailbox(self, cmd: int, base: int, queue: int, op: bool) -> None:
        if cmd == QM_MB_CMD_SQC_VFT_V2 and op:
            self._mb_data(self.pf.sqc_vft(self.vf_id))
        elif cmd == QM_MB_CMD_SQC_BT:
            self._table_base("sqc_bt", base, op)
        elif cmd == QM_MB_CMD_CQC_BT:
            self._table_base("cqc_bt", base, op)
        elif cmd == QM_MB_CMD_PAUSE_QM:
            self.paused = True  # queues stop being fetched; the engine stays idle
        # SQC/CQC/EQC/AEQC context loads come from the guest driver (guest_* below).

    def _mb_data(self, value: int) -> None:
        self.regs[QM_MB_CMD_DATA_ADDR_L] = value & 0xFFFFFFFF
        self.regs[QM_MB_CMD_DATA_ADDR_H] = value >> 32 & 0xFFFFFFFF

    def _table_base(self, attr: str, base: int, op: bool) -> None:
        if op:
            self._mb_data(getattr(self, attr))
            return
        # A new table base invalidates the cached contexts: they are fetched from the new
        # table on their next use (the restore path on a migration destination).
        setattr(self, attr, base)
        self.cache.clear()

    # -- queue contexts -------------------------------------------------------------------------

    def qp_context(self, qp: int) -> QpContext | None:
        """The context of queue `qp`: from the cache, or fetched from the SQC/CQC tables."""
        ctx = self.cache.get(qp)
        if ctx is None and self.sqc_bt and self.cqc_bt:
            ctx = self._fetch(qp)
        return ctx

    def _fetch(self, qp: int) -> QpContext | None:
        from vfiomig.hw.dma import UnbackedDma  # a bus error to the QM, like a refused DMA
        from vfiomig.hw.iommu import IommuFault

        try:
            sqc = qm_sqc.from_buffer_copy(self.dma_read(self.sqc_bt + qp * XQC_SIZE, XQC_SIZE))
            cqc = qm_cqc.from_buffer_copy(self.dma_read(self.cqc_bt + qp * XQC_SIZE, XQC_SIZE))
        except (IommuFault, UnbackedDma):  # the read is refused; the QM logs a RAS error
            self.pf.inject_ras_error(QM_AXI_RRESP)
            return None
        ctx = QpContext(sqc, cqc, dirty=False)
        self.cache[qp] = ctx
        return ctx

    def _cache_writeback(self) -> None:
        """QM_CACHE_WB_START: write dirty contexts to the tables; WB_DONE rises when done."""
        from vfiomig.hw.dma import UnbackedDma  # a bus error to the QM, like a refused DMA
        from vfiomig.hw.iommu import IommuFault

        self.regs[QM_CACHE_WB_DONE] = 0
        if self.wb_stuck:
            return
        for qp, ctx in self.cache.items():
            if not ctx.dirty:
                continue
            try:
                self.dma_write(self.sqc_bt + qp * XQC_SIZE, bytes(ctx.sqc))
                self.dma_write(self.cqc_bt + qp * XQC_SIZE, bytes(ctx.cqc))
            except (IommuFault, UnbackedDma):  # refused: WB never completes, RAS error
                self.pf.inject_ras_error(QM_AXI_BRESP)
                return
            ctx.dirty = False
        self.regs[QM_CACHE_WB_DONE] = 1

    def _qp_doorbell(self, qn: int, cmd: int, index: int, priority: int) -> None:
        if cmd == QM_DOORBELL_CMD_SQ:
            # Any SQ doorbell ends a PAUSE_QM: the guest's next submit, or the priority-1
            # doorbells vf_qm_fun_reset rings on every queue after a migration, which the
            # model reads as "resume fetching" and which keep the tail the guest last rang.
            self.paused = False
            self.armed.add(qn)
            if priority:
                return
        ctx = self.qp_context(qn)
        if ctx is None:  # no context to move (never started, or its fetch was refused)
            return
        if cmd == QM_DOORBELL_CMD_SQ:
            ctx.sqc.tail = index
        else:
            ctx.cqc.head = index
        ctx.dirty = True

    def _xeq_head(self, dw0_off: int, index: int) -> None:
        # EQC/AEQC dword 0 is {u16 head; u16 tail} (struct qm_eqc). The doorbell also clears
        # the interrupt source (qm_enable_eq_aeq_interrupts rings both "to clear" it).
        self.regs[dw0_off] = (self.regs.get(dw0_off, 0) & 0xFFFF0000) | index
        source = QM_VF_EQ_INT_SOURCE if dw0_off == QM_EQC_DW0 else QM_VF_AEQ_INT_SOURCE
        self.regs[source] = 0

    # -- DMA as the QM sees it: a refused access is a bus error --------------------------------

    def bus_read(self, iova: int, length: int) -> bytes:
        from vfiomig.hw.dma import UnbackedDma  # a bus error to the QM, like a refused DMA
        from vfiomig.hw.iommu import IommuFault

        try:
            return self.dma_read(iova, length)
        except (IommuFault, UnbackedDma):
            raise QmBusError(iova, False) from None

    def bus_write(self, iova: int, data: bytes) -> None:
        from vfiomig.hw.dma import UnbackedDma
        from vfiomig.hw.iommu import IommuFault

        try:
            self.dma_write(iova, data)
        except (IommuFault, UnbackedDma):
            raise QmBusError(iova, True) from None

    def _bus_error(self, e: QmBusError) -> None:
        """The QM logs a refused access as a RAS error on the PF (qm_hw_error[]: AXI RRESP
        for a read, BRESP for a write); hisi_acc_check_int_state then refuses to stop."""
        self.pf.inject_ras_error(QM_AXI_BRESP if e.write else QM_AXI_RRESP)

    # -- the job engine ------------------------------------------------------------------------

    def engine_step(self, max_jobs: int | None = None) -> int:
        """Run the engine over the queued SQEs; returns the number of jobs completed.

        Every armed queue with a context (cached, or fetched from the SQC/CQC tables) whose
        SQ holds SQEs between sqc.head and sqc.tail is served, one job per queue in turn,
        until no queue has work or `max_jobs` jobs completed. A job: read the SQE at the SQ
        base + head * SQE size, let the engine do it (its input/output DMA and the status it
        writes back into the SQE), post a qm_cqe at cqc.tail with the CQ's phase, advance
        sqc.head and cqc.tail (the phase toggles when cqc.tail wraps), mark the context dirty
        and, for a CQ with its interrupt flag (cqc dw6 bit 1, set by qm_cq_ctx_cfg), post a
        qm_eqe on the EQ. Nothing runs while the QM is paused (PAUSE_QM) or for a VF type
        without an engine. A refused DMA raises the RAS error and that job does not
        complete: the queue stalls at it (head unchanged, no CQE) until the next step.
        A full CQ (tail + 1 == head) also stalls its queue until the guest consumes CQEs.
        """
        if self.paused or self.engine is None:
            return 0
        done = 0
        busy = sorted(self.armed)
        while busy and (max_jobs is None or done < max_jobs):
            still = []
            for qp in busy:
                if max_jobs is not None and done >= max_jobs:
                    break
                if self._engine_job(qp, self.engine):
                    done += 1
                    still.append(qp)
            busy = still
        return done

    def _engine_job(self, qp: int, engine: QmEngine) -> bool:
        """One SQE of queue `qp`; False when the queue has nothing it can complete now."""
        ctx = self.qp_context(qp)
        if ctx is None:
            return False
        sqc, cqc = ctx.sqc, ctx.cqc
        sq_depth = (sqc.dw3 & QM_XQC_DEPTH_MASK) + 1
        cq_depth = (cqc.dw3 & QM_XQC_DEPTH_MASK) + 1
        head = int(sqc.head)
        if sq_depth < 2 or cq_depth < 2 or head == sqc.tail or sqc.tail >= sq_depth:
            return False  # empty, never configured, or a doorbell index past the queue
        cq_tail = int(cqc.tail)
        if (cq_tail + 1) % cq_depth == cqc.head:
            return False  # CQ full: wait for the guest to consume
        sqe_addr = (sqc.base_h << 32 | sqc.base_l) + head * (
            1 << (sqc.dw3 >> QM_SQ_SQE_SIZE_SHIFT & 0xF)
        )
        cqe = qm_cqe(sq_head=head, sq_num=qp, w7=cqc.dw6 >> QM_CQ_PHASE_SHIFT & 1)
        try:
            sqe = self.bus_read(sqe_addr, engine.sqe_size)
            alg_type = sqc.w13 >> QM_SQ_TYPE_SHIFT & QM_SQ_TYPE_MASK
            self.bus_write(sqe_addr, engine.do_job(self, sqe, alg_type))
            self.bus_write((cqc.base_h << 32 | cqc.base_l) + cq_tail * QM_CQE_SIZE, bytes(cqe))
        except QmBusError as e:
            self._bus_error(e)
            return False
        sqc.head = (head + 1) % sq_depth
        if cq_tail + 1 == cq_depth:
            cqc.tail = 0
            cqc.dw6 ^= 1 << QM_CQ_PHASE_SHIFT  # the next lap of the CQ carries the other phase
        else:
            cqc.tail = cq_tail + 1
        ctx.dirty = True
        if cqc.dw6 >> QM_CQ_FLAG_SHIFT & 1:
            if not self._post_xeqe(QM_EQC_DW0, qp):
                self._post_xeqe(QM_AEQC_DW0, qp | QM_EQ_OVERFLOW << QM_AEQE_TYPE_SHIFT)
        return True

    def _post_xeqe(self, dw0_off: int, value: int) -> bool:
        """Write one qm_eqe / qm_aeqe (`value` with the queue's phase at bit 16) at the tail
        of the EQ or AEQ its context registers describe, advance the tail (EQC dword 0, high
        half), toggle the phase (dword 6, bit 16) when it wraps, and raise the interrupt
        source unless masked. False when the queue is full (tail + 1 == head) or absent."""
        dw0 = self.regs.get(dw0_off, 0)
        dw6 = self.regs.get(dw0_off + 24, 0)
        base = self.regs.get(dw0_off + 8, 0) << 32 | self.regs.get(dw0_off + 4, 0)
        depth = (dw6 & QM_XQ_DEPTH_MASK) + 1
        head, tail = dw0 & 0xFFFF, dw0 >> 16
        if not base or depth < 2 or tail >= depth or (tail + 1) % depth == head:
            return False
        phase = dw6 >> QM_EQC_PHASE_SHIFT & 1
        try:
            self.bus_write(base + tail * QM_EQE_SIZE, struct.pack("<I", value | phase << 16))
        except QmBusError as e:
            self._bus_error(e)
            return True  # the event is lost, not the queue
        tail += 1
        if tail == depth:
            tail = 0
            self.regs[dw0_off + 24] = dw6 ^ 1 << QM_EQC_PHASE_SHIFT
        self.regs[dw0_off] = head | tail << 16
        eq = dw0_off == QM_EQC_DW0
        if not self.regs.get(QM_VF_EQ_INT_MASK if eq else QM_VF_AEQ_INT_MASK, 0):
            self.regs[QM_VF_EQ_INT_SOURCE if eq else QM_VF_AEQ_INT_SOURCE] = 1
        return True

    # -- what tests compare ------------------------------------------------------------------

    def migratable_state(self) -> dict[str, object]:
        """The state hisi_acc carries across a migration (registers, bases, VF state)."""
        regs = (
            QM_VF_AEQ_INT_MASK,
            QM_VF_EQ_INT_MASK,
            QM_IFC_INT_SOURCE_V,
            QM_IFC_INT_MASK,
            QM_IFC_INT_SET_V,
            QM_QUE_ISO_CFG_V,
            QM_PAGE_SIZE,
            QM_VF_STATE,
        )
        xqc = [QM_EQC_DW0 + 4 * i for i in range(QM_XQC_DWORDS)]
        xqc += [QM_AEQC_DW0 + 4 * i for i in range(QM_XQC_DWORDS)]
        return {
            "regs": {off: self.readl(off) for off in (*regs, *xqc)},
            "sqc_bt": self.sqc_bt,
            "cqc_bt": self.cqc_bt,
        }


# -- the guest driver's side (qm.c hisi_qm_start / hisi_qm_start_qp / hisi_qp_send) ----------


def _write_xqc(vf: HisiQmVf, dw0: int, base: int, depth: int) -> None:
    """EQC/AEQC with head = tail = 0 at `base` (qm_eq_ctx_cfg / qm_aeq_ctx_cfg on V2+:
    dw6 = (depth - 1) | 1 << QM_EQC_PHASE_SHIFT, so the first lap's elements carry phase 1,
    which is what qm_init_eq_aeq_status expects: eqc_phase = aeqc_phase = true).

    The driver hands the context over by mailbox from a DMA buffer; the model writes the
    resulting context registers directly, which is the state that mailbox leaves behind.
    """
    dwords = [0, base & 0xFFFFFFFF, base >> 32, 0, 0, 0, depth - 1 | 1 << QM_EQC_PHASE_SHIFT]
    for i, value in enumerate(dwords):
        vf.regs[dw0 + 4 * i] = value


def guest_qm_start(
    vf: HisiQmVf,
    *,
    eqe_dma: int,
    aeqe_dma: int,
    sqc_dma: int,
    cqc_dma: int,
    eq_depth: int = QM_EQ_DEPTH,
    aeq_depth: int = QM_AEQ_DEPTH,
) -> None:
    """What a guest's hisi_qm_start() leaves in the VF: bases, unmasked events, VF READY.
    The guest zeroes its EQ/AEQ/SQC/CQC memory first (qm_eq_aeq_ctx_cfg's memset)."""
    if not 2 <= eq_depth <= 1 << 16 or not 2 <= aeq_depth <= 1 << 16:
        raise ValueError("EQ/AEQ depths must be 2..65536")
    vf.writel(0, QM_PAGE_SIZE)  # qm_init_prefetch: 4 KiB pages
    _write_xqc(vf, QM_EQC_DW0, eqe_dma, eq_depth)
    _write_xqc(vf, QM_AEQC_DW0, aeqe_dma, aeq_depth)
    for cmd, base in ((QM_MB_CMD_SQC_BT, sqc_dma), (QM_MB_CMD_CQC_BT, cqc_dma)):
        vf.mb_write(mb_pack(cmd, base, 0, False))
    vf.writel(1, QM_IFC_INT_SOURCE_V)  # qm_dev_cmd_init
    vf.writel(0, QM_IFC_INT_MASK)
    guest_db(vf, 0, QM_DOORBELL_CMD_AEQ, 0)  # qm_enable_eq_aeq_interrupts
    guest_db(vf, 0, QM_DOORBELL_CMD_EQ, 0)
    vf.writel(0, QM_VF_EQ_INT_MASK)
    vf.writel(0, QM_VF_AEQ_INT_MASK)
    vf.writel(QM_READY, QM_VF_STATE)  # hisi_qm_set_state(qm, QM_READY)


def guest_qp_start(
    vf: HisiQmVf,
    qp: int,
    *,
    sqe_dma: int,
    cqe_dma: int,
    depth: int = QM_Q_DEPTH,
    sqe_size: int = 128,
    alg_type: int = 0,
) -> None:
    """hisi_qm_start_qp: fresh SQ/CQ contexts, head = tail = 0 (qm_sq_ctx_cfg: dw3 =
    QM_MK_SQC_DW3_V2(sqe_size, depth), w13 = QM_MK_SQC_W13(0, 1, alg_type), cq_num = qp;
    qm_cq_ctx_cfg: dw3 = QM_MK_CQC_DW3_V2(QM_QC_CQE_SIZE, depth), dw6 = phase 1 | flag 1).
    `alg_type` is the queue's kind (ZIP: 0 compress, 1 decompress, hisi_zip_ctx_init)."""
    if not 2 <= depth <= QM_XQC_DEPTH_MASK + 1 or sqe_size < 1 or sqe_size & (sqe_size - 1):
        raise ValueError("depth must be 2..4096 and sqe_size a power of two")
    sqc = qm_sqc(
        base_l=sqe_dma & 0xFFFFFFFF,
        base_h=sqe_dma >> 32,
        cq_num=qp,
        dw3=depth - 1 | (sqe_size.bit_length() - 1) << QM_SQ_SQE_SIZE_SHIFT,
        w13=1 << QM_SQ_ORDERS_SHIFT | (alg_type & QM_SQ_TYPE_MASK) << QM_SQ_TYPE_SHIFT,
    )
    cqc = qm_cqc(
        base_l=cqe_dma & 0xFFFFFFFF,
        base_h=cqe_dma >> 32,
        dw3=depth - 1 | QM_QC_CQE_SIZE << QM_CQ_CQE_SIZE_SHIFT,
        dw6=1 << QM_CQ_PHASE_SHIFT | 1 << QM_CQ_FLAG_SHIFT,
    )
    vf.cache[qp] = QpContext(sqc, cqc)


def guest_db(vf: HisiQmVf, qn: int, cmd: int, index: int, priority: int = 0) -> None:
    """qm_db as a guest rings it: SQ/CQ doorbells at 0x1000, EQ/AEQ at 0x2000 (V2 layout)."""
    base = (
        QM_DOORBELL_SQ_CQ_BASE_V2
        if cmd in (QM_DOORBELL_CMD_SQ, QM_DOORBELL_CMD_CQ)
        else QM_DOORBELL_EQ_AEQ_BASE_V2
    )
    vf.writeq(
        qn
        | cmd << QM_DB_CMD_SHIFT_V2
        | index << QM_DB_INDEX_SHIFT_V2
        | priority << QM_DB_PRIORITY_SHIFT_V2,
        base,
    )


def guest_sq_submit(vf: HisiQmVf, qp: int, n: int = 1) -> int:
    """hisi_qp_send n times: advance the SQ tail and ring the SQ doorbell; returns the tail.

    The guest keeps its own sq_tail in guest RAM; the model reads the context's tail instead,
    which holds the same value. No SQE is written: for queues whose SQEs matter, a guest
    driver model writes them (vfiomig.hw.hisi_zip.GuestZip).
    """
    ctx = vf.qp_context(qp)
    if ctx is None:
        raise ValueError(f"queue {qp} was never started")
    tail = (ctx.sqc.tail + n) % ((ctx.sqc.dw3 & QM_XQC_DEPTH_MASK) + 1)
    guest_db(vf, qp, QM_DOORBELL_CMD_SQ, tail)
    return tail


def guest_eq_consume(vf: HisiQmVf, n: int = 1, *, aeq: bool = False) -> int:
    """The guest's EQ/AEQ handler: advance the head and ring the EQ/AEQ doorbell."""
    dw0 = QM_AEQC_DW0 if aeq else QM_EQC_DW0
    depth = (vf.readl(dw0 + 24) & QM_XQ_DEPTH_MASK) + 1
    head = ((vf.readl(dw0) & 0xFFFF) + n) % depth
    guest_db(vf, 0, QM_DOORBELL_CMD_AEQ if aeq else QM_DOORBELL_CMD_EQ, head)
    return head
