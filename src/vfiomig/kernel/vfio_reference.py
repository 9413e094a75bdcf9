"""The `reference` device: a configurable migratable device for tests and what-if work.

It behaves like a well-written variant driver (mlx5 is the model where drivers differ) and
its state really moves through the data fds.

Options (ModelKernel.add_device("reference", ...)):
  migration_flags   1, 3, 5 or 7 (STOP_COPY [| P2P] [| PRE_COPY]); anything else ValueError
  dma_logging       True: device DMA logging (log_ops) with a real device-side dirty log
  state_size        bytes of device state (0 to hundreds of MiB); default 256 KiB
  chunk_size        the state is kept and streamed in chunks of this many bytes (64 KiB)
  seed              the device's power-on content (deterministic, per chunk, never stored)
  fail_arc          (FROM, TO, mode): the single arc FROM -> TO fails; mode an errno (the
                    state stays at FROM) or "error" (the device falls into ERROR, SET fails
                    with EIO; only VFIO_DEVICE_RESET leaves ERROR). States by name or number.
  log_page_shift    (min, max) log2 page sizes the tracker can do (mlx5
                    pg_track_log_{min,max}_page_size); default (12, 21)
  log_max_ranges    ranges the tracker takes; more are merged (pg_track_max_num_range), 8
  log_addr_space    (min, max) log2 of the total tracked length (pg_track_log_*_addr_space),
                    outside: EOPNOTSUPP; default (12, 52)
  defects           set of injected bugs, for testing a conformance suite:
      "wrong_data_size"        MIG_DATA_SIZE reports half of the real STOP_COPY length
      "fd_on_wrong_arc"        STOP_COPY -> STOP and PRE_COPY(_P2P) -> STOP_COPY also hand out
                               a (new) saving data fd, which the uAPI forbids
      "lossy_resume"           the resuming side zeroes the last 8 bytes of every chunk it
                               receives: the restored state differs from the source's
      "lossy_precopy"          the resuming side keeps the first copy of each chunk and drops
                               the ones sent again: the dirty data of a save that started in
                               PRE_COPY while the device ran (a STOP_COPY-only stream sends
                               each chunk once and restores exactly)
      "log_misses_writes"      every 4th device DMA write is not recorded in the DMA log
      "no_einval_blocked_arc"  STOP_COPY -> PRE_COPY / PRE_COPY_P2P succeed as a direct arc
                               (the saving session continues) instead of EINVAL
      "accepts_truncated"      RESUMING -> STOP loads a stream that stopped short (chunks that
                               did not arrive get their power-on content) instead of EINVAL
      "log_not_cleared"        a DMA logging report does not clear the pages it reports

Device internals (`ReferenceHw`, reached with ModelKernel.device(path)):
  The state is `nchunks` chunks; chunk i holds gen(seed, i, versions[i]) (a splitmix64
  stream) unless an explicit override was restored into it. While the device runs (RUNNING,
  RUNNING_P2P, PRE_COPY, PRE_COPY_P2P) `hw.run(n)` changes n chunks (a deterministic
  sequence) and every DMA write it makes changes the chunk its IOVA page hashes to;
  `hw.reinit()` asks for new initial data (PRE_COPY REINIT, mlx5 style).
  `hw.state()` is the whole state, comparable with ==; `hw.digest()` hashes the bytes.

The data stream is a sequence of records, each a 24-byte header <magic, type, length,
version, index> and `length` payload bytes: DEV (seed, state_size, chunk_size, steps), one
CHUNK per chunk (the initial image, in index order), CHUNKs of chunks changed since they
were sent (dirty data), and in STOP_COPY a final END (steps, nchunks). Records are made
when they are read, so the whole image is never in memory. PRE_COPY reads answer ENOMSG
when nothing is available for now (mlx5vf_save_read); STOP_COPY reaches EOF after END.
The resuming side checks every header (EINVAL, then ENODEV: mlx5 marks the file in error)
and stages the state; RESUMING -> STOP loads it if complete, else EINVAL (state stays
RESUMING), as hisi/mtty check completeness.
"""

from __future__ import annotations

import hashlib
import struct
from errno import EINVAL, EIO, ENODEV, ENOMSG, EOPNOTSUPP
from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.device import DmaDevice
from vfiomig.hw.io_pgtable import PackedBits
from vfiomig.kernel.bitops import U64_MAX
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap
from vfiomig.kernel.machine import DRIVERS, ModelKernel
from vfiomig.kernel.vfio_fsm import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    PRECOPY_STATES,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
    VALID_MIGRATION_FLAGS,
    state_from_name,
    state_supported,
)
from vfiomig.kernel.vfio_migration import ResumingFile, SavingFile, mig_set_state
from vfiomig.kernel.vfio_pci_core import PciBar, PciFunction, VfioPciCoreDevice
from vfiomig.uapi import vfio as v

DEFECTS = frozenset(
    {
        "wrong_data_size",
        "fd_on_wrong_arc",
        "lossy_resume",
        "lossy_precopy",
        "log_misses_writes",
        "no_einval_blocked_arc",
        "accepts_truncated",
        "log_not_cleared",
    }
)
RUNNING_STATES = frozenset({RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P})

MAGIC = 0x56524546  # "VREF"
REC_DEV, REC_CHUNK, REC_END = 1, 2, 3
_REC = struct.Struct("<IIIIQ")  # magic, type, length, version, index
# The largest state the model holds (mlx5 states are "100s of MB"): its per-chunk versions
# stay bounded in memory.
MAX_STATE_SIZE = 64 << 30
MAX_CHUNKS = 1 << 24
_DEV = struct.Struct("<QQQQ")  # seed, state_size, chunk_size, steps
_END = struct.Struct("<QQ")  # steps, nchunks
DEV_RECORD = _REC.size + _DEV.size
END_RECORD = _REC.size + _END.size

_GOLDEN = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------------------------------
# content generation (deterministic, independent of numpy's RNG versions)


def _splitmix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def gen_chunk(seed: int, index: int, version: int, n: int) -> bytes:
    """The n bytes of chunk `index` at `version` of a device seeded `seed`."""
    base = (seed * _GOLDEN + (index << 32) + version * 0xD1B54A32D192ED03) & U64_MAX
    words = np.arange((n + 7) // 8, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(base)
    return _splitmix(words).tobytes()[:n]


def _mix(seed: int, steps: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    return _splitmix(steps * np.uint64(_GOLDEN) + np.uint64((seed ^ 0x5EED) & U64_MAX))


# ---------------------------------------------------------------------------------------
# the device-side DMA log (mlx5's page tracker, sparse numpy bits)


class DirtyLog:
    """Dirty pages of the tracked ranges: one sparse bitmap of log pages (hw PackedBits,
    allocated per window of 2^22 pages on the first write there), so that a range of 2^52
    bytes or more costs memory only where the device wrote, like a device tracker, which
    the kernel (mlx5vf_start_page_tracker) never sizes per page of the ranges."""

    def __init__(self, ranges: list[tuple[int, int]], page_shift: int) -> None:
        self.shift = page_shift
        self.page_size = 1 << page_shift
        # (first page, last page) per range, sorted; zero-length ranges track nothing
        self.spans = [
            (start >> page_shift, (start + length - 1) >> page_shift)
            for start, length in ranges
            if length
        ]
        self.bits = PackedBits()

    def _overlaps(self, iova: int, length: int) -> list[tuple[int, int]]:
        """[first, last] log pages of every range that meets [iova, iova+length)."""
        q0, q1 = iova >> self.shift, (iova + length - 1) >> self.shift
        return [(max(p0, q0), min(p1, q1)) for p0, p1 in self.spans if p0 <= q1 and q0 <= p1]

    def mark(self, iova: int, length: int) -> None:
        if length <= 0:
            return
        for a, b in self._overlaps(iova, length):
            self.bits.set(a, b + 1)

    def read_and_clear(self, iova: int, length: int) -> npt.NDArray[np.uint64]:
        """Start addresses of the dirty pages meeting [iova, iova+length); clears them."""
        if length <= 0:
            return np.zeros(0, dtype=np.uint64)
        found = []
        for a, b in self._overlaps(iova, length):
            found.append(self.bits.nonzero(a, b + 1))
            self.bits.clear(a, b + 1)
        if not found:
            return np.zeros(0, dtype=np.uint64)
        pages = np.unique(np.concatenate(found)).astype(np.uint64)
        return pages << np.uint64(self.shift)


def _check_log_options(
    seed: int,
    log_page_shift: tuple[int, int],
    log_max_ranges: int,
    log_addr_space: tuple[int, int],
) -> None:
    """The device's capabilities must be ones a device could report (like mlx5's caps)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    lo, hi = log_page_shift
    if not 12 <= lo <= hi <= 63:
        raise ValueError(
            f"log_page_shift must be (min, max) with 12 <= min <= max <= 63, got {log_page_shift!r}"
        )
    if log_max_ranges < 1:
        raise ValueError(f"log_max_ranges must be >= 1, got {log_max_ranges!r}")
    lo, hi = log_addr_space
    if not 0 <= lo <= hi <= 64:
        raise ValueError(
            f"log_addr_space must be (min, max) with 0 <= min <= max <= 64, got {log_addr_space!r}"
        )


def vfio_combine_iova_ranges(nodes: list[list[int]], req: int) -> list[list[int]]:
    """drivers/vfio/vfio_main.c vfio_combine_iova_ranges on sorted [start, last] nodes:
    repeatedly merge the first pair with the smallest gap (one node: span everything)."""
    nodes = [list(n) for n in sorted(nodes)]
    if req == 1:
        return [[nodes[0][0], nodes[-1][1]]]
    while len(nodes) > req:
        gaps = [(nodes[i][0] - nodes[i - 1][1]) & U64_MAX for i in range(1, len(nodes))]
        i = gaps.index(min(gaps)) + 1
        nodes[i - 1][1] = nodes[i][1]
        del nodes[i]
    return nodes


# ---------------------------------------------------------------------------------------
# the hardware


class ReferenceHw(DmaDevice):
    def __init__(self, dev: ReferenceDevice, state_size: int, chunk_size: int, seed: int) -> None:
        super().__init__(dev.kernel.mm, f"reference{dev.index}")
        self.dev = dev
        self.state_size = state_size
        self.chunk_size = chunk_size
        self.nchunks = -(-state_size // chunk_size)
        self.power_on_seed = seed
        self.log: DirtyLog | None = None
        self.dma_writes = 0
        self.reinit_seq = 0
        self.power_on()

    def power_on(self) -> None:
        self.seed = self.power_on_seed
        self.versions = np.zeros(self.nchunks, dtype=np.uint32)
        self.overrides: dict[int, bytes] = {}
        self.steps = 0  # how far the device's work sequence has run

    @property
    def running(self) -> bool:
        return self.dev.mig_state in RUNNING_STATES

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.state_size - i * self.chunk_size)

    def chunk(self, i: int) -> bytes:
        o = self.overrides.get(i)
        return (
            o
            if o is not None
            else gen_chunk(self.seed, i, int(self.versions[i]), self.chunk_len(i))
        )

    def _touch(self, idx: npt.NDArray[np.int64]) -> None:
        np.add.at(self.versions, idx, 1)
        for i in set(idx.tolist()) & self.overrides.keys():
            del self.overrides[i]  # the chunk is generated content again

    def run(self, n: int = 1) -> int:
        """Do n units of work (each changes one chunk) if running; returns the units done."""
        if not self.running or n <= 0 or self.nchunks == 0:
            return 0
        steps = np.arange(self.steps, self.steps + n, dtype=np.uint64)
        self._touch((_mix(self.seed, steps) % np.uint64(self.nchunks)).astype(np.int64))
        self.steps += n
        return n

    def reinit(self) -> None:
        """New initial data appears (only while running): PRE_COPY readers restart."""
        if self.running:
            self.reinit_seq += 1

    def on_dma_write(self, iova: int, length: int) -> None:
        self.dma_writes += 1
        log = self.log
        if log is not None and not (
            "log_misses_writes" in self.dev.defects and self.dma_writes % 4 == 0
        ):
            log.mark(iova, length)
        if self.running and self.nchunks:
            self._touch(np.array([(iova >> 12) % self.nchunks], dtype=np.int64))

    def state(self) -> tuple[object, ...]:
        """The complete device state, comparable with ==."""
        return (
            self.seed,
            self.state_size,
            self.chunk_size,
            self.steps,
            self.versions.tobytes(),
            tuple(sorted(self.overrides.items())),
        )

    def digest(self) -> str:
        """sha256 of the state's bytes and the work counter (independent of representation)."""
        h = hashlib.sha256(_END.pack(self.steps, self.nchunks))
        for i in range(self.nchunks):
            h.update(self.chunk(i))
        return h.hexdigest()

    def read_state(self, offset: int, n: int) -> bytes:
        out = bytearray()
        while n > 0 and offset < self.state_size:
            i, off = divmod(offset, self.chunk_size)
            part = self.chunk(i)[off : off + n]
            out += part
            offset += len(part)
            n -= len(part)
        return bytes(out)


# ---------------------------------------------------------------------------------------
# data files


def _record(rtype: int, version: int, index: int, payload: bytes) -> bytes:
    return _REC.pack(MAGIC, rtype, len(payload), version, index) + payload


class RefSavingFile(SavingFile):
    def __init__(self, dev: ReferenceDevice) -> None:
        super().__init__(dev)
        self.hw = dev.ref_hw
        self.buf = b""  # the record being read
        self.off = 0
        self.buf_initial = False
        self.end_sent = False
        self.reinit_reported = True
        self._restart()
        self.reinit_seen = self.hw.reinit_seq

    def _restart(self) -> None:
        self.cursor = -1  # -1: the DEV record is next; then chunks 0.. of the initial image
        self.sent = np.full(self.hw.nchunks, -1, dtype=np.int64)  # version sent per chunk

    def _check_reinit(self) -> None:
        if self.hw.reinit_seq != self.reinit_seen:
            self.reinit_seen = self.hw.reinit_seq
            self._restart()  # takes effect after the record being read (framing stays)
            self.reinit_reported = False

    def _dirty(self) -> npt.NDArray[np.intp]:
        """Chunks already sent (behind the initial cursor) that changed since."""
        c = max(self.cursor, 0)
        return np.flatnonzero(self.sent[:c] != self.hw.versions[:c].astype(np.int64))

    def _next_record(self) -> bool:
        self._check_reinit()
        hw = self.hw
        if self.cursor < 0:
            payload = _DEV.pack(hw.seed, hw.state_size, hw.chunk_size, hw.steps)
            self._load(_record(REC_DEV, 0, 0, payload), True)
        elif self.cursor < hw.nchunks:
            self._load(self._chunk_record(self.cursor), True)
        else:
            dirty = self._dirty()
            if dirty.size:
                self._load(self._chunk_record(int(dirty[0])), False)
                return True
            if self.device.mig_state != STOP_COPY or self.end_sent:
                return False
            self.end_sent = True
            self._load(_record(REC_END, 0, 0, _END.pack(hw.steps, hw.nchunks)), False)
            return True
        self.cursor += 1
        return True

    def _chunk_record(self, i: int) -> bytes:
        ver = int(self.hw.versions[i])
        self.sent[i] = ver
        return _record(REC_CHUNK, ver, i, self.hw.chunk(i))

    def _load(self, rec: bytes, initial: bool) -> None:
        self.buf, self.off, self.buf_initial = rec, 0, initial

    def produce(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            if self.off == len(self.buf) and not self._next_record():
                break
            part = self.buf[self.off : self.off + n - got]
            self.off += len(part)
            got += len(part)
            parts.append(part)
        if not got and n and self.device.mig_state in PRECOPY_STATES:
            raise err(ENOMSG)  # temporary end of stream (mlx5vf_save_read)
        return b"".join(parts)

    def pending(self) -> tuple[int, int]:
        """(initial bytes, dirty bytes) not read yet."""
        self._check_reinit()
        hw = self.hw
        rest = len(self.buf) - self.off
        cur = max(self.cursor, 0)
        initial = (DEV_RECORD if self.cursor < 0 else 0) + (hw.nchunks - cur) * _REC.size
        initial += max(0, hw.state_size - cur * hw.chunk_size)
        dirty = self._dirty()
        dirty_bytes = int(dirty.size) * (_REC.size + hw.chunk_size)
        if dirty.size and dirty[-1] == hw.nchunks - 1:  # the last chunk may be short
            dirty_bytes -= hw.chunk_size - hw.chunk_len(hw.nchunks - 1)
        if self.buf_initial:
            initial += rest
        else:
            dirty_bytes += rest
        return initial, dirty_bytes

    def precopy_info(self, info: v.vfio_precopy_info) -> None:
        info.initial_bytes, info.dirty_bytes = self.pending()
        if self.device.precopy_info_v2 and not self.reinit_reported:
            info.flags |= v.VFIO_PRECOPY_INFO_REINIT
        self.reinit_reported = True

    def remaining(self) -> int:
        initial, dirty = self.pending()
        return initial + dirty + (0 if self.end_sent else END_RECORD)

    def disable(self) -> None:
        super().disable()
        self.buf = b""


class RefResumingFile(ResumingFile):
    def __init__(self, dev: ReferenceDevice) -> None:
        super().__init__(dev)
        self.dev = dev
        hw = dev.ref_hw
        self.hw = hw
        self.head = bytearray()
        self.rec: tuple[int, int, int, int] | None = None  # type, length, version, index
        self.payload = bytearray()
        self.broken = False
        self.seed: int | None = None
        self.versions = np.zeros(hw.nchunks, dtype=np.uint32)
        self.received = np.zeros(hw.nchunks, dtype=bool)
        self.overrides: dict[int, bytes] = {}
        self.end_steps: int | None = None

    def consume(self, data: bytes) -> int:
        if self.broken:
            raise err(ENODEV)  # mlx5: a resume file in error state
        try:
            self._parse(memoryview(data))
        except OSError:
            self.broken = True
            raise
        return len(data)

    def _parse(self, mv: memoryview) -> None:
        i = 0
        while i < len(mv):
            if self.rec is None:
                take = min(_REC.size - len(self.head), len(mv) - i)
                self.head += mv[i : i + take]
                i += take
                if len(self.head) == _REC.size:
                    self.rec = self._header(bytes(self.head))
                    self.head.clear()
            else:
                take = min(self.rec[1] - len(self.payload), len(mv) - i)
                self.payload += mv[i : i + take]
                i += take
            if self.rec is not None and len(self.payload) == self.rec[1]:
                self._apply(*self.rec, bytes(self.payload))
                self.rec = None
                self.payload.clear()

    def _header(self, raw: bytes) -> tuple[int, int, int, int]:
        magic, rtype, length, version, index = _REC.unpack(raw)
        hw = self.hw
        expect = {REC_DEV: _DEV.size, REC_END: _END.size}
        if rtype == REC_CHUNK and index < hw.nchunks and self.seed is not None:
            expect[REC_CHUNK] = hw.chunk_len(index)
        if magic != MAGIC or expect.get(rtype) != length:
            raise err(EINVAL)
        return rtype, length, version, index

    def _apply(self, rtype: int, length: int, version: int, index: int, payload: bytes) -> None:
        hw = self.hw
        if rtype == REC_DEV:
            seed, size, chunk, _steps = _DEV.unpack(payload)
            if (size, chunk) != (hw.state_size, hw.chunk_size):
                raise err(EINVAL)  # not the same kind of device
            self.seed = seed
        elif rtype == REC_END:
            self.end_steps = _END.unpack(payload)[0]
        else:
            assert self.seed is not None
            if "lossy_precopy" in self.dev.defects and self.received[index]:
                return  # the chunk's dirty (re-sent) data is dropped
            if "lossy_resume" in self.dev.defects:
                payload = payload[:-8] + bytes(min(8, len(payload)))
            self.versions[index] = version
            self.received[index] = True
            if payload == gen_chunk(self.seed, index, version, len(payload)):
                self.overrides.pop(index, None)
            else:
                self.overrides[index] = payload

    def commit(self) -> None:
        """RESUMING -> STOP: load the staged state, or EINVAL if it is not complete."""
        if "accepts_truncated" in self.dev.defects and not self.broken and self.seed is not None:
            self.received[:] = True  # what did not arrive: version 0, the power-on content
            self.rec = None  # a record cut short is dropped
            self.head.clear()
            if self.end_steps is None:
                self.end_steps = self.hw.steps
        if (
            self.broken
            or self.rec is not None
            or self.head
            or self.seed is None
            or self.end_steps is None
            or not self.received.all()
        ):
            raise err(EINVAL)
        hw = self.hw
        hw.seed, hw.steps = self.seed, self.end_steps
        hw.versions = self.versions.copy()
        hw.overrides = dict(self.overrides)


# ---------------------------------------------------------------------------------------
# the driver


def _parse_fail_arc(spec: Any) -> tuple[int, int, str | int] | None:
    if spec is None:
        return None
    try:
        src, dst, mode = spec
    except (TypeError, ValueError):
        raise ValueError(f"fail_arc must be (FROM, TO, mode), got {spec!r}") from None
    if mode != "error" and not (isinstance(mode, int) and mode > 0):
        raise ValueError(f"fail_arc mode must be 'error' or a positive errno, got {mode!r}")
    return state_from_name(src), state_from_name(dst), mode


# The reference device's PCI function (the model's own layout; ids arbitrary): a PCIe
# endpoint alone below a bridge (a bus reset reaches only it), INTx pin A, one MSI vector,
# 64 MSI-X vectors with the table at BAR0 + 0x2000 and the PBA at BAR0 + 0x3000.
# BAR0: 1 MiB 64-bit memory; BAR2: 16 KiB 64-bit prefetchable memory; BAR4: 256 bytes of
# I/O ports. All three are plain memory in the model (no registers behind them).
REFERENCE_PCI = PciFunction(
    vendor=0x1B36,
    device=0x11FF,
    class_code=0xFF0000,  # unassigned class
    revision=0x01,
    bars=(
        PciBar(size=1 << 20, start=0x8000_0000, mem64=True),
        PciBar(),
        PciBar(size=16 << 10, start=0x8010_0000, mem64=True, prefetch=True),
        PciBar(),
        PciBar(size=256, start=0x1000, io=True),
        PciBar(),
    ),
    intx_pin=1,
    msi_vectors=1,
    msix_vectors=64,
    msix_bar=0,
    msix_offset=0x2000,
    pba_offset=0x3000,
    reset_scope="bus",
    bus=0x10,
)


class ReferenceDevice(VfioPciCoreDevice):
    kind = "reference"
    pci_function = REFERENCE_PCI

    def __init__(
        self,
        kernel: ModelKernel,
        index: int,
        *,
        migration_flags: int = 7,
        dma_logging: bool = True,
        state_size: int = 256 * 1024,
        chunk_size: int = 64 * 1024,
        seed: int = 0,
        fail_arc: Any = None,
        log_page_shift: tuple[int, int] = (12, 21),
        log_max_ranges: int = 8,
        log_addr_space: tuple[int, int] = (12, 52),
        defects: set[str] | frozenset[str] = frozenset(),
        iommu_dirty: bool = True,
    ) -> None:
        if migration_flags not in VALID_MIGRATION_FLAGS:
            raise ValueError(f"migration_flags must be one of 1, 3, 5, 7, got {migration_flags!r}")
        if state_size < 0 or chunk_size <= 0:
            raise ValueError("state_size must be >= 0 and chunk_size > 0")
        if state_size > MAX_STATE_SIZE or -(-state_size // chunk_size) > MAX_CHUNKS:
            raise ValueError(
                f"state_size must be at most {MAX_STATE_SIZE >> 30} GiB in at most "
                f"{MAX_CHUNKS} chunks (the model keeps a version per chunk)"
            )
        unknown = set(defects) - DEFECTS
        if unknown:
            raise ValueError(f"unknown defects {sorted(unknown)}; known: {sorted(DEFECTS)}")
        _check_log_options(seed, log_page_shift, log_max_ranges, log_addr_space)
        super().__init__(kernel, index, iommu_dirty=iommu_dirty)
        self.migration_flags = migration_flags
        self.has_log_ops = dma_logging
        self.fail_arc = fail_arc
        self.log_page_shift = log_page_shift
        self.log_max_ranges = log_max_ranges
        self.log_addr_space = log_addr_space
        self.defects = frozenset(defects)
        self.ref_hw = ReferenceHw(self, state_size, chunk_size, seed)
        self.hw = self.ref_hw

    @property
    def fail_arc(self) -> tuple[int, int, str | int] | None:
        """(FROM, TO, mode) with states as numbers; settable like the option."""
        return self._fail_arc

    @fail_arc.setter
    def fail_arc(self, spec: Any) -> None:
        self._fail_arc = _parse_fail_arc(spec)

    # -- migration -------------------------------------------------------------------

    def migration_set_state(self, new: int) -> File | None:
        if (
            "no_einval_blocked_arc" in self.defects
            and self.mig_state == STOP_COPY
            and new in PRECOPY_STATES
            and state_supported(self.migration_flags, new)
        ):
            self.mig_state = new  # the blocked arc, taken as if it were legal
            return None
        return mig_set_state(self, new)

    def step(self, cur: int, new: int) -> File | None:
        self._maybe_fail(cur, new)
        if new == STOP_COPY and cur == STOP or new in PRECOPY_STATES and cur not in PRECOPY_STATES:
            # STOP -> STOP_COPY, RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P
            self.saving_file = RefSavingFile(self)
            return self.saving_file
        if cur == STOP and new == RESUMING:
            self.resuming_file = RefResumingFile(self)
            return self.resuming_file
        if cur == RESUMING:  # -> STOP: load the state; on failure stay RESUMING
            f = self.resuming_file
            assert isinstance(f, RefResumingFile)
            f.commit()
            self.disable_fds()
            return None
        if cur == STOP_COPY or cur in PRECOPY_STATES and new not in PRECOPY_STATES + (STOP_COPY,):
            # STOP_COPY -> STOP, PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P: session ends
            self.disable_fds()
            if "fd_on_wrong_arc" in self.defects and cur == STOP_COPY:
                self.saving_file = RefSavingFile(self)
                return self.saving_file
            return None
        if cur in PRECOPY_STATES and new == STOP_COPY and "fd_on_wrong_arc" in self.defects:
            self.disable_fds()
            self.saving_file = RefSavingFile(self)
            return self.saving_file
        # RUNNING <-> RUNNING_P2P <-> STOP, PRE_COPY <-> PRE_COPY_P2P, PRE_COPY* -> STOP_COPY:
        # the device starts or stops; the saving session (if any) continues.
        return None

    def _maybe_fail(self, cur: int, new: int) -> None:
        if self.fail_arc is None or self.fail_arc[:2] != (cur, new):
            return
        mode = self.fail_arc[2]
        if mode == "error":
            self.disable_fds()
            self.mig_state = ERROR
            raise err(EIO)
        assert isinstance(mode, int)
        raise err(mode)

    def get_data_size(self) -> int:
        f = self.saving_file
        hw = self.ref_hw
        if f is not None and f.live and isinstance(f, RefSavingFile):
            size = f.remaining()
        else:
            size = DEV_RECORD + hw.nchunks * _REC.size + hw.state_size + END_RECORD
        return size // 2 if "wrong_data_size" in self.defects else size

    def reset(self) -> None:
        """A function-level reset: power-on content, RUNNING, data fds disabled."""
        super().reset()
        self.ref_hw.power_on()

    # -- DMA logging (mlx5vf_start_page_tracker / mlx5vf_create_tracker) -------------

    def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        if self.ref_hw.log is not None:
            raise err(EINVAL)  # already active
        log_page = (page_size.bit_length() - 1) & 0xFF  # u8 = ilog2(); ilog2(0) = -1 -> 255
        lo, hi = self.log_page_shift
        log_page = min(max(log_page, lo), hi)
        nodes = [[s, (s + n - 1) & U64_MAX] for s, n in ranges]
        if len(nodes) > self.log_max_ranges:
            nodes = vfio_combine_iova_ranges(nodes, self.log_max_ranges)
        merged = [(s, ((last - s + 1) & U64_MAX)) for s, last in nodes]
        total = sum(n for _, n in merged) & U64_MAX
        log_space = (total - 1).bit_length() if total > 1 else 0  # ilog2(roundup_pow_of_two)
        if not self.log_addr_space[0] <= log_space <= self.log_addr_space[1]:
            raise err(EOPNOTSUPP)
        self.ref_hw.log = DirtyLog(merged, log_page)
        return 1 << log_page

    def log_stop(self) -> None:
        self.ref_hw.log = None

    def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        log = self.ref_hw.log
        if log is None:
            raise err(EINVAL)  # mlx5vf_tracker_read_and_clear: !log_active
        pages = log.read_and_clear(iova, length)
        if "log_not_cleared" in self.defects:
            for page in pages.tolist():
                log.mark(page, 1)
        bitmap.set_ranges(pages, log.page_size)


DRIVERS["reference"] = ReferenceDevice
