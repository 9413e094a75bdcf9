"""The hisi_acc driver (drivers/vfio/pci/hisilicon) over the modelled accelerator VF.

Everything goes through the device cdev of a ModelKernel (bind, VFIO_DEVICE_FEATURE, data fd
read/write). Python calls are used only to set up the VF the way a guest driver would
(vfiomig.hw.hisi_qm.guest_*), to inject faults and to inspect the hardware.
"""

from __future__ import annotations

import errno
import signal
import struct
from collections.abc import Callable
from typing import Any

import pytest
from conftest import GET, PROBE, SET, Dev, errno_of, ioas_map, precopy, resuming

from vfiomig.hw import hisi_qm as q
from vfiomig.hw.hisi_qm import HisiQmVf
from vfiomig.kernel import ModelKernel
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

MAGIC_V1 = 0xCDCDCDCDFEEDAACC
MAGIC_V2 = 0xAACCFEEDDECADEDE
# struct acc_vf_data, written out from the header independently of the driver's ctypes:
# match data (40) | 6 RW regs | eqc[7] | aeqc[7] | rsv[5] + padding | 4 DMA addresses
MATCH = struct.Struct("<QIIIIIHH2I")
BLOB = struct.Struct("<QIIIIIHH2I 6I 7I 7I 5I I 4Q")
assert MATCH.size == 40 and BLOB.size == 176

EQE, AEQE, SQC, CQC = 0x10000, 0x11000, 0x12000, 0x13000  # guest IOVAs the guest programs
READ = 33  # data fds are read in odd-sized pieces


# -- set-up ----------------------------------------------------------------------------------


def acc(k: ModelKernel, **opts: Any) -> Dev:
    """A bound hisi_acc device; `Dev.hw` is its VF (HisiQmVf), `Dev.vdev` the driver."""
    return Dev(k, "hisi_acc", **opts)


def started(k: ModelKernel, **opts: Any) -> Dev:
    """A VF whose guest driver ran hisi_qm_start and consumed a few events."""
    d = acc(k, **opts)
    q.guest_qm_start(d.hw, eqe_dma=EQE, aeqe_dma=AEQE, sqc_dma=SQC, cqc_dma=CQC)
    q.guest_eq_consume(d.hw, 5)
    q.guest_eq_consume(d.hw, 2, aeq=True)
    return d


@pytest.fixture
def k() -> ModelKernel:
    return ModelKernel()


def expected_match(
    dev_id: int = q.PCI_DEVICE_ID_HUAWEI_SEC_VF,
    qp_num: int = 2,
    iso: int = 0,
    qp_base: int = 0,
    vf_state: int = 0,
) -> bytes:
    return MATCH.pack(MAGIC_V2, qp_num, dev_id, iso, qp_base, vf_state, 1, 0, 0, 0)


def expected_blob(hw: HisiQmVf, **match: int) -> bytes:
    """The 176 bytes from the documented layout and the VF's registers."""
    r = hw.readl
    eqc = [r(q.QM_EQC_DW0 + 4 * i) for i in range(7)]
    aeqc = [r(q.QM_AEQC_DW0 + 4 * i) for i in range(7)]
    regs = [
        r(q.QM_VF_AEQ_INT_MASK),
        r(q.QM_VF_EQ_INT_MASK),
        r(q.QM_IFC_INT_SOURCE_V),
        r(q.QM_IFC_INT_MASK),
        r(q.QM_IFC_INT_SET_V),
        r(q.QM_PAGE_SIZE),
    ]
    dma = [eqc[2] << 32 | eqc[1], aeqc[2] << 32 | aeqc[1], hw.sqc_bt, hw.cqc_bt]
    head = MATCH.unpack(expected_match(**match))
    return BLOB.pack(*head, *regs, *eqc, *aeqc, *[0] * 6, *dma)


def save_stop_copy(d: Dev) -> bytes:
    assert d.set_state(STOP) == -1
    dfd = d.set_state(STOP_COPY)
    assert dfd >= 0
    return d.read_all(dfd, READ)


# -- capabilities --------------------------------------------------------------------------------


def test_capabilities(k: ModelKernel) -> None:
    d = acc(k)
    buf = d.feature(GET | v.VFIO_DEVICE_FEATURE_MIGRATION, 8)
    assert struct.unpack_from("<Q", buf, 8)[0] == 5  # STOP_COPY | PRE_COPY, no P2P
    for state in (RUNNING, PRE_COPY, RUNNING, STOP, STOP_COPY, STOP, RESUMING):
        d.set_state(state)
        buf = d.feature(GET | v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8)
        assert struct.unpack_from("<Q", buf, 8)[0] == 176  # always sizeof(acc_vf_data)


@pytest.mark.parametrize(
    "flags, payload",
    [
        (SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, bytes(24)),
        (SET | PROBE | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, b""),
        (SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, b""),
        (GET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, bytes(32)),
    ],
    ids=["start", "start-probe", "stop", "report"],
)
def test_no_dma_logging(k: ModelKernel, flags: int, payload: bytes) -> None:
    d = acc(k)
    assert errno_of(d.feature, flags, payload) == errno.ENOTTY


@pytest.mark.parametrize("state", [RUNNING_P2P, PRE_COPY_P2P])
def test_p2p_states_are_einval(k: ModelKernel, state: int) -> None:
    d = acc(k)
    assert errno_of(d.set_state, state) == errno.EINVAL
    assert d.get_state() == RUNNING


def test_without_pf_driver_there_is_no_migration(k: ModelKernel) -> None:
    d = acc(k, pf_driver=False)
    assert errno_of(d.feature, GET | v.VFIO_DEVICE_FEATURE_MIGRATION, 8) == errno.ENOTTY


# -- the saving stream ---------------------------------------------------------------------------


def test_precopy_sends_the_match_data_then_the_rest(k: ModelKernel) -> None:
    d = started(k, qp_num=4, qp_base=8, que_iso_cfg=1, dev_id=q.PCI_DEVICE_ID_HUAWEI_ZIP_VF)
    dfd = d.set_state(PRE_COPY)
    assert dfd >= 0
    assert precopy(d, dfd) == (0, 40, 0)
    first = k.read(dfd, 25)
    assert precopy(d, dfd) == (0, 15, 0)
    first += k.read(dfd, 1000)
    match = dict(dev_id=q.PCI_DEVICE_ID_HUAWEI_ZIP_VF, qp_num=4, iso=1, qp_base=8)
    assert first == expected_match(**match)  # vf_qm_state 0: the blob was zeroed
    assert k.read(dfd, 100) == b""  # 0 at the temporary end, not ENOMSG
    assert precopy(d, dfd) == (0, 0, 0)
    assert d.set_state(STOP_COPY) == -1  # same fd, the rest appended
    assert errno_of(precopy, d, dfd) == errno.EINVAL  # only in PRE_COPY
    rest = d.read_all(dfd, READ)
    assert first + rest == expected_blob(d.hw, **match)
    assert d.hw.paused


def test_precopy_of_a_vf_never_started_stays_at_40(k: ModelKernel) -> None:
    d = acc(k)
    dfd = d.set_state(PRE_COPY)
    assert d.set_state(STOP_COPY) == -1
    # vf_qm_state was rewritten to NOT_READY in the blob, but the total stays 40
    assert d.read_all(dfd, READ) == expected_match(vf_state=q.QM_NOT_READY)
    assert k.read(dfd, 1) == b""


def test_stop_copy_from_stop_has_everything(k: ModelKernel) -> None:
    d = started(k)
    blob = save_stop_copy(d)
    assert blob == expected_blob(d.hw)


def test_stop_copy_of_a_vf_never_started(k: ModelKernel) -> None:
    d = acc(k)
    assert save_stop_copy(d) == expected_match(vf_state=q.QM_NOT_READY)


def test_precopy_info_flags(k: ModelKernel) -> None:
    d = started(k)
    dfd = d.set_state(PRE_COPY)
    assert precopy(d, dfd, flags=0x77)[0] == 0x77  # v1 echo
    d.feature(SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)
    assert precopy(d, dfd, flags=0x77) == (0, 40, 0)
    short = bytearray(struct.pack("<IIQQ", 23, 0, 0, 0))
    assert errno_of(k.ioctl, dfd, v.VFIO_MIG_GET_PRECOPY_INFO, short) == errno.EINVAL
    assert errno_of(k.ioctl, dfd, v.VFIO_MIG_GET_PRECOPY_INFO, bytearray(8)) == errno.EFAULT
    assert errno_of(k.ioctl, dfd, v.VFIO_DEVICE_RESET, 0) == errno.ENOTTY


@pytest.mark.parametrize("end", ["pre_copy->running", "stop_copy->stop"])
def test_session_end_disables_the_fd(k: ModelKernel, end: str) -> None:
    d = started(k)
    if end == "pre_copy->running":
        dfd = d.set_state(PRE_COPY)
        d.set_state(RUNNING)
    else:
        d.set_state(STOP)
        dfd = d.set_state(STOP_COPY)
        d.set_state(STOP)
    assert errno_of(k.read, dfd, 1) == errno.ENODEV
    assert errno_of(k.write, dfd, b"x") == errno.EBADF


# -- stopping the QM ------------------------------------------------------------------------------


def _ras(d: Dev) -> None:
    d.hw.pf.inject_ras_error()


def _ifc(d: Dev) -> None:
    d.hw.regs[q.QM_IFC_INT_STATUS] = 1  # a PF -> VF message not yet handled


def _ifc_set(d: Dev) -> None:
    d.hw.regs[q.QM_IFC_INT_SET_V] = 1  # a VF -> PF message not yet taken


def _engine(d: Dev) -> None:
    d.hw.pf.inject_engine_interrupt(d.hw.dev_id)


def _mailbox(d: Dev) -> None:
    d.hw.mb_stuck = True


def _cache_wb(d: Dev) -> None:
    d.hw.wb_stuck = True


@pytest.mark.parametrize(
    "fault, expect",
    [
        (_ras, errno.EBUSY),
        (_ifc, errno.EBUSY),
        (_ifc_set, errno.EBUSY),
        (_engine, errno.EBUSY),
        (_mailbox, errno.EBUSY),
        (_cache_wb, errno.ETIMEDOUT),
    ],
    ids=["ras", "ifc-status", "ifc-set", "engine", "mailbox-busy", "cache-writeback"],
)
@pytest.mark.parametrize("path", ["running->stop", "pre_copy->stop_copy"])
def test_stop_fails_while_the_qm_is_busy(
    k: ModelKernel, fault: Callable[[Dev], None], expect: int, path: str
) -> None:
    d = started(k, dev_id=q.PCI_DEVICE_ID_HUAWEI_HPRE_VF)
    src = RUNNING if path == "running->stop" else PRE_COPY
    target = STOP if src == RUNNING else STOP_COPY
    if src == PRE_COPY:
        d.set_state(PRE_COPY)
    fault(d)
    assert errno_of(d.set_state, target) == expect
    assert d.get_state() == src  # the FSM stays at the last good state


def test_stop_then_running_restarts_the_queues(k: ModelKernel) -> None:
    d = started(k)
    d.set_state(STOP)
    assert d.hw.paused
    d.set_state(RUNNING)
    # hisi_acc_vf_start_device needs vf_qm_state READY, which only a save or a load sets;
    # even then vf_qm.qp_num is 0 on a device that never resumed a stream, so
    # vf_qm_fun_reset rings no doorbell: the QM stays paused until the guest's next submit.
    assert d.hw.paused
    d.set_state(STOP)
    d.set_state(STOP_COPY)  # vf_qm_state_save marks the VF READY
    d.set_state(STOP)
    d.set_state(RUNNING)
    assert d.vdev.vf_qm_state == q.QM_READY and d.hw.paused


# -- resuming ---------------------------------------------------------------------------------------


def migrate(src: Dev, dst: Dev, chunks: int = 176) -> None:
    blob = save_stop_copy(src)
    dfd = resuming(dst)
    for i in range(0, len(blob), chunks):
        assert dst.k.write(dfd, blob[i : i + chunks]) == len(blob[i : i + chunks])
    assert dst.set_state(STOP) == -1
    assert errno_of(dst.k.write, dfd, b"x") == errno.ENODEV


@pytest.mark.parametrize("chunks", [176, 40, 7])
def test_save_and_resume_on_a_second_device(k: ModelKernel, chunks: int) -> None:
    src = started(k, qp_num=4, que_iso_cfg=3)
    q.guest_eq_consume(src.hw, 9)
    dst = acc(k, qp_num=4, que_iso_cfg=3)
    migrate(src, dst, chunks)
    assert dst.hw.migratable_state() == src.hw.migratable_state()
    dst.set_state(RUNNING)  # start_device: the VF was READY
    assert dst.hw.readl(q.QM_VF_STATE) == q.QM_READY
    assert not dst.hw.paused  # vf_qm_fun_reset rang the SQ doorbells of its qp_num queues
    # and the event queues continue where the source left them
    assert q.guest_eq_consume(dst.hw, 1) == q.guest_eq_consume(src.hw, 1) == 15


def test_precopy_migration_end_to_end(k: ModelKernel) -> None:
    src, dst = started(k), acc(k)
    dfd = src.set_state(PRE_COPY)
    rfd = resuming(dst)
    assert k.write(rfd, k.read(dfd, 100)) == 40  # the match data, checked on arrival
    src.set_state(STOP_COPY)
    assert k.write(rfd, src.read_all(dfd, READ)) == 136
    assert dst.set_state(STOP) == -1
    assert dst.hw.migratable_state() == src.hw.migratable_state()


def test_only_match_data_loads_nothing(k: ModelKernel) -> None:
    src, dst = acc(k), acc(k)
    blob = save_stop_copy(src)
    assert len(blob) == 40
    before = dst.hw.migratable_state()
    dfd = resuming(dst)
    assert k.write(dfd, blob) == 40
    assert dst.set_state(STOP) == -1
    assert dst.hw.migratable_state() == before


def _blob(k: ModelKernel) -> bytes:
    return save_stop_copy(started(k))


def _patch(blob: bytes, fmt: str, off: int, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


@pytest.mark.parametrize(
    "case",
    ["dev_id", "qp_num", "que_iso_cfg", "bad_magic", "major_ver"],
)
def test_mismatched_destination_is_efault(k: ModelKernel, case: str) -> None:
    blob = _blob(k)
    opts: dict[str, object] = {}
    if case == "dev_id":
        opts["dev_id"] = q.PCI_DEVICE_ID_HUAWEI_ZIP_VF
    elif case == "qp_num":
        opts["qp_num"] = 3
    elif case == "que_iso_cfg":
        opts["que_iso_cfg"] = 1
    elif case == "bad_magic":
        blob = _patch(blob, "<Q", 0, 0x1234)
    else:
        blob = _patch(blob, "<H", 28, 2)
    dst = acc(k, **opts)
    dfd = resuming(dst)
    assert errno_of(k.write, dfd, blob[:40]) == errno.EFAULT
    # the bytes were kept: the check is retried (and fails) on every later write ...
    assert errno_of(k.write, dfd, blob[40:100]) == errno.EFAULT
    assert errno_of(k.write, dfd, blob[100:]) == errno.EFAULT
    assert errno_of(k.write, dfd, b"x") == errno.ENOMEM
    # ... and vf_qm_load_data never consults match_done: a complete stream still loads
    assert dst.set_state(STOP) == -1


def test_minor_version_is_not_checked(k: ModelKernel) -> None:
    dst = acc(k)
    dfd = resuming(dst)
    assert k.write(dfd, _patch(_blob(k), "<H", 30, 7)) == 176


def test_match_checked_only_once_40_bytes_arrived(k: ModelKernel) -> None:
    bad = _patch(_blob(k), "<Q", 0, 0x1234)
    dst = acc(k)
    dfd = resuming(dst)
    assert k.write(dfd, bad[:39]) == 39
    assert errno_of(k.write, dfd, bad[39:41]) == errno.EFAULT


def test_match_done_is_latched_until_the_next_open(k: ModelKernel) -> None:
    good = _blob(k)
    bad = _patch(good, "<I", 12, 0x1234)  # dev_id
    dst = acc(k)
    dfd = resuming(dst)
    assert k.write(dfd, good) == 176
    assert dst.set_state(STOP) == -1
    dfd = dst.set_state(RESUMING)  # a second session in the same open: no check
    assert k.write(dfd, bad) == 176
    k.close(dfd)
    dst.close()
    dst.reopen()  # match_done cleared
    dfd = resuming(dst)
    assert errno_of(k.write, dfd, bad) == errno.EFAULT


@pytest.mark.parametrize("length", [0, 1, 39, 41, 175])
def test_incomplete_stream_is_einval_and_stays_resuming(k: ModelKernel, length: int) -> None:
    blob = _blob(k)
    dst = acc(k)
    dfd = resuming(dst)
    if length:
        assert k.write(dfd, blob[:length]) == length
    assert errno_of(dst.set_state, STOP) == errno.EINVAL
    assert dst.get_state() == RESUMING
    assert k.write(dfd, blob[length:]) == 176 - length  # the fd is still usable
    assert dst.set_state(STOP) == -1


def test_write_beyond_176_is_enomem(k: ModelKernel) -> None:
    dst = acc(k)
    dfd = resuming(dst)
    assert errno_of(k.write, dfd, bytes(177)) == errno.ENOMEM
    assert errno_of(k.read, dfd, 1) == errno.EBADF
    assert errno_of(k.ioctl, dfd, v.VFIO_MIG_GET_PRECOPY_INFO, bytearray(24)) == errno.ENOTTY


def test_v1_magic_rederives_the_dma_addresses(k: ModelKernel) -> None:
    blob = bytearray(_blob(k))
    struct.pack_into("<Q", blob, 0, MAGIC_V1)
    struct.pack_into("<HH", blob, 28, 0, 0)  # V1 had reserved words here
    struct.pack_into("<QQ", blob, 144, 0xBAD, 0xBAD)  # old kernels saved these wrongly
    dst = acc(k)
    dfd = resuming(dst)
    assert k.write(dfd, bytes(blob)) == 176
    assert dst.set_state(STOP) == -1
    eqc = [dst.hw.readl(q.QM_EQC_DW0 + 4 * i) for i in range(3)]
    assert dst.vdev.vf_qm.eqe_dma == eqc[2] << 32 | eqc[1] == EQE
    assert dst.vdev.vf_qm.aeqe_dma == AEQE


def test_null_dma_address_loads_nothing_and_leaves_vf_not_ready(k: ModelKernel) -> None:
    blob = _patch(_blob(k), "<Q", 160, 0)  # sqc_dma = 0
    dst = acc(k)
    before = dst.hw.migratable_state()
    dfd = resuming(dst)
    assert k.write(dfd, blob) == 176
    assert dst.set_state(STOP) == -1
    assert dst.hw.migratable_state() == before
    assert dst.vdev.vf_qm_state == q.QM_NOT_READY


def test_load_fails_while_the_mailbox_is_busy(k: ModelKernel) -> None:
    blob = _blob(k)
    dst = acc(k)
    dfd = resuming(dst)
    assert k.write(dfd, blob) == 176  # the match check ran (it needs the mailbox too)
    dst.hw.mb_stuck = True
    assert errno_of(dst.set_state, STOP) == errno.ETIMEDOUT  # qm_set_regs
    assert dst.get_state() == RESUMING


def test_match_check_fails_while_the_mailbox_is_busy(k: ModelKernel) -> None:
    dst = acc(k)
    dfd = resuming(dst)
    dst.hw.mb_stuck = True  # qm_get_vft cannot run: EBUSY inside, EFAULT to the writer
    assert errno_of(k.write, dfd, _blob(k)) == errno.EFAULT


# -- reset ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [RUNNING, PRE_COPY, STOP_COPY, RESUMING])
def test_reset(k: ModelKernel, state: int) -> None:
    d = started(k)
    dfd = -1
    if state in (STOP_COPY, RESUMING):
        d.set_state(STOP)
    if state != RUNNING:
        dfd = d.set_state(state)
    assert k.ioctl(d.fd, v.VFIO_DEVICE_RESET) == 0
    assert d.get_state() == RUNNING
    if state == RESUMING:
        assert errno_of(k.write, dfd, b"x") == errno.ENODEV
    elif dfd >= 0:
        assert errno_of(k.read, dfd, 1) == errno.ENODEV
    # the FLR put the VF back to its reset values: a save now has match data only
    assert d.hw.readl(q.QM_VF_STATE) == q.QM_NOT_READY
    assert d.vdev.vf_qm_state == q.QM_NOT_READY
    assert save_stop_copy(d) == expected_match(vf_state=q.QM_NOT_READY)


# -- queue positions travel through guest memory -------------------------------------------------


def test_sq_cq_positions_resume_through_guest_memory(k: ModelKernel) -> None:
    src = acc(k, qp_num=2)
    dst = acc(k, qp_num=2, iommufd=src.iommufd)
    addr, _ = k.mmap(0x10000)  # the guest's queue memory, mapped at its IOVAs for both
    ioas = ioas_map(k, src.iommufd, addr, 0x10000, EQE)
    src.attach(ioas)
    dst.attach(ioas)
    q.guest_qm_start(src.hw, eqe_dma=EQE, aeqe_dma=AEQE, sqc_dma=SQC, cqc_dma=CQC)
    for qp in range(2):
        q.guest_qp_start(src.hw, qp, sqe_dma=0x14000 + 0x1000 * qp, cqe_dma=0x16000 + 0x1000 * qp)
    assert q.guest_sq_submit(src.hw, 0, 5) == 5
    assert q.guest_sq_submit(src.hw, 1, 3) == 3
    migrate(src, dst)  # RUNNING -> STOP wrote the cached contexts back (QM_CACHE_WB)
    dst.set_state(RUNNING)
    for qp, tail in ((0, 5), (1, 3)):
        ctx = dst.hw.qp_context(qp)  # fetched from the SQC/CQC tables in guest memory
        assert ctx is not None and ctx.sqc.tail == tail
        assert bytes(ctx.sqc) == bytes(src.hw.cache[qp].sqc)
        assert bytes(ctx.cqc) == bytes(src.hw.cache[qp].cqc)
    assert q.guest_sq_submit(dst.hw, 0, 1) == 6  # and the guest carries on


def test_queue_tables_in_unbacked_memory_fail_the_stop_arc_not_the_caller(k: ModelKernel) -> None:
    """A QM whose context tables lie in memory without bytes (a simulated huge guest) cannot
    write its cache back: the model treats that as the bus error it would be (RAS), so the
    STOP arc fails with an errno (WB_DONE never rises: ETIMEDOUT) instead of a Python
    exception escaping the ioctl."""
    d = acc(k)
    addr, _ = k.mmap(1 << 30, backed=False)
    base = 1 << 32
    d.attach(ioas_map(k, d.iommufd, addr, 1 << 30, base))
    q.guest_qm_start(
        d.hw, eqe_dma=base, aeqe_dma=base + 4096, sqc_dma=base + 8192, cqc_dma=base + 12288
    )
    q.guest_qp_start(d.hw, 0, sqe_dma=base + 16384, cqe_dma=base + 20480)
    assert errno_of(d.set_state, STOP) == errno.ETIMEDOUT  # vf_qm_cache_wb
    assert d.hw.pf.readl(q.QM_ABNORMAL_INT_STATUS) & q.QM_AXI_BRESP
    assert d.get_state() == RUNNING  # the failed arc left it running


# -- a resumed qp_num is used as it is ------------------------------------------------------


class _Overrun(Exception):
    pass


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn(), failing the test (not hanging it) if it runs longer than `seconds`."""

    def alarm(signum: int, frame: Any) -> None:
        raise _Overrun(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_resumed_qp_num_rings_each_distinct_doorbell_once(k: ModelKernel) -> None:
    """vf_qm_load_data takes qm->qp_num from the stream (a mismatched stream is refused by
    the match check's EFAULT but its bytes still load), and STOP -> RUNNING's
    vf_qm_fun_reset rings qm_db(qm, i, QM_DOORBELL_CMD_SQ, 0, 1) for every i < qp_num.
    qm_db takes a u16 qn, so past 65536 the same idempotent doorbell writes repeat: the
    model rings each distinct one once, where a qp_num of 2**32 - 1 used to hang it
    (found by bench/fuzz.py)."""
    blob = _patch(_blob(k), "<I", 8, 0xFFFF_FFFF)  # acc_vf_data.qp_num
    dst = acc(k)
    dfd = resuming(dst)
    assert errno_of(k.write, dfd, blob) == errno.EFAULT  # the match check refuses ...
    assert dst.set_state(STOP) == -1  # ... and the load takes it anyway
    assert dst.vdev.vf_qm.qp_num == 0xFFFF_FFFF
    assert _within(10, lambda: dst.set_state(RUNNING)) == -1
    assert dst.get_state() == RUNNING
    # qn is bits 0-11 of the doorbell and the u16's top nibble lands in its cmd bits: every
    # queue number got its SQ doorbell (cmd 0), and nothing past the 4096 SQ ones
    assert dst.hw.armed == set(range(4096))
    assert any("vf_qm_fun_reset" in w for w in dst.vdev.warnings)
