"""The `hisi_acc` device: drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.[ch] (Linux 7.2).

A vfio-pci variant driver for HiSilicon SEC/HPRE/ZIP accelerator VFs; the hardware is
vfiomig.hw.hisi_qm. The functions below carry the kernel's names and follow its code paths
step by step, talking to the QM through the same registers and mailbox commands:

* flags STOP_COPY | PRE_COPY (5), no P2P, no DMA logging ops (DMA_LOGGING_* ENOTTY);
* the device state is the 176-byte struct acc_vf_data; its first QM_MATCH_SIZE = 40 bytes
  (magic, version, VF queue range, device id, isolation config) are the only precopy data;
* PRE_COPY -> STOP_COPY pauses the QM and saves the rest into the same blob (176 bytes, or
  still 40 when the guest never made the VF ready); STOP -> STOP_COPY does it all at once;
* resume checks the match data once 40 bytes arrived (write answers EFAULT, bytes still
  counted, success latched in match_done until the next open); RESUMING -> STOP loads it;
* VFIO_DEVICE_RESET: an FLR, then (7.0+) hisi_acc_vf_pci_aer_reset_done resets the FSM.
* the vfio-pci device ioctls and region access of kernel/vfio_pci_core.py over the VF's
  function (`hisi_acc_vf_function`), with BAR2's migration half hidden from region info,
  read, write and mmap (not from IOEVENTFD, as in the kernel).

Where the source was read: hisi_acc_vfio_pci.c as of the V2-magic / match_done-on-open
versions (vf_qm_version_check, vf_qm_check_match without the VF_STATE write, vf_qm_load_data
with the NULL-DMA check, vf_qm_xeqc_save) plus the 7.0 reset_done fix.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from errno import EBUSY, EFAULT, EINVAL, ETIMEDOUT
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vfiomig.hw import hisi_qm as q
from vfiomig.hw.hisi_qm import QM_NOT_READY, QM_READY, HisiQmPf, HisiQmVf
from vfiomig.hw.memory import PAGE_SHIFT
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.machine import DRIVERS
from vfiomig.kernel.vfio_device_fops import VfioInfoCap
from vfiomig.kernel.vfio_fsm import PRE_COPY, RESUMING, RUNNING, STOP, STOP_COPY, state_name
from vfiomig.kernel.vfio_migration import ResumingFile, SavingFile
from vfiomig.kernel.vfio_pci_core import (
    VFIO_PCI_INDEX_TO_OFFSET,
    VFIO_PCI_OFFSET_MASK,
    VFIO_PCI_OFFSET_SHIFT,
    PciBar,
    PciFunction,
    VfioPciCoreDevice,
)
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory, Region
    from vfiomig.kernel.machine import ModelKernel

ACC_DEV_MAGIC_V1 = 0xCDCDCDCDFEEDAACC
ACC_DEV_MAGIC_V2 = 0xAACCFEEDDECADEDE
ACC_DRV_MAJOR_VER = 1
ACC_DRV_MINOR_VER = 0
QM_XQC_ADDR_OFFSET = 32
QM_XQC_ADDR_LOW = 1
QM_XQC_ADDR_HIGH = 2
QM_REGS_MAX_LEN = 7
QM_REG_ADDR_OFFSET = 4


class acc_vf_data(ctypes.LittleEndianStructure):
    """struct acc_vf_data (hisi_acc_vfio_pci.h): the whole migrated device state."""

    _fields_ = [
        # QM match information
        ("acc_magic", ctypes.c_uint64),
        ("qp_num", ctypes.c_uint32),
        ("dev_id", ctypes.c_uint32),
        ("que_iso_cfg", ctypes.c_uint32),
        ("qp_base", ctypes.c_uint32),
        ("vf_qm_state", ctypes.c_uint32),
        # QM reserved match information
        ("major_ver", ctypes.c_uint16),
        ("minor_ver", ctypes.c_uint16),
        ("qm_rsv_state", ctypes.c_uint32 * 2),
        # QM RW regs
        ("aeq_int_mask", ctypes.c_uint32),
        ("eq_int_mask", ctypes.c_uint32),
        ("ifc_int_source", ctypes.c_uint32),
        ("ifc_int_mask", ctypes.c_uint32),
        ("ifc_int_set", ctypes.c_uint32),
        ("page_size", ctypes.c_uint32),
        ("qm_eqc_dw", ctypes.c_uint32 * 7),
        ("qm_aeqc_dw", ctypes.c_uint32 * 7),
        ("qm_rsv_regs", ctypes.c_uint32 * 5),
        ("padding", ctypes.c_uint32),
        # QM memory init information
        ("eqe_dma", ctypes.c_uint64),
        ("aeqe_dma", ctypes.c_uint64),
        ("sqc_dma", ctypes.c_uint64),
        ("cqc_dma", ctypes.c_uint64),
    ]


ACC_VF_DATA_SIZE = ctypes.sizeof(acc_vf_data)
# offsetofend(struct acc_vf_data, qm_rsv_state)
QM_MATCH_SIZE = acc_vf_data.qm_rsv_state.offset + acc_vf_data.qm_rsv_state.size
assert ACC_VF_DATA_SIZE == 176 and QM_MATCH_SIZE == 40


@dataclass
class VfQm:
    """The fields of the driver's struct hisi_qm vf_qm that the migration code uses."""

    qp_base: int = 0
    qp_num: int = 0
    eqe_dma: int = 0
    aeqe_dma: int = 0
    sqc_dma: int = 0
    cqc_dma: int = 0


# -- register and mailbox access (hisi_acc_vfio_pci.c, qm.c) ------------------------------


def qm_read_regs(qm: HisiQmVf | HisiQmPf, reg: int, nums: int) -> list[int]:
    if not 1 <= nums <= QM_REGS_MAX_LEN:
        raise err(EINVAL)
    return [qm.readl(reg + i * QM_REG_ADDR_OFFSET) for i in range(nums)]


def qm_write_regs(qm: HisiQmVf, reg: int, data: list[int]) -> None:
    if not 1 <= len(data) <= QM_REGS_MAX_LEN:
        raise err(EINVAL)
    for i, val in enumerate(data):
        qm.writel(val, reg + i * QM_REG_ADDR_OFFSET)


def hisi_qm_wait_mb_ready(qm: HisiQmVf) -> None:
    """readl_relaxed_poll_timeout on the busy bit: -ETIMEDOUT when it never clears."""
    if qm.mb_busy():
        raise err(ETIMEDOUT)


def hisi_qm_mb(qm: HisiQmVf, cmd: int, dma_addr: int, queue: int, op: bool) -> None:
    """qm_mb_nolock: busy before or after the 128-bit write is -EBUSY."""
    if qm.mb_busy():
        raise err(EBUSY)
    qm.mb_write(q.mb_pack(cmd, dma_addr, queue, op))
    if qm.mb_busy():
        raise err(EBUSY)


def _mb_read64(qm: HisiQmVf, cmd: int) -> int:
    hisi_qm_mb(qm, cmd, 0, 0, True)
    return qm.readl(q.QM_MB_CMD_DATA_ADDR_L) | qm.readl(q.QM_MB_CMD_DATA_ADDR_H) << 32


def _vft_decode(sqc_vft: int) -> tuple[int, int]:
    """(qp_num, qp_base) from an SQC VFT entry (qm_get_vft / pf_qm_get_qp_num)."""
    base = q.QM_SQC_VFT_BASE_MASK_V2 & (sqc_vft >> q.QM_SQC_VFT_START_SQN_SHIFT)
    return (q.QM_SQC_VFT_NUM_MASK_V2 & (sqc_vft >> q.QM_SQC_VFT_SQN_SHIFT)) + 1, base


def qm_get_vft(qm: HisiQmVf) -> tuple[int, int]:
    return _vft_decode(_mb_read64(qm, q.QM_MB_CMD_SQC_VFT_V2))


def pf_qm_get_qp_num(pf: HisiQmPf, vf_id: int) -> tuple[int, int]:
    """Read a VF's VFT entry through the PF's VFT_CFG registers."""
    if not pf.readl(q.QM_VFT_CFG_RDY) & 1:
        raise err(ETIMEDOUT)
    pf.writel(1, q.QM_VFT_CFG_OP_WR)
    pf.writel(0, q.QM_VFT_CFG_TYPE)  # 0: SQC VFT
    pf.writel(vf_id, q.QM_VFT_CFG)
    pf.writel(0, q.QM_VFT_CFG_RDY)
    pf.writel(1, q.QM_VFT_CFG_OP_ENABLE)
    if not pf.readl(q.QM_VFT_CFG_RDY) & 1:
        raise err(ETIMEDOUT)
    return _vft_decode(pf.readl(q.QM_VFT_CFG_DATA_L) | pf.readl(q.QM_VFT_CFG_DATA_H) << 32)


# (acc_vf_data field, register) in the order qm_get_regs reads them
_RW_REGS = (
    ("aeq_int_mask", q.QM_VF_AEQ_INT_MASK),
    ("eq_int_mask", q.QM_VF_EQ_INT_MASK),
    ("ifc_int_source", q.QM_IFC_INT_SOURCE_V),
    ("ifc_int_mask", q.QM_IFC_INT_MASK),
    ("ifc_int_set", q.QM_IFC_INT_SET_V),
    ("page_size", q.QM_PAGE_SIZE),
)


def qm_get_regs(qm: HisiQmVf, d: acc_vf_data) -> None:
    for name, reg in _RW_REGS:
        setattr(d, name, qm_read_regs(qm, reg, 1)[0])
    d.qm_eqc_dw[:] = qm_read_regs(qm, q.QM_EQC_DW0, 7)
    d.qm_aeqc_dw[:] = qm_read_regs(qm, q.QM_AEQC_DW0, 7)


def qm_set_regs(qm: HisiQmVf, d: acc_vf_data) -> None:
    hisi_qm_wait_mb_ready(qm)  # "QM device is not ready to write"
    for name, reg in _RW_REGS[:5]:
        qm_write_regs(qm, reg, [getattr(d, name)])
    qm_write_regs(qm, q.QM_QUE_ISO_CFG_V, [d.que_iso_cfg])
    qm_write_regs(qm, q.QM_PAGE_SIZE, [d.page_size])
    qm_write_regs(qm, q.QM_EQC_DW0, list(d.qm_eqc_dw))
    qm_write_regs(qm, q.QM_AEQC_DW0, list(d.qm_aeqc_dw))


def qm_db(qm: HisiQmVf, qn: int, cmd: int, index: int, priority: int) -> None:
    """qm_db(struct hisi_qm *qm, u16 qn, u8 cmd, u16 index, u8 priority): the arguments
    arrive truncated to their C types."""
    qn, cmd, index, priority = qn & 0xFFFF, cmd & 0xFF, index & 0xFFFF, priority & 0xFF
    dbase = (
        q.QM_DOORBELL_SQ_CQ_BASE_V2
        if cmd in (q.QM_DOORBELL_CMD_SQ, q.QM_DOORBELL_CMD_CQ)
        else q.QM_DOORBELL_EQ_AEQ_BASE_V2
    )
    doorbell = (
        qn
        | cmd << q.QM_DB_CMD_SHIFT_V2
        | index << q.QM_DB_INDEX_SHIFT_V2
        | priority << q.QM_DB_PRIORITY_SHIFT_V2
    )
    qm.writeq(doorbell, dbase)


def qm_dev_cmd_init(qm: HisiQmVf) -> None:
    qm.writel(1, q.QM_IFC_INT_SOURCE_V)  # clear VF communication status
    qm.writel(0, q.QM_IFC_INT_MASK)  # enable PF <-> VF communication


def vf_qm_cache_wb(qm: HisiQmVf) -> None:
    qm.writel(1, q.QM_CACHE_WB_START)
    if not qm.readl(q.QM_CACHE_WB_DONE) & 1:
        raise err(ETIMEDOUT)  # "vf QM writeback sqc cache fail"


QM_DB_QN_WRAP = 1 << 16  # qm_db's qn is a u16


def vf_qm_fun_reset(dev: HisiAccDevice, qm: HisiQmVf, vf_qm: VfQm) -> None:
    """for (i = 0; i < qm->qp_num; i++) qm_db(qm, i, QM_DOORBELL_CMD_SQ, 0, 1).

    qp_num comes from a resumed stream as it is (vf_qm_load_data), up to 2**32 - 1. The
    u16 qn makes the doorbell values repeat every 65536 iterations, and writing the same
    doorbell again changes nothing, so the model rings each distinct one once: the same
    effect, in bounded time (the kernel's loop would run qp_num times)."""
    if vf_qm.qp_num > QM_DB_QN_WRAP:
        dev.warn(
            f"vf_qm_fun_reset: qp_num {vf_qm.qp_num} from the resumed stream: the driver"
            f" rings {vf_qm.qp_num} doorbells (the model rings the {QM_DB_QN_WRAP} distinct ones)"
        )
    for i in range(min(vf_qm.qp_num, QM_DB_QN_WRAP)):
        qm_db(qm, i, q.QM_DOORBELL_CMD_SQ, 0, 1)


def _dma_from(dw: ctypes.Array[ctypes.c_uint32]) -> int:
    return int(dw[QM_XQC_ADDR_HIGH]) << QM_XQC_ADDR_OFFSET | int(dw[QM_XQC_ADDR_LOW])


# -- migration files (hisi_acc_vf_save_fops / hisi_acc_vf_resume_fops) -----------------------


class HisiAccSavingFile(SavingFile):
    """struct hisi_acc_vf_migration_file, saving side."""

    precopy_states = (PRE_COPY,)  # hisi_acc_vf_precopy_ioctl: mig_state != PRE_COPY: EINVAL

    def __init__(self, dev: HisiAccDevice) -> None:
        super().__init__(dev)
        self.vf_data = acc_vf_data()
        self.total_length = 0

    def produce(self, n: int) -> bytes:
        """hisi_acc_vf_save_read: reads stop at total_length (0 bytes, not ENOMSG)."""
        if self.pos > self.total_length:
            raise err(EINVAL)
        n = min(self.total_length - self.pos, n)
        return bytes(self.vf_data)[self.pos : self.pos + n]

    def precopy_info(self, info: v.vfio_precopy_info) -> None:
        if self.pos > self.total_length:
            raise err(EINVAL)
        info.dirty_bytes = 0
        info.initial_bytes = self.total_length - self.pos

    def disable(self) -> None:
        """hisi_acc_vf_disable_fd: total_length and f_pos back to 0."""
        super().disable()
        self.total_length = 0
        self.pos = 0


class HisiAccResumingFile(ResumingFile):
    max_size = ACC_VF_DATA_SIZE

    def __init__(self, dev: HisiAccDevice) -> None:
        super().__init__(dev)
        self.dev = dev
        self.buf = bytearray(ACC_VF_DATA_SIZE)
        self.vf_data = acc_vf_data.from_buffer(self.buf)
        self.total_length = 0

    def consume(self, data: bytes) -> int:
        """hisi_acc_vf_resume_write after its size checks (ResumingFile.write)."""
        self.buf[self.pos : self.pos + len(data)] = data
        self.total_length += len(data)
        try:
            vf_qm_check_match(self.dev, self)
        except OSError:
            self.pos += len(data)  # stored and counted; only the return value is EFAULT
            raise err(EFAULT) from None
        return len(data)

    def disable(self) -> None:
        super().disable()
        self.total_length = 0
        self.pos = 0


# -- match data, save and load (hisi_acc_vfio_pci.c) --------------------------------------------


def vf_qm_version_check(d: acc_vf_data) -> None:
    if d.acc_magic == ACC_DEV_MAGIC_V2:
        if d.major_ver != ACC_DRV_MAJOR_VER:
            raise err(EINVAL)
    elif d.acc_magic == ACC_DEV_MAGIC_V1:
        # Streams from old kernels took the DMA addresses from the wrong EQC/AEQC dwords.
        d.eqe_dma = _dma_from(d.qm_eqc_dw)
        d.aeqe_dma = _dma_from(d.qm_aeqc_dw)
    else:
        raise err(EINVAL)


def vf_qm_check_match(dev: HisiAccDevice, migf: HisiAccResumingFile) -> None:
    """Runs on every write once 40 bytes are in, until it succeeds once per open."""
    d = migf.vf_data
    if migf.total_length < QM_MATCH_SIZE or dev.match_done:
        return
    vf_qm_version_check(d)
    if d.dev_id != dev.qm.dev_id:
        raise err(EINVAL)  # "failed to match VF devices"
    qp_num, dev.vf_qm.qp_base = qm_get_vft(dev.qm)
    if qp_num != d.qp_num:
        raise err(EINVAL)  # "failed to match VF qp num"
    dev.vf_qm.qp_num = qp_num
    if d.que_iso_cfg != qm_read_regs(dev.pf, q.QM_QUE_ISO_CFG_V, 1)[0]:
        raise err(EINVAL)  # "failed to match isolation state"
    dev.match_done = True


def vf_qm_get_match_data(dev: HisiAccDevice, d: acc_vf_data) -> None:
    d.acc_magic = ACC_DEV_MAGIC_V2
    d.major_ver = ACC_DRV_MAJOR_VER
    d.minor_ver = ACC_DRV_MINOR_VER
    d.dev_id = dev.qm.dev_id
    qp_num, d.qp_base = pf_qm_get_qp_num(dev.pf, dev.vf_id)
    d.qp_num = qp_num
    d.que_iso_cfg = qm_read_regs(dev.pf, q.QM_QUE_ISO_CFG_V, 1)[0]


def vf_qm_read_data(qm: HisiQmVf, d: acc_vf_data) -> None:
    qm_get_regs(qm, d)
    d.eqe_dma = _dma_from(d.qm_eqc_dw)
    d.aeqe_dma = _dma_from(d.qm_aeqc_dw)
    d.sqc_dma = _mb_read64(qm, q.QM_MB_CMD_SQC_BT)  # qm_get_sqc
    d.cqc_dma = _mb_read64(qm, q.QM_MB_CMD_CQC_BT)  # qm_get_cqc


def vf_qm_state_save(dev: HisiAccDevice, migf: HisiAccSavingFile) -> None:
    d = migf.vf_data
    if dev.qm.readl(q.QM_VF_STATE) & 1:  # qm_wait_dev_not_ready times out: guest not ready
        d.vf_qm_state = dev.vf_qm_state = QM_NOT_READY
        migf.total_length = QM_MATCH_SIZE
        return
    d.vf_qm_state = dev.vf_qm_state = QM_READY
    vf_qm_read_data(dev.qm, d)
    migf.total_length = ACC_VF_DATA_SIZE
    # vf_qm_xeqc_save: re-ring EQ/AEQ at their heads so pending events are re-signalled
    qm_db(dev.qm, 0, q.QM_DOORBELL_CMD_EQ, d.qm_eqc_dw[0] & 0xFFFF, 0)
    qm_db(dev.qm, 0, q.QM_DOORBELL_CMD_AEQ, d.qm_aeqc_dw[0] & 0xFFFF, 0)


def vf_qm_load_data(dev: HisiAccDevice, migf: HisiAccResumingFile) -> None:
    d, qm, vf_qm = migf.vf_data, dev.qm, dev.vf_qm
    if migf.total_length == QM_MATCH_SIZE:
        return  # only match data was transferred
    if migf.total_length < ACC_VF_DATA_SIZE:
        raise err(EINVAL)
    if not (d.eqe_dma and d.aeqe_dma and d.sqc_dma and d.cqc_dma):
        dev.vf_qm_state = QM_NOT_READY  # "resume dma addr is NULL!"
        return
    qm_write_regs(qm, q.QM_VF_STATE, [d.vf_qm_state])
    dev.vf_qm_state = d.vf_qm_state
    vf_qm.eqe_dma, vf_qm.aeqe_dma = d.eqe_dma, d.aeqe_dma
    vf_qm.sqc_dma, vf_qm.cqc_dma = d.sqc_dma, d.cqc_dma
    vf_qm.qp_base, vf_qm.qp_num = d.qp_base, d.qp_num
    qm_set_regs(qm, d)
    hisi_qm_mb(qm, q.QM_MB_CMD_SQC_BT, vf_qm.sqc_dma, 0, False)
    hisi_qm_mb(qm, q.QM_MB_CMD_CQC_BT, vf_qm.cqc_dma, 0, False)
    qm_dev_cmd_init(qm)


def hisi_acc_check_int_state(dev: HisiAccDevice) -> None:
    """The PF's RAS state, PF<->VF communication and the engine must all be quiet."""
    if dev.pf.readl(q.QM_ABNORMAL_INT_STATUS):
        raise err(EBUSY)
    if dev.qm.readl(q.QM_IFC_INT_STATUS) or dev.qm.readl(q.QM_IFC_INT_SET_V):
        raise err(EBUSY)
    status = q.ENGINE_INT_STATUS.get(dev.qm.dev_id)
    if status is None:
        raise err(EINVAL)  # "failed to detect acc module type"
    if dev.pf.readl(status):
        raise err(EBUSY)


def hisi_acc_vf_stop_device(dev: HisiAccDevice) -> None:
    hisi_qm_mb(dev.qm, q.QM_MB_CMD_PAUSE_QM, 0, 0, False)  # vf_qm_func_stop
    hisi_acc_check_int_state(dev)
    vf_qm_cache_wb(dev.qm)


def hisi_acc_vf_start_device(dev: HisiAccDevice) -> None:
    if dev.vf_qm_state != QM_READY:
        return
    qm_dev_cmd_init(dev.qm)
    vf_qm_fun_reset(dev, dev.qm, dev.vf_qm)


# -- the vfio_device (hisi_acc_vfio_pci_migrn_ops) ------------------------------------------------


# The VF's PCI function (modelled on a Kunpeng 920 accelerator VF): an integrated endpoint
# on the PF's root bus, so neither a slot nor a bus reset exists (hot reset: ENODEV); BAR2 is
# 64 KiB of QM registers whose upper half (EQC/AEQC, migration control) hisi_acc hides;
# MSI with 4 vectors (the QM's event, async-event and mailbox interrupts); no MSI-X; a VF
# has no INTx.
HISI_BAR2_SIZE = 0x10000
_CLASS = {  # crypto (SEC, HPRE): 0x10 encryption controller; ZIP: 0x12 accelerator
    q.PCI_DEVICE_ID_HUAWEI_SEC_VF: 0x108000,
    q.PCI_DEVICE_ID_HUAWEI_HPRE_VF: 0x108000,
    q.PCI_DEVICE_ID_HUAWEI_ZIP_VF: 0x120000,
}


def hisi_acc_vf_function(dev_id: int, vf_id: int) -> PciFunction:
    return PciFunction(
        vendor=0x19E5,  # PCI_VENDOR_ID_HUAWEI
        device=dev_id,
        class_code=_CLASS.get(dev_id, 0x120000),
        revision=0x21,
        bars=(
            PciBar(),
            PciBar(),
            PciBar(
                size=HISI_BAR2_SIZE,
                start=0x2000_0000_0000 + vf_id * HISI_BAR2_SIZE,
                mem64=True,
                prefetch=True,
                plain=False,  # QM registers (vfiomig.hw.hisi_qm)
            ),
            PciBar(),
            PciBar(),
            PciBar(),
        ),
        is_virtfn=True,
        pcie_type=0x9,  # PCI_EXP_TYPE_RC_END
        msi_vectors=4,
        reset_scope=None,
        bus=0x76,
        devfn=vf_id & 0xFF,
    )


class HisiAccDevice(VfioPciCoreDevice):
    kind = "hisi_acc"
    # Integrated endpoints cannot do P2P: STOP_COPY | PRE_COPY only.
    migration_flags = v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_PRE_COPY
    has_log_ops = False  # dirty pages come from the IOMMU (SMMUv3 HTTU)

    def __init__(
        self,
        kernel: ModelKernel,
        index: int,
        *,
        dev_id: int = q.PCI_DEVICE_ID_HUAWEI_SEC_VF,
        vf_id: int = 1,
        qp_num: int = 2,
        qp_base: int | None = None,
        que_iso_cfg: int = 0,
        pf_driver: bool = True,
        iommu_dirty: bool = True,
    ) -> None:
        if vf_id < 1:  # hisi_acc_vdev->vf_id = pci_iov_vf_id(pdev) + 1
            raise ValueError(f"vf_id must be >= 1, got {vf_id!r}")
        super().__init__(
            kernel, index, iommu_dirty=iommu_dirty, pci=hisi_acc_vf_function(dev_id, vf_id)
        )
        self.pf = HisiQmPf(que_iso_cfg)
        self.pf.set_vft(vf_id, (vf_id - 1) * qp_num if qp_base is None else qp_base, qp_num)
        self.qm = HisiQmVf(kernel.mm, f"hisi_acc{index}", self.pf, vf_id, dev_id)
        self.hw = self.qm
        self.vf_id = vf_id
        self.vf_qm = VfQm()
        self.vf_qm_state = QM_NOT_READY  # hisi_acc_vfio_pci_migrn_init_dev
        self.match_done = False
        if not pf_driver:
            # Without the PF's QM driver probe falls back to plain vfio-pci ops: no mig_ops,
            # and the core's region info / read / write / mmap (all of BAR2 visible).
            self.migration_flags = 0
        self.hide_mig_region = pf_driver  # hisi_acc_vfio_pci_migrn_ops

    # -- BAR2: the migration half hidden (hisi_acc_vfio_ioctl_get_region, hisi_acc_vfio_pci_
    # read / _write / _mmap); the other vfio-pci ops are the core's. IOEVENTFD is not
    # overridden: vfio_pci_ioeventfd checks against the whole BAR, so an ioeventfd can
    # still write the hidden half, as in the kernel.

    def get_region_info_caps(self, info: v.vfio_region_info, caps: VfioInfoCap) -> None:
        """hisi_acc_vfio_ioctl_get_region: BAR2 reports its functional half."""
        if not self.hide_mig_region or info.index != v.VFIO_PCI_BAR2_REGION_INDEX:
            super().get_region_info_caps(info, caps)
            return
        info.offset = VFIO_PCI_INDEX_TO_OFFSET(info.index)
        info.size = self.pci.bars[2].size // 2
        info.flags = (
            v.VFIO_REGION_INFO_FLAG_READ
            | v.VFIO_REGION_INFO_FLAG_WRITE
            | v.VFIO_REGION_INFO_FLAG_MMAP
        )

    def _rw_access_check(self, count: int, pos: int) -> int:
        """hisi_acc_pci_rw_access_check: BAR2 accesses stop at its functional half."""
        if self.hide_mig_region and pos >> VFIO_PCI_OFFSET_SHIFT == v.VFIO_PCI_BAR2_REGION_INDEX:
            off = pos & VFIO_PCI_OFFSET_MASK
            end = self.pci.bars[2].size // 2
            if off >= end:  # the migration control region
                raise err(EINVAL)
            return min(count, end - off)
        return count

    def ops_read(self, n: int, pos: int) -> bytes:
        return super().ops_read(self._rw_access_check(n, pos), pos)

    def ops_write(self, data: bytes, pos: int) -> int:
        return super().ops_write(data[: self._rw_access_check(len(data), pos)], pos)

    def ops_mmap(self, mm: Memory, size: int, pgoff: int) -> Region:
        """hisi_acc_vfio_pci_mmap."""
        index = pgoff >> (VFIO_PCI_OFFSET_SHIFT - PAGE_SHIFT)
        if self.hide_mig_region and index == v.VFIO_PCI_BAR2_REGION_INDEX:
            req_start = (pgoff & ((1 << (VFIO_PCI_OFFSET_SHIFT - PAGE_SHIFT)) - 1)) << PAGE_SHIFT
            if req_start + size > self.pci.bars[2].size // 2:
                raise err(EINVAL)
        return super().ops_mmap(mm, size, pgoff)

    def mmio_read(self, bar: int, off: int, size: int) -> int:
        """BAR2 is the QM's register file: dword reads (readl); a qword is two dwords, and
        narrower reads take their bytes from the dword."""
        if bar != 2:
            return super().mmio_read(bar, off, size)
        if size == 8:
            return self.qm.readl(off) | self.qm.readl(off + 4) << 32
        word = self.qm.readl(off & ~3) >> 8 * (off & 3)
        return int(word & ((1 << 8 * size) - 1))

    def mmio_write(self, bar: int, off: int, size: int, val: int) -> None:
        """writel for dwords; a qword at a doorbell is the QM's 64-bit doorbell write
        (writeq), elsewhere two dwords; narrower writes merge into the dword. The QM mailbox
        needs a 128-bit write, which no region write makes: its dwords are just stored."""
        if bar != 2:
            super().mmio_write(bar, off, size, val)
            return
        if size == 8:
            if off in (q.QM_DOORBELL_SQ_CQ_BASE_V2, q.QM_DOORBELL_EQ_AEQ_BASE_V2):
                self.qm.writeq(val, off)
            else:
                self.qm.writel(val & 0xFFFFFFFF, off)
                self.qm.writel(val >> 32, off + 4)
            return
        if size == 4:
            self.qm.writel(val, off)
            return
        shift = 8 * (off & 3)
        mask = ((1 << 8 * size) - 1) << shift
        word = self.qm.readl(off & ~3)
        self.qm.writel((word & ~mask) | (val << shift & mask), off & ~3)

    def mmio_backing(self, bar: int) -> npt.NDArray[np.uint8] | None:
        return None  # registers: an mmap is address space only

    def open_device(self) -> None:
        """hisi_acc_vfio_pci_open_device: RUNNING, and a fresh match check per open."""
        super().open_device()
        self.match_done = False

    def step(self, cur: int, new: int) -> File | None:
        """hisi_acc_vf_set_device_state: one arc."""
        arc = (cur, new)
        handler = _ARCS.get(arc)
        if handler is None:
            self.warn(f"hisi_acc_vf_set_device_state: arc {state_name(cur)} -> {state_name(new)}")
            raise err(EINVAL)
        return handler(self)

    def _open_saving(self) -> HisiAccSavingFile:
        """hisi_acc_open_saving_migf: a new file with the match data filled in."""
        migf = HisiAccSavingFile(self)
        vf_qm_get_match_data(self, migf.vf_data)
        return migf

    def _running_to_pre_copy(self) -> File | None:
        migf = self._open_saving()
        migf.total_length = QM_MATCH_SIZE
        self.saving_file = migf
        return migf

    def _pre_copy_to_stop_copy(self) -> File | None:
        hisi_acc_vf_stop_device(self)
        migf = self.saving_file
        assert isinstance(migf, HisiAccSavingFile)
        vf_qm_state_save(self, migf)
        return None

    def _running_to_stop(self) -> File | None:
        hisi_acc_vf_stop_device(self)
        return None

    def _stop_to_stop_copy(self) -> File | None:
        migf = self._open_saving()
        vf_qm_state_save(self, migf)
        self.saving_file = migf
        return migf

    def _end_session(self) -> File | None:  # STOP_COPY -> STOP, PRE_COPY -> RUNNING
        self.disable_fds()
        return None

    def _stop_to_resuming(self) -> File | None:
        self.resuming_file = HisiAccResumingFile(self)
        return self.resuming_file

    def _resuming_to_stop(self) -> File | None:
        migf = self.resuming_file
        assert isinstance(migf, HisiAccResumingFile)
        vf_qm_load_data(self, migf)  # EINVAL etc.: the SET fails, the state stays RESUMING
        self.disable_fds()
        return None

    def _stop_to_running(self) -> File | None:
        hisi_acc_vf_start_device(self)
        return None

    def get_data_size(self) -> int:
        return ACC_VF_DATA_SIZE  # hisi_acc_vfio_pci_get_data_size: always sizeof(acc_vf_data)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: the VF's FLR, then hisi_acc_vf_pci_aer_reset_done (7.0+:
        any device with mig_ops goes back to RUNNING with the VF NOT_READY)."""
        self.qm.flr()
        if self.migration_flags:  # hisi_acc_vf_reset: the core's RUNNING + disable_fds
            self.vf_qm_state = QM_NOT_READY
        super().reset()


_ARCS = {
    (RUNNING, PRE_COPY): HisiAccDevice._running_to_pre_copy,
    (PRE_COPY, STOP_COPY): HisiAccDevice._pre_copy_to_stop_copy,
    (RUNNING, STOP): HisiAccDevice._running_to_stop,
    (STOP, STOP_COPY): HisiAccDevice._stop_to_stop_copy,
    (STOP_COPY, STOP): HisiAccDevice._end_session,
    (STOP, RESUMING): HisiAccDevice._stop_to_resuming,
    (RESUMING, STOP): HisiAccDevice._resuming_to_stop,
    (PRE_COPY, RUNNING): HisiAccDevice._end_session,
    (STOP, RUNNING): HisiAccDevice._stop_to_running,
}

DRIVERS["hisi_acc"] = HisiAccDevice
