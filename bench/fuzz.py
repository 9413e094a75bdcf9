"""Structure-aware fuzzer of the model kernel's syscall surface (hardening issue, item 5).

    python bench/fuzz.py --seed N --calls M            one seed, M fuzzed calls
    python bench/fuzz.py --until 1000000 [--seed S]    seeds S, S+1, ... (--calls each, 5000
                                                       by default) until that many calls
    python bench/fuzz.py --seed N --calls M --trace    print every call as Python
    python bench/fuzz.py --seed N --calls M --minimize shrink the first defect to a few calls

Every seed starts from a realistic machine (`Fuzzer.build`, through the syscalls only): the
seed's IOMMU vendor (smmuv3, vtd, amd by seed % 3); an iommufd with IOASes (guest RAM,
a read-only window, unbacked memory, an IOAS_COPY), a dirty-tracking HWPT with dirty
tracking on and a plain one; devices of every kind bound and attached (physical ones to
the HWPTs or to an IOAS, mtty through its ACCESS), some DMA-logging; a second iommufd; a
type1 container with groups of every kind, mappings and dirty tracking on; and devices of
every kind in every migration state their flags allow (ERROR too), walked there with valid
VFIO_DEVICE_FEATURE MIG_DEVICE_STATE calls, with their data fds open and partly read or
written.

Then it draws calls (`Fuzzer.step`):

* ioctls from a template for every request the two uAPI headers define (`TEMPLATES`,
  checked complete by tests/test_fuzz.py): a valid argument struct for a live object of
  the right kind, then 0-4 field mutations chosen by the field's role (sizes around the
  struct's size, flag bits, ids of existing and missing objects of every type, fds of
  every kind and closed ones, IOVAs and lengths at mapping edges, reserved regions,
  apertures and overflow, page sizes, pointers into mapped, unbacked, unmapped and
  non-user memory, counts), buffer mutations (short, zero- or junk-extended) and buffer
  forms (read-only bytes, memoryview, numpy, ctypes, an int, junk objects);
* valid migration walks (MIG_DEVICE_STATE SET to any state), reads and writes on data fds
  (sizes 0, 1, stream pieces, huge; valid, corrupt and foreign streams) in every state;
* open, close, lseek, pread, poll, mmap and munmap, including close and munmap under live
  objects; raw ioctls with junk requests and arguments;
* device DMA interleaved: `kernel.device(path).dma_write/dma_read` at mapped, read-only,
  unmapped and edge IOVAs, and device work (reference run, mtty UART traffic, QM engine).

After every step the fuzzer checks invariants through the syscalls (`Fuzzer.check_step`,
and a full sweep every SWEEP steps): the open fds change only as the step allows (a closed
fd is EBADF, no fd appears or vanishes otherwise); a touched device answers
MIG_DEVICE_STATE GET with a state its flags allow (or ERROR), changed only by a call that
may change it, and equal to the state a successful SET asked for; every known IOAS answers
IOAS_IOVA_RANGES with sorted disjoint ranges and vanishes only by IOMMU_DESTROY; every live
fd of every kind answers its ping ioctl (GET_API_VERSION, GROUP_GET_STATUS, DEVICE_GET_INFO,
MIG_GET_PRECOPY_INFO, ...); a DMA write reads back. Any exception other than OSError from
a syscall (other than OSError, IommuFault or UnbackedDma from the hardware side) is a
defect; so is a call that grows the peak RSS by more than SPIKE_MIB or takes longer than
HANG_S. A finding ends its seed (the machine may be inconsistent after it).

Output: calls, calls/s, results by type (OSError by errno, and every other exception type),
findings with seed, step and call, and the peak RSS (resource.getrusage). Exit status 1 if
a finding is not a KNOWN_DEFECTS entry (defects recorded as xfail tests in files of other
work in progress).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import random
import resource
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vfiomig.hw import hisi_qm
from vfiomig.hw.dma import UnbackedDma
from vfiomig.hw.iommu import VENDORS, IommuFault
from vfiomig.hw.memory import MMAP_BASE, PAGE_SIZE, TASK_SIZE_MAX
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.vfio_fsm import (
    ERROR,
    NUM_STATES,
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
    state_supported,
)
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MIB = 1 << 20

SWEEP = 64  # a full invariant sweep every SWEEP steps (and at the end of a seed)
SPIKE_MIB = 256  # one call growing the peak RSS by more than this is a finding
HANG_S = 20.0  # one call taking longer than this is a finding
FD_SOFT_LIMIT = 256  # above this many open fds the fuzzer closes rather than opens
DEFAULT_CALLS = 5000

# fd kinds the fuzzer tells apart (what the fd refers to)
IOMMUFD, CONTAINER, GROUP, DEVICE, SAVING, RESUMING_FD, OTHER = (
    "iommufd",
    "container",
    "group",
    "device",
    "saving",
    "resuming",
    "other",
)

GET = v.VFIO_DEVICE_FEATURE_GET
SET = v.VFIO_DEVICE_FEATURE_SET
PROBE = v.VFIO_DEVICE_FEATURE_PROBE
MIG_STATE = v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE

# The IOVA layout every machine starts with.
RAM_SIZE = 8 * MIB
IOVA_RAM = 1 << 30  # guest RAM, read-write, in IOAS 1 (and IOAS 3 of the second iommufd)
IOVA_RO = 0x8000_0000  # the first MiB of RAM again, read-only
IOVA_BIG = 1 << 36  # 1 GiB of unbacked memory, read-write
BIG_MAPPED = 1 << 30
IOVA_T1 = 0x1000_0000  # the type1 container's RAM mapping (4 MiB), read-write
IOVA_T1_RO = IOVA_T1 + 8 * MIB  # and 1 MiB more of RAM, read-only

# Values at the edges of the IOVA space and of the vendors' apertures and reserved regions.
EDGE_IOVAS = [
    0,
    1,
    0xFFF,
    0x1000,
    0x20_0000,
    0x0800_0000,  # ARM SW_MSI
    0xFEE0_0000,  # x86 MSI
    0xFD_0000_0000,  # AMD HyperTransport
    1 << 32,
    (1 << 48) - 0x1000,  # the 48-bit aperture's last page
    1 << 48,
    1 << 52,
    1 << 63,
    U64 - 0x1F_FFFF,
    U64 - 0xFFF,
    U64 - 7,
    U64,
]
EDGE_LENGTHS = [
    0,
    1,
    7,
    0xFFF,
    0x1000,
    0x1001,
    0x2000,
    0x1_0000,
    0x20_0000,
    0x20_1000,
    1 << 30,
    1 << 32,
    1 << 40,
    1 << 47,
    1 << 63,
    U64 - 0xFFF,
    U64 - (1 << 30) + 1,
    U64,
]
PAGE_SIZES = [0, 1, 2, 3, 512, 0xFFF, 0x1000, 0x1001, 0x3000, 0x2000, 0x1_0000, 0x20_0000]
PAGE_SIZES += [1 << 30, 1 << 31, 1 << 32, 1 << 52, 1 << 63, U64]
COUNTS = [0, 1, 2, 3, 7, 8, 9, 16, 255, 256, 257, 4096, 0x7FFF_FFFF, 0x8000_0000, U32]
SMALL = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 255, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, U32]
BAD_POINTERS = [0, 1, 0x10, 0x1000, MMAP_BASE - 8, TASK_SIZE_MAX - 8, TASK_SIZE_MAX]
BAD_POINTERS += [0xFFFF_8000_0000_0000, U64 - 7, 1 << 63]
BAD_FDS = [-1, 0, 1, 2, 999, 1023, 1024, 0x7FFF_FFFF, -0x8000_0000]
READ_SIZES = [0, 1, 7, 8, 23, 24, 25, 39, 40, 41, 60, 96, 176, 177, 4096, 65536, MIB]
READ_SIZES += [1 << 30, 1 << 62]


class CallTimeout(BaseException):
    """A call took longer than HANG_S (raised by SIGALRM)."""


# ---------------------------------------------------------------------------------------
# calls: what the fuzzer does, as plain values (printable, replayable)


@dataclass(frozen=True)
class Arg:
    """An ioctl argument as passed: `form` says what object the bytes become."""

    form: str  # bytearray bytes memoryview numpy ctypes strided int junk
    data: bytes = b""
    value: Any = 0  # form "int": the value; form "junk": the object

    def make(self) -> Any:
        f = self.form
        if f == "bytearray":
            return bytearray(self.data)
        if f == "bytes":
            return bytes(self.data)
        if f == "memoryview":
            return memoryview(bytearray(self.data))
        if f == "numpy":
            return np.frombuffer(bytearray(self.data), dtype=np.uint8).copy()
        if f == "ctypes":
            return ctypes.create_string_buffer(self.data, len(self.data))
        if f == "strided":
            return np.frombuffer(bytearray(self.data * 2 or b"\0\0"), dtype=np.uint8)[::2]
        return self.value  # int, junk

    def render(self) -> str:
        f = self.form
        if f in ("int", "junk"):
            return repr(self.value)
        hexed = f'bytes.fromhex("{self.data.hex()}")'
        return {
            "bytearray": f"bytearray({hexed})",
            "bytes": hexed,
            "memoryview": f"memoryview(bytearray({hexed}))",
            "numpy": f"np.frombuffer(bytearray({hexed}), dtype=np.uint8).copy()",
            "ctypes": f"ctypes.create_string_buffer({hexed}, {len(self.data)})",
            "strided": f"np.frombuffer(bytearray({hexed} * 2), dtype=np.uint8)[::2]",
        }[f]


@dataclass(frozen=True)
class Call:
    """One fuzzed call: a ModelKernel syscall (op = its name) or the hardware side
    (op = dma_write, dma_read, hw_work with a device path first)."""

    op: str
    args: tuple[Any, ...]
    name: str = ""  # the ioctl's name, or what the call is for

    def render(self) -> str:
        if self.op == "ioctl":
            fd, req, arg = self.args
            req_s = f"{req:#x}" if isinstance(req, int) else repr(req)
            line = f"k.ioctl({fd!r}, {req_s}, {arg.render()})"
        elif self.op in ("dma_write", "dma_read"):
            path, iova, data = self.args
            line = f"k.device({path!r}).{self.op}({iova:#x}, {data!r})"
        elif self.op == "hw_work":
            path, what, n = self.args
            line = f"hw_work(k.device({path!r}), {what!r}, {n!r})"
        elif self.op == "write" and isinstance(self.args[1], bytes | bytearray | memoryview):
            fd, data = self.args
            raw = bytes(data)
            shown = repr(raw) if len(raw) <= 64 else f'bytes.fromhex("{raw.hex()}")'
            if isinstance(data, memoryview):
                shown = f"memoryview(bytearray({shown}))"
            line = f"k.write({fd!r}, {shown})"
        else:
            line = f"k.{self.op}({', '.join(repr(a) for a in self.args)})"
        return f"{line}  # {self.name}" if self.name else line


def hw_work(hw: Any, what: str, n: int) -> None:
    """Device activity that is not a syscall: the reference device's work loop, a guest
    sending bytes through an mtty UART and reading them back, the QM engine."""
    if what == "run":
        hw.run(n)
    elif what == "reinit":
        hw.reinit()
    elif what == "uart":
        port = n % hw.nr_ports
        hw.send(port, bytes(range(n % 20)))
        hw.recv(port, n % 24)
    elif what == "engine":
        hw.engine_step(n)


def _kernel_where(tb: Any) -> str:
    """file:line function of the innermost frame in vfiomig (or the innermost frame)."""
    frames = traceback.extract_tb(tb)
    inner = [f for f in frames if "/vfiomig/" in f.filename] or frames
    if not inner:
        return "?"
    f = inner[-1]
    path = f.filename.split("/src/", 1)[-1]
    return f"{path}:{f.lineno} {f.name}"


@dataclass
class Finding:
    seed: int
    step: int
    kind: str  # exception, invariant, memory, hang, setup
    what: str  # exception type or invariant name
    where: str  # file:line function (exceptions), or the object concerned
    call: str  # the call that did it (rendered)
    detail: str = ""

    @property
    def signature(self) -> tuple[str, str, str]:
        return (self.kind, self.what, self.where)

    @property
    def known(self) -> str | None:
        for sig, note in KNOWN_DEFECTS.items():
            if sig[0] == self.kind and sig[1] == self.what and sig[2] in self.where:
                return note
        return None

    def __str__(self) -> str:
        head = f"seed {self.seed} step {self.step}: {self.kind} {self.what} at {self.where}"
        known = self.known
        if known:
            head += f"  [known: {known}]"
        return f"{head}\n    call: {self.call}" + (f"\n    {self.detail}" if self.detail else "")


# Defects found in files this branch leaves to other work in progress: each is recorded as a
# failing-by-design xfail(strict=True) test (the note names it). The fuzzer still reports
# them, as known, and does not fail on them. (kind, what, substring of where) -> note.
KNOWN_DEFECTS: dict[tuple[str, str, str], str] = {}


# ---------------------------------------------------------------------------------------
# shadows: what the fuzzer knows of the machine, from what the syscalls answered


@dataclass
class FdInfo:
    kind: str
    path: str = ""  # the device's cdev path (device and data fds), the group's node (group)
    granted: bool = False  # device fd: bound to an iommufd, or opened through its group
    iommufd: int = -1  # device fd: the iommufd fd it was bound with
    attached: bool = False  # device fd: ATTACH_IOMMUFD_PT succeeded (and no DETACH since)
    set: bool = False  # group fd: SET_CONTAINER succeeded; container fd: SET_IOMMU did
    written: int = 0  # resuming fd: bytes of a valid stream accepted so far
    dead: bool = False  # data fd: answered ENODEV (its session ended)


@dataclass
class DevInfo:
    path: str
    kind: str  # reference, hisi_acc, mtty
    group: str
    flags: int  # migration flags
    nr_ports: int = 0
    state: int | None = None  # the last state GET answered
    touched: bool = False  # a call since then may have changed the state
    stream: bytes = b""  # a valid stream of this device (saved at build time)
    cdev: bool = True  # opened through its cdev (else through its group, in the container)


@dataclass
class Ictx:
    """One iommufd (by fd): object ids the fuzzer learnt from the answers."""

    ioas: list[int] = field(default_factory=list)
    hwpt: list[int] = field(default_factory=list)
    devs: list[int] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)  # HWPTs allocated with DIRTY_TRACKING
    maps: list[tuple[int, int, int]] = field(default_factory=list)  # (ioas, iova, length)


@dataclass
class Region:
    addr: int
    length: int
    backed: bool
    munmappable: bool = True


class Abort(Exception):
    """Ends the seed: a finding was recorded."""


@dataclass
class Built:
    """A template's valid argument: ctypes parts (mutated field by field) and raw bytes, or
    a value passed by value. `learn` reads what a successful call answered."""

    parts: list[Any] = field(default_factory=list)
    value: int | None = None
    learn: Callable[[Fuzzer, int, Any, int], None] | None = None
    roles: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Template:
    name: str
    req: int
    kinds: tuple[str, ...]
    build: Callable[[Fuzzer, int], Built]
    weight: float = 1.0
    granted: bool = False  # wants a device fd with access granted


# field roles (how a field is mutated)
R_SIZE, R_FLAGS, R_ID, R_FD, R_IOVA, R_LEN, R_PGSIZE, R_UPTR = (
    "size",
    "flags",
    "id",
    "fd",
    "iova",
    "len",
    "pgsize",
    "uptr",
)
R_COUNT, R_STATE, R_SMALL, R_RSVD, R_ANY = "count", "state", "small", "rsvd", "any"


def field_role(name: str, width: int) -> str:
    n = name.lower().strip("_")
    if n in ("argsz", "size") and width == 4:
        return R_SIZE
    if "reserved" in n or n.startswith(("pad", "resv")):
        return R_RSVD
    if n.endswith("flags"):
        return R_FLAGS
    if n in ("iommufd", "fd", "wakeup_eventfd") or n.endswith("_fd") or n == "group_fds":
        return R_FD
    if n.endswith("_id") or n in ("id", "devid", "out_devid", "group_id"):
        return R_ID
    if n == "device_state":
        return R_STATE
    if n in ("page_size", "pgsize", "pgsizes", "iova_pgsizes", "page_shift", "pgsize_bitmap"):
        return R_PGSIZE
    if n in ("user_va", "vaddr", "ranges", "bitmap", "data", "allowed_iovas", "pgtbl_addr"):
        return R_UPTR
    if n.endswith(("uptr", "_ptr")):
        return R_UPTR
    if n in ("iova", "dst_iova", "src_iova", "start", "last", "addr", "offset", "start_addr"):
        return R_IOVA
    if n in ("nesting_parent_iova", "virt_id", "dma32_window_start"):
        return R_IOVA
    if n in ("length", "size", "window_size", "stop_copy_length", "dma32_window_size"):
        return R_LEN
    if n.startswith(("num_", "nr_")) or n in ("count", "entry_num", "entry_len", "data_len"):
        return R_COUNT
    if n in ("levels", "veventq_depth", "initial_bytes", "dirty_bytes"):
        return R_COUNT
    if n in ("index", "region_index", "op", "type", "data_type", "in_data_type", "option_id"):
        return R_SMALL
    if n in ("pasid", "out_data_type", "drm_plane_type", "func"):
        return R_SMALL
    return R_ANY


Leaf = tuple[Any, Any, Any, str]  # (owner, name or index, ctype, name)


def struct_leaves(obj: Any, out: list[Leaf]) -> None:
    """The integer fields of a ctypes structure (nested structures, unions and the first
    elements of arrays included) as (owner, key, ctype, name)."""
    if isinstance(obj, ctypes._SimpleCData):
        out.append((obj, "value", type(obj), "fd" if isinstance(obj, ctypes.c_int32) else "x"))
        return
    if isinstance(obj, ctypes.Array):
        for i in range(min(len(obj), 4)):
            el = obj[i]
            if isinstance(el, ctypes.Structure | ctypes.Union):
                struct_leaves(el, out)
            elif isinstance(el, int):
                out.append((obj, i, obj._type_, "elem"))
        return
    for spec in obj._fields_:
        name, ctype = spec[0], spec[1]
        val = getattr(obj, name)
        if isinstance(val, ctypes.Structure | ctypes.Union | ctypes.Array):
            struct_leaves(val, out)
        elif isinstance(val, int) and not isinstance(val, bool):
            out.append((obj, name, ctype, name))


def set_leaf(leaf: Leaf, value: int) -> None:
    owner, key, ctype, _ = leaf
    width = ctypes.sizeof(ctype) * 8
    value &= (1 << width) - 1
    if ctype in (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64):
        if value >> (width - 1):
            value -= 1 << width
    if isinstance(key, int):
        owner[key] = value
    else:
        setattr(owner, key, value)


def get_leaf(leaf: Leaf) -> int:
    owner, key, _, _ = leaf
    return int(owner[key] if isinstance(key, int) else getattr(owner, key))


def _sized(cls: type[ctypes.Structure], **kw: Any) -> Any:
    """A struct whose leading argsz/size field is its own size."""
    obj = cls(**kw)
    first = cls._fields_[0][0]
    if first in ("argsz", "size") and first not in kw:
        setattr(obj, first, ctypes.sizeof(cls))
    return obj


def _out_bytes(obj: Any) -> bytes | None:
    """What the kernel wrote back, when the argument was a buffer the caller sees."""
    if isinstance(obj, bytearray):
        return bytes(obj)
    if isinstance(obj, memoryview | np.ndarray | ctypes.Array):
        try:
            return bytes(memoryview(obj).cast("B"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
    return None


def _u32_at(raw: bytes | None, off: int) -> int | None:
    if raw is None or len(raw) < off + 4:
        return None
    return int(struct.unpack_from("<I", raw, off)[0])


def _s32_at(raw: bytes | None, off: int) -> int | None:
    if raw is None or len(raw) < off + 4:
        return None
    return int(struct.unpack_from("<i", raw, off)[0])


def _u64_at(raw: bytes | None, off: int) -> int | None:
    if raw is None or len(raw) < off + 8:
        return None
    return int(struct.unpack_from("<Q", raw, off)[0])


# ---------------------------------------------------------------------------------------
# the fuzzer


class Fuzzer:
    """One seed: the machine, what is known of it, and the calls made to it."""

    def __init__(self, seed: int, *, trace: bool = False, record: bool = True) -> None:
        self.seed = seed
        self.r = random.Random(seed)
        self.vendor = VENDORS[seed % len(VENDORS)]
        self.trace = trace
        self.record = record
        self.k = ModelKernel(iommu=self.vendor)
        self.fds: dict[int, FdInfo] = {}
        self.devs: dict[str, DevInfo] = {}
        self.ictx: dict[int, Ictx] = {}
        self.t1_maps: list[tuple[int, int]] = []
        self.regions: dict[str, Region] = {}
        self.extra: list[Region] = []
        self.dangling: list[int] = []  # addresses of regions munmapped since
        self.closed: list[int] = []  # fds this seed closed (for EBADF values)
        self.calls: list[Call] = []  # this seed's calls (for --minimize)
        self.findings: list[Finding] = []
        self.results: Counter[str] = Counter()  # "ok", "EINVAL", ..., exception type names
        self.by_call: Counter[tuple[str, str]] = Counter()  # (call name, result)
        self.ncalls = 0  # fuzzed calls made
        self.nchecks = 0  # calls made by the invariant checks
        self.nsetup = 0  # calls made by build()
        self.step_no = 0
        self.maxrss = _maxrss_kib()
        self._phase = "setup"
        self._cur: Call | None = None

    # -- calling the kernel --------------------------------------------------------------

    def _finding(self, kind: str, what: str, where: str, detail: str = "") -> Abort:
        call = self._cur.render() if self._cur is not None else "(build)"
        if self._phase == "check":
            detail = f"(in the check after it) {detail}".rstrip()
        f = Finding(self.seed, self.step_no, kind, what, where, call, detail)
        self.findings.append(f)
        return Abort(str(f))

    def sys(self, name: str, *args: Any) -> tuple[Any, int]:
        """A syscall made by the build or the checks: (result, 0) or (None, errno).
        Anything but OSError is a finding."""
        if self._phase == "setup":
            self.nsetup += 1
        else:
            self.nchecks += 1
        try:
            return getattr(self.k, name)(*args), 0
        except OSError as e:
            return None, int(e.errno or -1)
        except Exception as e:
            where = _kernel_where(e.__traceback__)
            raise self._finding(
                "exception", type(e).__name__, where, f"{name}{args!r}: {e!r}"
            ) from None

    def must(self, name: str, *args: Any) -> Any:
        """A build syscall that must succeed."""
        res, e = self.sys(name, *args)
        if e:
            raise self._finding("setup", errno.errorcode.get(e, str(e)), name, f"{args!r}")
        return res

    def execute(self, call: Call) -> tuple[Any, Any, BaseException | None]:
        """Run a fuzzed call: (result, the ioctl's argument object, the OSError or hardware
        fault it raised). Anything else is a finding (Abort)."""
        self._cur = call
        self.ncalls += 1
        if self.record:
            self.calls.append(call)
        if self.trace:
            print(f"[{self.seed}:{self.step_no}] {call.render()}", flush=True)
        obj: Any = None
        res: Any = None
        hw = call.op in ("dma_write", "dma_read", "hw_work")
        before = self.maxrss
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
        try:
            if call.op == "ioctl":
                fd, req, arg = call.args
                obj = arg.make()
                res = self.k.ioctl(fd, req, obj)
            elif hw:
                path, a, b = call.args
                dev = self.k.device(path)
                if call.op == "dma_write":
                    res = dev.dma_write(a, b)
                elif call.op == "dma_read":
                    res = dev.dma_read(a, b)
                else:
                    hw_work(dev, a, b)
            else:
                res = getattr(self.k, call.op)(*call.args)
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, "E?")
            self.results[code] += 1
            self.by_call[call.name or call.op, code] += 1
            return None, obj, e
        except (IommuFault, UnbackedDma) as e:
            if not hw:
                self.results[type(e).__name__] += 1
                raise self._finding(
                    "exception", type(e).__name__, _kernel_where(e.__traceback__), repr(e)
                ) from None
            self.results[type(e).__name__] += 1
            self.by_call[call.name or call.op, type(e).__name__] += 1
            return None, obj, e
        except CallTimeout:
            raise self._finding("hang", f"over {HANG_S:g} s", call.op) from None
        except Exception as e:
            self.results[type(e).__name__] += 1
            where = _kernel_where(e.__traceback__)
            raise self._finding("exception", type(e).__name__, where, repr(e)[:300]) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.results["ok"] += 1
        self.by_call[call.name or call.op, "ok"] += 1
        self.maxrss = _maxrss_kib()
        if (self.maxrss - before) >> 10 > SPIKE_MIB:
            raise self._finding("memory", f"peak RSS +{(self.maxrss - before) >> 10} MiB", call.op)
        return res, obj, None

    def ioctl_ok(self, fd: int, req: int, obj: Any) -> bool:
        """A build or check ioctl; False on OSError."""
        _, e = self.sys("ioctl", fd, req, obj)
        return not e

    # -- the machine ---------------------------------------------------------------------

    def _mmap(self, name: str, length: int, backed: bool, munmappable: bool = True) -> int:
        addr, _ = self.must("mmap", length, backed)
        self.regions[name] = Region(addr, length, backed, munmappable)
        return int(addr)

    def _ioas_alloc(self, fd: int) -> int:
        a = _sized(u.iommu_ioas_alloc)
        if not self.ioctl_ok(fd, u.IOMMU_IOAS_ALLOC, a):
            return 0
        self.ictx[fd].ioas.append(a.out_ioas_id)
        return int(a.out_ioas_id)

    def _ioas_map(self, fd: int, ioas: int, uva: int, length: int, iova: int, rw: int) -> None:
        m = _sized(
            u.iommu_ioas_map,
            flags=u.IOMMU_IOAS_MAP_FIXED_IOVA | rw,
            ioas_id=ioas,
            user_va=uva,
            length=length,
            iova=iova,
        )
        if self.ioctl_ok(fd, u.IOMMU_IOAS_MAP, m):
            self.ictx[fd].maps.append((ioas, iova, length))

    def _add(self, kind: str, **opts: Any) -> DevInfo:
        self.nsetup += 1
        path = self.k.add_device(kind, **opts)
        vdev = self.k.devices[path]  # the build reads the driver's fixed facts only here
        d = DevInfo(path, kind, self.k.group_of(path), int(vdev.migration_flags))
        d.nr_ports = int(getattr(vdev, "nr_ports", 0))
        self.devs[path] = d
        return d

    def _open_dev(self, d: DevInfo) -> int:
        fd = int(self.must("open", d.path))
        self.fds[fd] = FdInfo(DEVICE, d.path)
        return fd

    def _bind(self, fd: int, iommufd: int) -> int:
        b = _sized(v.vfio_device_bind_iommufd, iommufd=iommufd)
        if not self.ioctl_ok(fd, v.VFIO_DEVICE_BIND_IOMMUFD, b):
            return 0
        self.fds[fd].granted = True
        self.fds[fd].iommufd = iommufd
        self.ictx[iommufd].devs.append(b.out_devid)
        return int(b.out_devid)

    def _attach(self, fd: int, pt_id: int) -> None:
        at = _sized(v.vfio_device_attach_iommufd_pt, pt_id=pt_id)
        if self.ioctl_ok(fd, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, at):
            self.fds[fd].attached = True
            ictx = self.ictx[self.fds[fd].iommufd]
            if at.pt_id not in ictx.ioas and at.pt_id not in ictx.hwpt:
                ictx.hwpt.append(at.pt_id)  # an automatic HWPT

    def _feature(self, fd: int, flags: int, payload: Any) -> bytearray | None:
        buf = v.feature_buffer(flags, payload)
        return buf if self.ioctl_ok(fd, v.VFIO_DEVICE_FEATURE, buf) else None

    def _set_state(self, fd: int, state: int) -> int:
        """MIG_DEVICE_STATE SET; the data fd (or -1), -2 on failure."""
        buf = self._feature(fd, SET | MIG_STATE, v.vfio_device_feature_mig_state(state, -1))
        if buf is None:
            return -2
        dfd = int(struct.unpack_from("<i", buf, 12)[0])
        d = self.devs[self.fds[fd].path]
        d.state = state
        if dfd >= 0:
            self.fds[dfd] = FdInfo(RESUMING_FD if state == RESUMING else SAVING, d.path)
        return dfd

    def _walk(self, fd: int, d: DevInfo, target: int) -> None:
        """Walk a device to `target` with valid SETs; leave its data fd open and used."""
        if target == ERROR:
            self._set_state(fd, STOP)  # its fail_arc RUNNING_P2P -> STOP is "error": EIO
            d.state = ERROR
            return
        if target == RESUMING:
            # first save a stream of its own to resume from
            sfd = self._set_state(fd, STOP_COPY)
            if sfd >= 0:
                parts = []
                for _ in range(4096):
                    data, e = self.sys("read", sfd, 1 << 16)
                    if e or not data:
                        break
                    parts.append(data)
                d.stream = b"".join(parts)
                self._set_state(fd, STOP)
                self.sys("close", sfd)
                del self.fds[sfd]
        dfd = self._set_state(fd, target)
        if dfd >= 0 and target == RESUMING and d.stream:
            n = self.r.randrange(len(d.stream) + 1)
            if self.sys("write", dfd, d.stream[:n])[1] == 0:
                self.fds[dfd].written = n
        elif dfd >= 0:
            self.sys("read", dfd, self.r.choice([0, 1, 24, 40, 4096, 1 << 20]))

    def build(self) -> None:
        """The starting machine of this seed, made through the syscalls."""
        r, k = self.r, self.k
        self._phase = "setup"
        ram = self._mmap("ram", RAM_SIZE, True)
        self._mmap("big", 4 << 30, False)
        self._mmap("scratch", 256 << 10, True, munmappable=False)
        self._mmap("victim", 64 << 10, True)
        self.chk = self._mmap("check", 64 << 10, True, munmappable=False)
        hole = self._mmap("hole", PAGE_SIZE, True)
        self.must("munmap", hole)
        self.regions["hole"].munmappable = False
        self.ram_view = k.mm.view(ram, RAM_SIZE)
        self.ram_view[: 64 << 10] = np.frombuffer(r.randbytes(64 << 10), dtype=np.uint8)

        # two iommufds: IOASes with RAM, a read-only window, unbacked memory, a copy
        fa = self.must("open", "/dev/iommu")
        fb = self.must("open", "/dev/iommu")
        for fd in (fa, fb):
            self.fds[fd] = FdInfo(IOMMUFD)
            self.ictx[fd] = Ictx()
        rw = u.IOMMU_IOAS_MAP_READABLE | u.IOMMU_IOAS_MAP_WRITEABLE
        ioas1, ioas2, ioas3 = self._ioas_alloc(fa), self._ioas_alloc(fa), self._ioas_alloc(fb)
        self._ioas_map(fa, ioas1, ram, RAM_SIZE, IOVA_RAM, rw)
        self._ioas_map(fa, ioas1, ram, MIB, IOVA_RO, u.IOMMU_IOAS_MAP_READABLE)
        self._ioas_map(fa, ioas1, self.regions["big"].addr, BIG_MAPPED, IOVA_BIG, rw)
        self._ioas_map(fb, ioas3, ram, RAM_SIZE, IOVA_RAM, rw)
        copy = _sized(
            u.iommu_ioas_copy,
            flags=u.IOMMU_IOAS_MAP_FIXED_IOVA | rw,
            dst_ioas_id=ioas2,
            src_ioas_id=ioas1,
            length=2 * MIB,
            dst_iova=IOVA_RAM,
            src_iova=IOVA_RAM,
        )
        if self.ioctl_ok(fa, u.IOMMU_IOAS_COPY, copy):
            self.ictx[fa].maps.append((ioas2, IOVA_RAM, 2 * MIB))
        vio = _sized(u.iommu_vfio_ioas, ioas_id=ioas1, op=u.IOMMU_VFIO_IOAS_SET)
        self.ioctl_ok(fa, u.IOMMU_VFIO_IOAS, vio)

        # devices on the cdev path: every kind in every state its flags allow
        sizes = [0, 4096, 16384, 65536, 200000]
        plan: list[tuple[DevInfo, int]] = []
        for st in (RUNNING, STOP, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P, STOP_COPY, RESUMING, ERROR):
            d = self._add(
                "reference",
                state_size=r.choice(sizes),
                chunk_size=r.choice([4096, 16384]),
                seed=r.getrandbits(64),
                fail_arc=("RUNNING_P2P", "STOP", "error") if st == ERROR else None,
                log_max_ranges=r.choice([1, 2, 8]),
            )
            plan.append((d, st))
        for i, st in enumerate((RUNNING, STOP, PRE_COPY, STOP_COPY, RESUMING)):
            plan.append((self._add("hisi_acc", vf_id=i + 1), st))
        for st in (RUNNING, STOP, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P, STOP_COPY, RESUMING):
            plan.append((self._add("mtty", nr_ports=r.choice([1, 2])), st))
        flags = r.choice([1, 3, 5])
        d = self._add("reference", migration_flags=flags, iommu_dirty=False, state_size=8192)
        plan.append((d, r.choice([s for s in range(1, NUM_STATES) if state_supported(flags, s)])))

        # bind (most to the first iommufd), a dirty-tracking HWPT and a plain one, attach
        devfds: list[tuple[int, DevInfo, int]] = []
        for d, st in plan:
            fd = self._open_dev(d)
            ifd = fb if r.random() < 0.15 else fa
            devfds.append((fd, d, st))
            self._bind(fd, ifd)
        first_ref = next(fd for fd, d, _ in devfds if d.kind == "reference")
        hwpts: list[int] = []
        if self.fds[first_ref].iommufd == fa:
            for hflags in (u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 0):
                h = _sized(
                    u.iommu_hwpt_alloc,
                    flags=hflags,
                    dev_id=self.ictx[fa].devs[0],
                    pt_id=ioas1,
                )
                if self.ioctl_ok(fa, u.IOMMU_HWPT_ALLOC, h):
                    self.ictx[fa].hwpt.append(h.out_hwpt_id)
                    if hflags:
                        self.ictx[fa].dirty.append(h.out_hwpt_id)
                    hwpts.append(int(h.out_hwpt_id))
            if hwpts:
                dt = _sized(
                    u.iommu_hwpt_set_dirty_tracking,
                    flags=u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                    hwpt_id=hwpts[0],
                )
                self.ioctl_ok(fa, u.IOMMU_HWPT_SET_DIRTY_TRACKING, dt)
        for fd, d, _ in devfds:
            info = self.fds[fd]
            if info.iommufd == fb:
                self._attach(fd, ioas3)
            elif d.kind == "mtty":
                self._attach(fd, r.choice([ioas1, ioas2]))
            elif hwpts and self.k.devices[d.path].iommu_dirty and r.random() < 0.7:
                self._attach(fd, r.choice(hwpts[:1] * 3 + hwpts))
            else:
                self._attach(fd, ioas1)
            if d.kind == "reference" and r.random() < 0.5:
                self._log_start(fd)
            if d.kind == "hisi_acc" and r.random() < 0.6:
                hisi_qm.guest_qm_start(
                    k.device(d.path),
                    eqe_dma=IOVA_RAM + MIB,
                    aeqe_dma=IOVA_RAM + MIB + 0x10000,
                    sqc_dma=IOVA_RAM + MIB + 0x20000,
                    cqc_dma=IOVA_RAM + MIB + 0x30000,
                )
        for fd, d, st in devfds:
            self._walk(fd, d, st)

        # a type1 container with a group of every kind
        cdevs = [
            self._add("reference", state_size=r.choice(sizes), chunk_size=4096),
            self._add("mtty", nr_ports=2),
            self._add("hisi_acc", vf_id=9),
        ]
        for d in cdevs:
            d.cdev = False
        cont = self.must("open", "/dev/vfio/vfio")
        self.fds[cont] = FdInfo(CONTAINER)
        gfds = []
        for d in cdevs:
            g = self.must("open", d.group)
            self.fds[g] = FdInfo(GROUP, d.path)
            if self.ioctl_ok(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(cont)):
                self.fds[g].set = True
            gfds.append(g)
        t1 = v.VFIO_TYPE1_IOMMU if r.random() < 0.2 else v.VFIO_TYPE1v2_IOMMU
        self.fds[cont].set = not self.sys("ioctl", cont, v.VFIO_SET_IOMMU, t1)[1]
        for iova, off, size, fl in (
            (IOVA_T1, 0, 4 * MIB, v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE),
            (IOVA_T1_RO, 4 * MIB, MIB, v.VFIO_DMA_MAP_FLAG_READ),
        ):
            m = _sized(v.vfio_iommu_type1_dma_map, flags=fl, vaddr=ram + off, iova=iova, size=size)
            if self.ioctl_ok(cont, v.VFIO_IOMMU_MAP_DMA, m):
                self.t1_maps.append((iova, size))
        start = v.dirty_pages_buffer(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
        self.sys("ioctl", cont, v.VFIO_IOMMU_DIRTY_PAGES, start)
        for d, g in zip(cdevs, gfds, strict=True):
            name = os.path.basename(d.path).encode() + b"\0"
            fd, e = self.sys("ioctl", g, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(name))
            if e:
                continue
            self.fds[fd] = FdInfo(DEVICE, d.path, granted=True)
            ok = [s for s in range(1, NUM_STATES) if state_supported(d.flags, s)]
            self._walk(fd, d, r.choice(ok))
        for d in self.devs.values():
            d.state, d.touched = None, True  # learn the states in the first sweep
        self._phase = "fuzz"

    def _log_start(self, fd: int) -> None:
        ranges = struct.pack("<QQ", IOVA_RAM, RAM_SIZE)
        ptr = self.regions["scratch"].addr
        self.k.mm.write(ptr, ranges)
        ctl = v.vfio_device_feature_dma_logging_control(page_size=4096, num_ranges=1, ranges=ptr)
        self._feature(fd, SET | v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, ctl)

    # -- picking values ------------------------------------------------------------------

    def fds_of(self, *kinds: str, granted: bool = False) -> list[int]:
        return [
            fd
            for fd, i in self.fds.items()
            if i.kind in kinds and (not granted or i.granted or i.kind != DEVICE)
        ]

    def pick_fd(self, kinds: tuple[str, ...], granted: bool = False, unbound: bool = False) -> Any:
        """Mostly an open fd of the right kind (a live data fd, an unbound device fd for
        BIND); sometimes any fd, a closed one or junk."""
        r = self.r
        c = r.random()
        if c < 0.92:
            cand = self.fds_of(*kinds, granted=granted) or self.fds_of(*kinds)
            live = [fd for fd in cand if not self.fds[fd].dead]
            if unbound:
                live = [fd for fd in cand if not self.fds[fd].granted] or cand
            if live and r.random() < 0.9:
                cand = live
            if cand:
                return r.choice(cand)
        if c < 0.97 and self.fds:
            return r.choice(list(self.fds))
        return self.fd_value()

    def fd_value(self) -> int:
        """An fd number as a struct field: open ones of every kind, closed ones, junk."""
        r = self.r
        c = r.random()
        if c < 0.7 and self.fds:
            return r.choice(list(self.fds))
        if c < 0.8 and self.closed:
            return r.choice(self.closed[-16:])
        return r.choice(BAD_FDS)

    def ictx_of(self, fd: int) -> Ictx:
        info = self.fds.get(fd)
        if info is not None and info.kind == DEVICE and info.iommufd in self.ictx:
            return self.ictx[info.iommufd]
        if fd in self.ictx:
            return self.ictx[fd]
        return next(iter(self.ictx.values()), Ictx())

    def obj_id(self, fd: int, prefer: str = "") -> int:
        """An object id: mostly one of the preferred type in this fd's iommufd, else an id
        of any type (of any iommufd) or a missing one."""
        r = self.r
        ictx = self.ictx_of(fd)
        pools = {"ioas": ictx.ioas, "hwpt": ictx.hwpt, "dev": ictx.devs, "dirty": ictx.dirty}
        c = r.random()
        if c < 0.75 and pools.get(prefer):
            return r.choice(pools[prefer])
        every = [i for x in self.ictx.values() for i in x.ioas + x.hwpt + x.devs]
        if c < 0.9 and every:
            return r.choice(every)
        return r.choice([0, max(every, default=0) + 1, 0x7FFF_FFFF, 0x8000_0000, U32, 77])

    def mapping(self) -> tuple[int, int]:
        """(iova, length) of something mapped (or once mapped) in an IOAS or the container."""
        maps = [(i, n) for x in self.ictx.values() for _, i, n in x.maps] + self.t1_maps
        return self.r.choice(maps) if maps else (IOVA_RAM, RAM_SIZE)

    def iova(self) -> int:
        r = self.r
        c = r.random()
        if c < 0.6:
            iova, n = self.mapping()
            return iova + r.choice([0, 0, PAGE_SIZE, n // 2 & ~0xFFF, n - PAGE_SIZE, n, 1, n - 1])
        if c < 0.7:
            return r.randrange(0, 1 << 48, PAGE_SIZE)
        return r.choice(EDGE_IOVAS)

    def length(self) -> int:
        r = self.r
        c = r.random()
        if c < 0.5:
            _, n = self.mapping()
            return r.choice([n, n // 2 & ~0xFFF or PAGE_SIZE, PAGE_SIZE, n + PAGE_SIZE, n - 1])
        return r.choice(EDGE_LENGTHS)

    def uptr(self, n: int = 64) -> int:
        """A user pointer to n bytes: inside, across the end of and past mappings, into
        unbacked, unmapped and non-user memory."""
        r = self.r
        c = r.random()
        sc = self.regions["scratch"]
        if c < 0.55:
            room = max(sc.length - n, 0)
            return sc.addr + (
                r.randrange(0, room + 1, 8) if r.random() < 0.9 else r.randrange(room + 1)
            )
        if c < 0.65:
            return sc.addr + sc.length - n + r.choice([0, 8, 1, -8])
        if c < 0.72:
            ram = self.regions["ram"]
            return ram.addr + r.randrange(0, ram.length, 8)
        if c < 0.78:
            return self.regions["big"].addr + r.choice([0, PAGE_SIZE, 1 << 31])
        if c < 0.83:
            return r.choice([self.regions["hole"].addr, *self.dangling[-4:]]) + r.choice([0, 8])
        if c < 0.88:
            vic = self.regions["victim"]
            return vic.addr + r.randrange(0, vic.length, 8)
        if c < 0.92 and self.extra:
            reg = r.choice(self.extra)
            return reg.addr + r.choice([0, reg.length - 8])
        return r.choice(BAD_POINTERS)

    def put_user(self, addr: int, data: bytes) -> None:
        """The process writing its own memory (no syscall): a pointed-to array."""
        try:
            self.k.mm.write(addr, data)
        except OSError:
            pass  # the pointer points nowhere: the call will fault on it

    def array_ptr(self, data: bytes) -> int:
        """A pointer to `data` placed in user memory (mostly where it fits)."""
        ptr = self.uptr(max(len(data), 1))
        self.put_user(ptr, data)
        return ptr

    def role_value(self, role: str, cur: int, width: int) -> int:
        r = self.r
        if role == R_SIZE:  # around the valid size (cur), and the usual minimum sizes
            if r.random() < 0.6:
                return max(cur + r.choice([-8, -4, -1, 1, 4, 8, cur]), 0)
            return r.choice([0, 1, 4, 7, 8, 12, 16, 20, 24, 32, 40, 48, 64, 4096, U32])
        if role == R_FLAGS:
            bit = 1 << r.randrange(width)
            return r.choice([0, U64, cur | bit, cur ^ bit, bit, cur ^ 1, 1 << 31])
        if role == R_ID:
            return self.obj_id(self._target)
        if role == R_FD:
            return self.fd_value()
        if role == R_IOVA:
            return self.iova()
        if role == R_LEN:
            return self.length()
        if role == R_PGSIZE:
            return r.choice(PAGE_SIZES)
        if role == R_UPTR:
            return self.uptr()
        if role == R_COUNT:
            return r.choice(COUNTS)
        if role == R_STATE:
            return r.choice([*range(0, NUM_STATES + 2), 255, U32])
        if role == R_SMALL:
            return r.choice(SMALL)
        if role == R_RSVD:
            return r.choice([1, 0x80, U64, 1 << r.randrange(width)])
        return r.choice([0, 1, U64, cur + 1, cur - 1, 1 << r.randrange(64), r.getrandbits(64)])

    def mutate(self, b: Built) -> int:
        """0-4 field mutations of a built argument; returns how many."""
        r = self.r
        c = r.random()
        n = 0 if c < 0.4 else 1 if c < 0.75 else 2 if c < 0.92 else r.randint(3, 4)
        if not n:
            return 0
        leaves: list[Leaf] = []
        for p in b.parts:
            if not isinstance(p, bytes | bytearray):
                struct_leaves(p, leaves)
        if not leaves:
            return 0
        for _ in range(n):
            leaf = r.choice(leaves)
            width = ctypes.sizeof(leaf[2]) * 8
            role = b.roles.get(leaf[3]) or field_role(leaf[3], width // 8)
            set_leaf(leaf, self.role_value(role, get_leaf(leaf), width))
        return n

    def as_arg(self, data: bytes) -> Arg:
        """The buffer, sometimes cut short or extended, in one of the forms a caller may
        pass (mostly a bytearray)."""
        r = self.r
        c = r.random()
        if c < 0.06 and data:
            data = data[: r.randrange(len(data))]
        elif c < 0.09:
            data += bytes(r.choice([4, 8, 64]))
        elif c < 0.12:
            data += bytes([r.randrange(1, 256)]) + r.randbytes(r.choice([3, 7, 63]))
        c = r.random()
        if c < 0.86:
            return Arg("bytearray", data)
        if c < 0.9:
            return Arg("bytes", data)
        if c < 0.93:
            return Arg("memoryview", data)
        if c < 0.95:
            return Arg("numpy", data)
        if c < 0.97:
            return Arg("ctypes", data)
        if c < 0.98:
            return Arg("strided", data)
        if c < 0.99:
            return Arg("int", value=self.uptr())
        return Arg("junk", value=r.choice([None, "x", 1.5, [1, 2], (), object.__name__]))

    # -- steps ---------------------------------------------------------------------------

    def step(self) -> None:
        """Draw one call, make it, learn from it, check the invariants."""
        r = self.r
        self.step_no += 1
        nfds = len(self.fds)
        weights = STEP_WEIGHTS
        if nfds > FD_SOFT_LIMIT:
            weights = {**STEP_WEIGHTS, "close": 30.0, "open": 0.0}
        kind = r.choices(list(weights), weights=list(weights.values()))[0]
        gen: Callable[[], tuple[Call, Callable[[Any, Any], None] | None]] = getattr(
            self, f"gen_{kind}"
        )
        call, learn = gen()
        res, obj, exc = self.execute(call)
        if exc is None and learn is not None:
            learn(res, obj)
        self.learn_flags(call, exc)
        self._phase = "check"
        try:
            self.check_step(call, res, exc)
            if self.step_no % SWEEP == 0:
                self.sweep()
        finally:
            self._phase = "fuzz"

    def learn_flags(self, call: Call, exc: BaseException | None) -> None:
        """What a call's success or errno says of the fd it was made on."""
        tgt = call.args[0] if call.args else None
        info = self.fds.get(tgt) if isinstance(tgt, int) else None
        if info is None:
            return
        if isinstance(exc, OSError):
            if exc.errno == errno.ENODEV and info.kind in (SAVING, RESUMING_FD):
                info.dead = True
            return
        if exc is not None or call.op != "ioctl":
            return
        name = call.name
        if name == "VFIO_GROUP_SET_CONTAINER":
            info.set = True
        elif name == "VFIO_GROUP_UNSET_CONTAINER":
            info.set = False
        elif name == "VFIO_SET_IOMMU" and info.kind == CONTAINER:
            info.set = True
        elif name == "VFIO_DEVICE_ATTACH_IOMMUFD_PT":
            info.attached = True
        elif name == "VFIO_DEVICE_DETACH_IOMMUFD_PT":
            info.attached = False

    def gen_revive(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        """One valid call towards the starting machine again: the fuzzing takes it apart
        (closes, detaches, destroys), this puts back the next missing piece."""
        r = self.r
        if r.random() < 0.6:
            got = self._revive_iommufd()
        else:
            got = self._revive_container()
        return got or self.gen_mig()

    def _ioctl_call(self, fd: int, name: str, parts: list[Any]) -> Call:
        data = b"".join(bytes(p) for p in parts)
        return Call("ioctl", (fd, TEMPLATES[name].req, Arg("bytearray", data)), name)

    def _revive_iommufd(self) -> tuple[Call, Callable[[Any, Any], None] | None] | None:
        r = self.r
        ifds = self.fds_of(IOMMUFD)
        if not ifds:
            return Call("open", ("/dev/iommu", os.O_RDWR), "revive"), None
        f = r.choice(ifds)
        ictx = self.ictx[f]
        if not ictx.ioas:
            return self._ioctl_call(f, "IOMMU_IOAS_ALLOC", [_sized(u.iommu_ioas_alloc)]), (
                lambda res, obj: _learn_out_id(8, "ioas")(self, f, obj, res)
            )
        mapped = {m[0] for m in ictx.maps}
        bare = [i for i in ictx.ioas if i not in mapped]
        if bare:
            m = _sized(
                u.iommu_ioas_map,
                flags=u.IOMMU_IOAS_MAP_FIXED_IOVA | _rw(),
                ioas_id=bare[0],
                user_va=self.regions["ram"].addr,
                length=RAM_SIZE,
                iova=IOVA_RAM,
            )
            return self._ioctl_call(f, "IOMMU_IOAS_MAP", [m]), (
                lambda res, obj: _learn_map(8, 32, 24)(self, f, obj, res)
            )
        cdevs = [d for d in self.devs.values() if d.cdev]
        lonely = [d for d in cdevs if self.granted_fd(d) is None]
        if lonely:
            d = r.choice(lonely)
            unbound = [fd for fd, i in self.fds.items() if i.kind == DEVICE and i.path == d.path]
            if not unbound:
                return Call("open", (d.path, os.O_RDWR), "revive"), None
            fd = unbound[0]
            b = b_bind(self, fd)
            bind = b.parts[0]
            bind.iommufd = f
            learn = b.learn
            assert learn is not None

            def learn_bind(res: Any, obj: Any) -> None:
                assert learn is not None
                learn(self, fd, obj, res)
                self.fds[fd].iommufd = f

            return self._ioctl_call(fd, "VFIO_DEVICE_BIND_IOMMUFD", [bind]), learn_bind
        loose = [
            fd
            for fd, i in self.fds.items()
            if i.kind == DEVICE and i.granted and not i.attached and self.devs[i.path].cdev
        ]
        if loose:
            fd = r.choice(loose)
            own = self.ictx.get(self.fds[fd].iommufd, ictx)
            d = self.devs[self.fds[fd].path]
            pts = (own.dirty + own.ioas) if d.kind != "mtty" and own.dirty else own.ioas
            if not pts:
                return None
            at = _sized(v.vfio_device_attach_iommufd_pt, pt_id=r.choice(pts))
            learn_at = b_attach(self, fd).learn
            assert learn_at is not None
            return self._ioctl_call(fd, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", [at]), (
                lambda res, obj: learn_at(self, fd, obj, res)
            )
        if ictx.devs and not ictx.dirty:
            h = _sized(
                u.iommu_hwpt_alloc,
                flags=u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
                dev_id=r.choice(ictx.devs),
                pt_id=r.choice(ictx.ioas),
            )
            return self._ioctl_call(f, "IOMMU_HWPT_ALLOC", [h]), (
                lambda res, obj: b_hwpt_alloc(self, f).learn(self, f, obj, res)  # type: ignore[misc]
            )
        if ictx.dirty:
            dt = _sized(
                u.iommu_hwpt_set_dirty_tracking,
                flags=u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                hwpt_id=r.choice(ictx.dirty),
            )
            return self._ioctl_call(f, "IOMMU_HWPT_SET_DIRTY_TRACKING", [dt]), None
        return None

    def _revive_container(self) -> tuple[Call, Callable[[Any, Any], None] | None] | None:
        r = self.r
        conts = self.fds_of(CONTAINER)
        if not conts:
            return Call("open", ("/dev/vfio/vfio", os.O_RDWR), "revive"), None
        cont = r.choice(conts)
        cdevs = [d for d in self.devs.values() if not d.cdev]
        groups = {i.path: fd for fd, i in self.fds.items() if i.kind == GROUP}
        closed = [d for d in cdevs if d.path not in groups]
        if closed:
            d = r.choice(closed)
            # device fds of it (through the old group, or its cdev) keep the group busy
            busy = [fd for fd, i in self.fds.items() if i.kind == DEVICE and i.path == d.path]
            if busy:
                return Call("close", (r.choice(busy),), "revive"), None
            return Call("open", (d.group, os.O_RDWR), "revive"), None
        unset = [fd for fd, i in self.fds.items() if i.kind == GROUP and not i.set]
        if unset:
            g = r.choice(unset)
            return self._ioctl_call(g, "VFIO_GROUP_SET_CONTAINER", [ctypes.c_int32(cont)]), None
        if not self.fds[cont].set:
            call = Call("ioctl", (cont, v.VFIO_SET_IOMMU, Arg("int", value=3)), "VFIO_SET_IOMMU")
            return call, None
        if not self.t1_maps:
            m = _sized(
                v.vfio_iommu_type1_dma_map,
                flags=v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE,
                vaddr=self.regions["ram"].addr,
                iova=IOVA_T1,
                size=4 * MIB,
            )

            def learn(res: Any, obj: Any) -> None:
                self.t1_maps.append((IOVA_T1, 4 * MIB))

            return self._ioctl_call(cont, "VFIO_IOMMU_MAP_DMA", [m]), learn
        lonely = [d for d in cdevs if self.granted_fd(d) is None and d.path in groups]
        if lonely:
            d = r.choice(lonely)
            name = os.path.basename(d.path).encode() + b"\0"
            return self._ioctl_call(groups[d.path], "VFIO_GROUP_GET_DEVICE_FD", [name]), None
        start = v.dirty_pages_buffer(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
        return self._ioctl_call(cont, "VFIO_IOMMU_DIRTY_PAGES", [bytes(start)]), None

    def gen_ioctl(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        tpl = r.choices(TEMPLATE_LIST, weights=TEMPLATE_WEIGHTS)[0]
        unbound = tpl.name == "VFIO_DEVICE_BIND_IOMMUFD"
        return self.ioctl_from(tpl, self.pick_fd(tpl.kinds, tpl.granted, unbound))

    def gen_mig(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        """A valid MIG_DEVICE_STATE SET (or GET) on a device fd, to any state."""
        r = self.r
        fd = self.pick_fd((DEVICE,), granted=True)
        info = self.fds.get(fd)
        dev = self.devs.get(info.path) if info is not None else None
        states = list(range(1, NUM_STATES))
        if dev is not None and r.random() < 0.85:
            states = [s for s in states if state_supported(dev.flags, s)] or states
        state = r.choice(states)
        op = GET if r.random() < 0.1 else SET
        buf = v.feature_buffer(op | MIG_STATE, v.vfio_device_feature_mig_state(state, -1))
        return Call("ioctl", (fd, v.VFIO_DEVICE_FEATURE, Arg("bytearray", bytes(buf))), "MIG"), None

    def ioctl_from(self, tpl: Template, fd: Any) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        self._target = fd if isinstance(fd, int) else -1
        b = tpl.build(self, self._target)
        if b.value is not None:
            c = r.random()
            val: int = b.value
            if c < 0.2:
                val = r.choice(SMALL + [U64, -1, 1 << 64])
            elif c < 0.25:
                val = self.uptr()
            arg = Arg("int", value=val)
            if c > 0.97:
                arg = self.as_arg(struct.pack("<Q", b.value & U64))
        else:
            self.mutate(b)
            arg = self.as_arg(b"".join(bytes(p) for p in b.parts))
        call = Call("ioctl", (fd, tpl.req, arg), tpl.name)
        learn = b.learn
        if learn is None:
            return call, None
        fn = learn
        return call, lambda res, obj: fn(self, self._target, obj, res)

    def gen_raw(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        """A junk request, or a real one with junk argument bytes, on any fd."""
        r = self.r
        fd = self.pick_fd(tuple({i.kind for i in self.fds.values()}) or (OTHER,))
        if r.random() < 0.1:
            fd = r.choice([*BAD_FDS, "3", None, 3.0])
        c = r.random()
        req: Any = r.choice(REQUESTS)
        if c < 0.3:
            req |= r.choice([0xC000_0000, 0x4000_0000, 0x8000_0000]) | r.randrange(1 << 14) << 16
        elif c < 0.4:
            req = r.choice([0, 0x3B00, 0x3B63, 0x3B7A, 0x3B7F, 0x3B95, 0x3BFF, U32, 1 << 32, -1])
        elif c < 0.45:
            req = r.choice(["x", None, 1.5])
        c = r.random()
        if c < 0.2:
            return Call(
                "ioctl", (fd, req, Arg("int", value=r.choice(SMALL + [U64, -1]))), "raw"
            ), None
        n = r.choice([0, 3, 4, 8, 12, 16, 24, 32, 40, 48, 64, 128])
        data = bytearray(r.randbytes(n))
        if n >= 4 and r.random() < 0.6:
            struct.pack_into("<I", data, 0, n)
        return Call("ioctl", (fd, req, self.as_arg(bytes(data))), "raw"), None

    def gen_read(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        fd = self.pick_fd((SAVING,) if r.random() < 0.85 else (RESUMING_FD, DEVICE))
        n: Any = r.choice(READ_SIZES)
        if r.random() < 0.03:
            n = r.choice([-1, 1.5, None, "8"])
        return Call("read", (fd, n)), None

    def gen_write(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        fd = self.pick_fd((RESUMING_FD,) if r.random() < 0.85 else (SAVING, DEVICE))
        info = self.fds.get(fd) if isinstance(fd, int) else None
        dev = self.devs.get(info.path) if info is not None else None
        stream = dev.stream if dev is not None else b""
        if not stream:
            streams = [d.stream for d in self.devs.values() if d.stream]
            stream = r.choice(streams) if streams else b""
        c = r.random()
        valid = False
        if c < 0.55 and stream and info is not None:
            off = info.written if r.random() < 0.8 else 0
            n = r.choice([1, 8, 24, 40, 100, 4096, 65536, len(stream)])
            data: Any = stream[off : off + n]
            valid = off == info.written
        elif c < 0.7 and stream:
            a = r.randrange(len(stream))
            data = bytearray(stream[a : a + r.choice([24, 40, 4096])])
            if data:
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            data = bytes(data)
        elif c < 0.9:
            data = r.randbytes(r.choice([0, 1, 7, 24, 40, 60, 96, 176, 177, 4096]))
        elif c < 0.97:
            data = bytes(r.choice([0, 1 << 16, 1 << 20, 4 << 20]))
        else:
            data = r.choice([None, "text", 7, [1, 2]])
        if isinstance(data, bytes) and r.random() < 0.05:
            data = memoryview(bytearray(data))
        call = Call("write", (fd, data))
        if not valid or info is None:
            return call, None
        inf = info

        def learn(res: Any, obj: Any) -> None:
            if isinstance(res, int):
                inf.written += res

        return call, learn

    def gen_seek(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        fd = self.pick_fd((SAVING, RESUMING_FD, DEVICE, IOMMUFD))
        op = r.choice(["lseek", "pread", "poll"])
        off = r.choice([0, 1, 24, -1, 1 << 62, U64, "0"])
        if op == "lseek":
            return Call("lseek", (fd, off, r.choice([0, 1, 2, 3, 4, -1]))), None
        if op == "pread":
            return Call("pread", (fd, r.choice(READ_SIZES[:12]), off)), None
        return Call("poll", (fd, r.choice([0, 1, 4, 0x41, 0xFFFF, -1, 1 << 40, "x"]))), None

    def gen_close(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        """Close an fd, often one others still depend on (an iommufd with devices bound,
        a container with groups, a group with device fds open, a device with a data fd)."""
        r = self.r
        c = r.random()
        if c < 0.92 and self.fds:
            kinds = [SAVING, RESUMING_FD, DEVICE, DEVICE, GROUP, IOMMUFD, CONTAINER, OTHER]
            cand = self.fds_of(r.choice(kinds)) or list(self.fds)
            fd: Any = r.choice(cand)
        else:
            fd = r.choice([*BAD_FDS, *self.closed[-4:], None, "3"])
        return Call("close", (fd,)), None

    def gen_open(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        c = r.random()
        paths = list(self.devs)
        if c < 0.6:
            path: Any = r.choice(paths)
        elif c < 0.75:
            path = self.devs[r.choice(paths)].group
        elif c < 0.85:
            path = "/dev/iommu"
        elif c < 0.93:
            path = "/dev/vfio/vfio"
        else:
            path = r.choice(
                ["/dev/vfio/devices/vfio999", "/dev/vfio/", "", "/dev/iommu\0x", b"/dev/iommu"]
                + ["/dev/vfio/99", "/dev/vfio/vfio/..", None, 7, b"\xff\xfe"]
            )
        flags: Any = os.O_RDWR
        if r.random() < 0.15:
            flags = r.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_CLOEXEC, 3, -1, 1 << 40])
        return Call("open", (path, flags)), None

    def gen_mmap(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        if r.random() < 0.5 or len(self.extra) >= 8:
            return self.gen_munmap()
        length, backed = r.choice(
            [(PAGE_SIZE, True), (1 << 16, True), (2 * MIB, True), (1 << 30, False)]
            + [(1 << 40, False), (0, True), (-1, True), (1 << 64, False), (TASK_SIZE_MAX, False)]
        )
        call = Call("mmap", (length, backed))

        def learn(res: Any, obj: Any) -> None:
            addr, _ = res
            self.extra.append(Region(int(addr), length, backed))

        return call, learn

    def gen_munmap(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        c = r.random()
        regs = [g for g in self.regions.values() if g.munmappable] + self.extra
        if c < 0.85 and regs:
            reg = r.choice(self.extra or regs) if r.random() < 0.8 else r.choice(regs)
            addr: Any = reg.addr
        else:
            addr = r.choice([*BAD_POINTERS, self.regions["ram"].addr + PAGE_SIZE, -1, "x"])
        call = Call("munmap", (addr,))

        def learn(res: Any, obj: Any) -> None:
            # the addresses stay in use: pointers into memory that is gone
            for g in self.regions.values():
                if g.addr == addr:
                    g.munmappable = False
            self.dangling += [g.addr for g in self.extra if g.addr == addr]
            self.extra = [g for g in self.extra if g.addr != addr]

        return call, learn

    def gen_dma(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        """Device DMA (the hardware side) at mapped, read-only, unmapped and edge IOVAs."""
        r = self.r
        path = r.choice(list(self.devs))
        d = self.devs[path]
        if d.kind == "mtty" and r.random() < 0.9:  # an mdev does no DMA of its own
            path = r.choice([p for p, x in self.devs.items() if x.kind != "mtty"])
            d = self.devs[path]
        fd = self.granted_fd(d)
        own: list[tuple[int, int]] = []
        if fd is not None and self.fds[fd].iommufd in self.ictx:
            own = [(i, n) for _, i, n in self.ictx[self.fds[fd].iommufd].maps]
        elif not d.cdev:
            own = self.t1_maps
        c = r.random()
        pick = r.random()
        if pick < 0.5:  # guest RAM, where the machine mapped it for this device's path
            base = IOVA_RAM if d.cdev else IOVA_T1
            iova = base + r.randrange(0, 4 * MIB, r.choice([PAGE_SIZE, 8, 1]))
        elif own and pick < 0.75:
            base, n = r.choice(own)
            iova = base + r.choice([0, PAGE_SIZE, n // 2 & ~0xFFF, n - PAGE_SIZE, n - 8, n])
        else:
            iova = self.iova() if r.random() < 0.9 else r.choice(EDGE_IOVAS)
        if iova < 0 or iova > U64:
            iova = 0
        if c < 0.45:
            data: Any = r.randbytes(r.choice([1, 8, 64, 4096, 4097, 8192]))
            return Call("dma_write", (path, iova, data)), None
        if c < 0.6:
            n = r.choice([1, PAGE_SIZE, 2 * MIB, 1 << 30])
            return Call("dma_write", (path, iova, n)), None
        return Call("dma_read", (path, iova, r.choice([1, 8, 4096, 8192, 65536]))), None

    def gen_hw(self) -> tuple[Call, Callable[[Any, Any], None] | None]:
        r = self.r
        d = self.devs[r.choice(list(self.devs))]
        if d.kind == "reference":
            what = r.choice(["run", "run", "reinit"])
        elif d.kind == "mtty":
            what = "uart"
        else:
            what = "engine"
        return Call("hw_work", (d.path, what, r.choice([1, 3, 16, 64]))), None

    # -- invariants ----------------------------------------------------------------------

    def broken(self, name: str, where: str, detail: str = "") -> Abort:
        return self._finding("invariant", name, where, detail)

    def scan_fds(self, hi: int) -> set[int]:
        """The open fds up to hi, through poll (EBADF: not open)."""
        out = set()
        for fd in range(3, hi + 1):
            _, e = self.sys("poll", fd, 0)
            if not e:
                out.add(fd)
            elif e != errno.EBADF:
                raise self.broken("poll of an fd answered neither events nor EBADF", str(fd))
        return out

    def resync(self) -> None:
        """After the build: every open fd known (any unknown one is OTHER)."""
        now = self.scan_fds(1100)
        for fd in now - set(self.fds):
            self.fds[fd] = FdInfo(OTHER)
        for fd in set(self.fds) - now:
            del self.fds[fd]

    def _classify(self, fd: int, call: Call) -> FdInfo:
        """What a new fd is, from the call that made it."""
        if call.op == "open":
            path = call.args[0]
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            path = str(path).split("\0", 1)[0]
            if path in self.devs:
                return FdInfo(DEVICE, path)
            if path == "/dev/iommu":
                self.ictx[fd] = Ictx()
                return FdInfo(IOMMUFD)
            if path == "/dev/vfio/vfio":
                return FdInfo(CONTAINER)
            for d in self.devs.values():
                if d.group == path:
                    return FdInfo(GROUP, d.path)
            return FdInfo(OTHER)
        tgt = self.fds.get(call.args[0]) if call.op == "ioctl" else None
        if tgt is not None and tgt.kind == GROUP:
            return FdInfo(DEVICE, tgt.path, granted=True)
        if tgt is not None and tgt.kind == DEVICE:
            _, e = self.sys("read", fd, 0)
            return FdInfo(RESUMING_FD if e == errno.EBADF else SAVING, tgt.path)
        return FdInfo(OTHER)

    def check_step(self, call: Call, res: Any, exc: BaseException | None) -> None:
        # 1. the open fds change only as the call allows
        hi = max(self.fds, default=2) + 2
        now = self.scan_fds(hi)
        known = set(self.fds)
        closed = call.args[0] if call.op == "close" and exc is None else None
        for fd in sorted(known - now):
            if fd != closed:
                raise self.broken("fd vanished", str(fd), f"{self.fds[fd].kind} fd {fd}")
        if closed is not None and closed in now:
            raise self.broken("a closed fd still answers", str(closed))
        new = sorted(now - known)
        if new and (call.op not in ("open", "ioctl") or len(new) > 1):
            raise self.broken("fd appeared", str(new), f"{call.op} made fds {new}")
        if call.op == "open" and exc is None and res not in new:
            raise self.broken("open returned no new fd", str(res))
        for fd in new:
            self.fds[fd] = self._classify(fd, call)
        if closed is not None and closed in self.fds:
            info_closed = self.fds[closed]
            del self.fds[closed]
            self.ictx.pop(closed, None)
            self.closed.append(closed)
            del self.closed[:-64]
            for d in self.devs.values():
                d.touched = True
            if info_closed.kind == GROUP:
                for i in self.fds.values():
                    if i.kind == CONTAINER:
                        i.set = False
                self.t1_maps.clear()
        # 2. the device the call concerns answers, in a valid state
        dev: DevInfo | None = None
        set_to: int | None = None
        tgt = call.args[0] if call.args else None
        info = self.fds.get(tgt) if isinstance(tgt, int) and call.op != "close" else None
        if call.op in ("dma_write", "dma_read", "hw_work"):
            dev = self.devs[call.args[0]]
        elif info is not None and info.path:
            dev = self.devs[info.path]
            if call.op == "ioctl" and info.kind in (DEVICE, GROUP):
                dev.touched = True
                set_to = self._set_request(call, info, exc)
        if dev is not None:
            self.check_dev(dev, set_to)
        # 3. the iommufd's IOASes answer, and vanish only by IOMMU_DESTROY
        if call.op == "ioctl" and isinstance(tgt, int) and tgt in self.ictx:
            destroyed = None
            if call.args[1] == u.IOMMU_DESTROY and exc is None:
                destroyed = _u32_at(call.args[2].data, 4)
            self.check_ioas(tgt, destroyed)
        # 4. what a device wrote reads back
        if call.op == "dma_write" and exc is None and isinstance(call.args[2], bytes):
            self.check_readback(*call.args)

    def _set_request(self, call: Call, info: FdInfo, exc: BaseException | None) -> int | None:
        """The state a successful MIG_DEVICE_STATE SET asked for, else None."""
        arg: Arg = call.args[2]
        if exc is not None or call.args[1] != v.VFIO_DEVICE_FEATURE or info.kind != DEVICE:
            return None
        if arg.form in ("int", "junk", "strided") or len(arg.data) < 16:
            return None
        argsz, flags, state = struct.unpack_from("<III", arg.data)
        return state if flags == SET | MIG_STATE and argsz >= 16 else None

    def granted_fd(self, d: DevInfo) -> int | None:
        for fd, i in self.fds.items():
            if i.kind == DEVICE and i.path == d.path and i.granted:
                return fd
        return None

    def check_dev(self, d: DevInfo, set_to: int | None) -> None:
        fd = self.granted_fd(d)
        if fd is None:
            d.state, d.touched = None, True
            return
        buf = v.feature_buffer(GET | MIG_STATE, 8)
        _, e = self.sys("ioctl", fd, v.VFIO_DEVICE_FEATURE, buf)
        if e:
            raise self.broken(
                "MIG_DEVICE_STATE GET failed on a live device fd", d.path, errno.errorcode[e]
            )
        st = int(struct.unpack_from("<I", buf, 8)[0])
        if not (st == ERROR or 0 < st < NUM_STATES and state_supported(d.flags, st)):
            raise self.broken("MIG_DEVICE_STATE GET gave an invalid state", d.path, str(st))
        if set_to is not None and st != set_to:
            raise self.broken("state differs from a successful SET", d.path, f"{st} != {set_to}")
        if d.state is not None and st != d.state and not d.touched:
            raise self.broken("state changed by an unrelated call", d.path, f"{d.state} -> {st}")
        d.state, d.touched = st, False

    def check_ioas(self, fd: int, destroyed: int | None) -> None:
        ictx = self.ictx[fd]
        for ioas in list(ictx.ioas):
            cmd = _sized(
                u.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=64, allowed_iovas=self.chk
            )
            _, e = self.sys("ioctl", fd, u.IOMMU_IOAS_IOVA_RANGES, cmd)
            where = f"IOAS {ioas} of iommufd {fd}"
            if e == errno.ENOENT:
                if ioas != destroyed:
                    raise self.broken("IOAS vanished", where)
                ictx.ioas.remove(ioas)
                continue
            if e not in (0, errno.EMSGSIZE):
                raise self.broken("IOAS_IOVA_RANGES failed", where, errno.errorcode.get(e, "?"))
            align = cmd.out_iova_alignment
            if align < 1 or align & (align - 1):
                raise self.broken("IOAS_IOVA_RANGES alignment not a power of 2", where, str(align))
            n = min(cmd.num_iovas, 64)
            raw = self.k.mm.read(self.chk, 16 * n)  # the process reads its own memory
            prev = -1
            for i in range(n):
                start, last = struct.unpack_from("<QQ", raw, 16 * i)
                if start > last or start <= prev:
                    raise self.broken("IOAS_IOVA_RANGES not sorted and disjoint", where)
                prev = last

    def check_readback(self, path: str, iova: int, data: bytes) -> None:
        if not data or iova % PAGE_SIZE + len(data) > PAGE_SIZE:
            return  # one page: one translation (a range may map the same page twice)
        self.nchecks += 1
        try:
            back = self.k.device(path).dma_read(iova, len(data))
        except (OSError, IommuFault, UnbackedDma):
            return  # a write-only mapping, say
        except Exception as e:
            where = _kernel_where(e.__traceback__)
            raise self._finding("exception", type(e).__name__, where, repr(e)) from None
        if back != data:
            raise self.broken("a DMA write does not read back", path, f"IOVA {iova:#x}")

    def sweep(self) -> None:
        """Every live fd answers its ping; every device and IOAS is checked; memory."""
        for fd, info in list(self.fds.items()):
            self.ping(fd, info)
        for d in self.devs.values():
            self.check_dev(d, None)
        for fd in list(self.ictx):
            self.check_ioas(fd, None)
        rss = _rss_mib()
        if rss > self.max_rss_mib:
            raise self._finding("memory", f"RSS {rss} MiB > {self.max_rss_mib} MiB", "sweep")

    max_rss_mib = 1024

    def ping(self, fd: int, info: FdInfo) -> None:
        k = info.kind
        where = f"{k} fd {fd} {info.path}".rstrip()
        if k in (IOMMUFD, CONTAINER):
            res, e = self.sys("ioctl", fd, v.VFIO_GET_API_VERSION, 0)
            if e or res != v.VFIO_API_VERSION:
                raise self.broken("GET_API_VERSION does not answer", where, f"{res} {e}")
            if k == CONTAINER:
                res, e = self.sys("ioctl", fd, v.VFIO_CHECK_EXTENSION, v.VFIO_TYPE1v2_IOMMU)
                if e or res != 1:
                    raise self.broken("CHECK_EXTENSION(TYPE1v2) does not answer 1", where)
        elif k == GROUP:
            st = _sized(v.vfio_group_status)
            _, e = self.sys("ioctl", fd, v.VFIO_GROUP_GET_STATUS, st)
            ok = v.VFIO_GROUP_FLAGS_VIABLE | v.VFIO_GROUP_FLAGS_CONTAINER_SET
            if e or st.flags & ~ok:
                raise self.broken("GROUP_GET_STATUS does not answer", where, f"{e} {st.flags}")
        elif k == DEVICE:
            di = _sized(v.vfio_device_info)
            _, e = self.sys("ioctl", fd, v.VFIO_DEVICE_GET_INFO, di)
            if info.granted and e:
                raise self.broken("DEVICE_GET_INFO fails on a bound device fd", where, str(e))
            if not info.granted and e != errno.EINVAL:
                raise self.broken("DEVICE_GET_INFO of an unbound device fd not EINVAL", where)
            if info.granted:
                buf = v.feature_buffer(GET | v.VFIO_DEVICE_FEATURE_MIGRATION, 8)
                _, e = self.sys("ioctl", fd, v.VFIO_DEVICE_FEATURE, buf)
                flags = struct.unpack_from("<Q", buf, 8)[0]
                if e or flags != self.devs[info.path].flags:
                    raise self.broken("FEATURE_MIGRATION does not answer its flags", where)
        elif k in (SAVING, RESUMING_FD):
            pi = _sized(v.vfio_precopy_info)
            _, e = self.sys("ioctl", fd, v.VFIO_MIG_GET_PRECOPY_INFO, pi)
            if k == RESUMING_FD and e != errno.ENOTTY:
                raise self.broken("a resuming fd has an ioctl", where, str(e))
        else:
            self.sys("poll", fd, 0xFFFF)

    def finish(self) -> None:
        """The seed's last check: a sweep, then every fd closes cleanly and nothing stays."""
        self._phase = "check"
        self._cur = Call("close", ("*",), "closing everything at the end of the seed")
        self.sweep()
        fds = sorted(self.fds)
        self.r.shuffle(fds)
        for fd in fds:
            _, e = self.sys("close", fd)
            if e:
                raise self.broken("close of an open fd failed", str(fd), errno.errorcode[e])
        left = self.scan_fds(1100)
        if left:
            raise self.broken("fds left after closing all", str(sorted(left)))


def _maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_mib() -> int:
    """The current RSS (not the peak), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") >> 20
    except (OSError, ValueError, IndexError):
        return _maxrss_kib() >> 10


STEP_WEIGHTS: dict[str, float] = {
    "ioctl": 52.0,
    "mig": 8.0,
    "read": 9.0,
    "write": 7.0,
    "dma": 10.0,
    "hw": 2.0,
    "raw": 3.0,
    "seek": 2.0,
    "close": 3.0,
    "open": 3.0,
    "mmap": 1.0,
    "revive": 5.0,
}


# ---------------------------------------------------------------------------------------
# templates: a valid argument for every ioctl of the two headers


class _vfio_bitmap(ctypes.Structure):
    """struct vfio_bitmap with its data pointer as the u64 it is on the wire."""

    _fields_ = [("pgsize", ctypes.c_uint64), ("size", ctypes.c_uint64), ("data", ctypes.c_uint64)]


class _dirty_bitmap_get(ctypes.Structure):
    _fields_ = [("iova", ctypes.c_uint64), ("size", ctypes.c_uint64), ("bitmap", _vfio_bitmap)]


def _rw() -> int:
    return int(u.IOMMU_IOAS_MAP_READABLE | u.IOMMU_IOAS_MAP_WRITEABLE)


def _bitmap_ptr(fz: Fuzzer, nbytes: int) -> int:
    """A dirty bitmap of nbytes: in scratch memory when it fits, else anywhere."""
    sc = fz.regions["scratch"]
    if nbytes <= sc.length and fz.r.random() < 0.8:
        return sc.addr + fz.r.randrange(0, sc.length - nbytes + 1, 8)
    return fz.uptr(min(nbytes, 1 << 16))


def _span(fz: Fuzzer) -> tuple[int, int]:
    """A page-aligned (iova, length) inside something mapped."""
    iova, n = fz.mapping()
    pages = max(n // PAGE_SIZE, 1)
    first = fz.r.randrange(pages)
    count = fz.r.randint(1, min(pages - first, 512))
    return iova + first * PAGE_SIZE, count * PAGE_SIZE


def _free_iova(fz: Fuzzer) -> int:
    return (1 << 38) + fz.r.randrange(1 << 12) * 2 * MIB


def _ram_slice(fz: Fuzzer) -> tuple[int, int]:
    ram = fz.regions["ram"]
    pages = ram.length // PAGE_SIZE
    first = fz.r.randrange(pages)
    return ram.addr + first * PAGE_SIZE, fz.r.randint(1, min(pages - first, 64)) * PAGE_SIZE


def _learn_out_id(off: int, pool: str) -> Callable[[Fuzzer, int, Any, int], None]:
    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        oid = _u32_at(_out_bytes(obj), off)
        if fd in fz.ictx and oid:
            ids: list[int] = getattr(fz.ictx[fd], pool)
            if oid not in ids:
                ids.append(oid)
                del ids[:-32]

    return learn


def _learn_map(
    ioas_off: int, iova_off: int, len_off: int
) -> Callable[[Fuzzer, int, Any, int], None]:
    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        raw = _out_bytes(obj)
        ioas, iova, n = _u32_at(raw, ioas_off), _u64_at(raw, iova_off), _u64_at(raw, len_off)
        if fd in fz.ictx and ioas is not None and iova is not None and n:
            fz.ictx[fd].maps.append((ioas, iova, n))
            del fz.ictx[fd].maps[:-32]

    return learn


# iommufd


def b_destroy(fz: Fuzzer, fd: int) -> Built:
    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        oid = _u32_at(_out_bytes(obj) or bytes(obj) if not isinstance(obj, int) else None, 4)
        ictx = fz.ictx.get(fd)
        if ictx is not None:
            for ids in (ictx.ioas, ictx.hwpt, ictx.devs, ictx.dirty):
                if oid in ids:
                    ids.remove(oid)

    oid = fz.obj_id(fd, fz.r.choice(["hwpt", "ioas", "dev"]))
    return Built([_sized(u.iommu_destroy, id=oid)], learn=learn)


def b_ioas_alloc(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(u.iommu_ioas_alloc)], learn=_learn_out_id(8, "ioas"))


def b_allow_iovas(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    ranges = r.choice(
        [[], [(0, U64)], [(IOVA_RAM, IOVA_RAM + RAM_SIZE - 1)], [(1 << 20, (1 << 40) - 1)]]
        + [[(PAGE_SIZE, (1 << 32) - 1), (1 << 33, (1 << 47) - 1)], [(5, 4), (0, 10), (8, 20)]]
    )
    ptr = fz.array_ptr(b"".join(struct.pack("<QQ", s, e) for s, e in ranges))
    cmd = _sized(
        u.iommu_ioas_allow_iovas,
        ioas_id=fz.obj_id(fd, "ioas"),
        num_iovas=len(ranges),
        allowed_iovas=ptr,
    )
    return Built([cmd])


def b_copy(fz: Fuzzer, fd: int) -> Built:
    src_iova, n = _span(fz)
    fixed = u.IOMMU_IOAS_MAP_FIXED_IOVA if fz.r.random() < 0.7 else 0
    cmd = _sized(
        u.iommu_ioas_copy,
        flags=fixed | _rw(),
        dst_ioas_id=fz.obj_id(fd, "ioas"),
        src_ioas_id=fz.obj_id(fd, "ioas"),
        length=n,
        dst_iova=_free_iova(fz),
        src_iova=src_iova,
    )
    return Built([cmd], learn=_learn_map(8, 24, 16))


def b_iova_ranges(fz: Fuzzer, fd: int) -> Built:
    n = fz.r.choice([0, 1, 2, 4, 64])
    cmd = _sized(
        u.iommu_ioas_iova_ranges,
        ioas_id=fz.obj_id(fd, "ioas"),
        num_iovas=n,
        allowed_iovas=fz.uptr(16 * max(n, 1)),
    )
    return Built([cmd])


def b_map(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    uva, n = _ram_slice(fz)
    if r.random() < 0.1:
        uva, n = fz.regions["big"].addr, r.choice([MIB, 1 << 30])
    fixed = u.IOMMU_IOAS_MAP_FIXED_IOVA if r.random() < 0.7 else 0
    prot = r.choice([_rw(), _rw(), u.IOMMU_IOAS_MAP_READABLE, u.IOMMU_IOAS_MAP_WRITEABLE])
    cmd = _sized(
        u.iommu_ioas_map,
        flags=fixed | prot,
        ioas_id=fz.obj_id(fd, "ioas"),
        user_va=uva,
        length=n,
        iova=_free_iova(fz),
    )
    return Built([cmd], learn=_learn_map(8, 32, 24))


def b_unmap(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    ictx = fz.ictx_of(fd)
    if ictx.maps and r.random() < 0.8:
        ioas, iova, n = r.choice(ictx.maps)
    else:
        ioas, (iova, n) = fz.obj_id(fd, "ioas"), fz.mapping()
    if r.random() < 0.1:
        iova, n = 0, U64  # everything

    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        if fd in fz.ictx:
            last = iova + n - 1
            maps = fz.ictx[fd].maps
            maps[:] = [m for m in maps if not (m[0] == ioas and iova <= m[1] <= last)]

    return Built([_sized(u.iommu_ioas_unmap, ioas_id=ioas, iova=iova, length=n)], learn=learn)


def b_option(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    opt = r.choice([u.IOMMU_OPTION_RLIMIT_MODE, u.IOMMU_OPTION_HUGE_PAGES])
    oid = 0 if opt == u.IOMMU_OPTION_RLIMIT_MODE else fz.obj_id(fd, "ioas")
    cmd = _sized(
        u.iommu_option,
        option_id=opt,
        op=r.choice([u.IOMMU_OPTION_OP_SET, u.IOMMU_OPTION_OP_GET]),
        object_id=oid,
        val64=r.choice([0, 1]),
    )
    return Built([cmd])


def b_vfio_ioas(fz: Fuzzer, fd: int) -> Built:
    op = fz.r.choice([u.IOMMU_VFIO_IOAS_GET, u.IOMMU_VFIO_IOAS_SET, u.IOMMU_VFIO_IOAS_CLEAR])
    return Built([_sized(u.iommu_vfio_ioas, ioas_id=fz.obj_id(fd, "ioas"), op=op)])


def b_hwpt_alloc(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    flags = r.choice([0, u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, u.IOMMU_HWPT_ALLOC_NEST_PARENT])
    cmd = _sized(
        u.iommu_hwpt_alloc,
        flags=flags,
        dev_id=fz.obj_id(fd, "dev"),
        pt_id=fz.obj_id(fd, r.choice(["ioas", "ioas", "hwpt"])),
    )
    learn_hwpt = _learn_out_id(16, "hwpt")
    learn_dirty = _learn_out_id(16, "dirty")

    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        learn_hwpt(fz, fd, obj, res)
        raw = _out_bytes(obj)
        if _u32_at(raw, 4) == u.IOMMU_HWPT_ALLOC_DIRTY_TRACKING:
            learn_dirty(fz, fd, obj, res)

    return Built([cmd], learn=learn)


def b_hw_info(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    n = r.choice([0, 8, 16, 32, 64])
    cmd = _sized(
        u.iommu_hw_info,
        flags=r.choice([0, u.IOMMU_HW_INFO_FLAG_INPUT_TYPE]),
        dev_id=fz.obj_id(fd, "dev"),
        data_len=n,
        data_uptr=fz.uptr(max(n, 1)),
    )
    cmd.in_data_type = r.choice([0, 1, 2, 3, 4])
    return Built([cmd])


def b_set_dirty(fz: Fuzzer, fd: int) -> Built:
    flags = fz.r.choice([0, u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE, u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE])
    return Built(
        [_sized(u.iommu_hwpt_set_dirty_tracking, flags=flags, hwpt_id=fz.obj_id(fd, "dirty"))]
    )


def b_get_dirty(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    iova, n = _span(fz)
    pgsize = r.choice([PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE, 2 * MIB])
    nbytes = ((n // pgsize + 63) // 64) * 8 or 8
    cmd = _sized(
        u.iommu_hwpt_get_dirty_bitmap,
        hwpt_id=fz.obj_id(fd, fz.r.choice(["dirty", "dirty", "hwpt"])),
        flags=r.choice([0, u.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR]),
        iova=iova,
        length=n,
        page_size=pgsize,
        data=_bitmap_ptr(fz, nbytes),
    )
    return Built([cmd])


def b_invalidate(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    cmd = _sized(
        u.iommu_hwpt_invalidate,
        hwpt_id=fz.obj_id(fd, "hwpt"),
        data_uptr=fz.uptr(64),
        data_type=r.choice([0, 1]),
        entry_len=r.choice([16, 24, 32]),
        entry_num=r.choice([0, 1, 2]),
    )
    return Built([cmd])


def b_fault_alloc(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(u.iommu_fault_alloc)])


def b_map_file(fz: Fuzzer, fd: int) -> Built:
    cmd = _sized(
        u.iommu_ioas_map_file,
        flags=u.IOMMU_IOAS_MAP_FIXED_IOVA | _rw(),
        ioas_id=fz.obj_id(fd, "ioas"),
        fd=fz.fd_value(),
        start=0,
        length=PAGE_SIZE,
        iova=_free_iova(fz),
    )
    return Built([cmd])


def b_viommu(fz: Fuzzer, fd: int) -> Built:
    cmd = _sized(
        u.iommu_viommu_alloc,
        type=fz.r.choice([0, 1, 2]),
        dev_id=fz.obj_id(fd, "dev"),
        hwpt_id=fz.obj_id(fd, "hwpt"),
    )
    return Built([cmd])


def b_vdevice(fz: Fuzzer, fd: int) -> Built:
    cmd = _sized(
        u.iommu_vdevice_alloc, viommu_id=fz.obj_id(fd), dev_id=fz.obj_id(fd, "dev"), virt_id=1
    )
    return Built([cmd])


def b_change_process(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(u.iommu_ioas_change_process)])


def b_veventq(fz: Fuzzer, fd: int) -> Built:
    cmd = _sized(u.iommu_veventq_alloc, viommu_id=fz.obj_id(fd), type=1, veventq_depth=16)
    return Built([cmd])


def b_hw_queue(fz: Fuzzer, fd: int) -> Built:
    iova, n = fz.mapping()
    cmd = _sized(
        u.iommu_hw_queue_alloc,
        viommu_id=fz.obj_id(fd),
        type=1,
        nesting_parent_iova=iova,
        length=min(n, 1 << 16),
    )
    return Built([cmd])


# container (and /dev/iommu's VFIO compatibility)


def b_value(choices: list[int]) -> Callable[[Fuzzer, int], Built]:
    def build(fz: Fuzzer, fd: int) -> Built:
        return Built(value=fz.r.choice(choices))

    return build


EXTENSIONS = list(range(0, 12))


def b_iommu_get_info(fz: Fuzzer, fd: int) -> Built:
    argsz = fz.r.choice([16, 24, 48, 128, 512])
    info = _sized(v.vfio_iommu_type1_info, argsz=argsz)
    return Built([info, bytes(max(argsz - ctypes.sizeof(info), 0))])


def b_map_dma(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    vaddr, n = _ram_slice(fz)
    flags = r.choice([3, 3, 3, 1, 2, 0, v.VFIO_DMA_MAP_FLAG_VADDR])
    iova = IOVA_T1 + 16 * MIB + r.randrange(256) * MIB
    m = _sized(v.vfio_iommu_type1_dma_map, flags=flags, vaddr=vaddr, iova=iova, size=n)

    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        if fz.fds.get(fd, FdInfo(OTHER)).kind == CONTAINER:
            fz.t1_maps.append((iova, n))
            del fz.t1_maps[:-32]

    return Built([m], learn=learn)


def b_unmap_dma(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    iova, n = r.choice(fz.t1_maps) if fz.t1_maps and r.random() < 0.8 else fz.mapping()
    flags = r.choice([0, 0, 0, v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP])
    if r.random() < 0.1:
        flags = r.choice([v.VFIO_DMA_UNMAP_FLAG_ALL, v.VFIO_DMA_UNMAP_FLAG_VADDR])
    if flags == v.VFIO_DMA_UNMAP_FLAG_ALL:
        iova, n = 0, 0
    parts: list[Any] = [v.vfio_iommu_type1_dma_unmap(flags=flags, iova=iova, size=n)]
    if flags & v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
        nbytes = ((n // PAGE_SIZE + 63) // 64) * 8 or 8
        parts.append(_vfio_bitmap(pgsize=PAGE_SIZE, size=nbytes, data=_bitmap_ptr(fz, nbytes)))
    parts[0].argsz = sum(ctypes.sizeof(p) for p in parts)

    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        if fz.fds.get(fd, FdInfo(OTHER)).kind == CONTAINER and not flags & 4:
            last = iova + n - 1 if n else U64
            fz.t1_maps[:] = [m for m in fz.t1_maps if not iova <= m[0] <= last]

    return Built(parts, learn=learn)


def b_dirty_pages(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    flags = r.choice(
        [
            v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
            v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
        ]
    )
    parts: list[Any] = [v.vfio_iommu_type1_dirty_bitmap(flags=flags)]
    if flags == v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP:
        iova, n = r.choice(fz.t1_maps) if fz.t1_maps else fz.mapping()
        nbytes = ((n // PAGE_SIZE + 63) // 64) * 8 or 8
        bm = _vfio_bitmap(pgsize=PAGE_SIZE, size=nbytes, data=_bitmap_ptr(fz, nbytes))
        parts.append(_dirty_bitmap_get(iova=iova, size=n, bitmap=bm))
    parts[0].argsz = sum(ctypes.sizeof(p) for p in parts)
    return Built(parts)


def b_sized(cls: type[ctypes.Structure], **kw: Any) -> Callable[[Fuzzer, int], Built]:
    def build(fz: Fuzzer, fd: int) -> Built:
        return Built([_sized(cls, **kw)])

    return build


def b_spapr_reg(fz: Fuzzer, fd: int) -> Built:
    vaddr, n = _ram_slice(fz)
    return Built([_sized(v.vfio_iommu_spapr_register_memory, vaddr=vaddr, size=n)])


def b_eeh(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(v.vfio_eeh_pe_op, op=fz.r.randrange(10))])


# group


def b_set_container(fz: Fuzzer, fd: int) -> Built:
    conts = fz.fds_of(CONTAINER)
    cfd = fz.r.choice(conts) if conts and fz.r.random() < 0.8 else fz.fd_value()
    return Built([ctypes.c_int32(cfd)])


def b_get_device_fd(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    info = fz.fds.get(fd)
    path = info.path if info is not None and info.path else r.choice(list(fz.devs))
    if r.random() < 0.1:
        path = r.choice(list(fz.devs))
    name = os.path.basename(path).encode()
    c = r.random()
    if c < 0.8:
        raw = name + b"\0"
    elif c < 0.85:
        raw = name  # no NUL
    elif c < 0.9:
        raw = b"x" * 5000 + b"\0"
    elif c < 0.95:
        raw = b"\0"
    else:
        raw = name + b"\0" + r.randbytes(8)
    return Built([raw])


# device


def b_dev_info(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(v.vfio_device_info, argsz=fz.r.choice([16, 24, 24, 32]))])


def b_region_info(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(v.vfio_region_info, index=fz.r.randrange(10))])


def b_irq_info(fz: Fuzzer, fd: int) -> Built:
    return Built([_sized(v.vfio_irq_info, index=fz.r.randrange(6))])


def b_set_irqs(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    dtype = r.choice(
        [v.VFIO_IRQ_SET_DATA_NONE, v.VFIO_IRQ_SET_DATA_BOOL, v.VFIO_IRQ_SET_DATA_EVENTFD]
    )
    action = r.choice([v.VFIO_IRQ_SET_ACTION_TRIGGER, v.VFIO_IRQ_SET_ACTION_MASK])
    count = r.choice([0, 1, 2])
    data = b"" if dtype == v.VFIO_IRQ_SET_DATA_NONE else bytes(count * (1 if dtype == 2 else 4))
    hdr = v.vfio_irq_set(flags=dtype | action, index=r.randrange(5), start=0, count=count)
    hdr.argsz = ctypes.sizeof(hdr) + len(data)
    return Built([hdr, data])


def b_hot_reset_info(fz: Fuzzer, fd: int) -> Built:
    n = fz.r.choice([0, 1, 4])
    hdr = v.vfio_pci_hot_reset_info(argsz=12 + 8 * n)
    return Built([hdr, bytes(8 * n)])


def b_hot_reset(fz: Fuzzer, fd: int) -> Built:
    n = fz.r.choice([0, 1, 2])
    fds = (ctypes.c_int32 * n)(*[fz.fd_value() for _ in range(n)])
    return Built([v.vfio_pci_hot_reset(argsz=12 + 4 * n, count=n), fds])


def b_ioeventfd(fz: Fuzzer, fd: int) -> Built:
    cmd = _sized(
        v.vfio_device_ioeventfd,
        flags=v.VFIO_DEVICE_IOEVENTFD_32,
        offset=fz.r.choice([0, 0x10, 1 << 40]),
        data=1,
        fd=fz.fd_value(),
    )
    return Built([cmd])


def _log_ranges(fz: Fuzzer) -> list[tuple[int, int]]:
    r = fz.r
    c = r.random()
    if c < 0.5:
        return [_span(fz) for _ in range(r.choice([1, 1, 2, 3, 9]))]
    if c < 0.7:
        return [(IOVA_RAM, RAM_SIZE)]
    return [(r.choice(EDGE_IOVAS), r.choice(EDGE_LENGTHS)) for _ in range(r.choice([1, 2]))]


def b_feature(fz: Fuzzer, fd: int) -> Built:
    r = fz.r
    idx = r.choice([0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7, 8, 8, 8, 9, 9, 10, 11, 12, 12, 13, 0xFFFF])
    payload: list[Any] = []
    op = GET
    if idx == v.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN:
        op, payload = SET, [r.randbytes(16)]
    elif idx == v.VFIO_DEVICE_FEATURE_MIGRATION:
        payload = [v.vfio_device_feature_migration()]
    elif idx == MIG_STATE:
        op = r.choice([GET, SET, SET])
        payload = [v.vfio_device_feature_mig_state(r.randrange(1, NUM_STATES), -1)]
    elif idx == v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP:
        op = SET
        payload = [v.vfio_device_low_power_entry_with_wakeup(wakeup_eventfd=fz.fd_value())]
    elif idx in (3, 5, 7, 12):
        op = SET
    elif idx == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
        op = SET
        ranges = _log_ranges(fz)
        ptr = fz.array_ptr(b"".join(struct.pack("<QQ", a, n & U64) for a, n in ranges))
        payload = [
            v.vfio_device_feature_dma_logging_control(
                page_size=r.choice([PAGE_SIZE, PAGE_SIZE, 2 * MIB, 8192]),
                num_ranges=len(ranges),
                ranges=ptr,
            )
        ]
    elif idx == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT:
        iova, n = _span(fz) if r.random() < 0.8 else (IOVA_RAM, RAM_SIZE)
        pgsize = r.choice([PAGE_SIZE, PAGE_SIZE, 8192, 2 * MIB])
        nbytes = ((n // pgsize + 63) // 64) * 8 or 8
        payload = [
            v.vfio_device_feature_dma_logging_report(
                iova=iova, length=n, page_size=pgsize, bitmap=_bitmap_ptr(fz, nbytes)
            )
        ]
    elif idx == v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
        payload = [v.vfio_device_feature_mig_data_size()]
    elif idx == v.VFIO_DEVICE_FEATURE_BUS_MASTER:
        op, payload = SET, [v.vfio_device_feature_bus_master(op=r.choice([0, 1]))]
    elif idx == v.VFIO_DEVICE_FEATURE_DMA_BUF:
        op = GET
        payload = [
            v.vfio_device_feature_dma_buf(region_index=0, open_flags=os.O_RDWR, nr_ranges=1),
            v.vfio_region_dma_range(offset=0, length=PAGE_SIZE),
        ]
    else:
        op, payload = r.choice([GET, SET]), [bytes(8)]
    if r.random() < 0.08:
        op |= PROBE
    hdr = v.vfio_device_feature(flags=op | idx)
    hdr.argsz = ctypes.sizeof(hdr) + sum(len(bytes(p)) for p in payload)
    return Built([hdr, *payload], roles={"flags": R_FLAGS})


def b_bind(fz: Fuzzer, fd: int) -> Built:
    iommufds = fz.fds_of(IOMMUFD)
    ifd = fz.r.choice(iommufds) if iommufds and fz.r.random() < 0.85 else fz.fd_value()
    cmd = _sized(v.vfio_device_bind_iommufd, iommufd=ifd)
    if fz.r.random() < 0.03:
        cmd.flags, cmd.token_uuid_ptr = v.VFIO_DEVICE_BIND_FLAG_TOKEN, fz.array_ptr(bytes(16))

    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        info = fz.fds.get(fd)
        if info is not None and info.kind == DEVICE:
            info.granted, info.iommufd = True, ifd
            devid = _u32_at(_out_bytes(obj), 12)
            if devid and ifd in fz.ictx:
                fz.ictx[ifd].devs.append(devid)
                del fz.ictx[ifd].devs[:-32]

    return Built([cmd], learn=learn)


def b_attach(fz: Fuzzer, fd: int) -> Built:
    pt = fz.obj_id(fd, fz.r.choice(["ioas", "hwpt"]))

    def learn(fz: Fuzzer, fd: int, obj: Any, res: int) -> None:
        info = fz.fds.get(fd)
        hwpt = _u32_at(_out_bytes(obj), 8)
        if info is not None and hwpt and info.iommufd in fz.ictx:
            ictx = fz.ictx[info.iommufd]
            if hwpt not in ictx.ioas and hwpt not in ictx.hwpt:
                ictx.hwpt.append(hwpt)

    return Built([_sized(v.vfio_device_attach_iommufd_pt, pt_id=pt)], learn=learn)


def b_precopy(fz: Fuzzer, fd: int) -> Built:
    flags = fz.r.choice([0, 0, v.VFIO_PRECOPY_INFO_REINIT])
    return Built([_sized(v.vfio_precopy_info, flags=flags)])


CT = (CONTAINER,)
CT_COMPAT = (CONTAINER, IOMMUFD)
DEV = (DEVICE,)
IFD = (IOMMUFD,)
GRP = (GROUP,)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # container, and the VFIO compatibility of /dev/iommu
        Template("VFIO_GET_API_VERSION", v.VFIO_GET_API_VERSION, CT_COMPAT, b_value([0]), 0.5),
        Template("VFIO_CHECK_EXTENSION", v.VFIO_CHECK_EXTENSION, CT_COMPAT, b_value(EXTENSIONS)),
        Template("VFIO_SET_IOMMU", v.VFIO_SET_IOMMU, CT_COMPAT, b_value(EXTENSIONS)),
        Template("VFIO_IOMMU_GET_INFO", v.VFIO_IOMMU_GET_INFO, CT_COMPAT, b_iommu_get_info),
        Template("VFIO_IOMMU_MAP_DMA", v.VFIO_IOMMU_MAP_DMA, CT_COMPAT, b_map_dma, 2),
        Template("VFIO_IOMMU_UNMAP_DMA", v.VFIO_IOMMU_UNMAP_DMA, CT_COMPAT, b_unmap_dma, 2),
        Template("VFIO_IOMMU_ENABLE", v.VFIO_IOMMU_ENABLE, CT, b_value([0]), 0.3),
        Template("VFIO_IOMMU_DISABLE", v.VFIO_IOMMU_DISABLE, CT, b_value([0]), 0.3),
        Template("VFIO_IOMMU_DIRTY_PAGES", v.VFIO_IOMMU_DIRTY_PAGES, CT, b_dirty_pages, 2),
        Template(
            "VFIO_IOMMU_SPAPR_TCE_GET_INFO",
            v.VFIO_IOMMU_SPAPR_TCE_GET_INFO,
            CT,
            b_sized(v.vfio_iommu_spapr_tce_info),
            0.3,
        ),
        Template(
            "VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
            v.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
            CT,
            b_spapr_reg,
            0.3,
        ),
        Template(
            "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY",
            v.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
            CT,
            b_spapr_reg,
            0.3,
        ),
        Template(
            "VFIO_IOMMU_SPAPR_TCE_CREATE",
            v.VFIO_IOMMU_SPAPR_TCE_CREATE,
            CT,
            b_sized(v.vfio_iommu_spapr_tce_create, page_shift=12, window_size=1 << 30, levels=1),
            0.3,
        ),
        Template(
            "VFIO_IOMMU_SPAPR_TCE_REMOVE",
            v.VFIO_IOMMU_SPAPR_TCE_REMOVE,
            CT,
            b_sized(v.vfio_iommu_spapr_tce_remove, start_addr=1 << 59),
            0.3,
        ),
        Template("VFIO_EEH_PE_OP", v.VFIO_EEH_PE_OP, CT, b_eeh, 0.3),
        # groups
        Template(
            "VFIO_GROUP_GET_STATUS", v.VFIO_GROUP_GET_STATUS, GRP, b_sized(v.vfio_group_status)
        ),
        Template("VFIO_GROUP_SET_CONTAINER", v.VFIO_GROUP_SET_CONTAINER, GRP, b_set_container),
        Template("VFIO_GROUP_UNSET_CONTAINER", v.VFIO_GROUP_UNSET_CONTAINER, GRP, b_value([0])),
        Template("VFIO_GROUP_GET_DEVICE_FD", v.VFIO_GROUP_GET_DEVICE_FD, GRP, b_get_device_fd, 1.5),
        # devices
        Template("VFIO_DEVICE_GET_INFO", v.VFIO_DEVICE_GET_INFO, DEV, b_dev_info),
        Template("VFIO_DEVICE_GET_REGION_INFO", v.VFIO_DEVICE_GET_REGION_INFO, DEV, b_region_info),
        Template("VFIO_DEVICE_GET_IRQ_INFO", v.VFIO_DEVICE_GET_IRQ_INFO, DEV, b_irq_info, 0.5),
        Template("VFIO_DEVICE_SET_IRQS", v.VFIO_DEVICE_SET_IRQS, DEV, b_set_irqs, 0.5),
        Template("VFIO_DEVICE_RESET", v.VFIO_DEVICE_RESET, DEV, b_value([0]), 1.5, True),
        Template(
            "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
            v.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
            DEV,
            b_hot_reset_info,
            0.3,
        ),
        Template("VFIO_DEVICE_PCI_HOT_RESET", v.VFIO_DEVICE_PCI_HOT_RESET, DEV, b_hot_reset, 0.3),
        Template(
            "VFIO_DEVICE_QUERY_GFX_PLANE",
            v.VFIO_DEVICE_QUERY_GFX_PLANE,
            DEV,
            b_sized(v.vfio_device_gfx_plane_info, flags=v.VFIO_GFX_PLANE_TYPE_PROBE),
            0.3,
        ),
        Template(
            "VFIO_DEVICE_GET_GFX_DMABUF",
            v.VFIO_DEVICE_GET_GFX_DMABUF,
            DEV,
            lambda fz, fd: Built([ctypes.c_uint32(0)]),
            0.3,
        ),
        Template("VFIO_DEVICE_IOEVENTFD", v.VFIO_DEVICE_IOEVENTFD, DEV, b_ioeventfd, 0.3),
        Template("VFIO_DEVICE_FEATURE", v.VFIO_DEVICE_FEATURE, DEV, b_feature, 14, True),
        Template("VFIO_DEVICE_BIND_IOMMUFD", v.VFIO_DEVICE_BIND_IOMMUFD, DEV, b_bind, 2),
        Template(
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT", v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, DEV, b_attach, 2, True
        ),
        Template(
            "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            v.VFIO_DEVICE_DETACH_IOMMUFD_PT,
            DEV,
            b_sized(v.vfio_device_detach_iommufd_pt),
            0.7,
            True,
        ),
        # data fds
        Template(
            "VFIO_MIG_GET_PRECOPY_INFO",
            v.VFIO_MIG_GET_PRECOPY_INFO,
            (SAVING, RESUMING_FD),
            b_precopy,
            3,
        ),
        # iommufd
        Template("IOMMU_DESTROY", u.IOMMU_DESTROY, IFD, b_destroy, 1.5),
        Template("IOMMU_IOAS_ALLOC", u.IOMMU_IOAS_ALLOC, IFD, b_ioas_alloc),
        Template("IOMMU_IOAS_ALLOW_IOVAS", u.IOMMU_IOAS_ALLOW_IOVAS, IFD, b_allow_iovas),
        Template("IOMMU_IOAS_COPY", u.IOMMU_IOAS_COPY, IFD, b_copy, 1.5),
        Template("IOMMU_IOAS_IOVA_RANGES", u.IOMMU_IOAS_IOVA_RANGES, IFD, b_iova_ranges),
        Template("IOMMU_IOAS_MAP", u.IOMMU_IOAS_MAP, IFD, b_map, 3),
        Template("IOMMU_IOAS_UNMAP", u.IOMMU_IOAS_UNMAP, IFD, b_unmap, 2),
        Template("IOMMU_OPTION", u.IOMMU_OPTION, IFD, b_option),
        Template("IOMMU_VFIO_IOAS", u.IOMMU_VFIO_IOAS, IFD, b_vfio_ioas),
        Template("IOMMU_HWPT_ALLOC", u.IOMMU_HWPT_ALLOC, IFD, b_hwpt_alloc, 2),
        Template("IOMMU_GET_HW_INFO", u.IOMMU_GET_HW_INFO, IFD, b_hw_info),
        Template(
            "IOMMU_HWPT_SET_DIRTY_TRACKING", u.IOMMU_HWPT_SET_DIRTY_TRACKING, IFD, b_set_dirty
        ),
        Template("IOMMU_HWPT_GET_DIRTY_BITMAP", u.IOMMU_HWPT_GET_DIRTY_BITMAP, IFD, b_get_dirty, 3),
        Template("IOMMU_HWPT_INVALIDATE", u.IOMMU_HWPT_INVALIDATE, IFD, b_invalidate, 0.5),
        Template("IOMMU_FAULT_QUEUE_ALLOC", u.IOMMU_FAULT_QUEUE_ALLOC, IFD, b_fault_alloc, 0.3),
        Template("IOMMU_IOAS_MAP_FILE", u.IOMMU_IOAS_MAP_FILE, IFD, b_map_file, 0.5),
        Template("IOMMU_VIOMMU_ALLOC", u.IOMMU_VIOMMU_ALLOC, IFD, b_viommu, 0.3),
        Template("IOMMU_VDEVICE_ALLOC", u.IOMMU_VDEVICE_ALLOC, IFD, b_vdevice, 0.3),
        Template(
            "IOMMU_IOAS_CHANGE_PROCESS", u.IOMMU_IOAS_CHANGE_PROCESS, IFD, b_change_process, 0.3
        ),
        Template("IOMMU_VEVENTQ_ALLOC", u.IOMMU_VEVENTQ_ALLOC, IFD, b_veventq, 0.3),
        Template("IOMMU_HW_QUEUE_ALLOC", u.IOMMU_HW_QUEUE_ALLOC, IFD, b_hw_queue, 0.3),
    ]
}
TEMPLATE_LIST = list(TEMPLATES.values())
TEMPLATE_WEIGHTS = [t.weight for t in TEMPLATE_LIST]


def uapi_ioctls() -> dict[str, int]:
    """Every ioctl request of the two headers, by name (type ';', no size or direction)."""
    out = {}
    for mod in (v, u):
        for name, val in vars(mod).items():
            if name.isupper() and type(val) is int and val >> 8 == ord(";"):
                out[name] = val
    return out


REQUESTS = sorted(set(uapi_ioctls().values()))


# ---------------------------------------------------------------------------------------
# running


def _on_alarm(signum: int, frame: Any) -> None:
    raise CallTimeout()


def run_seed(
    seed: int, calls: int, *, trace: bool = False, record: bool = False, max_rss_mib: int = 1024
) -> Fuzzer:
    """Build seed's machine and make `calls` fuzzed calls (fewer if a finding ends it)."""
    fz = Fuzzer(seed, trace=trace, record=record)
    fz.max_rss_mib = max_rss_mib
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        fz.build()
        fz.resync()
        while fz.ncalls < calls:
            fz.step()
        fz.finish()
    except Abort:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return fz


def replay(seed: int, calls: list[Call]) -> Finding | None:
    """Make `calls` on seed's machine, without checks: the finding they raise, if any."""
    fz = Fuzzer(seed, record=False)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        fz.build()
        fz._phase = "fuzz"
        for call in calls:
            fz.step_no += 1
            fz.execute(call)
    except Abort:
        return fz.findings[-1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return None


def minimize(seed: int, calls: list[Call], target: Finding, budget: int = 3000) -> list[Call]:
    """ddmin: a small sublist of `calls` that still raises the same exception."""
    sig = target.signature
    tests = 0

    def fails(cs: list[Call]) -> bool:
        nonlocal tests
        tests += 1
        f = replay(seed, cs)
        return f is not None and f.signature == sig

    if not fails(calls):
        return calls
    # the last call alone, on each fd of the starting machine (its own fd may have been
    # made by earlier calls)
    last = calls[-1]
    alone = [last]
    if last.op in ("ioctl", "read", "write", "close", "lseek", "pread", "poll"):
        probe = Fuzzer(seed, record=False)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            probe.build()
        finally:
            signal.signal(signal.SIGALRM, old)
        alone += [Call(last.op, (fd, *last.args[1:]), last.name) for fd in sorted(probe.fds)]
    for c in alone:
        if fails([c]):
            return [c]
    cur = list(calls)
    n = 2
    while len(cur) >= 2 and tests < budget:
        chunk = -(-len(cur) // n)
        subsets = [cur[i : i + chunk] for i in range(0, len(cur), chunk)]
        for i in range(len(subsets)):
            comp = [c for j, s in enumerate(subsets) if j != i for c in s]
            if fails(comp):
                cur, n = comp, max(n - 1, 2)
                break
        else:
            if n >= len(cur):
                break
            n = min(n * 2, len(cur))
    return cur


@dataclass
class Totals:
    seeds: int = 0
    calls: int = 0
    checks: int = 0
    setup: int = 0
    seconds: float = 0.0
    results: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    vendors: Counter[str] = field(default_factory=Counter)
    by_call: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, fz: Fuzzer, seconds: float) -> None:
        self.seeds += 1
        self.calls += fz.ncalls
        self.checks += fz.nchecks
        self.setup += fz.nsetup
        self.seconds += seconds
        self.results.update(fz.results)
        self.by_call.update(fz.by_call)
        self.findings.extend(fz.findings)
        self.vendors[fz.vendor] += 1

    @property
    def unknown(self) -> list[Finding]:
        return [f for f in self.findings if f.known is None]


def report(t: Totals, out: Any = None) -> None:
    out = out or sys.stdout
    rate = t.calls / t.seconds if t.seconds else 0.0
    vendors = ", ".join(f"{n} {v}" for v, n in sorted(t.vendors.items()))
    print(f"seeds: {t.seeds} ({vendors})", file=out)
    print(
        f"calls: {t.calls:,} in {t.seconds:.1f} s = {rate:,.0f} calls/s"
        f"  (and {t.checks:,} calls by the invariant checks, {t.setup:,} building machines)",
        file=out,
    )
    oserr = {k: n for k, n in t.results.items() if k.startswith("E")}
    other = {k: n for k, n in t.results.items() if k != "ok" and not k.startswith("E")}
    print(f"ok: {t.results['ok']:,}", file=out)
    errs = ", ".join(f"{k} {n:,}" for k, n in sorted(oserr.items(), key=lambda kv: -kv[1]))
    print(f"OSError: {sum(oserr.values()):,} ({errs})", file=out)
    hw = {k: n for k, n in other.items() if k in ("IommuFault", "UnbackedDma")}
    bad = {k: n for k, n in other.items() if k not in hw}
    if hw:
        print(
            "hardware faults (allowed from DMA): " + ", ".join(f"{k} {n:,}" for k, n in hw.items()),
            file=out,
        )
    print(
        "other exceptions: " + (", ".join(f"{k} {n:,}" for k, n in bad.items()) if bad else "0"),
        file=out,
    )
    sigs: dict[tuple[str, str, str], list[Finding]] = {}
    for f in t.findings:
        sigs.setdefault(f.signature, []).append(f)
    inv = sum(1 for f in t.findings if f.kind == "invariant")
    print(
        f"findings: {len(t.findings)} ({len(sigs)} distinct; {inv} broken invariants;"
        f" {len(t.unknown)} not known)",
        file=out,
    )
    for fs in sigs.values():
        print(f"  x{len(fs)} {fs[0]}", file=out)
    print(f"peak RSS: {_maxrss_kib() / 1024:.0f} MiB", file=out)


def report_calls(t: Totals, out: Any = None) -> None:
    """Per call: how often it succeeded and its three most frequent errors."""
    out = out or sys.stdout
    names = sorted({n for n, _ in t.by_call})
    print("per call (calls, ok, top results):", file=out)
    for n in names:
        res = Counter({r: c for (m, r), c in t.by_call.items() if m == n})
        total = sum(res.values())
        top = ", ".join(f"{r} {c}" for r, c in res.most_common(4) if r != "ok")
        print(f"  {n:36} {total:8,} ok {res['ok'] / total:6.1%}  {top}", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Structure-aware fuzzer of the model kernel's syscalls.",
        epilog="Exit status 1 when a finding is not a known (recorded) defect.",
    )
    ap.add_argument("--seed", type=int, default=0, help="the (first) seed")
    ap.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="fuzzed calls per seed")
    ap.add_argument("--until", type=int, help="run seeds from --seed on until this many calls")
    ap.add_argument("--trace", action="store_true", help="print every call")
    ap.add_argument("--minimize", action="store_true", help="shrink the first defect's calls")
    ap.add_argument("--max-rss", type=int, default=1024, help="MiB of RSS that is a finding")
    ap.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines")
    ap.add_argument("--stats", action="store_true", help="results per call kind")
    a = ap.parse_args(argv)
    t = Totals()
    seed = a.seed
    target = a.until if a.until is not None else a.calls
    last = time.perf_counter()
    print(
        f"vfiomig fuzz: seed {seed}{' on' if a.until else ''}, {a.calls:,} calls per seed,"
        f" {target:,} calls in all",
        flush=True,
    )
    while True:
        t0 = time.perf_counter()
        fz = run_seed(seed, a.calls, trace=a.trace, record=a.minimize, max_rss_mib=a.max_rss)
        t.add(fz, time.perf_counter() - t0)
        for f in fz.findings:
            print(f"FINDING {f}", flush=True)
        if a.minimize and fz.findings and fz.findings[0].kind in ("exception", "hang", "memory"):
            calls = fz.calls[: fz.findings[0].step]
            small = minimize(seed, calls, fz.findings[0])
            print(f"minimized to {len(small)} of {len(calls)} calls after build (seed {seed}):")
            for c in small:
                print(f"    {c.render()}")
        del fz
        seed += 1
        if a.until is None or t.calls >= a.until:
            break
        if time.perf_counter() - last > a.progress:
            last = time.perf_counter()
            print(
                f"... {t.seeds} seeds, {t.calls:,} calls, {t.calls / t.seconds:,.0f} calls/s,"
                f" {len(t.findings)} findings, peak RSS {_maxrss_kib() >> 10} MiB",
                flush=True,
            )
    report(t)
    if a.stats:
        report_calls(t)
    return 1 if t.unknown else 0


if __name__ == "__main__":
    sys.exit(main())
