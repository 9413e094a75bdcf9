"""`vfiomig conformance`: a migration conformance suite for one VFIO device.

Every check drives the device through ``vfiomig.host`` (the same bytes a VMM would send) and
compares what the kernel and the driver do with what the VFIO uAPI (linux/vfio.h) promises:
the migration FSM and its data fds, illegal and blocked transitions, PRECOPY_INFO,
MIG_DATA_SIZE, the end of the data stream, save/resume round trips, rejection of bad resume
streams, recovery through reset, DMA logging, and the P2P two-phase order.

    vfiomig conformance --model reference                  # the model's reference device
    vfiomig conformance --model reference --defect lossy_resume
    vfiomig conformance --model hisi_acc --json
    vfiomig conformance --device /dev/vfio/devices/vfio3 --device2 /dev/vfio/devices/vfio4 --yes

Each check prints pass / fail / skip with its reason; the exit status is 1 when any check
fails (2 for usage errors). On a real device the suite changes the device's migration state
and resets it, so it refuses to start without ``--yes``. Checks that need to make the device
DMA or to inject a fault run only on the model and are skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from errno import E2BIG, EBADF, EINVAL, ENODEV, ENOMSG, ENOTTY, EOVERFLOW, ESPIPE
from functools import partial
from typing import IO, Any

from vfiomig.host import (
    Iommufd,
    LinuxTransport,
    MigrationFile,
    MigrationFlags,
    MigrationState,
    ModelTransport,
    Transport,
    VfioDevice,
    VfioError,
    fsm,
)
from vfiomig.host.device import SET, state_name
from vfiomig.host.errors import MigrationStateError, errno_name
from vfiomig.host.iommufd import Ioas
from vfiomig.host.transport import IOMMUFD_PATH
from vfiomig.tools.probe import IOMMU_CHOICES, ModelSpec, build_model, flag_names, model_spec_arg
from vfiomig.uapi import vfio as v

S = MigrationState
PASS, FAIL, SKIP = "pass", "fail", "skip"
READ_CHUNK = 1 << 20
# Saved streams up to this size stay in memory; larger ones go to a temporary file.
KEEP_STREAM = 64 << 20
# Where the DMA-logging check maps its buffer, and how big it is.
DMA_BASE = 1 << 32
DMA_PAGES = 64


class Fail(Exception):
    """The device departs from the uAPI; the message says how."""


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class CheckResult:
    name: str
    status: str
    reason: str
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "status": self.status,
            "reason": self.reason,
            "details": self.details,
            "seconds": round(self.seconds, 4),
        }


# ------------------------------------------------------------------------------------------
# targets


class ModelHooks:
    """What only the model can do for the suite: make the device DMA, inject faults.

    This is the suite's one look below the uAPI (ModelKernel.device / add_device); on a real
    host there is none and the checks that need it skip.
    """

    def __init__(self, kernel: Any, spec: ModelSpec) -> None:
        self.kernel = kernel
        self.spec = spec

    def dma_write(self, path: str, iova: int, data: bytes) -> None:
        self.kernel.device(path).dma_write(iova, data)

    def error_device(self) -> str | None:
        """A device of the same kind whose STOP -> STOP_COPY arc drops it into ERROR."""
        if self.spec.kind != "reference":
            return None
        opts = dict(self.spec.options, fail_arc=("STOP", "STOP_COPY", "error"))
        return str(self.kernel.add_device(self.spec.kind, **opts))

    def mismatched_device(self) -> str | None:
        """A device of the same kind whose saved state the suite's devices must refuse."""
        o = self.spec.options
        change: dict[str, Any]
        if self.spec.kind == "reference":  # another state size: the DEV record differs
            size = int(o.get("state_size", 256 * 1024))
            change = {"state_size": size + int(o.get("chunk_size", 64 * 1024))}
        elif self.spec.kind == "mtty":  # another port count in the header
            change = {"nr_ports": 1 if int(o.get("nr_ports", 2)) == 2 else 2}
        elif self.spec.kind == "hisi_acc":  # another VF queue count in the match data
            change = {"qp_num": int(o.get("qp_num", 2)) + 1}
        else:
            return None
        return str(self.kernel.add_device(self.spec.kind, **dict(o, **change)))


@dataclass
class Target:
    transport: Transport
    primary: str
    secondary: str | None
    iommufd_path: str = IOMMUFD_PATH
    label: str = ""
    model: ModelHooks | None = None
    host_page_size: int = mmap.PAGESIZE
    # Whether the blocked STOP_COPY -> PRE_COPY(_P2P) arcs may be tried: a kernel before 7.2
    # without the stable fix spins forever on them (soft lockup) instead of EINVAL.
    blocked_arcs_safe: bool = True


def kernel_release_at_least(release: str, major: int, minor: int) -> bool:
    """``"7.2.0-rc1-foo"`` >= (7, 2)? Unparsable releases count as older."""
    parts = release.split("-", 1)[0].split(".")
    try:
        have = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return False
    return have >= (major, minor)


class Stream:
    """A saved migration stream: length and sha256, its bytes in memory up to KEEP_STREAM
    and in an anonymous temporary file beyond (a device state can be hundreds of MiB)."""

    def __init__(self) -> None:
        self.length = 0
        self._hash = hashlib.sha256()
        self._mem = bytearray()
        self._file: IO[bytes] | None = None

    def add(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.length += len(chunk)
        if self._file is None and len(self._mem) + len(chunk) > KEEP_STREAM:
            self._file = tempfile.TemporaryFile()
            self._file.write(self._mem)
            self._mem = bytearray()
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._mem.extend(chunk)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def chunks(self, n: int = READ_CHUNK) -> Iterator[bytes]:
        if self._file is None:
            for i in range(0, len(self._mem), n):
                yield bytes(self._mem[i : i + n])
            return
        self._file.seek(0)
        while chunk := self._file.read(n):
            yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stream):
            return NotImplemented
        return (self.length, self.digest) == (other.length, other.digest)

    __hash__ = None  # type: ignore[assignment]


def first_difference(a: Stream, b: Stream) -> int:
    """Offset of the first byte where two streams differ (the shorter length if one is a
    prefix of the other)."""
    off = 0
    ia, ib = a.chunks(), b.chunks()
    ca = cb = b""
    while True:
        if not ca:
            ca = next(ia, b"")
        if not cb:
            cb = next(ib, b"")
        if not ca or not cb:
            return off
        n = min(len(ca), len(cb))
        if ca[:n] != cb[:n]:
            return off + next(i for i in range(n) if ca[i] != cb[i])
        off += n
        ca, cb = ca[n:], cb[n:]


def truncated(stream: Stream) -> Iterator[bytes]:
    """The first half of a stream."""
    left = stream.length // 2
    for chunk in stream.chunks():
        if left <= 0:
            return
        yield chunk[:left]
        left -= len(chunk)


def corrupted(stream: Stream) -> Iterator[bytes]:
    """The stream with every bit of its first 8 bytes inverted (its header)."""
    head = 8
    for chunk in stream.chunks():
        if head > 0:
            n = min(head, len(chunk))
            chunk = bytes(x ^ 0xFF for x in chunk[:n]) + chunk[n:]
            head -= n
        yield chunk


# ------------------------------------------------------------------------------------------
# the run context


class Ctx:
    """Open devices and helpers shared by the checks."""

    def __init__(self, target: Target, stack: ExitStack) -> None:
        self.target = target
        self.t = target.transport
        self.stack = stack
        self.ictx = stack.enter_context(Iommufd(self.t, target.iommufd_path))
        self.ioas: Ioas = stack.enter_context(self.ictx.ioas_alloc())
        self.attach_error: str | None = None
        self.a = self.open_device(target.primary)
        self.b = self.open_device(target.secondary) if target.secondary else None
        self.files: list[MigrationFile] = []
        # per device: the state last set or seen, and how many resumes completed
        self.last: dict[str, int] = {}
        self.loaded: dict[str, int] = {}
        self._flags: int | None = None
        self._stream: Stream | None = None
        # The state each device was in right after it was opened (before any check).
        self.initial_state: dict[str, int | str] = {}
        for d in self.devices:
            try:
                self.initial_state[d.path] = int(d.get_state())
            except VfioError as e:
                self.initial_state[d.path] = str(e)

    @property
    def devices(self) -> list[VfioDevice]:
        return [self.a] + ([self.b] if self.b is not None else [])

    def open_device(self, path: str) -> VfioDevice:
        dev = self.stack.enter_context(VfioDevice(self.t, path))
        dev.bind(self.ictx)
        try:
            dev.attach(self.ioas)
        except VfioError as e:
            self.attach_error = str(e)
        return dev

    @property
    def flags(self) -> int:
        if self._flags is None:
            try:
                self._flags = int(self.a.migration_flags())
            except VfioError as e:
                if e.errno == ENOTTY:
                    raise Skip(f"the device does not support migration ({e})") from e
                raise Fail(f"the device does not report migration flags ({e})") from e
        return self._flags

    def need(self, flag: MigrationFlags, what: str) -> None:
        if not self.flags & flag:
            raise Skip(f"the device does not advertise {flag.name} ({what})")

    def need_b(self) -> VfioDevice:
        if self.b is None:
            raise Skip("needs a second device of the same kind (--device2, or a model)")
        return self.b

    # -- state helpers ------------------------------------------------------------------

    def keep(self, f: MigrationFile | None) -> MigrationFile | None:
        if f is not None:
            self.files.append(f)
        return f

    def set(self, dev: VfioDevice, state: int) -> MigrationFile | None:
        was = self.last.get(dev.path)
        f = self.keep(dev.set_state(state))
        if was == S.RESUMING and state != S.RESUMING:
            self.loaded[dev.path] = self.loaded.get(dev.path, 0) + 1
        self.last[dev.path] = state
        return f

    def state(self, dev: VfioDevice) -> int:
        st = int(dev.get_state())
        self.last[dev.path] = st
        return st

    def close_files(self) -> None:
        for f in self.files:
            try:
                f.close()
            except VfioError:
                pass
        self.files.clear()

    def settle(self) -> None:
        """Close every data fd and bring each device back to RUNNING (reset if needed)."""
        self.close_files()
        for dev in self.devices:
            try:
                if self.state(dev) == S.RUNNING:
                    continue
                self.set(dev, S.RUNNING)
            except VfioError:
                try:
                    dev.reset()
                except VfioError as e:
                    raise Fail(f"setup: cannot bring {dev.path} back to RUNNING: {e}") from e
            self.close_files()
            st = self.state(dev)
            if st != S.RUNNING:
                raise Fail(f"setup: {dev.path} is in {state_name(st)} after SET RUNNING / reset")

    def enter(
        self, dev: VfioDevice, state: int, stream: Stream | None = None
    ) -> MigrationFile | None:
        """From RUNNING, SET ``state`` (for RESUMING also write ``stream``); check GET."""
        try:
            f = self.set(dev, state)
        except VfioError as e:
            raise Fail(f"cannot reach {state_name(state)} from RUNNING: {e}") from e
        got = self.state(dev)
        if got != state:
            raise Fail(f"SET {state_name(state)} succeeded but GET reports {state_name(got)}")
        if stream is not None and f is not None:
            for chunk in stream.chunks():
                f.write_all(chunk)
        return f

    def save(self, dev: VfioDevice, via_precopy: bool = False) -> Stream:
        """From RUNNING: the whole stream of a STOP_COPY save (STOP -> STOP_COPY), back to
        STOP; with ``via_precopy``, PRE_COPY data first, then STOP_COPY on the same fd."""
        out = self.stream()
        if via_precopy:
            f = self.enter(dev, S.PRE_COPY)
            if f is None:
                raise Fail("RUNNING -> PRE_COPY returned no data fd")
            for c in f.chunks(READ_CHUNK):
                out.add(c)
            if self.set(dev, S.STOP_COPY) is not None:
                raise Fail("data fd on the wrong arc: PRE_COPY -> STOP_COPY returned a new data fd")
        else:
            self.enter(dev, S.STOP)
            f = self.set(dev, S.STOP_COPY)
            if f is None:
                raise Fail("STOP -> STOP_COPY returned no data fd")
        read_to_eof(f, out.add)
        f.close()
        self.keep(self.set(dev, S.STOP))
        return out

    def stream(self) -> Stream:
        """A new, empty Stream closed with the run."""
        st = Stream()
        self.stack.callback(st.close)
        return st

    def saved_stream(self) -> Stream:
        """A STOP_COPY stream of device A (saved once), to feed RESUMING."""
        if self._stream is None:
            self.settle()
            self._stream = self.save(self.a)
            self.settle()
        return self._stream


def read_to_eof(f: MigrationFile, take: Callable[[bytes], None]) -> None:
    """Read a STOP_COPY stream to its permanent end; ENOMSG there is a uAPI violation."""
    while True:
        try:
            chunk = f.read(READ_CHUNK)
        except VfioError as e:
            if e.errno == ENOMSG:
                raise Fail("read returned ENOMSG in STOP_COPY (only PRE_COPY may)") from e
            raise
        if not chunk:
            return
        take(chunk)


def expect_errno(fn: Callable[[], Any], code: int, what: str) -> None:
    """``fn`` must fail with ``code``."""
    try:
        r = fn()
    except OSError as e:
        if e.errno != code:
            raise Fail(
                f"{what}: expected {errno_name(code)}, got {errno_name(e.errno or 0)}"
            ) from e
        return
    if isinstance(r, MigrationFile):
        r.close()
    raise Fail(f"{what}: expected {errno_name(code)}, but it succeeded")


def probe_errno(fn: Callable[[], Any]) -> int:
    """0 if ``fn`` succeeds, else its errno."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


# ------------------------------------------------------------------------------------------
# checks


Check = Callable[[Ctx], str]
CHECKS: list[tuple[str, str, Check]] = []


def check(name: str, doc: str) -> Callable[[Check], Check]:
    def deco(fn: Check) -> Check:
        CHECKS.append((name, doc, fn))
        return fn

    return deco


@check("migration-flags", "MIGRATION feature: STOP_COPY set, a defined combination")
def c_migration_flags(ctx: Ctx) -> str:
    try:
        flags = ctx.flags
    except Skip as e:
        raise Fail(str(e)) from e
    names = "|".join(flag_names(flags)) or "none"
    if not flags & MigrationFlags.STOP_COPY:
        raise Fail(
            f"flags {flags:#x} ({names}) lack STOP_COPY, which every migratable device needs"
        )
    if flags not in (1, 3, 5, 7):
        raise Fail(
            f"flags {flags:#x} ({names}) are not a combination the uAPI defines (1, 3, 5, 7)"
        )
    return f"flags {names} ({flags})"


@check("initial-state", "a freshly opened device is RUNNING")
def c_initial_state(ctx: Ctx) -> str:
    for path, st in ctx.initial_state.items():
        if st != S.RUNNING:
            shown = state_name(st) if isinstance(st, int) else st
            raise Fail(f"{path} was {shown} right after open; the uAPI starts devices in RUNNING")
    return "RUNNING after open"


@check(
    "fsm-paths",
    "every supported from -> to: final state, data fd exactly when the uAPI says, ended sessions ENODEV",
)
def c_fsm_paths(ctx: Ctx) -> str:
    flags = ctx.flags
    states = fsm.supported_states(flags)
    problems: list[str] = []
    pairs = 0
    for x in states:
        for y in states:
            p = fsm.path(flags, x, y)
            if p is None:
                continue  # blocked arcs have their own check
            pairs += 1
            ctx.settle()
            stream = ctx.saved_stream() if x == S.RESUMING and y != S.RESUMING else None
            old = ctx.enter(ctx.a, x, stream)
            problems += _one_transition(ctx, x, y, old)
            if len(problems) > 40:
                break
    if problems:
        first = problems[0]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise Fail(first + more, *problems[1:])
    return f"{pairs} transitions over {len(states)} states"


def _one_transition(ctx: Ctx, x: int, y: int, old: MigrationFile | None) -> list[str]:
    flags = ctx.flags
    arc = f"{state_name(x)} -> {state_name(y)}"
    try:
        new = ctx.set(ctx.a, y)
    except VfioError as e:
        return [f"SET {arc} failed: {e}"]
    out: list[str] = []
    got = ctx.state(ctx.a)
    if got != y:
        out.append(f"SET {arc} succeeded but GET reports {state_name(got)}")
    want = fsm.fd_expected(flags, x, y)
    path = " -> ".join(state_name(s) for s in fsm.path(flags, x, y) or [])
    if new is not None and want is None:
        out.append(
            f"data fd on the wrong arc: SET {arc} (path {path or 'no-op'}) returned data_fd "
            f"{new.fd}; the uAPI opens no fd there"
        )
    elif new is None and want is not None:
        out.append(f"SET {arc} returned no data fd; the uAPI opens a {want} fd on that arc")
    elif new is not None and want is not None:
        # A saving fd is O_RDONLY (write: EBADF), a resuming fd O_WRONLY (read: EBADF).
        # Zero-length calls: the direction is checked before any data moves.
        no_write = probe_errno(partial(new.write, b"")) == EBADF
        no_read = probe_errno(partial(new.read, 0)) == EBADF
        got_kind = "saving" if no_write and not no_read else "resuming" if no_read else "?"
        if got_kind != want:
            out.append(
                f"SET {arc} returned a data fd that is not {want} "
                f"(read {'EBADF' if no_read else 'allowed'}, write {'EBADF' if no_write else 'allowed'})"
            )
    if old is not None and x != y:
        kind = "saving" if old.saving else "resuming"
        survives = fsm.session_survives(flags, x, y, kind)
        if old.saving:
            code = probe_errno(lambda: old.read(1))
            if survives and code == ENODEV:
                out.append(f"SET {arc} ended the saving session (ENODEV), which must continue")
            elif not survives and code != ENODEV:
                out.append(
                    f"after SET {arc} the ended saving fd answers "
                    f"{errno_name(code) if code else 'data'} instead of ENODEV"
                )
        elif not survives:
            code = probe_errno(lambda: old.write(b"\0"))
            if code != ENODEV:
                out.append(
                    f"after SET {arc} the ended resuming fd answers "
                    f"{errno_name(code) if code else 'success'} instead of ENODEV"
                )
    return out


@check(
    "fsm-illegal-targets",
    "ERROR, unsupported and out-of-range targets: EINVAL, state unchanged; SET to the current state is a no-op",
)
def c_fsm_illegal(ctx: Ctx) -> str:
    flags = ctx.flags
    states = fsm.supported_states(flags)
    bad = [S.ERROR] + [s for s in S if s != S.ERROR and not fsm.supported(flags, s)]
    bad_values: list[int] = [int(s) for s in bad] + [8, 9, 0x7FFFFFFF]
    n = 0
    for x in states:
        ctx.settle()
        stream = ctx.saved_stream() if x == S.RESUMING else None
        ctx.enter(ctx.a, x, stream)
        for target in bad_values:
            what = f"SET {state_name(x)} -> {state_name(target)}"
            expect_errno(partial(ctx.set, ctx.a, target), EINVAL, what)
            got = ctx.state(ctx.a)
            if got != x:
                raise Fail(f"{what} failed but moved the device to {state_name(got)}")
            n += 1
        f = ctx.set(ctx.a, x)
        if f is not None:
            raise Fail(
                f"data fd on the wrong arc: SET {state_name(x)} -> itself returned a data fd"
            )
        if ctx.state(ctx.a) != x:
            raise Fail(f"SET {state_name(x)} -> itself changed the state")
    return f"{n} illegal targets rejected from {len(states)} states"


@check(
    "fsm-blocked-arcs", "STOP_COPY -> PRE_COPY(_P2P): EINVAL (Linux 7.2), state and session kept"
)
def c_fsm_blocked(ctx: Ctx) -> str:
    arcs = fsm.blocked_arcs(ctx.flags)
    if not arcs:
        raise Skip("no blocked arcs without PRE_COPY")
    if not ctx.target.blocked_arcs_safe:
        raise Skip(
            "kernel older than 7.2: without the stable fix these arcs hang the kernel; "
            "pass --blocked-arcs if yours has it"
        )
    for src, dst in arcs:
        ctx.settle()
        f = ctx.enter(ctx.a, src)
        try:
            r = ctx.set(ctx.a, dst)
        except MigrationStateError as e:
            if e.errno != EINVAL:
                raise Fail(
                    f"blocked arc {state_name(src)} -> {state_name(dst)} failed with "
                    f"{errno_name(e.errno or 0)}, expected EINVAL"
                ) from e
        else:
            now = state_name(ctx.state(ctx.a))
            raise Fail(
                f"no EINVAL on the blocked arc {state_name(src)} -> {state_name(dst)}: SET "
                f"succeeded{' with a data fd' if r is not None else ''} (device now {now})"
            )
        got = ctx.state(ctx.a)
        if got != src:
            raise Fail(f"rejected blocked arc moved the device to {state_name(got)}")
        if f is not None and probe_errno(partial(f.read, 1)) == ENODEV:
            raise Fail("the rejected blocked arc ended the saving session")
    return ", ".join(f"{state_name(a)} -> {state_name(b)}" for a, b in arcs) + ": EINVAL"


@check(
    "stream-files",
    "data fds are streams: no lseek (ESPIPE), saving fd not writable, resuming fd not readable",
)
def c_stream_files(ctx: Ctx) -> str:
    f = ctx.enter(ctx.a, S.STOP_COPY)
    if f is None:
        raise Fail("RUNNING -> STOP_COPY returned no data fd")
    expect_errno(lambda: ctx.t.lseek(f.fd, 0), ESPIPE, "lseek on the saving fd")
    expect_errno(lambda: f.write(b"x"), EBADF, "write on the saving fd")
    ctx.settle()
    stream = ctx.saved_stream()
    r = ctx.enter(ctx.a, S.RESUMING)
    if r is None:
        raise Fail("RUNNING -> RESUMING returned no data fd")
    expect_errno(lambda: ctx.t.lseek(r.fd, 0), ESPIPE, "lseek on the resuming fd")
    expect_errno(lambda: r.read(1), EBADF, "read on the resuming fd")
    expect_errno(lambda: r.precopy_info(), ENOTTY, "VFIO_MIG_GET_PRECOPY_INFO on the resuming fd")
    del stream
    return "ESPIPE / EBADF / ENOTTY as a stream file should"


@check(
    "end-of-stream",
    "temporary end in PRE_COPY (ENOMSG or 0) vs permanent EOF in STOP_COPY (0, never ENOMSG)",
)
def c_end_of_stream(ctx: Ctx) -> str:
    notes: list[str] = []
    if ctx.flags & MigrationFlags.PRE_COPY:
        f = ctx.enter(ctx.a, S.PRE_COPY)
        if f is None:
            raise Fail("RUNNING -> PRE_COPY returned no data fd")
        while True:
            try:
                chunk = f.read(READ_CHUNK)
            except VfioError as e:
                if e.errno == ENOMSG:
                    notes.append("PRE_COPY temporary end: ENOMSG")
                    break
                raise Fail(f"read in PRE_COPY failed: {e}") from e
            if not chunk:
                notes.append("PRE_COPY temporary end: read returns 0 (the uAPI asks for ENOMSG)")
                break
        if ctx.set(ctx.a, S.STOP_COPY) is not None:
            raise Fail("data fd on the wrong arc: PRE_COPY -> STOP_COPY returned a new data fd")
    else:
        ctx.enter(ctx.a, S.STOP)
        f = ctx.set(ctx.a, S.STOP_COPY)
        if f is None:
            raise Fail("STOP -> STOP_COPY returned no data fd")
    total = 0

    def take(c: bytes) -> None:
        nonlocal total
        total += len(c)

    read_to_eof(f, take)
    for _ in range(2):
        try:
            again = f.read(READ_CHUNK)
        except VfioError as e:
            raise Fail(
                f"read after EOF in STOP_COPY failed with {errno_name(e.errno or 0)}; expected 0"
            ) from e
        if again:
            raise Fail(f"read after EOF in STOP_COPY returned {len(again)} more bytes")
    notes.append(f"STOP_COPY: {total} bytes then EOF")
    return "; ".join(notes)


@check(
    "precopy-info-states",
    "PRECOPY_INFO only in PRE_COPY / PRE_COPY_P2P (else EINVAL); argsz < 24 is EINVAL",
)
def c_precopy_states(ctx: Ctx) -> str:
    ctx.need(MigrationFlags.PRE_COPY, "PRECOPY_INFO")
    f = ctx.enter(ctx.a, S.PRE_COPY)
    if f is None:
        raise Fail("RUNNING -> PRE_COPY returned no data fd")
    try:
        f.precopy_info()
    except VfioError as e:
        raise Fail(f"PRECOPY_INFO in PRE_COPY failed: {e}") from e
    short = v.vfio_precopy_info(argsz=16)
    expect_errno(
        lambda: ctx.t.ioctl(f.fd, v.VFIO_MIG_GET_PRECOPY_INFO, short),
        EINVAL,
        "PRECOPY_INFO with argsz 16",
    )
    seen = ["PRE_COPY"]
    if ctx.flags & MigrationFlags.P2P:
        ctx.set(ctx.a, S.PRE_COPY_P2P)
        try:
            f.precopy_info()
        except VfioError as e:
            raise Fail(f"PRECOPY_INFO in PRE_COPY_P2P failed: {e}") from e
        seen.append("PRE_COPY_P2P")
    ctx.set(ctx.a, S.STOP_COPY)
    expect_errno(f.precopy_info, EINVAL, "PRECOPY_INFO in STOP_COPY (same session)")
    ctx.settle()
    ctx.enter(ctx.a, S.STOP)
    g = ctx.set(ctx.a, S.STOP_COPY)
    if g is not None:
        expect_errno(g.precopy_info, EINVAL, "PRECOPY_INFO on a STOP -> STOP_COPY fd")
    return f"answers in {', '.join(seen)}; EINVAL in STOP_COPY and for argsz 16"


@check(
    "precopy-info-initial-bytes",
    "initial_bytes never grows while PRE_COPY data is read, and is all readable",
)
def c_precopy_initial(ctx: Ctx) -> str:
    ctx.need(MigrationFlags.PRE_COPY, "PRECOPY_INFO")
    f = ctx.enter(ctx.a, S.PRE_COPY)
    if f is None:
        raise Fail("RUNNING -> PRE_COPY returned no data fd")
    first = f.precopy_info()
    last = first.initial_bytes
    step = max(1, min(READ_CHUNK, first.initial_bytes // 16 or 4096))
    read = 0
    reads = 0
    while True:
        chunk = f.read_chunk(step)
        if not chunk:
            break
        read += len(chunk)
        reads += 1
        info = f.precopy_info()
        if info.initial_bytes > last and not info.reinit:
            raise Fail(
                f"initial_bytes grew from {last} to {info.initial_bytes} after reading "
                f"{read} bytes (without REINIT)"
            )
        last = info.initial_bytes
        if reads > 100000:
            raise Fail("PRE_COPY never reached a temporary end of stream")
    if read < first.initial_bytes:
        raise Fail(
            f"PRECOPY_INFO announced {first.initial_bytes} initial bytes but only {read} "
            "could be read before the temporary end of stream"
        )
    if last != 0:
        raise Fail(f"initial_bytes is still {last} after all available data was read")
    note = "" if first.initial_bytes else " (initial_bytes started at 0)"
    return f"{first.initial_bytes} initial bytes, non-increasing over {reads} reads{note}"


@check(
    "precopy-info-v2",
    "MIG_PRECOPY_INFOv2: v1 echoes flags; after opt-in flags are the kernel's (REINIT only)",
)
def c_precopy_v2(ctx: Ctx) -> str:
    if not ctx.flags & MigrationFlags.PRE_COPY:
        expect_errno(
            ctx.a.enable_precopy_info_v2,
            EINVAL,
            "MIG_PRECOPY_INFOv2 SET on a device without PRE_COPY",
        )
        return "EINVAL without PRE_COPY"
    junk = 0xA5A50000
    f = ctx.enter(ctx.a, S.PRE_COPY)
    if f is None:
        raise Fail("RUNNING -> PRE_COPY returned no data fd")
    v1 = f.precopy_info(flags=junk)
    note = (
        "v1 echoes the caller's flags" if v1.flags == junk else f"v1 returned flags {v1.flags:#x}"
    )
    code = probe_errno(ctx.a.enable_precopy_info_v2)
    if code in (ENOTTY,):
        raise Skip(f"the kernel lacks MIG_PRECOPY_INFOv2 ({errno_name(code)}); {note}")
    if code:
        raise Fail(f"MIG_PRECOPY_INFOv2 SET failed with {errno_name(code)} on a PRE_COPY device")
    v2 = f.precopy_info(flags=junk)
    if v2.flags & ~v.VFIO_PRECOPY_INFO_REINIT:
        raise Fail(
            f"after the v2 opt-in PRECOPY_INFO flags are {v2.flags:#x}; only REINIT may be set"
        )
    return f"{note}; v2 flags {v2.flags:#x}"


@check("mig-data-size", "MIG_DATA_SIZE against the bytes STOP_COPY actually produces")
def c_mig_data_size(ctx: Ctx) -> str:
    ctx.enter(ctx.a, S.STOP)
    try:
        reported = ctx.a.mig_data_size()
    except VfioError as e:
        raise Fail(f"MIG_DATA_SIZE failed: {e}") from e
    ctx.settle()
    actual = ctx.save(ctx.a).length
    if actual > reported:
        raise Fail(
            f"wrong MIG_DATA_SIZE: it reports {reported} bytes but STOP_COPY produced {actual} "
            f"({actual - reported} more than announced)"
        )
    if reported > 2 * actual + 65536:
        raise Fail(
            f"wrong MIG_DATA_SIZE: it reports {reported} bytes but STOP_COPY produced only {actual}"
        )
    exact = "exact" if reported == actual else f"estimate {reported}"
    return f"{actual} bytes ({exact})"


@check(
    "save-resume-roundtrip",
    "save -> resume on the second device -> save again gives the same bytes",
)
def c_roundtrip(ctx: Ctx) -> str:
    b = ctx.need_b()
    s1 = ctx.save(ctx.a)
    ctx.settle()
    r = ctx.enter(b, S.RESUMING)
    if r is None:
        raise Fail("RUNNING -> RESUMING returned no data fd")
    try:
        for chunk in s1.chunks():
            r.write_all(chunk)
    except VfioError as e:
        raise Fail(f"the second device refused the first one's stream: {e}") from e
    try:
        ctx.set(b, S.STOP)
    except VfioError as e:
        raise Fail(f"RESUMING -> STOP after a complete stream failed: {e}") from e
    ctx.settle()
    s2 = ctx.save(b)
    if s1 != s2:
        where = f"; first difference at byte {first_difference(s1, s2)}"
        raise Fail(
            f"lossy resume: the resumed device saves different bytes ({s1.length} bytes "
            f"saved, {s2.length} after resume{where})"
        )
    return f"{s1.length} bytes, identical after resume (sha256 {s1.digest[:12]})"


@check(
    "resume-rejects-bad-streams",
    "truncated / corrupted / mismatched resume streams are refused (write error or EINVAL on RESUMING -> STOP)",
)
def c_bad_streams(ctx: Ctx) -> str:
    dev = ctx.b or ctx.a
    good = ctx.saved_stream()
    cases: list[tuple[str, Callable[[], Iterator[bytes]]]] = [
        ("truncated", partial(truncated, good)),
        ("corrupted", partial(corrupted, good)),
    ]
    skipped: list[str] = []
    other = ctx.target.model.mismatched_device() if ctx.target.model else None
    if other is not None:
        with VfioDevice(ctx.t, other) as odev:
            odev.bind(ctx.ictx)
            mism = ctx.save(odev)
            try:
                odev.set_state(S.RUNNING)
            except VfioError:
                pass
            ctx.close_files()
        cases.append(("mismatched", mism.chunks))
    else:
        skipped.append("mismatched (needs a differently configured device of the same kind)")
    verdicts: list[str] = []
    for name, stream in cases:
        ctx.settle()
        before = ctx.loaded.get(dev.path, 0)
        r = ctx.enter(dev, S.RESUMING)
        if r is None:
            raise Fail("RUNNING -> RESUMING returned no data fd")
        write_err = 0
        size = 0
        try:
            for chunk in stream():
                size += len(chunk)
                r.write_all(chunk)
        except VfioError as e:
            write_err = e.errno or -1
        code = probe_errno(lambda: ctx.set(dev, S.STOP))
        if code == 0 and write_err == 0:
            hint = (
                f"; the device had loaded {before} stream(s) since it was opened" if before else ""
            )
            raise Fail(
                f"accepted a {name} resume stream ({size} bytes): RESUMING -> STOP succeeded{hint}"
            )
        if code == 0:
            verdicts.append(f"{name}: write {errno_name(write_err)}")
            continue
        got = ctx.state(dev)
        if got not in (S.RESUMING, S.ERROR):
            raise Fail(f"after refusing a {name} stream the device is in {state_name(got)}")
        how = f"write {errno_name(write_err)}, " if write_err else ""
        verdicts.append(f"{name}: {how}STOP {errno_name(code)}")
    tail = f"; skipped {', '.join(skipped)}" if skipped else ""
    return "; ".join(verdicts) + tail


@check(
    "reset-recovery", "VFIO_DEVICE_RESET from saving / resuming states: RUNNING, data fds ENODEV"
)
def c_reset(ctx: Ctx) -> str:
    advertised = ctx.a.info().can_reset
    done = []
    for st in (S.STOP_COPY, S.RESUMING):
        ctx.settle()
        f = ctx.enter(ctx.a, st)
        code = probe_errno(ctx.a.reset)
        if code:
            if advertised:
                raise Fail(f"VFIO_DEVICE_RESET in {state_name(st)} failed with {errno_name(code)}")
            raise Skip(
                f"no VFIO_DEVICE_FLAGS_RESET and VFIO_DEVICE_RESET answers {errno_name(code)}"
            )
        got = ctx.state(ctx.a)
        if got != S.RUNNING:
            raise Fail(
                f"after reset in {state_name(st)} the device is {state_name(got)}, not RUNNING"
            )
        if f is not None:
            op = partial(f.read, 1) if f.saving else partial(f.write, b"\0")
            code = probe_errno(op)
            if code != ENODEV:
                shown = errno_name(code) if code else "success"
                raise Fail(f"after reset the {state_name(st)} data fd answers {shown}, not ENODEV")
        done.append(state_name(st))
    note = "" if advertised else " (VFIO_DEVICE_FLAGS_RESET not advertised, the ioctl works)"
    return f"reset from {', '.join(done)}: RUNNING, fds ENODEV{note}"


@check(
    "error-recovery",
    "a device in ERROR refuses every SET but a no-op, and reset brings it back to RUNNING",
)
def c_error(ctx: Ctx) -> str:
    path = ctx.target.model.error_device() if ctx.target.model else None
    if path is None:
        raise Skip("needs fault injection to reach ERROR (the model's reference device)")
    with VfioDevice(ctx.t, path) as dev:
        dev.bind(ctx.ictx)
        dev.set_state(S.STOP)
        try:
            f = dev.set_state(S.STOP_COPY)
        except MigrationStateError as e:
            code = e.errno
        else:
            if f is not None:
                f.close()
            raise Skip("the injected fault did not fire")
        if int(dev.get_state()) != S.ERROR:
            raise Skip(f"the injected fault left the device in {state_name(int(dev.get_state()))}")
        for target in (S.RUNNING, S.STOP):
            expect_errno(
                partial(dev.set_state, target), EINVAL, f"SET ERROR -> {state_name(target)}"
            )
            if int(dev.get_state()) != S.ERROR:
                raise Fail("a refused SET moved the device out of ERROR")
        dev.reset()
        got = int(dev.get_state())
        if got != S.RUNNING:
            raise Fail(f"after reset in ERROR the device is {state_name(got)}, not RUNNING")
        dev.set_state(S.STOP)
        dev.set_state(S.RUNNING)
    return f"arc failed with {errno_name(code or 0)} into ERROR; SETs EINVAL; reset -> RUNNING"


@check(
    "dma-logging-validation",
    "DMA_LOGGING_START / REPORT argument validation (EINVAL, E2BIG, EOVERFLOW)",
)
def c_log_validation(ctx: Ctx) -> str:
    code = ctx.a.probe_feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET)
    if code == ENOTTY:
        for fn, what in (
            (lambda: ctx.a.dma_logging_start([(0, 4096)]), "DMA_LOGGING_START"),
            (lambda: ctx.a.dma_logging_report(0, 4096), "DMA_LOGGING_REPORT"),
        ):
            expect_errno(fn, ENOTTY, f"{what} on a device without DMA logging")
        return "no DMA logging: START / REPORT ENOTTY"
    if code:
        raise Fail(f"DMA_LOGGING_START PROBE failed with {errno_name(code)}")
    pg = 4096
    limit = ctx.target.host_page_size // 16
    a = ctx.a
    cases: list[tuple[str, Callable[[], Any], int]] = [
        ("START with no ranges", lambda: a.dma_logging_start([], pg), EINVAL),
        (
            f"START with {limit + 1} ranges",
            lambda: a.dma_logging_start([(i * 2 * pg, pg) for i in range(limit + 1)], pg),
            E2BIG,
        ),
        ("START with an unaligned iova", lambda: a.dma_logging_start([(pg // 2, pg)], pg), EINVAL),
        (
            "START with an unaligned length",
            lambda: a.dma_logging_start([(0, pg + 512)], pg),
            EINVAL,
        ),
        (
            "START with overlapping ranges",
            lambda: a.dma_logging_start([(0, 4 * pg), (2 * pg, 4 * pg)], pg),
            EINVAL,
        ),
        (
            "START with iova + length past 2^64",
            lambda: a.dma_logging_start([((1 << 64) - pg, 2 * pg)], pg),
            EOVERFLOW,
        ),
        ("REPORT with page_size 2048", lambda: a.dma_logging_report(0, 1 << 20, 2048), EINVAL),
        ("REPORT with page_size 12288", lambda: a.dma_logging_report(0, 3 << 20, 12288), EINVAL),
        (
            "REPORT with iova + length past 2^64",
            lambda: a.dma_logging_report((1 << 64) - pg, 2 * pg, pg),
            EOVERFLOW,
        ),
    ]
    for what, fn, want in cases:
        expect_errno(fn, want, what)
    try:
        a.dma_logging_stop()
    except VfioError:
        pass
    return f"{len(cases)} bad arguments rejected"


@check(
    "dma-logging-report",
    "the device's dirty log reports exactly the pages the suite made it write, then clears",
)
def c_log_report(ctx: Ctx) -> str:
    hooks = ctx.target.model
    if hooks is None:
        raise Skip("needs a way to make the device DMA (only the model has one)")
    if ctx.a.probe_feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET):
        raise Skip("the device has no DMA logging")
    if ctx.attach_error:
        raise Skip(f"the device is not attached to an IOAS ({ctx.attach_error})")
    length = DMA_PAGES * 4096
    with ctx.t.mmap(length) as buf:
        ctx.ioas.map(buf, iova=DMA_BASE)
        try:
            return _log_report(ctx, hooks, length)
        finally:
            try:
                ctx.a.dma_logging_stop()
            except VfioError:
                pass
            ctx.ioas.unmap(DMA_BASE, length)


def _log_report(ctx: Ctx, hooks: ModelHooks, length: int) -> str:
    page = ctx.a.dma_logging_start([(DMA_BASE, length)], 4096)
    if page <= 0 or page & (page - 1):
        raise Fail(f"DMA_LOGGING_START negotiated page size {page}, not a power of two")
    if page > length // 4:
        raise Skip(f"the device logs at {page:#x} bytes, too coarse for a {length:#x}-byte test")
    offsets = [0, 4096, 5 * 4096, 17 * 4096 + 100, 31 * 4096, 32 * 4096, 33 * 4096, 63 * 4096 + 8]
    offsets = [o for o in offsets if o + 8 <= length]
    for i, off in enumerate(offsets):
        try:
            hooks.dma_write(ctx.a.path, DMA_BASE + off, bytes([i + 1]) * 8)
        except Exception as e:  # the model's own fault type: the device cannot DMA here
            raise Skip(f"the device cannot DMA: {e}") from e
    want = sorted({off // page for off in offsets})
    rep = ctx.a.dma_logging_report(DMA_BASE, length, page)
    got = rep.pages().tolist()
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    if missing:
        shown = ", ".join(f"{DMA_BASE + p * page:#x}" for p in missing[:4])
        raise Fail(
            f"dirty log misses writes: {len(missing)} of {len(want)} pages the device wrote "
            f"are not reported (iova {shown})"
        )
    again = ctx.a.dma_logging_report(DMA_BASE, length, page)
    if again:
        raise Fail(f"the report did not clear the log: a second report shows {again.count()} pages")
    # bits are relative to the report's own iova
    hooks.dma_write(ctx.a.path, DMA_BASE + 40 * 4096, b"\xee" * 8)
    sub = ctx.a.dma_logging_report(DMA_BASE + 32 * 4096, 16 * 4096, page)
    if sub.pages().tolist() != [(8 * 4096) // page]:
        raise Fail(
            f"a report from iova {DMA_BASE + 32 * 4096:#x} set bits {sub.pages().tolist()}; "
            f"expected [{(8 * 4096) // page}] (bits count from the report's iova)"
        )
    note = f"; {len(extra)} extra pages reported" if extra else ""
    return f"{len(want)} written pages reported at {page:#x}, then clear{note}"


@check(
    "p2p-quiescence",
    "two devices: all reach RUNNING_P2P before any STOP; resume side all RUNNING_P2P before RUNNING",
)
def c_p2p(ctx: Ctx) -> str:
    ctx.need(MigrationFlags.P2P, "P2P quiescence")
    b = ctx.need_b()
    devs = [ctx.a, b]

    def all_to(state: int) -> list[MigrationFile | None]:
        out = []
        for d in devs:
            try:
                out.append(ctx.set(d, state))
            except VfioError as e:
                raise Fail(f"{d.path}: SET {state_name(state)} failed: {e}") from e
        for d in devs:
            got = ctx.state(d)
            if got != state:
                raise Fail(f"{d.path}: SET {state_name(state)} but GET says {state_name(got)}")
        return out

    for f in all_to(S.RUNNING_P2P):
        if f is not None:
            raise Fail("data fd on the wrong arc: RUNNING -> RUNNING_P2P returned a data fd")
    all_to(S.STOP)
    files = all_to(S.STOP_COPY)
    streams: list[Stream] = []
    for f in files:
        if f is None:
            raise Fail("STOP -> STOP_COPY returned no data fd")
        st = ctx.stream()
        read_to_eof(f, st.add)
        streams.append(st)
    all_to(S.STOP)
    ctx.close_files()
    for f, data in zip(all_to(S.RESUMING), streams, strict=True):
        if f is None:
            raise Fail("STOP -> RESUMING returned no data fd")
        for chunk in data.chunks():
            f.write_all(chunk)
    all_to(S.STOP)
    for f in all_to(S.RUNNING_P2P):
        if f is not None:
            raise Fail("data fd on the wrong arc: STOP -> RUNNING_P2P returned a data fd")
    all_to(S.RUNNING)
    return "RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY and RESUMING -> STOP -> RUNNING_P2P -> RUNNING, both devices in step"


CHECK_NAMES = [name for name, _, _ in CHECKS]


# ------------------------------------------------------------------------------------------
# running


def run_suite(target: Target, only: list[str] | None = None) -> list[CheckResult]:
    """Run the checks (all, or those named) against the target; one result each (plus a
    "teardown" failure if closing the devices, IOAS or iommufd fails)."""
    selected = [c for c in CHECKS if only is None or c[0] in only]
    results: list[CheckResult] = []
    try:
        with ExitStack() as stack:
            try:
                ctx = Ctx(target, stack)
            except VfioError as e:
                return [CheckResult(n, FAIL, f"setup failed: {e}") for n, _, _ in selected]
            except Exception as e:  # a kernel that raises something other than OSError
                why = f"setup failed: internal error: {type(e).__name__}: {e}"
                tb = traceback.format_exc().splitlines()
                return [CheckResult(n, FAIL, why, tb) for n, _, _ in selected]
            for name, _doc, fn in selected:
                results.append(_run_one(ctx, name, fn))
            try:
                ctx.settle()
            except (Fail, VfioError):
                pass
    except Exception as e:
        results.append(CheckResult("teardown", FAIL, f"closing the test objects failed: {e}"))
    return results


def _run_one(ctx: Ctx, name: str, fn: Check) -> CheckResult:
    t0 = time.perf_counter()
    try:
        ctx.settle()
        reason = fn(ctx)
        res = CheckResult(name, PASS, reason)
    except Fail as e:
        res = CheckResult(
            name, FAIL, str(e.args[0]) if e.args else "failed", [str(a) for a in e.args[1:]]
        )
    except Skip as e:
        res = CheckResult(name, SKIP, str(e))
    except VfioError as e:
        res = CheckResult(name, FAIL, f"unexpected error: {e}")
    except Exception as e:  # a bug in the suite or the kernel: report, keep going
        res = CheckResult(
            name,
            FAIL,
            f"internal error: {type(e).__name__}: {e}",
            traceback.format_exc().splitlines(),
        )
    res.seconds = time.perf_counter() - t0
    return res


def summary(results: list[CheckResult]) -> dict[str, int]:
    out = {PASS: 0, FAIL: 0, SKIP: 0}
    for r in results:
        out[r.status] += 1
    return out


def render(results: list[CheckResult], label: str) -> str:
    lines = [f"conformance: {label}"]
    width = max((len(r.name) for r in results), default=10)
    for r in results:
        lines.append(f"{r.status.upper():4}  {r.name:<{width}}  {r.reason}")
        for d in r.details[:10]:
            lines.append(f"{'':4}  {'':<{width}}    {d}")
    s = summary(results)
    lines.append(f"{len(results)} checks: {s[PASS]} pass, {s[FAIL]} fail, {s[SKIP]} skip")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--device", metavar="PATH", help="a VFIO cdev of this host (/dev/vfio/devices/vfioN)"
    )
    where.add_argument(
        "--model",
        metavar="KIND[:k=v,...]",
        type=model_spec_arg,
        help="a device of the model kernel: mtty, hisi_acc or reference (two are created)",
    )
    parser.add_argument(
        "--device2", metavar="PATH", help="a second device of the same kind (resume checks)"
    )
    parser.add_argument(
        "--iommufd", metavar="PATH", default=IOMMUFD_PATH, help="iommufd node (default %(default)s)"
    )
    parser.add_argument("--yes", action="store_true", help="allow changing a real device's state")
    parser.add_argument(
        "--blocked-arcs",
        action="store_true",
        help="try STOP_COPY -> PRE_COPY on a real kernel older than 7.2 (hangs one without the fix)",
    )
    parser.add_argument(
        "--iommu", choices=IOMMU_CHOICES, default="smmuv3", help="the model's IOMMU"
    )
    parser.add_argument(
        "--migration-flags", type=int, choices=(1, 3, 5, 7), help="model option migration_flags"
    )
    parser.add_argument("--dma-logging", type=int, choices=(0, 1), help="model option dma_logging")
    parser.add_argument("--state-size", type=int, metavar="BYTES", help="model option state_size")
    parser.add_argument(
        "--defect",
        action="append",
        default=[],
        metavar="NAME",
        help="inject a defect into the reference device; repeatable",
    )
    parser.add_argument(
        "--check", action="append", metavar="NAME", help="run only this check; repeatable"
    )
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def target_from_args(args: argparse.Namespace) -> Target:
    if args.device:
        return Target(
            LinuxTransport(),
            args.device,
            args.device2,
            iommufd_path=args.iommufd,
            label=args.device + (f" + {args.device2}" if args.device2 else ""),
            blocked_arcs_safe=args.blocked_arcs
            or kernel_release_at_least(platform.release(), 7, 2),
        )
    spec: ModelSpec = args.model
    opts = dict(spec.options)
    if args.migration_flags is not None:
        opts["migration_flags"] = args.migration_flags
    if args.dma_logging is not None:
        opts["dma_logging"] = bool(args.dma_logging)
    if args.state_size is not None:
        opts["state_size"] = args.state_size
    if args.defect:
        opts["defects"] = frozenset(opts.get("defects", frozenset())) | frozenset(args.defect)
    spec = ModelSpec(spec.kind, opts)
    k, (a, b) = build_model([spec, spec], args.iommu)
    return Target(
        ModelTransport(k),
        a,
        b,
        label=f"model {spec.label()} ({args.iommu})",
        model=ModelHooks(k, spec),
        host_page_size=4096,
    )


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, doc, _ in CHECKS:
            print(f"{name:<28} {doc}")
        return 0
    if not args.device and not args.model:
        print(
            "vfiomig conformance: give --device PATH (a real device) or --model KIND",
            file=sys.stderr,
        )
        return 2
    if args.device and not args.yes:
        print(
            f"vfiomig conformance: this changes the migration state of {args.device} and resets it;"
            " no VM may use it. Run again with --yes to proceed.",
            file=sys.stderr,
        )
        return 2
    unknown = [c for c in args.check or [] if c not in CHECK_NAMES]
    if unknown:
        print(
            f"vfiomig conformance: unknown check(s) {', '.join(unknown)} (see --list)",
            file=sys.stderr,
        )
        return 2
    try:
        target = target_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"vfiomig conformance: {e}", file=sys.stderr)
        return 2
    except VfioError as e:
        print(f"vfiomig conformance: {e}", file=sys.stderr)
        return 1
    results = run_suite(target, args.check)
    if args.json:
        print(
            json.dumps(
                {
                    "target": target.label,
                    "results": [r.as_dict() for r in results],
                    "summary": summary(results),
                },
                indent=2,
            )
        )
    else:
        print(render(results, target.label))
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="vfiomig conformance")
    add_arguments(p)
    sys.exit(run(p.parse_args()))


__all__ = ["CHECKS", "CHECK_NAMES", "CheckResult", "ModelHooks", "Target", "run_suite"]
