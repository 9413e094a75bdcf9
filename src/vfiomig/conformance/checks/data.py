"""The data fds: stream semantics, end of stream, PRECOPY_INFO, MIG_DATA_SIZE."""

from __future__ import annotations

from errno import EBADF, EINVAL, ENOMSG, ENOTTY, ESPIPE

from vfiomig.conformance.core import (
    READ_CHUNK,
    CheckSpec,
    Ctx,
    Fail,
    S,
    Skip,
    checker,
    expect_errno,
    probe_errno,
    read_to_eof,
)
from vfiomig.host import MigrationFlags, VfioError
from vfiomig.host.errors import errno_name
from vfiomig.uapi import vfio as v

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)


@check(
    "stream-files",
    "data fds are streams: no lseek (ESPIPE), saving fd not writable, resuming fd not readable",
)
def c_stream_files(ctx: Ctx) -> str:
    f = ctx.open_session(ctx.a, S.STOP_COPY)
    expect_errno(lambda: ctx.t.lseek(f.fd, 0), ESPIPE, "lseek on the saving fd")
    expect_errno(lambda: f.write(b"x"), EBADF, "write on the saving fd")
    ctx.settle()
    stream = ctx.saved_stream()
    r = ctx.open_session(ctx.a, S.RESUMING)
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
        f = ctx.open_session(ctx.a, S.PRE_COPY)
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
        ctx.same_session(ctx.a, S.STOP_COPY)
    else:
        ctx.enter(ctx.a, S.STOP)
        f = ctx.stop_copy(ctx.a)
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
    f = ctx.open_session(ctx.a, S.PRE_COPY)
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
    f = ctx.open_session(ctx.a, S.PRE_COPY)
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
    f = ctx.open_session(ctx.a, S.PRE_COPY)
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
