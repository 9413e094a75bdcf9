"""The HiSilicon accelerator VF behind hisi_acc_vfio_pci: its queue manager (QM).

A Kunpeng SEC/HPRE/ZIP virtual function is driven through a QM (drivers/crypto/hisilicon/qm.c,
include/linux/hisi_acc_qm.h). What the model keeps is what hisi_acc migrates:

* per-function 32-bit registers in BAR2 (interrupt masks, the PF<->VF "IFC" registers, page
  size, isolation config, QM_VF_STATE) and the EQ/AEQ contexts (7 dwords each at 0x8000 and
  0x8020, in the half of BAR2 that hisi_acc hides from the guest);
* a mailbox (one 16-byte write at QM_MB_CMD_SEND_BASE, busy bit 13) for the commands the
  driver uses: SQC_BT/CQC_BT (queue-context table bases), SQC_VFT_V2 (this VF's queue range),
  PAUSE_QM;
* doorbells (SQ/CQ at 0x1000, EQ/AEQ at 0x2000) that move queue positions;
* the queue contexts (struct qm_sqc / qm_cqc, 32 bytes each). As on the real chip they live in
  host memory at the SQC/CQC table bases and are cached on chip; QM_CACHE_WB_START writes the
  cache back through the IOMMU. So SQ/CQ positions migrate through guest RAM, and the 176-byte
  acc_vf_data blob carries only the registers and the table bases.
* the PF side the driver consults (HisiQmPf): the VF function table (VFT: each VF's queue base
  and count), the PF isolation config, RAS and engine interrupt status.

The engine that consumes SQEs and posts CQEs arrives with the migration-engine issue: it plugs
in at HisiQmVf.engine_step(), the one place SQ heads and CQ tails advance.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

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

QM_Q_DEPTH = 1024
XQC_SIZE = 32  # sizeof(struct qm_sqc) == sizeof(struct qm_cqc)


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


assert ctypes.sizeof(qm_sqc) == XQC_SIZE and ctypes.sizeof(qm_cqc) == XQC_SIZE


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
        self.flr()

    def flr(self) -> None:
        """Function-level reset: registers to reset values, cache dropped (not written back)."""
        self.regs = _vf_reset_regs(self.pf)
        self._mb_stuck = False
        self.sqc_bt = 0
        self.cqc_bt = 0
        self.cache: dict[int, QpContext] = {}
        self.paused = False

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
        # EQC/AEQC dword 0 is {u16 head; u16 tail} (struct qm_eqc).
        self.regs[dw0_off] = (self.regs.get(dw0_off, 0) & 0xFFFF0000) | index

    def engine_step(self) -> int:
        """Process queued SQEs: the job engine comes with the migration-engine issue.

        It will consume SQEs between sqc.head and sqc.tail of every unpaused queue, post CQEs
        (advancing cqc.tail) and events; it must do nothing while `paused`. Returns the number
        of jobs done (none yet).
        """
        return 0

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


def _write_xqc(vf: HisiQmVf, dw0: int, base: int) -> None:
    """EQC/AEQC with head = tail = 0 at `base` (qm_eq_ctx_cfg / qm_aeq_ctx_cfg).

    The driver hands the context over by mailbox from a DMA buffer; the model writes the
    resulting context registers directly, which is the state that mailbox leaves behind.
    """
    dwords = [0, base & 0xFFFFFFFF, base >> 32, QM_Q_DEPTH - 1, 0, 0, 0]
    for i, value in enumerate(dwords):
        vf.regs[dw0 + 4 * i] = value


def guest_qm_start(
    vf: HisiQmVf, *, eqe_dma: int, aeqe_dma: int, sqc_dma: int, cqc_dma: int
) -> None:
    """What a guest's hisi_qm_start() leaves in the VF: bases, unmasked events, VF READY."""
    vf.writel(0, QM_PAGE_SIZE)  # qm_init_prefetch: 4 KiB pages
    _write_xqc(vf, QM_EQC_DW0, eqe_dma)
    _write_xqc(vf, QM_AEQC_DW0, aeqe_dma)
    for cmd, base in ((QM_MB_CMD_SQC_BT, sqc_dma), (QM_MB_CMD_CQC_BT, cqc_dma)):
        vf.mb_write(mb_pack(cmd, base, 0, False))
    vf.writel(1, QM_IFC_INT_SOURCE_V)  # qm_dev_cmd_init
    vf.writel(0, QM_IFC_INT_MASK)
    vf.writel(0, QM_VF_EQ_INT_MASK)  # qm_enable_eq_aeq_interrupts
    vf.writel(0, QM_VF_AEQ_INT_MASK)
    vf.writel(QM_READY, QM_VF_STATE)  # hisi_qm_set_state(qm, QM_READY)


def guest_qp_start(vf: HisiQmVf, qp: int, *, sqe_dma: int, cqe_dma: int) -> None:
    """hisi_qm_start_qp: fresh SQ/CQ contexts (INIT_QC_COMMON), head = tail = 0."""
    sqc = qm_sqc(base_l=sqe_dma & 0xFFFFFFFF, base_h=sqe_dma >> 32, cq_num=qp, dw3=QM_Q_DEPTH - 1)
    cqc = qm_cqc(base_l=cqe_dma & 0xFFFFFFFF, base_h=cqe_dma >> 32, dw3=QM_Q_DEPTH - 1)
    vf.cache[qp] = QpContext(sqc, cqc)


def guest_sq_submit(vf: HisiQmVf, qp: int, n: int = 1) -> int:
    """hisi_qp_send n times: advance the SQ tail and ring the SQ doorbell; returns the tail.

    The guest keeps its own sq_tail in guest RAM; the model reads the context's tail instead,
    which holds the same value.
    """
    ctx = vf.qp_context(qp)
    if ctx is None:
        raise ValueError(f"queue {qp} was never started")
    tail = (ctx.sqc.tail + n) % QM_Q_DEPTH
    vf.writeq(
        qp | QM_DOORBELL_CMD_SQ << QM_DB_CMD_SHIFT_V2 | tail << QM_DB_INDEX_SHIFT_V2,
        QM_DOORBELL_SQ_CQ_BASE_V2,
    )
    return tail


def guest_eq_consume(vf: HisiQmVf, n: int = 1, *, aeq: bool = False) -> int:
    """The guest's EQ/AEQ handler: advance the head and ring the EQ/AEQ doorbell."""
    dw0 = QM_AEQC_DW0 if aeq else QM_EQC_DW0
    head = ((vf.readl(dw0) & 0xFFFF) + n) & 0xFFFF
    cmd = QM_DOORBELL_CMD_AEQ if aeq else QM_DOORBELL_CMD_EQ
    vf.writeq(cmd << QM_DB_CMD_SHIFT_V2 | head << QM_DB_INDEX_SHIFT_V2, QM_DOORBELL_EQ_AEQ_BASE_V2)
    return head
