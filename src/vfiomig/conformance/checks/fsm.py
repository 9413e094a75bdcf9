"""The migration FSM: flags, the initial state, every path, illegal targets, blocked arcs."""

from __future__ import annotations

from errno import EBADF, EINVAL, ENODEV
from functools import partial

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
from vfiomig.host import MigrationFile, MigrationFlags, VfioError, fsm
from vfiomig.host.device import flag_names, state_name
from vfiomig.host.errors import MigrationStateError, errno_name

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)


MF_NONE = failure("migration-flags/none", "the device does not support migration (ENOTTY)")
MF_NO_STOP_COPY = failure("migration-flags/no-stop-copy", "the flags lack STOP_COPY")
MF_UNDEFINED = failure(
    "migration-flags/undefined", "the flags are not a combination the uAPI defines (1, 3, 5, 7)"
)


@check("migration-flags", "MIGRATION feature: STOP_COPY set, a defined combination")
def c_migration_flags(ctx: Ctx) -> str:
    try:
        flags = ctx.flags
    except Skip as e:
        raise Fail(str(e), at=MF_NONE) from e
    names = "|".join(flag_names(flags)) or "none"
    if not flags & MigrationFlags.STOP_COPY:
        raise Fail(
            f"flags {flags:#x} ({names}) lack STOP_COPY, which every migratable device needs",
            at=MF_NO_STOP_COPY,
        )
    if flags not in (1, 3, 5, 7):
        raise Fail(
            f"flags {flags:#x} ({names}) are not a combination the uAPI defines (1, 3, 5, 7)",
            at=MF_UNDEFINED,
        )
    return f"flags {names} ({flags})"


IS_NOT_RUNNING = failure(
    "initial-state/not-running", "a device is not RUNNING right after open (or GET fails)"
)


@check("initial-state", "a freshly opened device is RUNNING")
def c_initial_state(ctx: Ctx) -> str:
    for path, st in ctx.initial_state.items():
        if st != S.RUNNING:
            shown = state_name(st) if isinstance(st, int) else st
            raise Fail(
                f"{path} was {shown} right after open; the uAPI starts devices in RUNNING",
                at=IS_NOT_RUNNING,
            )
    return "RUNNING after open"


FP_SET = failure("fsm-paths/set-failed", "a SET on a path the uAPI allows failed")
FP_GET = failure("fsm-paths/get-differs", "a SET succeeded but GET reports another state")
FP_FD_EXTRA = failure(
    "fsm-paths/fd-on-wrong-arc", "a SET returned a data fd where the uAPI opens none"
)
FP_FD_MISSING = failure(
    "fsm-paths/fd-missing", "a SET whose last arc opens a session returned no data fd"
)
FP_FD_KIND = failure(
    "fsm-paths/fd-direction",
    "a new data fd reads or writes the wrong way (saving: read only, resuming: write only)",
)
FP_SESSION_ENDED = failure(
    "fsm-paths/session-ended",
    "a SET that keeps the device in the saving states ended its saving session (ENODEV)",
)
FP_SAVING_ALIVE = failure(
    "fsm-paths/ended-saving-fd",
    "the saving fd of a session the SET ended answers something other than ENODEV",
)
FP_RESUMING_ALIVE = failure(
    "fsm-paths/ended-resuming-fd",
    "the resuming fd of a session the SET ended answers something other than ENODEV",
)


@check(
    "fsm-paths",
    "every supported from -> to: final state, data fd exactly when the uAPI says, ended sessions ENODEV",
)
def c_fsm_paths(ctx: Ctx) -> str:
    flags = ctx.flags
    states = fsm.supported_states(flags)
    problems: list[tuple[str, str]] = []  # (failure path, what)
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
        (at, first), rest = problems[0], problems[1:]
        more = f" (+{len(rest)} more)" if rest else ""
        raise Fail(first + more, *(p for _, p in rest), at=at, also=[a for a, _ in rest])
    return f"{pairs} transitions over {len(states)} states"


def _one_transition(ctx: Ctx, x: int, y: int, old: MigrationFile | None) -> list[tuple[str, str]]:
    flags = ctx.flags
    arc = f"{state_name(x)} -> {state_name(y)}"
    try:
        new = ctx.set(ctx.a, y)
    except VfioError as e:
        return [(FP_SET, f"SET {arc} failed: {e}")]
    out: list[tuple[str, str]] = []
    got = ctx.state(ctx.a)
    if got != y:
        out.append((FP_GET, f"SET {arc} succeeded but GET reports {state_name(got)}"))
    want = fsm.fd_expected(flags, x, y)
    path = " -> ".join(state_name(s) for s in fsm.path(flags, x, y) or [])
    if new is not None and want is None:
        out.append(
            (
                FP_FD_EXTRA,
                f"data fd on the wrong arc: SET {arc} (path {path or 'no-op'}) returned "
                f"data_fd {new.fd}; the uAPI opens no fd there",
            )
        )
    elif new is None and want is not None:
        out.append(
            (
                FP_FD_MISSING,
                f"SET {arc} returned no data fd; the uAPI opens a {want} fd on that arc",
            )
        )
    elif new is not None and want is not None:
        # A saving fd is O_RDONLY (write: EBADF), a resuming fd O_WRONLY (read: EBADF).
        # Zero-length calls: the direction is checked before any data moves.
        no_write = probe_errno(partial(new.write, b"")) == EBADF
        no_read = probe_errno(partial(new.read, 0)) == EBADF
        got_kind = "saving" if no_write and not no_read else "resuming" if no_read else "?"
        if got_kind != want:
            out.append(
                (
                    FP_FD_KIND,
                    f"SET {arc} returned a data fd that is not {want} (read "
                    f"{'EBADF' if no_read else 'allowed'}, write {'EBADF' if no_write else 'allowed'})",
                )
            )
    if old is not None and x != y:
        kind = "saving" if old.saving else "resuming"
        survives = fsm.session_survives(flags, x, y, kind)
        if old.saving:
            code = probe_errno(lambda: old.read(1))
            if survives and code == ENODEV:
                out.append(
                    (
                        FP_SESSION_ENDED,
                        f"SET {arc} ended the saving session (ENODEV), which must continue",
                    )
                )
            elif not survives and code != ENODEV:
                out.append(
                    (
                        FP_SAVING_ALIVE,
                        f"after SET {arc} the ended saving fd answers "
                        f"{errno_name(code) if code else 'data'} instead of ENODEV",
                    )
                )
        elif not survives:
            code = probe_errno(lambda: old.write(b"\0"))
            if code != ENODEV:
                out.append(
                    (
                        FP_RESUMING_ALIVE,
                        f"after SET {arc} the ended resuming fd answers "
                        f"{errno_name(code) if code else 'success'} instead of ENODEV",
                    )
                )
    return out


FI_ERRNO = failure(
    "fsm-illegal-targets/not-einval",
    "SET to ERROR, an unsupported or an out-of-range state did not fail with EINVAL",
)
FI_MOVED = failure("fsm-illegal-targets/moved", "a refused SET changed the state")
FI_NOOP_FD = failure("fsm-illegal-targets/no-op-fd", "SET to the current state returned a data fd")
FI_NOOP_MOVED = failure(
    "fsm-illegal-targets/no-op-moved", "SET to the current state changed the state"
)


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
            expect_errno(partial(ctx.set, ctx.a, target), EINVAL, what, FI_ERRNO)
            got = ctx.state(ctx.a)
            if got != x:
                raise Fail(f"{what} failed but moved the device to {state_name(got)}", at=FI_MOVED)
            n += 1
        f = ctx.set(ctx.a, x)
        if f is not None:
            raise Fail(
                f"data fd on the wrong arc: SET {state_name(x)} -> itself returned a data fd",
                at=FI_NOOP_FD,
            )
        if ctx.state(ctx.a) != x:
            raise Fail(f"SET {state_name(x)} -> itself changed the state", at=FI_NOOP_MOVED)
    return f"{n} illegal targets rejected from {len(states)} states"


FB_ERRNO = failure(
    "fsm-blocked-arcs/wrong-errno", "a blocked arc failed with an errno other than EINVAL"
)
FB_ACCEPTED = failure("fsm-blocked-arcs/accepted", "a blocked arc succeeded")
FB_MOVED = failure("fsm-blocked-arcs/moved", "the rejected blocked arc changed the state")
FB_ENDED = failure(
    "fsm-blocked-arcs/session-ended", "the rejected blocked arc ended the saving session"
)


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
                    f"{errno_name(e.errno or 0)}, expected EINVAL",
                    at=FB_ERRNO,
                ) from e
        else:
            now = state_name(ctx.state(ctx.a))
            raise Fail(
                f"no EINVAL on the blocked arc {state_name(src)} -> {state_name(dst)}: SET "
                f"succeeded{' with a data fd' if r is not None else ''} (device now {now})",
                at=FB_ACCEPTED,
            )
        got = ctx.state(ctx.a)
        if got != src:
            raise Fail(f"rejected blocked arc moved the device to {state_name(got)}", at=FB_MOVED)
        if f is not None and probe_errno(partial(f.read, 1)) == ENODEV:
            raise Fail("the rejected blocked arc ended the saving session", at=FB_ENDED)
    return ", ".join(f"{state_name(a)} -> {state_name(b)}" for a, b in arcs) + ": EINVAL"
