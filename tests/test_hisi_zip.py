"""The ZIP VF's job engine (HisiQmVf.engine_step + hw.hisi_zip) and the guest driver GuestZip.

The machine is set up through the uAPI with vfiomig.host (bind, IOAS, dirty-tracking HWPT,
attach, the migration FSM). Below the uAPI the tests touch only what a guest would touch: the
VF's registers (through GuestZip and the hisi_qm.guest_* helpers) and guest RAM; `Host.vf`
is the ground truth they read (contexts, RAS status, faults) and say so.
"""

from __future__ import annotations

import errno
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest

from vfiomig.host import Hwpt, Ioas, Iommufd, MigrationState, ModelTransport, VfioDevice
from vfiomig.host.errors import MigrationStateError
from vfiomig.hw import hisi_qm as q
from vfiomig.hw import hisi_zip as z
from vfiomig.hw.hisi_zip import GuestRam, GuestZip, GuestZipError, ZipLayout
from vfiomig.hw.memory import PAGE_SIZE
from vfiomig.kernel import ModelKernel

W = 1 << 32  # guest-physical (= IO virtual) address of the driver's window
SLOTS = 16


class Host:
    """A ModelKernel with one ZIP VF bound to iommufd, attached to a dirty-tracking HWPT
    whose IOAS maps the guest's window at W, in two areas: the queues and SGL pool, then
    the buffers (so a test can take the buffers away)."""

    def __init__(self, *, slots: int = SLOTS, **layout: Any) -> None:
        self.k = ModelKernel()
        self.t = ModelTransport(self.k)
        self.path = self.k.add_device("hisi_acc", dev_id=q.PCI_DEVICE_ID_HUAWEI_ZIP_VF)
        self.ictx = Iommufd(self.t)
        self.dev = VfioDevice(self.t, self.path)
        self.devid = self.dev.bind(self.ictx)
        self.layout = ZipLayout(W, slots=slots, buf_size=8192, **layout)
        self.buf = self.t.mmap(self.layout.size)
        self.ioas: Ioas = self.ictx.ioas_alloc()
        self.ioas.set_huge_pages(False)  # 4 KiB IOPTEs: dirty bits per page
        self.split = self.layout.offsets["bufs"]
        self.ioas.map(self.buf.addr, self.split, iova=W)
        self.map_buffers()
        self.hwpt: Hwpt = self.ictx.hwpt_alloc(self.devid, self.ioas, dirty_tracking=True)
        self.dev.attach(self.hwpt)
        self.ram = GuestRam(self.buf.array, W)

    def map_buffers(self, *, writeable: bool = True) -> None:
        n = self.layout.size - self.split
        self.ioas.map(self.buf.addr + self.split, n, iova=W + self.split, writeable=writeable)

    def unmap_buffers(self) -> None:
        self.ioas.unmap(W + self.split, self.layout.size - self.split)

    @property
    def vf(self) -> q.HisiQmVf:  # below the uAPI: ground truth
        hw = self.k.device(self.path)
        assert isinstance(hw, q.HisiQmVf)
        return hw

    def ras(self) -> int:
        return self.vf.pf.readl(q.QM_ABNORMAL_INT_STATUS)

    def guest(self, **opts: Any) -> GuestZip:
        lay = self.layout
        return GuestZip(
            self.vf, self.ram, slots=lay.slots, depth=lay.depth, eq_depth=lay.eq_depth, **opts
        )

    def dirty_pages(self) -> set[int]:
        bm = self.hwpt.get_dirty_bitmap(W, self.layout.size)
        return {int(p) for p in bm.pages()}


def sqe_at(host: Host, i: int) -> z.hisi_zip_sqe:
    return z.hisi_zip_sqe.from_buffer_copy(host.ram.read(host.layout.sqe(i), z.HZIP_SQE_SIZE))


def pages(start: int, n: int) -> set[int]:
    """Window-relative pages of [start, start + n)."""
    return set(range((start - W) // PAGE_SIZE, (start + n - 1 - W) // PAGE_SIZE + 1))


@pytest.fixture
def host() -> Host:
    return Host()


# -- jobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alg, buf_type",
    [
        (z.HZIP_ALG_TYPE_DEFLATE, z.HZIP_SGL),  # what zip_crypto.c sends today
        (z.HZIP_ALG_TYPE_ZLIB, z.HZIP_SGL),
        (z.HZIP_ALG_TYPE_DEFLATE, z.HZIP_PBUFFER),
        (z.HZIP_ALG_TYPE_ZLIB, z.HZIP_PBUFFER),
    ],
    ids=["deflate-sgl", "zlib-sgl", "deflate-flat", "zlib-flat"],
)
def test_jobs_complete_once_with_output_that_decompresses(
    host: Host, alg: int, buf_type: int
) -> None:
    g = host.guest(alg=alg, buf_type=buf_type)
    rng = np.random.default_rng(7)
    ids = g.post(SLOTS, rng)
    assert ids == list(range(1, SLOTS + 1)) and set(g.outstanding) == set(ids)
    assert g.post(1, rng) == []  # every slot busy until its job completes
    assert host.vf.engine_step() == SLOTS
    assert g.reap() == ids
    assert g.completed == ids and not g.outstanding
    g.check(idle=True)
    assert host.vf.engine_step() == 0 and g.reap() == []
    # what the hardware wrote back into each SQE: status, lengths; the tag is untouched
    wbits = -15 if alg == z.HZIP_ALG_TYPE_DEFLATE else 15
    for i, job_id in enumerate(ids):
        sqe = sqe_at(host, i)
        assert z.sqe_tag(sqe) == job_id and sqe.dw3 & z.HZIP_BD_STATUS_M == 0
        assert sqe.consumed == sqe.input_data_length > sqe.produced  # compressible
        slot = i  # the first free slot each time
        out = host.ram.read(host.layout.out_buf(slot), sqe.produced)
        assert zlib.decompress(out, wbits) == host.ram.read(
            host.layout.in_buf(slot), sqe.input_data_length
        )
    assert host.ras() == 0 and host.vf.faults == []
    # slots are reused once free
    assert g.post(3, rng) == [SLOTS + 1, SLOTS + 2, SLOTS + 3]


def test_jobs_are_deterministic() -> None:
    def run() -> bytes:
        h = Host(slots=4)
        g = h.guest()
        g.post(4, np.random.default_rng(3))
        h.vf.engine_step()
        g.reap()
        return bytes(h.buf.array)

    assert run() == run()


def test_max_jobs_and_round_robin_over_queues(host: Host) -> None:
    g = host.guest()
    rng = np.random.default_rng(1)
    g.post(10, rng)
    assert host.vf.engine_step(max_jobs=3) == 3
    assert g.reap() == [1, 2, 3]
    assert host.vf.engine_step(max_jobs=0) == 0
    assert host.vf.engine_step() == 7
    assert g.reap() == list(range(4, 11))
    g.check(idle=True)


# -- dirty tracking ---------------------------------------------------------------------------


def test_engine_dma_dirties_exactly_output_sq_cq_and_eq_pages(host: Host) -> None:
    g = host.guest()
    rng = np.random.default_rng(11)
    ids = g.post(8, rng)
    host.hwpt.set_dirty_tracking(True)  # enabling starts from clean: the guest's CPU
    assert host.dirty_pages() == set()  # writes (inputs, SGLs, SQEs) are not DMA
    assert host.vf.engine_step() == 8
    lay = host.layout
    expect = pages(lay.sqe(0), 8 * z.HZIP_SQE_SIZE)  # status written back into the SQEs
    expect |= pages(lay.cqe(0), 8 * q.QM_CQE_SIZE)
    expect |= pages(lay.eqe(0), 8 * q.QM_EQE_SIZE)
    for slot in range(8):
        expect |= pages(lay.out_buf(slot), sqe_at(host, slot).produced)
    assert host.dirty_pages() == expect
    assert host.dirty_pages() == set()  # read-and-clear
    assert g.reap() == ids
    assert host.dirty_pages() == set()  # reaping is the CPU's
    # RUNNING -> STOP writes the cached SQ/CQ contexts back: their table pages
    host.dev.set_state(MigrationState.STOP)
    assert host.dirty_pages() == pages(lay.addr("sqc"), q.XQC_SIZE) | pages(
        lay.addr("cqc"), q.XQC_SIZE
    )
    g.check(idle=True)


def test_engine_progress_is_written_back_with_the_contexts(host: Host) -> None:
    """The engine's head/tail moves mark the cached context dirty: a write-back after them
    (here the one of RUNNING -> STOP) puts them in the tables in guest RAM."""
    g = host.guest()
    g.post(3, np.random.default_rng(3))
    host.vf.writel(1, q.QM_CACHE_WB_START)  # below the uAPI: tables current, cache clean
    assert host.vf.engine_step() == 3
    host.dev.set_state(MigrationState.STOP)
    lay = host.layout
    sqc = q.qm_sqc.from_buffer_copy(host.ram.read(lay.addr("sqc"), q.XQC_SIZE))
    cqc = q.qm_cqc.from_buffer_copy(host.ram.read(lay.addr("cqc"), q.XQC_SIZE))
    assert (sqc.head, sqc.tail, cqc.head, cqc.tail) == (3, 3, 0, 3)


# -- pause ---------------------------------------------------------------------------------


def test_paused_qm_does_nothing(host: Host) -> None:
    g = host.guest()
    rng = np.random.default_rng(5)
    g.post(4, rng)
    host.dev.set_state(MigrationState.STOP)  # hisi_acc: PAUSE_QM, then cache write-back
    assert host.vf.paused
    before = bytes(host.buf.array)
    assert host.vf.engine_step() == 0
    assert bytes(host.buf.array) == before and g.reap() == []
    # STOP -> RUNNING of a VF that never saved its state rings no doorbell
    # (hisi_acc_vf_start_device needs vf_qm_state READY): still paused ...
    host.dev.set_state(MigrationState.RUNNING)
    assert host.vf.engine_step() == 0
    # ... until the guest's next submit rings the SQ doorbell
    g.post(1, rng)
    assert host.vf.engine_step() == 5
    assert g.reap() == [1, 2, 3, 4, 5]
    g.check(idle=True)


def test_pause_qm_mailbox_stops_the_engine(host: Host) -> None:
    g = host.guest()
    g.post(2, np.random.default_rng(0))
    host.vf.mb_write(q.mb_pack(q.QM_MB_CMD_PAUSE_QM, 0, 0, False))
    assert host.vf.engine_step() == 0
    q.guest_db(host.vf, 0, q.QM_DOORBELL_CMD_SQ, 0, 1)  # vf_qm_fun_reset's resume
    assert host.vf.engine_step() == 2


def test_queues_never_started_do_nothing(host: Host) -> None:
    assert host.vf.engine_step() == 0  # no guest driver at all
    g = host.guest()
    q.guest_db(host.vf, 1, q.QM_DOORBELL_CMD_SQ, 5)  # a queue with a zeroed context
    assert host.vf.engine_step() == 0
    assert host.ras() == 0 and g.reap() == []


def test_sec_vf_has_no_engine() -> None:
    k = ModelKernel()
    vf = k.device(k.add_device("hisi_acc"))
    assert vf.engine is None and vf.engine_step() == 0


# -- wrap-around -------------------------------------------------------------------------------


def test_more_jobs_than_the_queue_depth_wrap_with_the_phase_bit(host: Host) -> None:
    g = host.guest()
    rng = np.random.default_rng(2024)
    rounds = q.QM_Q_DEPTH // SLOTS + 6
    for _ in range(rounds):
        assert len(g.post(SLOTS, rng)) == SLOTS
        assert host.vf.engine_step() == SLOTS
        g.reap()
    total = rounds * SLOTS
    assert total > q.QM_Q_DEPTH
    assert g.completed == list(range(1, total + 1))
    g.check(idle=True)
    ctx = host.vf.qp_context(0)
    assert ctx is not None
    assert ctx.sqc.head == ctx.sqc.tail == total % q.QM_Q_DEPTH
    assert ctx.cqc.dw6 & 1 == 0 and g.cq_phase == 0  # one lap: the phase flipped once


@pytest.mark.parametrize("slots, step", [(4, None), (7, 3)])
def test_small_rings_wrap_many_times(slots: int, step: int | None) -> None:
    """SQ/CQ of 8 and an EQ of 16 elements: every ring laps many times."""
    h = Host(slots=slots, depth=8, eq_depth=16)
    g = h.guest()
    rng = np.random.default_rng(slots)
    for _ in range(40):
        g.post(slots, rng)
        h.vf.engine_step(max_jobs=step)
        g.reap()
    while g.outstanding:
        assert h.vf.engine_step() > 0
        g.reap()
    assert g.completed == list(range(1, g.posted + 1)) and g.posted > 100
    g.check(idle=True)
    assert h.ras() == 0


def test_full_eq_overflows_to_the_aeq() -> None:
    """A guest that never consumes events: once the EQ is full the QM reports
    QM_EQ_OVERFLOW on the AEQ (qm_aeq_thread), and jobs still complete."""
    h = Host(slots=4, depth=8, eq_depth=4)
    g = h.guest()
    g.post(4, np.random.default_rng(1))
    assert h.vf.engine_step() == 4  # EQ of 4 holds 3 events
    assert g.reap() == [1, 2, 3, 4]
    assert g.errors == [f"AEQ event type {q.QM_EQ_OVERFLOW} on queue 0"]


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("buf_type", [z.HZIP_SGL, z.HZIP_PBUFFER], ids=["sgl", "flat"])
def test_too_small_output_is_an_error_and_nothing_past_it_is_written(
    host: Host, buf_type: int
) -> None:
    g = host.guest(buf_type=buf_type)
    lay = host.layout
    host.ram.write(lay.out_buf(0), b"\xa5" * lay.buf_size)
    (job,) = g.post(1, np.random.default_rng(9), dest_avail_out=64)
    assert host.vf.engine_step() == 1
    assert g.reap() == [job]
    assert g.failures == {job: z.HZIP_ERR_DSTLEN_OUT}
    sqe = sqe_at(host, 0)
    assert sqe.produced == 64
    data = host.ram.read(lay.in_buf(0), sqe.input_data_length)
    c = zlib.compressobj(wbits=-15)
    full = c.compress(data) + c.flush()
    out = host.ram.read(lay.out_buf(0), lay.buf_size)
    assert out[:64] == full[:64] and out[64:] == b"\xa5" * (lay.buf_size - 64)
    with pytest.raises(GuestZipError, match="failed with status 0xe"):
        g.check()


def test_unsupported_algorithm_is_rejected_in_the_status(host: Host) -> None:
    g = host.guest()
    lay = host.layout
    host.ram.write(lay.out_buf(0), b"\xa5" * lay.buf_size)
    (job,) = g.post(1, np.random.default_rng(9))
    sqe = sqe_at(host, 0)
    sqe.dw9 = sqe.dw9 & ~z.HZIP_REQ_TYPE_M | z.HZIP_ALG_TYPE_GZIP  # gzip: not modelled
    host.ram.write(lay.sqe(0), bytes(sqe))
    assert host.vf.engine_step() == 1
    assert g.reap() == [job] and g.failures == {job: z.HZIP_MODEL_BAD_REQ}
    assert host.ram.read(lay.out_buf(0), lay.buf_size) == b"\xa5" * lay.buf_size


def test_decompress_queue(host: Host) -> None:
    """A queue started with alg_type 1 (HZIP_ALG_TYPE_DECOMP) inflates."""
    lay = host.layout
    host.guest()  # QM started, queue 0 compress; queue 1 decompress by hand below
    q.guest_qp_start(
        host.vf, 1, sqe_dma=lay.addr("bufs"), cqe_dma=lay.addr("sgl"), depth=8, alg_type=1
    )
    plain = b"hello, zip " * 300
    src, dst = lay.in_buf(1), lay.out_buf(1)
    c = zlib.compressobj(wbits=-15)
    packed = c.compress(plain) + c.flush()
    host.ram.write(src, packed)
    sqe = z.hisi_zip_sqe(
        source_addr_l=src & 0xFFFFFFFF,
        source_addr_h=src >> 32,
        dest_addr_l=dst & 0xFFFFFFFF,
        dest_addr_h=dst >> 32,
        input_data_length=len(packed),
        dest_avail_out=lay.buf_size,
        dw9=z.HZIP_ALG_TYPE_DEFLATE,
        dw26=77,
        dw7=z.HZIP_SQE_TYPE_V3 << z.HZIP_SQE_TYPE_SHIFT,
    )
    host.ram.write(lay.addr("bufs"), bytes(sqe))
    q.guest_db(host.vf, 1, q.QM_DOORBELL_CMD_SQ, 1)
    assert host.vf.engine_step() == 1
    done = z.hisi_zip_sqe.from_buffer_copy(host.ram.read(lay.addr("bufs"), z.HZIP_SQE_SIZE))
    assert done.dw3 & 0xFF == 0 and done.consumed == len(packed) and done.dw26 == 77
    assert host.ram.read(dst, done.produced) == plain
    cqe = q.qm_cqe.from_buffer_copy(host.ram.read(lay.addr("sgl"), q.QM_CQE_SIZE))
    assert (cqe.sq_head, cqe.sq_num, cqe.w7 & 1) == (0, 1, 1)
    eqe = host.ram.u32(lay.eqe(0))
    assert eqe == 1 | 1 << q.QM_EQE_PHASE_SHIFT  # qm_eqe: CQN 1, phase 1


@pytest.mark.parametrize("how", ["unmapped", "read-only"])
def test_refused_dma_raises_ras_and_the_job_does_not_complete(host: Host, how: str) -> None:
    g = host.guest()
    rng = np.random.default_rng(4)
    ids = g.post(2, rng)
    host.unmap_buffers()
    if how == "read-only":
        host.map_buffers(writeable=False)
    assert host.vf.engine_step() == 0
    bit = q.QM_AXI_RRESP if how == "unmapped" else q.QM_AXI_BRESP
    assert host.ras() == bit
    assert host.vf.faults and host.vf.faults[0][1] == (how == "read-only")
    assert g.reap() == [] and set(g.outstanding) == set(ids)
    ctx = host.vf.qp_context(0)
    assert ctx is not None and ctx.sqc.head == 0 and ctx.cqc.tail == 0
    # the RAS error makes hisi_acc refuse to stop the device (hisi_acc_check_int_state)
    with pytest.raises(MigrationStateError) as e:
        host.dev.set_state(MigrationState.STOP)
    assert e.value.errno == errno.EBUSY and host.vf.paused  # PAUSE_QM came first
    # memory back, error cleared, the guest's next submit resumes: nothing was lost
    if how == "read-only":
        host.unmap_buffers()
    host.map_buffers()
    host.vf.pf.clear_interrupts()
    ids += g.post(1, rng)
    assert host.vf.engine_step() == 3
    assert g.reap() == ids
    g.check(idle=True)


# -- the guest's judge ----------------------------------------------------------------------


def forge_cqe(host: Host, g: GuestZip, sq_head: int) -> None:
    cqe = q.qm_cqe(sq_head=sq_head, sq_num=0, w7=g.cq_phase)
    host.ram.write(host.layout.cqe(g.cq_head), bytes(cqe))


def test_judge_catches_a_forged_double_completion(host: Host) -> None:
    g = host.guest()
    ids = g.post(2, np.random.default_rng(8))
    host.vf.engine_step()
    assert g.reap() == ids
    g.check(idle=True)
    forge_cqe(host, g, 0)  # SQE 0 again: job 1's tag
    assert g.reap() == []
    assert g.errors == ["job 1 completed twice"]
    with pytest.raises(GuestZipError, match="job 1 completed twice"):
        g.check()


def test_judge_catches_a_completion_never_posted(host: Host) -> None:
    g = host.guest()
    host.ram.write(host.layout.sqe(5), bytes(z.hisi_zip_sqe(dw26=999, dw7=3 << 28)))
    forge_cqe(host, g, 5)
    assert g.reap() == []
    with pytest.raises(GuestZipError, match="job 999, which was never posted"):
        g.check()


@pytest.mark.parametrize("how", ["flipped-byte", "other-jobs-output"])
def test_judge_catches_corrupt_output(host: Host, how: str) -> None:
    g = host.guest()
    ids = g.post(2, np.random.default_rng(8))
    host.vf.engine_step()
    lay = host.layout
    out = lay.out_buf(0)  # job 1's output
    if how == "flipped-byte":
        b = host.ram.read(out + 40, 1)[0]
        host.ram.write(out + 40, bytes([b ^ 0x10]))
    else:  # a valid stream, of job 2's input: only the length/CRC check can tell
        other = sqe_at(host, 1)
        host.ram.write(out, host.ram.read(lay.out_buf(1), other.produced))
        mine = sqe_at(host, 0)
        mine.produced = other.produced
        host.ram.write(lay.sqe(0), bytes(mine))
    assert g.reap() == ids  # completed, but wrong
    assert len(g.errors) == 1 and g.errors[0].startswith("job 1: ")
    with pytest.raises(GuestZipError, match="job 1: "):
        g.check(idle=True)


def test_judge_catches_a_job_that_never_completes(host: Host) -> None:
    g = host.guest()
    g.post(3, np.random.default_rng(8))
    host.vf.engine_step(max_jobs=2)
    assert g.reap() == [1, 2]
    g.check()  # nothing wrong so far ...
    with pytest.raises(GuestZipError, match="job 3 never completed"):
        g.check(idle=True)  # ... but the queue was expected drained


# -- bookkeeping as data ---------------------------------------------------------------------


def test_state_is_json_and_restores(host: Host) -> None:
    g = host.guest(alg=z.HZIP_ALG_TYPE_ZLIB)
    rng = np.random.default_rng(6)
    g.post(5, rng)
    host.vf.engine_step(max_jobs=2)
    g.reap()
    state = g.state()
    again = json.loads(json.dumps(state))
    h = GuestZip.restore(again, host.vf, host.ram)
    assert h.state() == state
    assert host.vf.engine_step() == 3 and h.reap() == [3, 4, 5]
    h.check(idle=True)
    with pytest.raises(ValueError, match="window"):
        GuestZip.restore(state, host.vf, GuestRam(host.buf.array, W + PAGE_SIZE))


def test_window_must_be_big_enough_and_backed() -> None:
    k = ModelKernel()
    vf = k.device(k.add_device("hisi_acc", dev_id=q.PCI_DEVICE_ID_HUAWEI_ZIP_VF))
    need = GuestZip.window_size(slots=4)
    addr, mem = k.mmap(need - PAGE_SIZE)
    assert mem is not None
    with pytest.raises(ValueError, match="needs"):
        GuestZip(vf, GuestRam(mem, W), slots=4)
    addr, _ = k.mmap(need, backed=False)
    with pytest.raises(ValueError, match="not backed"):
        GuestRam.from_memory(k.mm, addr, need, W)


# -- migration through the VFIO uAPI ----------------------------------------------------------


def test_jobs_in_flight_complete_on_the_destination_exactly_once() -> None:
    src, dst = Host(), Host()
    g = src.guest()
    rng = np.random.default_rng(42)
    first = g.post(SLOTS, rng)
    assert src.vf.engine_step(max_jobs=6) == 6
    assert g.reap() == first[:6]
    g.post(6, rng)  # into the slots just freed
    assert src.vf.engine_step(max_jobs=3) == 3  # three more done, not yet reaped
    in_flight = sorted(g.outstanding)
    assert len(in_flight) == 16

    # source: RUNNING -> STOP -> STOP_COPY (PAUSE_QM, cache write-back, state saved)
    saving = src.dev.set_state(MigrationState.STOP_COPY)
    assert saving is not None
    blob = saving.read_available()
    assert len(blob) == 176
    assert src.vf.engine_step() == 0  # paused: nothing more happens on the source
    # guest RAM byte for byte; the driver's variables as vCPU state
    dst.buf.array[:] = src.buf.array
    state = json.loads(json.dumps(g.state()))

    # destination: RUNNING -> STOP -> RESUMING, load, -> STOP -> RUNNING
    resuming = dst.dev.set_state(MigrationState.RESUMING)
    assert resuming is not None
    resuming.write_all(blob)
    dst.dev.set_state(MigrationState.STOP)
    dst.dev.set_state(MigrationState.RUNNING)
    assert not dst.vf.paused  # vf_qm_fun_reset rang the SQ doorbells

    gd = GuestZip.restore(state, dst.vf, dst.ram)
    assert dst.vf.engine_step() == 13  # 16 in flight, 3 already done on the source
    done = gd.reap()
    assert sorted(done) == in_flight
    gd.check(idle=True)
    assert sorted(gd.completed) == list(range(1, gd.posted + 1))
    assert len(set(gd.completed)) == len(gd.completed)
    # and the guest carries on on the destination
    more = gd.post(5, rng)
    assert dst.vf.engine_step() == 5 and gd.reap() == more
    gd.check(idle=True)
    assert src.ras() == dst.ras() == 0


def test_eq_position_and_phase_travel_in_the_device_state() -> None:
    """The EQ tail and phase live in EQC dwords 0 and 6, which acc_vf_data carries."""
    src, dst = Host(slots=4, depth=8, eq_depth=8), Host(slots=4, depth=8, eq_depth=8)
    g = src.guest()
    rng = np.random.default_rng(1)
    for _ in range(3):
        g.post(4, rng)
        src.vf.engine_step()
        g.reap()
    g.post(3, rng)
    src.vf.engine_step(max_jobs=1)
    saving = src.dev.set_state(MigrationState.STOP_COPY)
    assert saving is not None
    blob = saving.read_available()
    eqc = struct.unpack_from("<7I", blob, 64)  # qm_eqc_dw[7] after the 6 RW registers
    assert eqc[0] >> 16 == (12 + 1) % 8 and eqc[6] >> q.QM_EQC_PHASE_SHIFT & 1 == 0
    dst.buf.array[:] = src.buf.array
    resuming = dst.dev.set_state(MigrationState.RESUMING)
    assert resuming is not None
    resuming.write_all(blob)
    dst.dev.set_state(MigrationState.RUNNING)
    gd = GuestZip.restore(g.state(), dst.vf, dst.ram)
    dst.vf.engine_step()
    gd.reap()
    for _ in range(3):
        gd.post(4, rng)
        dst.vf.engine_step()
        gd.reap()
    gd.check(idle=True)
    assert gd.completed == list(range(1, 28))
