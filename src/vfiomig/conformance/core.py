"""What every check shares: verdicts (Fail / Skip / CheckResult), the registry of failure
paths, the target, the model's hooks, and the run context `Ctx` with its state helpers."""

from __future__ import annotations

import mmap
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from errno import ENOMSG, ENOTTY
from typing import Any

from vfiomig.conformance.stream import READ_CHUNK, Stream
from vfiomig.host import (
    Iommufd,
    MigrationFile,
    MigrationFlags,
    MigrationState,
    Transport,
    VfioDevice,
    VfioError,
)
from vfiomig.host.device import state_name
from vfiomig.host.errors import errno_name
from vfiomig.host.iommufd import Ioas
from vfiomig.host.transport import IOMMUFD_PATH

S = MigrationState
PASS, FAIL, SKIP, FINDING = "pass", "fail", "skip", "finding"


# ------------------------------------------------------------------------------------------
# failure paths

# Every place where the suite records a failure, by id ("group/name"), with what it means.
# Checks register theirs at import (``X = failure(...)``) and name one in each Fail; a test
# makes every registered path fire (tests/test_conformance_paths.py), so a path added
# without a test that fires it fails there.
FAILURES: dict[str, str] = {}
# Paths that are findings, not failures: the device does what its Linux driver does, and
# what it does deserves a user's attention without making the device non-conforming (e.g.
# hisi_acc's compatibility check latched once per open, which the kernel resets only at
# open). A result whose paths are all findings has status FINDING; it does not fail a run.
FINDINGS: set[str] = set()


def failure(fid: str, what: str, *, finding: bool = False) -> str:
    """Register a failure path: its id and what it means (``finding``: it reports a
    finding rather than a failure). Returns the id."""
    if fid in FAILURES:
        raise ValueError(f"failure path {fid!r} registered twice")
    FAILURES[fid] = what
    if finding:
        FINDINGS.add(fid)
    return fid


def verdict(paths: Sequence[str]) -> str:
    """FINDING when every path that fired is a finding, else FAIL."""
    return FINDING if paths and all(p in FINDINGS for p in paths) else FAIL


class Fail(Exception):
    """The device departs from the uAPI; the message says how, ``at`` names the failure path
    (a registered id) and ``also`` those of further problems listed in the details."""

    def __init__(self, reason: str, *details: str, at: str, also: Sequence[str] = ()) -> None:
        unknown = [p for p in (at, *also) if p not in FAILURES]
        if unknown:
            raise ValueError(f"unregistered failure path(s) {unknown}")
        super().__init__(reason, *details)
        self.paths = list(dict.fromkeys((at, *also)))


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class CheckResult:
    name: str
    status: str
    reason: str
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # An internal error's traceback: in --json output (for a bug report), not in the table.
    traceback: list[str] = field(default_factory=list)
    # The failure paths that fired (FAILURES ids), the one the reason describes first.
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "check": self.name,
            "status": self.status,
            "reason": self.reason,
            "details": self.details,
            "seconds": round(self.seconds, 4),
        }
        if self.failures:
            out["failures"] = self.failures
        if self.traceback:
            out["traceback"] = self.traceback
        return out


INTERNAL_ERROR = failure(
    "runner/internal-error",
    "a check raised something other than a verdict or a kernel error (a bug in the suite or "
    "in the kernel); the reason says where",
)
SETUP_INTERNAL = failure(
    "runner/setup-internal", "opening the devices raised something other than OSError"
)


def internal_error(
    name: str, e: Exception, what: str = "internal error", at: str = INTERNAL_ERROR
) -> CheckResult:
    """A failure for an exception that is neither the kernel's answer nor a verdict: a bug in
    the suite or the kernel. The reason says where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return CheckResult(
        name,
        FAIL,
        f"{what}: {type(e).__name__}: {e}{where}",
        traceback="".join(traceback.format_exception(e)).splitlines(),
        failures=[at],
    )


# ------------------------------------------------------------------------------------------
# targets


class ModelHooks:
    """What only the model can do for the suite: make the device DMA, inject faults.

    This is the suite's one look below the uAPI (ModelKernel.device / add_device); on a real
    host there is none and the checks that need it skip.
    """

    def __init__(self, kernel: Any, kind: str, options: dict[str, Any]) -> None:
        self.kernel = kernel
        self.kind = kind
        self.options = dict(options)

    def dma_write(self, path: str, iova: int, data: bytes) -> None:
        self.kernel.device(path).dma_write(iova, data)

    def error_device(self) -> str | None:
        """A device of the same kind whose STOP -> STOP_COPY arc drops it into ERROR."""
        if self.kind != "reference":
            return None
        opts = dict(self.options, fail_arc=("STOP", "STOP_COPY", "error"))
        return str(self.kernel.add_device(self.kind, **opts))

    def mismatched_device(self) -> str | None:
        """A device of the same kind whose saved state the suite's devices must refuse."""
        o = self.options
        change: dict[str, Any]
        if self.kind == "reference":  # another state size: the DEV record differs
            size = int(o.get("state_size", 256 * 1024))
            change = {"state_size": size + int(o.get("chunk_size", 64 * 1024))}
        elif self.kind == "mtty":  # another port count in the header
            change = {"nr_ports": 1 if int(o.get("nr_ports", 2)) == 2 else 2}
        elif self.kind == "hisi_acc":  # another VF queue count in the match data
            change = {"qp_num": int(o.get("qp_num", 2)) + 1}
        else:
            return None
        return str(self.kernel.add_device(self.kind, **dict(o, **change)))


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


# ------------------------------------------------------------------------------------------
# the run context


# The failure paths of the helpers (Ctx, below).
FLAGS_ERROR = failure(
    "core/flags-error", "the MIGRATION feature GET fails with an errno other than ENOTTY"
)
SETTLE_STUCK = failure(
    "core/settle-stuck",
    "a device cannot be brought back to RUNNING: SET RUNNING and VFIO_DEVICE_RESET fail",
)
SETTLE_NOT_RUNNING = failure(
    "core/settle-not-running", "after SET RUNNING (or a reset) GET reports another state"
)
ENTER_REFUSED = failure(
    "core/enter-refused", "SET from RUNNING to a supported state (one the check needs) fails"
)
ENTER_GET = failure(
    "core/enter-get-differs", "SET from RUNNING succeeded but GET reports another state"
)
SESSION_NEW_FD = failure(
    "core/session-new-fd",
    "an arc inside an open saving session (PRE_COPY -> PRE_COPY_P2P, -> STOP_COPY) "
    "returned a new data fd",
)


class Ctx:
    """The devices one check runs on, opened for it, and helpers shared by the checks.

    The runner builds a new Ctx for every check (iommufd, IOAS and devices opened anew, as a
    user would, and all closed after it), so no check sees what an earlier one left behind:
    a driver's per-open state (hisi_acc's latched match check, the PRECOPY_INFOv2 opt-in)
    starts fresh for each."""

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
        # per device: the state last set or seen
        self.last: dict[str, int] = {}
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
                raise Fail(
                    f"the device does not report migration flags ({e})", at=FLAGS_ERROR
                ) from e
        return self._flags

    def need(self, flag: MigrationFlags, what: str) -> None:
        if not self.flags & flag:
            raise Skip(f"the device does not advertise {flag.name} ({what})")

    def reopen(self, dev: VfioDevice) -> VfioDevice:
        """Settle the devices, close ``dev`` and open it again, bound and attached as before:
        what a destination VMM resumes into is a freshly opened device."""
        self.settle()
        dev.close()
        self.last.pop(dev.path, None)
        new = self.open_device(dev.path)
        if dev is self.a:
            self.a = new
        elif dev is self.b:
            self.b = new
        return new

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
        f = self.keep(dev.set_state(state))
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

    def migratable(self) -> bool:
        try:
            return bool(self.flags)
        except (Fail, Skip):
            return False

    def settle(self) -> None:
        """Close every data fd and bring each device back to RUNNING (reset if needed);
        a device without migration has no state to settle."""
        self.close_files()
        if not self.migratable():
            return
        for dev in self.devices:
            try:
                if self.state(dev) == S.RUNNING:
                    continue
                self.set(dev, S.RUNNING)
            except VfioError:
                try:
                    dev.reset()
                except VfioError as e:
                    raise Fail(
                        f"setup: cannot bring {dev.path} back to RUNNING: {e}",
                        at=SETTLE_STUCK,
                    ) from e
            self.close_files()
            st = self.state(dev)
            if st != S.RUNNING:
                raise Fail(
                    f"setup: {dev.path} is in {state_name(st)} after SET RUNNING / reset",
                    at=SETTLE_NOT_RUNNING,
                )

    def enter(
        self, dev: VfioDevice, state: int, stream: Stream | None = None
    ) -> MigrationFile | None:
        """From RUNNING, SET ``state`` (for RESUMING also write ``stream``); check GET."""
        try:
            f = self.set(dev, state)
        except VfioError as e:
            raise Fail(
                f"cannot reach {state_name(state)} from RUNNING: {e}", at=ENTER_REFUSED
            ) from e
        got = self.state(dev)
        if got != state:
            raise Fail(
                f"SET {state_name(state)} succeeded but GET reports {state_name(got)}",
                at=ENTER_GET,
            )
        if stream is not None and f is not None:
            for chunk in stream.chunks():
                f.write_all(chunk)
        return f

    def open_session(self, dev: VfioDevice, state: int) -> MigrationFile:
        """From RUNNING, SET ``state`` (PRE_COPY, STOP_COPY or RESUMING): the data fd that
        SET must return."""
        return _needs_fd(self.enter(dev, state), S.RUNNING, state)

    def stop_copy(self, dev: VfioDevice) -> MigrationFile:
        """From STOP, SET STOP_COPY: the saving fd that SET must return."""
        return _needs_fd(self.set(dev, S.STOP_COPY), S.STOP, S.STOP_COPY)

    def same_session(self, dev: VfioDevice, state: int) -> None:
        """SET ``state`` on an arc inside the open saving session: no new data fd."""
        was = self.last[dev.path]
        if self.set(dev, state) is not None:
            raise Fail(
                f"data fd on the wrong arc: {state_name(was)} -> {state_name(state)} "
                "returned a new data fd",
                at=SESSION_NEW_FD,
            )

    def save(
        self,
        dev: VfioDevice,
        via_precopy: bool = False,
        meanwhile: Callable[[], None] | None = None,
        phases: list[tuple[str, int]] | None = None,
    ) -> Stream:
        """From RUNNING (or STOP): the whole stream of a STOP_COPY save (STOP -> STOP_COPY),
        back to STOP. With ``via_precopy`` (from RUNNING) the stream starts in PRE_COPY: what
        is available, ``meanwhile()`` (the model makes the device change), what is available
        again, with P2P also in PRE_COPY_P2P, then STOP_COPY on the same fd to EOF.
        ``phases`` receives (phase, bytes read in it) in order."""
        out = self.stream()

        def take(phase: str, chunks: Iterator[bytes]) -> None:
            before = out.length
            for c in chunks:
                out.add(c)
            if phases is not None:
                phases.append((phase, out.length - before))

        if via_precopy:
            f = self.open_session(dev, S.PRE_COPY)
            take("PRE_COPY", f.chunks(READ_CHUNK))
            if meanwhile is not None:
                meanwhile()
            take("PRE_COPY again", f.chunks(READ_CHUNK))
            if self.flags & MigrationFlags.P2P:
                self.same_session(dev, S.PRE_COPY_P2P)
                take("PRE_COPY_P2P", f.chunks(READ_CHUNK))
            self.same_session(dev, S.STOP_COPY)
        else:
            if self.state(dev) != S.STOP:
                self.enter(dev, S.STOP)
            f = self.stop_copy(dev)
        before = out.length
        read_to_eof(f, out.add)
        if phases is not None:
            phases.append(("STOP_COPY", out.length - before))
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


NO_DATA_FD = failure(
    "core/no-data-fd",
    "an arc that opens a session (RUNNING -> PRE_COPY, STOP -> STOP_COPY, STOP -> RESUMING) "
    "returned no data fd",
)
ENOMSG_IN_STOP_COPY = failure("core/enomsg-in-stop-copy", "a read in STOP_COPY answered ENOMSG")


def _needs_fd(f: MigrationFile | None, cur: int, new: int) -> MigrationFile:
    if f is None:
        raise Fail(f"{state_name(cur)} -> {state_name(new)} returned no data fd", at=NO_DATA_FD)
    return f


def read_to_eof(f: MigrationFile, take: Callable[[bytes], None]) -> None:
    """Read a STOP_COPY stream to its permanent end; ENOMSG there is a uAPI violation."""
    while True:
        try:
            chunk = f.read(READ_CHUNK)
        except VfioError as e:
            if e.errno == ENOMSG:
                raise Fail(
                    "read returned ENOMSG in STOP_COPY (only PRE_COPY may)", at=ENOMSG_IN_STOP_COPY
                ) from e
            raise
        if not chunk:
            return
        take(chunk)


def expect_errno(fn: Callable[[], Any], code: int, what: str, at: str) -> None:
    """``fn`` must fail with ``code``; else a Fail at the failure path ``at``."""
    try:
        r = fn()
    except OSError as e:
        if e.errno != code:
            raise Fail(
                f"{what}: expected {errno_name(code)}, got {errno_name(e.errno or 0)}", at=at
            ) from e
        return
    if isinstance(r, MigrationFile):
        r.close()
    raise Fail(f"{what}: expected {errno_name(code)}, but it succeeded", at=at)


def probe_errno(fn: Callable[[], Any]) -> int:
    """0 if ``fn`` succeeds, else its errno."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


Check = Callable[[Ctx], str]
CheckSpec = tuple[str, str, Check]


def checker(into: list[CheckSpec]) -> Callable[[str, str], Callable[[Check], Check]]:
    """``check = checker(CHECKS)``: a decorator that appends ``(name, doc, fn)`` to ``into``."""

    def check(name: str, doc: str) -> Callable[[Check], Check]:
        def deco(fn: Check) -> Check:
            into.append((name, doc, fn))
            return fn

        return deco

    return check
