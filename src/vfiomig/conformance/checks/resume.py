"""Resuming: the round trips (a STOP_COPY save, a save through PRE_COPY), bad streams
refused, recovery through reset and from ERROR."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from errno import EINVAL, ENODEV
from functools import partial

from vfiomig.conformance.checks.dma import DMA_BASE, dma_window
from vfiomig.conformance.core import (
    CheckSpec,
    Ctx,
    Fail,
    S,
    Skip,
    checker,
    expect_errno,
    failure,
    probe_errno,
)
from vfiomig.conformance.stream import Stream, corrupted, first_difference, truncated
from vfiomig.host import MigrationFlags, VfioDevice, VfioError
from vfiomig.host.device import state_name
from vfiomig.host.errors import MigrationStateError, errno_name

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)

# Pages of the DMA window the device writes between two PRE_COPY reads (on the model).
CHANGE_PAGES = 8


RT_REFUSED = failure(
    "save-resume-roundtrip/refused", "the second device refused the first one's STOP_COPY stream"
)
RT_LOAD = failure(
    "save-resume-roundtrip/load-failed", "RESUMING -> STOP after a complete stream failed"
)
RT_LOSSY = failure(
    "save-resume-roundtrip/lossy", "the resumed device saves other bytes than it was given"
)


@check(
    "save-resume-roundtrip",
    "save -> resume on the second device -> save again gives the same bytes",
)
def c_roundtrip(ctx: Ctx) -> str:
    b = ctx.need_b()
    s1 = ctx.save(ctx.a)
    ctx.settle()
    s2 = _resume_and_save(ctx, b, s1, RT_REFUSED, RT_LOAD)
    _same_bytes(s1, s2, "lossy resume", "saved", RT_LOSSY)
    return f"{s1.length} bytes, identical after resume (sha256 {s1.digest[:12]})"


PR_REFUSED = failure(
    "precopy-roundtrip/refused", "the second device refused a stream saved through PRE_COPY"
)
PR_LOAD = failure(
    "precopy-roundtrip/load-failed",
    "RESUMING -> STOP after a complete stream saved through PRE_COPY failed",
)
PR_LOSSY = failure(
    "precopy-roundtrip/lossy",
    "the device resumed from a PRE_COPY save saves other bytes than the source's STOP_COPY",
)


@check(
    "precopy-roundtrip",
    "save through PRE_COPY (the device changing between reads) -> resume on the second "
    "device -> its STOP_COPY save equals the source's",
)
def c_precopy_roundtrip(ctx: Ctx) -> str:
    ctx.need(MigrationFlags.PRE_COPY, "a save that starts in PRE_COPY")
    b = ctx.need_b()
    notes: list[str] = []
    phases: list[tuple[str, int]] = []
    with _device_changes(ctx, notes) as change:
        s1 = ctx.save(ctx.a, via_precopy=True, meanwhile=change, phases=phases)
    # The source, still stopped where the PRE_COPY save left it: the bytes to match.
    ref = ctx.save(ctx.a)
    ctx.settle()
    s2 = _resume_and_save(ctx, b, s1, PR_REFUSED, PR_LOAD)
    _same_bytes(ref, s2, "lossy pre-copy", "in the source's STOP_COPY save", PR_LOSSY)
    read = ", ".join(f"{n} in {phase}" for phase, n in phases)
    return (
        f"{s1.length} bytes through PRE_COPY ({read}); the resumed device saves the source's "
        f"{ref.length} STOP_COPY bytes (sha256 {ref.digest[:12]}); {'; '.join(notes)}"
    )


def _resume_and_save(ctx: Ctx, b: VfioDevice, stream: Stream, refused: str, load: str) -> Stream:
    """Resume ``stream`` on ``b`` (from RUNNING), then its STOP_COPY save. The failure
    paths: ``refused`` (a write fails), ``load`` (RESUMING -> STOP fails)."""
    r = ctx.open_session(b, S.RESUMING)
    try:
        for chunk in stream.chunks():
            r.write_all(chunk)
    except VfioError as e:
        raise Fail(f"the second device refused the first one's stream: {e}", at=refused) from e
    try:
        ctx.set(b, S.STOP)
    except VfioError as e:
        raise Fail(f"RESUMING -> STOP after a complete stream failed: {e}", at=load) from e
    ctx.settle()
    return ctx.save(b)


def _same_bytes(want: Stream, got: Stream, defect: str, what: str, at: str) -> None:
    """The resumed device's save ``got`` must be ``want``; else a Fail naming ``defect``."""
    if want != got:
        where = f"; first difference at byte {first_difference(want, got)}"
        raise Fail(
            f"{defect}: the resumed device saves different bytes ({want.length} bytes {what}, "
            f"{got.length} after resume{where})",
            at=at,
        )


@contextmanager
def _device_changes(ctx: Ctx, notes: list[str]) -> Iterator[Callable[[], None] | None]:
    """What makes device A change while it runs in PRE_COPY: on the model, DMA into a few
    pages of a buffer mapped for it (each write changes the device's state); on a real
    device nothing (the save reads what the device offers)."""
    hooks = ctx.target.model
    if hooks is None:
        notes.append("no way to make a real device change: read what it offered")
        yield None
        return
    if ctx.attach_error:
        notes.append(f"the device is not attached to an IOAS ({ctx.attach_error})")
        yield None
        return

    def change() -> None:
        try:
            for i in range(CHANGE_PAGES):
                hooks.dma_write(ctx.a.path, DMA_BASE + i * 4096, bytes([0xA0 + i]) * 8)
        except Exception as e:  # the model's own fault type: the device cannot DMA here
            notes.append(f"the device could not DMA between the PRE_COPY reads ({e})")
        else:
            notes.append(f"the device wrote {CHANGE_PAGES} pages between the PRE_COPY reads")

    with dma_window(ctx):
        yield change


BS_ACCEPTED = failure(
    "resume-rejects-bad-streams/accepted",
    "a truncated, corrupted or mismatched stream was taken and loaded (RESUMING -> STOP)",
)
BS_STATE = failure(
    "resume-rejects-bad-streams/state",
    "after refusing a bad stream the device is neither in RESUMING nor in ERROR",
)


@check(
    "resume-rejects-bad-streams",
    "truncated / corrupted / mismatched resume streams are refused (write error or EINVAL on "
    "RESUMING -> STOP), each by a freshly opened device",
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
        # Each stream goes to a device opened for it, as a destination VMM's would be: what
        # the device remembers from an earlier resume in the same open is another check's
        # subject (resume-rechecks-each-session).
        dev = ctx.reopen(dev)
        verdicts.append(_refused(ctx, dev, name, stream(), "", BS_ACCEPTED, BS_STATE))
    tail = f"; skipped {', '.join(skipped)}" if skipped else ""
    return "; ".join(verdicts) + tail


def _refused(
    ctx: Ctx,
    dev: VfioDevice,
    name: str,
    stream: Iterable[bytes],
    hint: str,
    accepted: str,
    state: str,
) -> str:
    """From RUNNING, resume ``stream`` on ``dev``: it must be refused (a write error, or an
    error on RESUMING -> STOP that leaves the device in RESUMING or ERROR). How it was. The
    failure paths: ``accepted`` (it was not refused), ``state`` (the state after)."""
    r = ctx.open_session(dev, S.RESUMING)
    write_err = 0
    size = 0
    try:
        for chunk in stream:
            size += len(chunk)
            r.write_all(chunk)
    except VfioError as e:
        write_err = e.errno or -1
    code = probe_errno(lambda: ctx.set(dev, S.STOP))
    if code == 0 and write_err == 0:
        raise Fail(
            f"accepted a {name} resume stream ({size} bytes): RESUMING -> STOP succeeded{hint}",
            at=accepted,
        )
    if code == 0:
        return f"{name}: write {errno_name(write_err)}"
    got = ctx.state(dev)
    if got not in (S.RESUMING, S.ERROR):
        raise Fail(f"after refusing a {name} stream the device is in {state_name(got)}", at=state)
    how = f"write {errno_name(write_err)}, " if write_err else ""
    return f"{name}: {how}STOP {errno_name(code)}"


RC_GOOD = failure(
    "resume-rechecks-each-session/good-refused", "a freshly opened device refused a good stream"
)
RC_ACCEPTED = failure(
    "resume-rechecks-each-session/accepted",
    "after a good resume, a second RESUMING session of the same open took a corrupted stream "
    "(a compatibility check done once per open, like hisi_acc's match_done, which the kernel "
    "resets only at open since 2025): a finding, not a failure",
    finding=True,
)
RC_STATE = failure(
    "resume-rechecks-each-session/state",
    "after refusing the second session's stream the device is neither in RESUMING nor ERROR",
)


@check(
    "resume-rechecks-each-session",
    "after one resume, a second RESUMING session of the same open still refuses a corrupted "
    "stream (the compatibility check is not done once per open)",
)
def c_recheck(ctx: Ctx) -> str:
    dev = ctx.b or ctx.a
    good = ctx.saved_stream()
    dev = ctx.reopen(dev)
    r = ctx.open_session(dev, S.RESUMING)
    try:
        for chunk in good.chunks():
            r.write_all(chunk)
        ctx.set(dev, S.STOP)
    except VfioError as e:
        raise Fail(
            f"a freshly opened device refused a good stream ({good.length} bytes): {e}",
            at=RC_GOOD,
        ) from e
    ctx.settle()
    verdict = _refused(
        ctx,
        dev,
        "corrupted",
        corrupted(good),
        " in the second resume of one open (the first resume was good): the device checks "
        "a stream's compatibility only once per open",
        RC_ACCEPTED,
        RC_STATE,
    )
    return f"after a good resume in the same open, {verdict}"


RR_FAILED = failure(
    "reset-recovery/failed", "VFIO_DEVICE_RESET failed on a device that advertises it"
)
RR_STATE = failure(
    "reset-recovery/not-running", "after VFIO_DEVICE_RESET the device is not RUNNING"
)
RR_FD = failure(
    "reset-recovery/fd-alive", "after VFIO_DEVICE_RESET the session's data fd is not ENODEV"
)


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
                raise Fail(
                    f"VFIO_DEVICE_RESET in {state_name(st)} failed with {errno_name(code)}",
                    at=RR_FAILED,
                )
            raise Skip(
                f"no VFIO_DEVICE_FLAGS_RESET and VFIO_DEVICE_RESET answers {errno_name(code)}"
            )
        got = ctx.state(ctx.a)
        if got != S.RUNNING:
            raise Fail(
                f"after reset in {state_name(st)} the device is {state_name(got)}, not RUNNING",
                at=RR_STATE,
            )
        if f is not None:
            op = partial(f.read, 1) if f.saving else partial(f.write, b"\0")
            code = probe_errno(op)
            if code != ENODEV:
                shown = errno_name(code) if code else "success"
                raise Fail(
                    f"after reset the {state_name(st)} data fd answers {shown}, not ENODEV",
                    at=RR_FD,
                )
        done.append(state_name(st))
    note = "" if advertised else " (VFIO_DEVICE_FLAGS_RESET not advertised, the ioctl works)"
    return f"reset from {', '.join(done)}: RUNNING, fds ENODEV{note}"


ER_ERRNO = failure(
    "error-recovery/not-einval", "SET RUNNING or STOP on a device in ERROR is not EINVAL"
)
ER_LEFT = failure("error-recovery/left-error", "a refused SET moved the device out of ERROR")
ER_RESET = failure(
    "error-recovery/reset", "after VFIO_DEVICE_RESET in ERROR the device is not RUNNING"
)


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
                partial(dev.set_state, target),
                EINVAL,
                f"SET ERROR -> {state_name(target)}",
                ER_ERRNO,
            )
            if int(dev.get_state()) != S.ERROR:
                raise Fail("a refused SET moved the device out of ERROR", at=ER_LEFT)
        dev.reset()
        got = int(dev.get_state())
        if got != S.RUNNING:
            raise Fail(
                f"after reset in ERROR the device is {state_name(got)}, not RUNNING", at=ER_RESET
            )
        dev.set_state(S.STOP)
        dev.set_state(S.RUNNING)
    return f"arc failed with {errno_name(code or 0)} into ERROR; SETs EINVAL; reset -> RUNNING"
