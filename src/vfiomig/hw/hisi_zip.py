"""The HiSilicon ZIP engine behind a ZIP VF's QM, and a guest driver that feeds it.

Hardware side (HisiZipEngine, plugged into HisiQmVf.engine_step through hisi_qm.qm_engine):
one SQE is a struct hisi_zip_sqe (128 bytes, drivers/crypto/hisilicon/zip/zip.h). The engine
reads it, reads the input by DMA (a flat buffer, HZIP_PBUFFER, or a chain of hisi_acc_hw_sgl
as the kernel driver builds them, HZIP_SGL, drivers/crypto/hisilicon/sgl.c), compresses or
decompresses it with zlib (the queue's alg_type: 0 compress, 1 decompress; the SQE's request
type: raw deflate or zlib), writes the output by DMA within dest_avail_out, and writes the
status and lengths back over the SQE's first 16 bytes (consumed, produced, dw3 status) where
the driver's callback reads them (zip_crypto.c hisi_zip_acomp_cb: status from dw3 bits 0-7,
output length from `produced`). The tag (dw26 for SQE type 3, dw13 for type 0) is not
touched, so the guest matches each completion to its request through it.

Statuses: 0 done; HZIP_NC_ERR (0x0d, zip.h) "negative compression", which the kernel driver
counts as success (hisi_zip_acomp_cb); 0x0e when the output does not fit dest_avail_out
(ERR_DSTLEN_OUT in the user-space driver, uadk drv/hisi_comp.c) - the engine then writes the
first dest_avail_out bytes and nothing past them; HZIP_MODEL_BAD_REQ (0xff) is the model's own
code for a request it cannot run (another algorithm such as gzip, an unknown buffer type, a
malformed SGL, a corrupt stream to decompress): the kernel knows no code for these, and any
status other than 0 and 0x0d is a failed request (-EIO) to it.

Guest side (GuestZip): the parts of qm.c and zip_crypto.c a guest runs to compress with the
VF, over a window of guest memory it owns (EQ, AEQ, SQC/CQC tables, SQ, CQ, a hw SGL pool and
an input/output buffer pair per slot; see ZipLayout). Its bookkeeping is plain data
(`state()` / `GuestZip.restore`), so a migration engine can carry it across as vCPU state
while the window itself travels as guest RAM.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from vfiomig.hw import hisi_qm as q
from vfiomig.hw.hisi_qm import HisiQmVf
from vfiomig.hw.memory import PAGE_SIZE, Memory

# -- struct hisi_zip_sqe fields (zip_crypto.c) -------------------------------------------------
HZIP_BD_STATUS_M = 0xFF  # dw3
HZIP_IN_SGE_DATA_OFFSET_M = 0xFFFFFF  # dw7
HZIP_SQE_TYPE_SHIFT = 28  # dw7, HZIP_SQE_TYPE_M = GENMASK(31, 28)
HZIP_OUT_SGE_DATA_OFFSET_M = 0xFFFFFF  # dw8
HZIP_REQ_TYPE_M = 0xFF  # dw9
HZIP_BUF_TYPE_SHIFT = 8  # dw9, HZIP_BUF_TYPE_M = GENMASK(11, 8)
HZIP_BUF_TYPE_MASK = 0xF
HZIP_PBUFFER = 0x0
HZIP_SGL = 0x1
# request types (dw9 bits 0-7): raw deflate is what today's driver registers ("deflate");
# zlib and gzip are the types of older kernels and of uadk.
HZIP_ALG_TYPE_DEFLATE = 0x01
HZIP_ALG_TYPE_ZLIB = 0x02
HZIP_ALG_TYPE_GZIP = 0x03
# enum hisi_zip_alg_type: the queue's kind, in its sqc (hisi_zip_ctx_init)
HZIP_ALG_TYPE_COMP = 0
HZIP_ALG_TYPE_DECOMP = 1
# SQE types: 0 keeps the tag in dw13, 3 (hisi_zip_ops.sqe_type, Kunpeng 930) in dw26
HZIP_SQE_TYPE_V1 = 0x0
HZIP_SQE_TYPE_V3 = 0x3
# statuses
HZIP_NC_ERR = 0x0D  # enum hisi_zip_error_type (zip.h)
HZIP_ERR_DSTLEN_OUT = 0x0E  # uadk drv/hisi_comp.c ERR_DSTLEN_OUT
HZIP_MODEL_BAD_REQ = 0xFF  # the model's: a request it cannot run
HZIP_SQE_SIZE = 128
HZIP_MAX_BUFFER_SIZE = 8 << 20  # uadk MAX_BUFFER_SIZE / HZ_MAX_SIZE: 8 MiB per request
_WBITS = {HZIP_ALG_TYPE_DEFLATE: -15, HZIP_ALG_TYPE_ZLIB: 15}  # zlib window: raw / zlib

# -- hardware SGL (sgl.c, hisi_acc_qm.h) ----------------------------------------------------
HISI_ACC_SGL_SGE_NR_MAX = 255
HISI_ACC_SGL_NR_MAX = 256
HISI_ACC_SGL_ALIGN_SIZE = 64


class hisi_zip_sqe(ctypes.LittleEndianStructure):
    """struct hisi_zip_sqe (zip.h), 32 dwords."""

    _fields_ = [
        ("consumed", ctypes.c_uint32),
        ("produced", ctypes.c_uint32),
        ("comp_data_length", ctypes.c_uint32),
        ("dw3", ctypes.c_uint32),
        ("input_data_length", ctypes.c_uint32),
        ("dw5", ctypes.c_uint32),
        ("dw6", ctypes.c_uint32),
        ("dw7", ctypes.c_uint32),
        ("dw8", ctypes.c_uint32),
        ("dw9", ctypes.c_uint32),
        ("dw10", ctypes.c_uint32),
        ("dw11", ctypes.c_uint32),
        ("dw12", ctypes.c_uint32),
        ("dw13", ctypes.c_uint32),
        ("dest_avail_out", ctypes.c_uint32),
        ("dw15", ctypes.c_uint32),
        ("dw16", ctypes.c_uint32),
        ("dw17", ctypes.c_uint32),
        ("source_addr_l", ctypes.c_uint32),
        ("source_addr_h", ctypes.c_uint32),
        ("dest_addr_l", ctypes.c_uint32),
        ("dest_addr_h", ctypes.c_uint32),
        ("dw22", ctypes.c_uint32),
        ("dw23", ctypes.c_uint32),
        ("dw24", ctypes.c_uint32),
        ("dw25", ctypes.c_uint32),
        ("dw26", ctypes.c_uint32),
        ("dw27", ctypes.c_uint32),
        ("rsvd1", ctypes.c_uint32 * 4),
    ]


class hisi_acc_hw_sgl(ctypes.LittleEndianStructure):
    """struct hisi_acc_hw_sgl (sgl.c) without its trailing sge_entries[]: the 64-byte head."""

    _pack_ = 1
    _fields_ = [
        ("next_dma", ctypes.c_uint64),
        ("entry_sum_in_chain", ctypes.c_uint16),
        ("entry_sum_in_sgl", ctypes.c_uint16),
        ("entry_length_in_sgl", ctypes.c_uint16),
        ("pad0", ctypes.c_uint16),
        ("pad1", ctypes.c_uint64 * 5),
        ("next", ctypes.c_uint64),  # the driver's own pointer; the hardware ignores it
    ]


class acc_hw_sge(ctypes.LittleEndianStructure):
    """struct acc_hw_sge (sgl.c): one entry, 32 bytes."""

    _fields_ = [
        ("buf", ctypes.c_uint64),
        ("page_ctrl", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
    ]


assert ctypes.sizeof(hisi_zip_sqe) == HZIP_SQE_SIZE
assert ctypes.sizeof(hisi_acc_hw_sgl) == 64 and ctypes.sizeof(acc_hw_sge) == 32
_SGL_HEAD = ctypes.sizeof(hisi_acc_hw_sgl)
_SGE = ctypes.sizeof(acc_hw_sge)


def sgl_size(sge_nr: int) -> int:
    """Bytes of one hw SGL in a pool (hisi_acc_create_sgl_pool: ALIGN(sge * nr + head, 64))."""
    raw = _SGE * sge_nr + _SGL_HEAD
    return -(-raw // HISI_ACC_SGL_ALIGN_SIZE) * HISI_ACC_SGL_ALIGN_SIZE


def sqe_tag(sqe: hisi_zip_sqe) -> int:
    """The request id a driver put in the SQE (hisi_zip_get_tag: dw26 for SQE type 3)."""
    if sqe.dw7 >> HZIP_SQE_TYPE_SHIFT == HZIP_SQE_TYPE_V3:
        return int(sqe.dw26)
    return int(sqe.dw13)


# -- the engine ----------------------------------------------------------------------------


class _BadRequest(Exception):
    """The SQE asks for something the engine cannot do: HZIP_MODEL_BAD_REQ."""


class HisiZipEngine:
    """The compression engine of a ZIP function, as HisiQmVf.engine_step drives it."""

    sqe_size = HZIP_SQE_SIZE

    def do_job(self, vf: HisiQmVf, sqe: bytes, alg_type: int) -> bytes:
        s = hisi_zip_sqe.from_buffer_copy(sqe)
        try:
            status, consumed, produced = _run(vf, s, alg_type)
        except _BadRequest:
            status, consumed, produced = HZIP_MODEL_BAD_REQ, 0, 0
        s.consumed = consumed
        s.produced = produced
        s.dw3 = (s.dw3 & ~HZIP_BD_STATUS_M) | status
        return bytes(s)[:16]  # consumed, produced, comp_data_length, dw3: nothing else


def _run(vf: HisiQmVf, s: hisi_zip_sqe, alg_type: int) -> tuple[int, int, int]:
    """(status, consumed, produced) of one request; its DMA raises QmBusError."""
    wbits = _WBITS.get(s.dw9 & HZIP_REQ_TYPE_M)
    buf_type = s.dw9 >> HZIP_BUF_TYPE_SHIFT & HZIP_BUF_TYPE_MASK
    n_in, avail = int(s.input_data_length), int(s.dest_avail_out)
    if wbits is None or alg_type not in (HZIP_ALG_TYPE_COMP, HZIP_ALG_TYPE_DECOMP):
        raise _BadRequest
    if n_in > HZIP_MAX_BUFFER_SIZE:
        raise _BadRequest
    src = s.source_addr_h << 32 | s.source_addr_l
    dst = s.dest_addr_h << 32 | s.dest_addr_l
    if buf_type == HZIP_SGL:
        src_segs = _sgl_segments(vf, src, s.dw7 & HZIP_IN_SGE_DATA_OFFSET_M)
        dst_segs = _sgl_segments(vf, dst, s.dw8 & HZIP_OUT_SGE_DATA_OFFSET_M)
    elif buf_type == HZIP_PBUFFER:
        src_segs, dst_segs = [(src, n_in)], [(dst, avail)]
    else:
        raise _BadRequest
    data = _gather(vf, src_segs, n_in)
    cap = min(avail, sum(n for _, n in dst_segs), HZIP_MAX_BUFFER_SIZE)
    status = 0
    if alg_type == HZIP_ALG_TYPE_COMP:
        c = zlib.compressobj(wbits=wbits)
        out = c.compress(data) + c.flush()
        consumed = len(data)
        if len(out) > len(data):
            status = HZIP_NC_ERR  # the output outgrew the input: still a complete stream
    else:
        d = zlib.decompressobj(wbits=wbits)
        try:
            out = d.decompress(data, cap + 1)
        except zlib.error:
            raise _BadRequest from None
        if len(out) <= cap and not d.eof:
            raise _BadRequest  # a truncated stream
        consumed = len(data) - len(d.unconsumed_tail) - len(d.unused_data)
    if len(out) > cap:
        out, status = out[:cap], HZIP_ERR_DSTLEN_OUT
    _scatter(vf, dst_segs, out)
    return status, consumed, len(out)


def _sgl_segments(vf: HisiQmVf, sgl_dma: int, offset: int) -> list[tuple[int, int]]:
    """The (iova, length) pieces a chain of hw SGLs describes, `offset` bytes skipped."""
    segs: list[tuple[int, int]] = []
    for _ in range(HISI_ACC_SGL_NR_MAX):
        if not sgl_dma:
            break
        head = hisi_acc_hw_sgl.from_buffer_copy(vf.bus_read(sgl_dma, _SGL_HEAD))
        n = int(head.entry_sum_in_sgl)
        if n > HISI_ACC_SGL_SGE_NR_MAX:
            raise _BadRequest
        raw = vf.bus_read(sgl_dma + _SGL_HEAD, n * _SGE) if n else b""
        for i in range(n):
            sge = acc_hw_sge.from_buffer_copy(raw, i * _SGE)
            segs.append((int(sge.buf), int(sge.len)))
        sgl_dma = int(head.next_dma)
    else:
        raise _BadRequest  # a chain longer than any pool (or a loop)
    out: list[tuple[int, int]] = []
    for addr, n in segs:
        skip = min(offset, n)
        offset -= skip
        if n > skip:
            out.append((addr + skip, n - skip))
    return out


def _gather(vf: HisiQmVf, segs: list[tuple[int, int]], n: int) -> bytes:
    parts, left = [], n
    for addr, length in segs:
        if not left:
            break
        take = min(length, left)
        parts.append(vf.bus_read(addr, take))
        left -= take
    if left:
        raise _BadRequest  # the buffers hold less than input_data_length
    return b"".join(parts)


def _scatter(vf: HisiQmVf, segs: list[tuple[int, int]], data: bytes) -> None:
    off = 0
    for addr, length in segs:
        if off == len(data):
            break
        take = min(length, len(data) - off)
        vf.bus_write(addr, data[off : off + take])
        off += take


# -- the guest's memory ----------------------------------------------------------------------


class GuestRam:
    """A window of guest-physical memory as the guest's CPUs see it: the bytes at
    [iova, iova + size), which are the very bytes the VF's DMA reaches through the IOMMU
    (IOVA = guest-physical address, as a VMM maps guest RAM). Bytes only: a window in
    memory without bytes (an unbacked region of a huge simulated guest) is refused."""

    def __init__(self, data: npt.NDArray[np.uint8], iova: int) -> None:
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError("guest RAM is a 1-D uint8 array")
        self.data = data
        self.iova = iova

    @classmethod
    def from_memory(cls, mem: Memory, uva: int, size: int, iova: int) -> GuestRam:
        """The window whose bytes live at user address `uva` of the VMM's `mem`."""
        try:
            return cls(mem.view(uva, size), iova)
        except OSError:
            raise ValueError(
                f"guest RAM at {uva:#x} (+{size:#x}) is not backed memory: GuestZip needs bytes"
            ) from None

    @property
    def size(self) -> int:
        return int(self.data.size)

    def _off(self, iova: int, n: int) -> int:
        off = iova - self.iova
        if off < 0 or n < 0 or off + n > self.data.size:
            raise ValueError(f"[{iova:#x}, +{n:#x}) is outside the guest RAM window")
        return off

    def read(self, iova: int, n: int) -> bytes:
        off = self._off(iova, n)
        return self.data[off : off + n].tobytes()

    def write(self, iova: int, data: bytes) -> None:
        off = self._off(iova, len(data))
        self.data[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def zero(self, iova: int, n: int) -> None:
        off = self._off(iova, n)
        self.data[off : off + n] = 0

    def u32(self, iova: int) -> int:
        return int(struct.unpack("<I", self.read(iova, 4))[0])


def _page_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


class ZipLayout:
    """Where a GuestZip keeps everything inside its window, each part page-aligned:

    EQ (eq_depth x 4 B) | AEQ (aeq_depth x 4 B) | SQC table | CQC table (32 B for each of the
    1024 queues a VFT entry can give, QM_MAX_QP_NUM) | SQ (depth x 128 B) | CQ (depth x 16 B)
    | hw SGL pool (2 SGLs per slot, one entry each: 128 B) | buffers (per slot an input and an
    output buffer of buf_size bytes).
    """

    SGE_NR = 1  # one entry per SGL: each buffer is contiguous in guest-physical memory

    def __init__(
        self,
        iova: int,
        *,
        slots: int,
        buf_size: int,
        depth: int = q.QM_Q_DEPTH,
        eq_depth: int = q.QM_EQ_DEPTH,
        aeq_depth: int = q.QM_AEQ_DEPTH,
    ) -> None:
        if iova % PAGE_SIZE:
            raise ValueError("the window must start on a page")
        self.iova = iova
        self.slots, self.buf_size = slots, buf_size
        self.depth, self.eq_depth, self.aeq_depth = depth, eq_depth, aeq_depth
        self.sgl_size = sgl_size(self.SGE_NR)
        sizes = [
            ("eqe", eq_depth * q.QM_EQE_SIZE),
            ("aeqe", aeq_depth * q.QM_EQE_SIZE),
            ("sqc", q.QM_MAX_QP_NUM * q.XQC_SIZE),
            ("cqc", q.QM_MAX_QP_NUM * q.XQC_SIZE),
            ("sqe", depth * HZIP_SQE_SIZE),
            ("cqe", depth * q.QM_CQE_SIZE),
            ("sgl", 2 * slots * self.sgl_size),
            ("bufs", 2 * slots * buf_size),
        ]
        off = 0
        self.offsets: dict[str, int] = {}
        for name, size in sizes:
            self.offsets[name] = off
            off += _page_up(size)
        self.queue_bytes = self.offsets["sgl"]  # EQ .. CQ: what the QM itself touches
        self.size = off

    def addr(self, part: str) -> int:
        return self.iova + self.offsets[part]

    def sqe(self, i: int) -> int:
        return self.addr("sqe") + i * HZIP_SQE_SIZE

    def cqe(self, i: int) -> int:
        return self.addr("cqe") + i * q.QM_CQE_SIZE

    def eqe(self, i: int) -> int:
        return self.addr("eqe") + i * q.QM_EQE_SIZE

    def aeqe(self, i: int) -> int:
        return self.addr("aeqe") + i * q.QM_EQE_SIZE

    def sgl(self, index: int) -> int:
        """hw SGL `index` of the pool (hisi_zip_do_work: req_id << 1 in, + 1 out)."""
        return self.addr("sgl") + index * self.sgl_size

    def in_buf(self, slot: int) -> int:
        return self.addr("bufs") + 2 * slot * self.buf_size

    def out_buf(self, slot: int) -> int:
        return self.in_buf(slot) + self.buf_size


# -- the guest driver ------------------------------------------------------------------------


class GuestZipError(Exception):
    """The guest driver's judgement failed: `problems` says how."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Job(NamedTuple):
    slot: int  # buffer slot (and SGL pair) it owns until it completes
    length: int  # input bytes
    crc: int  # zlib.crc32 of the input, to judge the output by


_STATE_VERSION = 1
# the driver's queue positions (qp_status, qm->status) and its next request id
_POSITIONS = (
    "next_id",
    "sq_tail",
    "cq_head",
    "cq_phase",
    "eq_head",
    "eq_phase",
    "aeq_head",
    "aeq_phase",
)


class GuestZip:
    """A guest's ZIP driver on one queue of a ZIP VF, in a window of guest RAM it owns.

    Construction zeroes the queue memory and starts the QM and the queue the way
    hisi_qm_start / hisi_qm_start_qp do (hisi_qm.guest_qm_start, guest_qp_start). Then:

    * post(n, rng) queues up to n compression jobs: input data from `rng` written by the CPU
      into a free slot's input buffer, hw SGLs for input and output (or flat addresses), an
      SQE as hisi_zip_fill_sqe fills it (tag = the job id in dw26, SQE type 3) at the SQ tail,
      and the SQ doorbell rung per SQE (hisi_qp_send). A slot is reused only after its job
      completed; at most depth - 1 SQEs are outstanding (qm_get_avail_sqe).
    * reap() consumes EQEs and AEQEs (phase bits, qm_get_complete_eqe_num / qm_aeq_thread),
      then CQEs (phase bit, qm_poll_req_cb: each CQE's sq_head names the SQE whose tag and
      status the callback reads), rings the CQ doorbell per CQE and once more with priority 1
      (c_flag), and judges each completion: a tag completed before, a tag never posted, an
      output that does not decompress to exactly the input (length and CRC), are `errors`;
      a status other than 0 / HZIP_NC_ERR is a failed job (`failures`).
    * check(idle=...) raises GuestZipError for any error or failure, and with idle=True also
      for every job that never completed.

    Counters: `posted`, `completed` (ids in completion order), `outstanding` (id -> Job),
    `failures` (id -> status), `errors`.
    """

    def __init__(
        self,
        vf: HisiQmVf,
        ram: GuestRam,
        *,
        qp: int = 0,
        slots: int = 64,
        buf_size: int = 8192,
        alg: int = HZIP_ALG_TYPE_DEFLATE,
        buf_type: int = HZIP_SGL,
        depth: int = q.QM_Q_DEPTH,
        eq_depth: int = q.QM_EQ_DEPTH,
        min_len: int = 1024,
        max_len: int = 4096,
    ) -> None:
        config = dict(
            iova=ram.iova,
            qp=qp,
            slots=slots,
            buf_size=buf_size,
            alg=alg,
            buf_type=buf_type,
            depth=depth,
            eq_depth=eq_depth,
            min_len=min_len,
            max_len=max_len,
        )
        self._configure(vf, ram, config)
        self._reset_bookkeeping()
        self._start()

    @staticmethod
    def window_size(
        *,
        slots: int = 64,
        buf_size: int = 8192,
        depth: int = q.QM_Q_DEPTH,
        eq_depth: int = q.QM_EQ_DEPTH,
    ) -> int:
        """Bytes of guest RAM a GuestZip with these parameters needs (a page multiple)."""
        return ZipLayout(0, slots=slots, buf_size=buf_size, depth=depth, eq_depth=eq_depth).size

    def _configure(self, vf: HisiQmVf, ram: GuestRam, config: dict[str, int]) -> None:
        self.vf, self.ram, self.config = vf, ram, dict(config)
        c = self.config
        self.qp, self.slots, self.buf_size = c["qp"], c["slots"], c["buf_size"]
        self.alg, self.buf_type, self.depth = c["alg"], c["buf_type"], c["depth"]
        self.min_len, self.max_len = c["min_len"], c["max_len"]
        if self.alg not in _WBITS:
            raise ValueError(f"alg must be raw deflate or zlib, got {self.alg:#x}")
        if self.buf_type not in (HZIP_SGL, HZIP_PBUFFER):
            raise ValueError("buf_type must be HZIP_SGL or HZIP_PBUFFER")
        if not 1 <= self.min_len <= self.max_len <= self.buf_size:
            raise ValueError("need 1 <= min_len <= max_len <= buf_size")
        if self.slots < 1 or not 2 <= self.depth <= 1 << 12 or not 0 <= self.qp < q.QM_MAX_QP_NUM:
            raise ValueError("need slots >= 1, depth 2..4096, qp 0..1023")
        if c["iova"] != ram.iova:
            raise ValueError(f"the window is at {ram.iova:#x}, the driver's at {c['iova']:#x}")
        self.layout = ZipLayout(
            ram.iova,
            slots=self.slots,
            buf_size=self.buf_size,
            depth=self.depth,
            eq_depth=c["eq_depth"],
        )
        if ram.size < self.layout.size:
            raise ValueError(f"the window needs {self.layout.size:#x} bytes, has {ram.size:#x}")
        self.wbits = _WBITS[self.alg]

    def _reset_bookkeeping(self) -> None:
        self.next_id = 1  # tags start at 1: a zeroed SQE never names a job
        self.sq_tail = 0
        self.cq_head, self.cq_phase = 0, 1  # qm_init_qp_status: cqc_phase = true
        self.eq_head, self.eq_phase = 0, 1  # qm_init_eq_aeq_status
        self.aeq_head, self.aeq_phase = 0, 1
        self.outstanding: dict[int, Job] = {}
        self.completed: list[int] = []
        self._done: set[int] = set()
        self.failures: dict[int, int] = {}
        self.errors: list[str] = []

    def _start(self) -> None:
        lay = self.layout
        self.ram.zero(lay.iova, lay.queue_bytes)  # qm_eq_aeq_ctx_cfg / qp memory: zeroed
        q.guest_qm_start(
            self.vf,
            eqe_dma=lay.addr("eqe"),
            aeqe_dma=lay.addr("aeqe"),
            sqc_dma=lay.addr("sqc"),
            cqc_dma=lay.addr("cqc"),
            eq_depth=lay.eq_depth,
            aeq_depth=lay.aeq_depth,
        )
        q.guest_qp_start(
            self.vf,
            self.qp,
            sqe_dma=lay.addr("sqe"),
            cqe_dma=lay.addr("cqe"),
            depth=self.depth,
            sqe_size=HZIP_SQE_SIZE,
            alg_type=HZIP_ALG_TYPE_COMP,
        )

    # -- counters ---------------------------------------------------------------------------

    @property
    def posted(self) -> int:
        return self.next_id - 1

    # -- posting (zip_crypto.c hisi_zip_acompress -> hisi_zip_do_work -> hisi_qp_send) -------

    def post(
        self, n: int, rng: np.random.Generator, *, dest_avail_out: int | None = None
    ) -> list[int]:
        """Queue up to `n` jobs (fewer when slots or SQ entries run out); their ids.
        `dest_avail_out` overrides the output room given to the hardware (default: the
        whole output buffer)."""
        used = {job.slot for job in self.outstanding.values()}
        free = [s for s in range(self.slots) if s not in used]
        room = min(n, len(free), self.depth - 1 - len(self.outstanding))
        ids = []
        for slot in free[: max(room, 0)]:
            length = int(rng.integers(self.min_len, self.max_len + 1))
            # compressible: 8 letters, about 3 bits of entropy per byte
            data = (rng.integers(0, 8, size=length, dtype=np.uint8) + ord("a")).tobytes()
            ids.append(self._post_one(slot, data, dest_avail_out))
        return ids

    def _post_one(self, slot: int, data: bytes, dest_avail_out: int | None) -> int:
        lay, job_id = self.layout, self.next_id
        self.ram.write(lay.in_buf(slot), data)
        avail = self.buf_size if dest_avail_out is None else dest_avail_out
        if self.buf_type == HZIP_SGL:
            src, dst = lay.sgl(slot << 1), lay.sgl((slot << 1) + 1)
            self._write_sgl(src, lay.in_buf(slot), len(data))
            self._write_sgl(dst, lay.out_buf(slot), self.buf_size)
        else:
            src, dst = lay.in_buf(slot), lay.out_buf(slot)
        sqe = hisi_zip_sqe(
            source_addr_l=src & 0xFFFFFFFF,
            source_addr_h=src >> 32,
            dest_addr_l=dst & 0xFFFFFFFF,
            dest_addr_h=dst >> 32,
            input_data_length=len(data),
            dest_avail_out=avail,
            dw9=self.buf_type << HZIP_BUF_TYPE_SHIFT | self.alg,
            dw26=job_id,
            dw7=HZIP_SQE_TYPE_V3 << HZIP_SQE_TYPE_SHIFT,
        )
        self.ram.write(lay.sqe(self.sq_tail), bytes(sqe))
        self.sq_tail = (self.sq_tail + 1) % self.depth
        q.guest_db(self.vf, self.qp, q.QM_DOORBELL_CMD_SQ, self.sq_tail)
        self.outstanding[job_id] = Job(slot, len(data), zlib.crc32(data))
        self.next_id += 1
        return job_id

    def _write_sgl(self, at: int, buf: int, length: int) -> None:
        """hisi_acc_sg_buf_map_to_hw_sgl for one contiguous buffer."""
        head = hisi_acc_hw_sgl(
            entry_sum_in_chain=ZipLayout.SGE_NR,
            entry_sum_in_sgl=1,
            entry_length_in_sgl=ZipLayout.SGE_NR,
        )
        self.ram.write(at, bytes(head) + bytes(acc_hw_sge(buf=buf, len=length)))

    # -- completions (qm.c qm_work_process / qm_poll_req_cb, zip_crypto.c hisi_zip_acomp_cb) --

    def reap(self) -> list[int]:
        """Consume events and completions; the ids completed by this call, in order."""
        lay = self.layout
        eq_n = 0
        for _ in range(lay.eq_depth):
            dw0 = self.ram.u32(lay.eqe(self.eq_head))
            if dw0 >> q.QM_EQE_PHASE_SHIFT & 1 != self.eq_phase:
                break
            if dw0 & q.QM_EQE_CQN_MASK != self.qp:
                self.errors.append(f"EQE for queue {dw0 & q.QM_EQE_CQN_MASK}, not {self.qp}")
            self.eq_head, self.eq_phase = self._next(self.eq_head, self.eq_phase, lay.eq_depth)
            eq_n += 1
        if eq_n:
            q.guest_db(self.vf, 0, q.QM_DOORBELL_CMD_EQ, self.eq_head)
        aeq_n = 0
        for _ in range(lay.aeq_depth):
            dw0 = self.ram.u32(lay.aeqe(self.aeq_head))
            if dw0 >> q.QM_EQE_PHASE_SHIFT & 1 != self.aeq_phase:
                break
            kind, qn = dw0 >> q.QM_AEQE_TYPE_SHIFT, dw0 & q.QM_EQE_CQN_MASK
            self.errors.append(f"AEQ event type {kind} on queue {qn}")
            self.aeq_head, self.aeq_phase = self._next(
                self.aeq_head, self.aeq_phase, lay.aeq_depth
            )
            aeq_n += 1
        if aeq_n:
            q.guest_db(self.vf, 0, q.QM_DOORBELL_CMD_AEQ, self.aeq_head)
        done = []
        for _ in range(self.depth):
            cqe = q.qm_cqe.from_buffer_copy(self.ram.read(lay.cqe(self.cq_head), q.QM_CQE_SIZE))
            if cqe.w7 & 1 != self.cq_phase:
                break
            job_id = self._complete(int(cqe.sq_head))
            if job_id is not None:
                done.append(job_id)
            self.cq_head, self.cq_phase = self._next(self.cq_head, self.cq_phase, self.depth)
            q.guest_db(self.vf, self.qp, q.QM_DOORBELL_CMD_CQ, self.cq_head)
        q.guest_db(self.vf, self.qp, q.QM_DOORBELL_CMD_CQ, self.cq_head, 1)  # set c_flag
        return done

    @staticmethod
    def _next(head: int, phase: int, depth: int) -> tuple[int, int]:
        """One element on: at the end of the ring back to 0 with the phase flipped."""
        return (0, phase ^ 1) if head == depth - 1 else (head + 1, phase)

    def _complete(self, sq_head: int) -> int | None:
        """hisi_zip_acomp_cb for the SQE at `sq_head`; the job id it completed, if any."""
        if sq_head >= self.depth:
            self.errors.append(f"CQE names SQE {sq_head}, outside the SQ")
            return None
        sqe = hisi_zip_sqe.from_buffer_copy(self.ram.read(self.layout.sqe(sq_head), HZIP_SQE_SIZE))
        tag = sqe_tag(sqe)
        if tag in self._done:
            self.errors.append(f"job {tag} completed twice")
            return None
        job = self.outstanding.pop(tag, None)
        if job is None:
            self.errors.append(f"completion for job {tag}, which was never posted")
            return None
        self.completed.append(tag)
        self._done.add(tag)
        status = sqe.dw3 & HZIP_BD_STATUS_M
        if status not in (0, HZIP_NC_ERR):
            self.failures[tag] = status
            return tag
        problem = self._judge(job, int(sqe.produced))
        if problem:
            self.errors.append(f"job {tag}: {problem}")
        return tag

    def _judge(self, job: Job, produced: int) -> str:
        """Does the output decompress to exactly the input? An empty string when it does."""
        if not 0 < produced <= self.buf_size:
            return f"produced {produced} bytes"
        out = self.ram.read(self.layout.out_buf(job.slot), produced)
        d = zlib.decompressobj(wbits=self.wbits)
        try:
            data = d.decompress(out, job.length + 1)
        except zlib.error as e:
            return f"corrupt output ({e})"
        if not d.eof or d.unused_data or d.unconsumed_tail:
            return "corrupt output (not one complete stream)"
        if len(data) != job.length or zlib.crc32(data) != job.crc:
            return "output does not decompress to the input"
        return ""

    # -- judgement ------------------------------------------------------------------------

    def problems(self, *, idle: bool = False) -> list[str]:
        """Everything wrong so far; with idle=True also every job still outstanding (a job
        that never completed, when the caller expects the queue drained)."""
        out = list(self.errors)
        out += [f"job {j} failed with status {s:#x}" for j, s in sorted(self.failures.items())]
        if idle:
            out += [f"job {j} never completed" for j in sorted(self.outstanding)]
        return out

    def check(self, *, idle: bool = False) -> None:
        problems = self.problems(idle=idle)
        if problems:
            raise GuestZipError(problems)

    # -- migration: the driver's variables as plain data -------------------------------------

    def state(self) -> dict[str, Any]:
        """The driver's bookkeeping, JSON-able (what travels with the vCPU state)."""
        return {
            "version": _STATE_VERSION,
            "config": dict(self.config),
            **{key: getattr(self, key) for key in _POSITIONS},
            "outstanding": [[j, *job] for j, job in sorted(self.outstanding.items())],
            "completed": list(self.completed),
            "failures": [[j, s] for j, s in sorted(self.failures.items())],
            "errors": list(self.errors),
        }

    @classmethod
    def restore(cls, state: dict[str, Any], vf: HisiQmVf, ram: GuestRam) -> GuestZip:
        """The driver continuing on `vf` over `ram` (the guest's RAM on the destination,
        copied from the source, at the same guest-physical addresses). Nothing is written to
        the VF or the RAM: the queues are where the migrated QM and RAM left them."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown GuestZip state version {state.get('version')!r}")
        self = cls.__new__(cls)
        self._configure(vf, ram, {k: int(v) for k, v in state["config"].items()})
        self._reset_bookkeeping()
        for key in _POSITIONS:
            setattr(self, key, int(state[key]))
        self.outstanding = {
            int(j): Job(int(s), int(n), int(c)) for j, s, n, c in state["outstanding"]
        }
        self.completed = [int(j) for j in state["completed"]]
        self._done = set(self.completed)
        self.failures = {int(j): int(s) for j, s in state["failures"]}
        self.errors = [str(e) for e in state["errors"]]
        return self
