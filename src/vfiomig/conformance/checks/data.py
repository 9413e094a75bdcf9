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
    failure,
    probe_errno,
    read_to_eof,
)
from vfiomig.host import MigrationFlags, VfioError
from vfiomig.host.errors import errno_name
from vfiomig.uapi import vfio as v

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)


SF_LSEEK_SAVING = failure("stream-files/lseek-saving", "lseek on a saving fd is not ESPIPE")
SF_WRITE_SAVING = failure("stream-files/write-saving", "write on a saving fd is not EBADF")
SF_LSEEK_RESUMING = failure("stream-files/lseek-resuming", "lseek on a resuming fd is not ESPIPE")
SF_READ_RESUMING = failure("stream-files/read-resuming", "read on a resuming fd is not EBADF")
SF_INFO_RESUMING = failure(
    "stream-files/precopy-info-resuming", "PRECOPY_INFO on a resuming fd is not ENOTTY"
)


@check(
    "stream-files",
    "data fds are streams: no lseek (ESPIPE), saving fd not writable, resuming fd not readable",
)
def c_stream_files(ctx: Ctx) -> str:
    f = ctx.open_session(ctx.a, S.STOP_COPY)
    expect_errno(lambda: ctx.t.lseek(f.fd, 0), ESPIPE, "lseek on the saving fd", SF_LSEEK_SAVING)
    expect_errno(lambda: f.write(b"x"), EBADF, "write on the saving fd", SF_WRITE_SAVING)
    ctx.settle()
    stream = ctx.saved_stream()
    r = ctx.open_session(ctx.a, S.RESUMING)
    expect_errno(
        lambda: ctx.t.lseek(r.fd, 0), ESPIPE, "lseek on the resuming fd", SF_LSEEK_RESUMING
    )
    expect_errno(lambda: r.read(1), EBADF, "read on the resuming fd", SF_READ_RESUMING)
    expect_errno(
        lambda: r.precopy_info(),
        ENOTTY,
        "VFIO_MIG_GET_PRECOPY_INFO on the resuming fd",
        SF_INFO_RESUMING,
    )
    del stream
    return "ESPIPE / EBADF / ENOTTY as a stream file should"


EOS_PRECOPY_READ = failure(
    "end-of-stream/pre-copy-read-error", "a read in PRE_COPY failed with an errno but ENOMSG"
)
EOS_AFTER_ERROR = failure(
    "end-of-stream/read-after-eof-error", "a read after EOF in STOP_COPY failed"
)
EOS_AFTER_DATA = failure(
    "end-of-stream/read-after-eof-data", "a read after EOF in STOP_COPY returned more bytes"
)


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
                raise Fail(f"read in PRE_COPY failed: {e}", at=EOS_PRECOPY_READ) from e
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
                f"read after EOF in STOP_COPY failed with {errno_name(e.errno or 0)}; expected 0",
                at=EOS_AFTER_ERROR,
            ) from e
        if again:
            raise Fail(
                f"read after EOF in STOP_COPY returned {len(again)} more bytes", at=EOS_AFTER_DATA
            )
    notes.append(f"STOP_COPY: {total} bytes then EOF")
    return "; ".join(notes)


PI_PRECOPY = failure("precopy-info-states/pre-copy-error", "PRECOPY_INFO in PRE_COPY failed")
PI_ARGSZ = failure(
    "precopy-info-states/short-argsz", "PRECOPY_INFO with argsz 16 (< 24) is not EINVAL"
)
PI_P2P = failure("precopy-info-states/pre-copy-p2p-error", "PRECOPY_INFO in PRE_COPY_P2P failed")
PI_STOP_COPY = failure(
    "precopy-info-states/stop-copy-session",
    "PRECOPY_INFO on a PRE_COPY session's fd once it is in STOP_COPY is not EINVAL",
)
PI_STOP_COPY_FD = failure(
    "precopy-info-states/stop-copy-fd", "PRECOPY_INFO on a STOP -> STOP_COPY fd is not EINVAL"
)


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
        raise Fail(f"PRECOPY_INFO in PRE_COPY failed: {e}", at=PI_PRECOPY) from e
    short = v.vfio_precopy_info(argsz=16)
    expect_errno(
        lambda: ctx.t.ioctl(f.fd, v.VFIO_MIG_GET_PRECOPY_INFO, short),
        EINVAL,
        "PRECOPY_INFO with argsz 16",
        PI_ARGSZ,
    )
    seen = ["PRE_COPY"]
    if ctx.flags & MigrationFlags.P2P:
        ctx.set(ctx.a, S.PRE_COPY_P2P)
        try:
            f.precopy_info()
        except VfioError as e:
            raise Fail(f"PRECOPY_INFO in PRE_COPY_P2P failed: {e}", at=PI_P2P) from e
        seen.append("PRE_COPY_P2P")
    ctx.set(ctx.a, S.STOP_COPY)
    expect_errno(f.precopy_info, EINVAL, "PRECOPY_INFO in STOP_COPY (same session)", PI_STOP_COPY)
    ctx.settle()
    ctx.enter(ctx.a, S.STOP)
    g = ctx.stop_copy(ctx.a)
    expect_errno(g.precopy_info, EINVAL, "PRECOPY_INFO on a STOP -> STOP_COPY fd", PI_STOP_COPY_FD)
    return f"answers in {', '.join(seen)}; EINVAL in STOP_COPY and for argsz 16"


# Reads of PRE_COPY data after which a device that never reaches a temporary end fails.
MAX_PRECOPY_READS = 100000

IB_GREW = failure(
    "precopy-info-initial-bytes/grew",
    "initial_bytes grew while PRE_COPY data was read (without REINIT)",
)
IB_ENDLESS = failure(
    "precopy-info-initial-bytes/endless", "PRE_COPY never reached a temporary end of stream"
)
IB_SHORT = failure(
    "precopy-info-initial-bytes/short",
    "fewer bytes could be read than the first PRECOPY_INFO announced as initial_bytes",
)
IB_LEFT = failure(
    "precopy-info-initial-bytes/left-over",
    "initial_bytes is not 0 once all available data was read",
)


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
                f"{read} bytes (without REINIT)",
                at=IB_GREW,
            )
        last = info.initial_bytes
        if reads >= MAX_PRECOPY_READS:
            raise Fail(
                f"PRE_COPY never reached a temporary end of stream ({reads} reads, {read} bytes)",
                at=IB_ENDLESS,
            )
    if read < first.initial_bytes:
        raise Fail(
            f"PRECOPY_INFO announced {first.initial_bytes} initial bytes but only {read} "
            "could be read before the temporary end of stream",
            at=IB_SHORT,
        )
    if last != 0:
        raise Fail(f"initial_bytes is still {last} after all available data was read", at=IB_LEFT)
    note = "" if first.initial_bytes else " (initial_bytes started at 0)"
    return f"{first.initial_bytes} initial bytes, non-increasing over {reads} reads{note}"


V2_NO_PRECOPY = failure(
    "precopy-info-v2/without-pre-copy",
    "the MIG_PRECOPY_INFOv2 opt-in on a device without PRE_COPY is not EINVAL",
)
V2_OPT_IN = failure(
    "precopy-info-v2/opt-in-failed",
    "the MIG_PRECOPY_INFOv2 opt-in failed (but with ENOTTY) on a PRE_COPY device",
)
V2_FLAGS = failure(
    "precopy-info-v2/flags",
    "after the opt-in PRECOPY_INFO returns flags other than REINIT (v1 echoes the caller's)",
)


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
            V2_NO_PRECOPY,
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
        raise Fail(
            f"MIG_PRECOPY_INFOv2 SET failed with {errno_name(code)} on a PRE_COPY device",
            at=V2_OPT_IN,
        )
    v2 = f.precopy_info(flags=junk)
    if v2.flags & ~v.VFIO_PRECOPY_INFO_REINIT:
        raise Fail(
            f"after the v2 opt-in PRECOPY_INFO flags are {v2.flags:#x}; only REINIT may be set",
            at=V2_FLAGS,
        )
    return f"{note}; v2 flags {v2.flags:#x}"


DS_ERROR = failure("mig-data-size/error", "MIG_DATA_SIZE failed in STOP")
DS_SMALL = failure(
    "mig-data-size/too-small", "MIG_DATA_SIZE reports less than STOP_COPY then produces"
)
DS_LARGE = failure(
    "mig-data-size/too-large",
    "MIG_DATA_SIZE reports more than twice (+ 64 KiB) what STOP_COPY then produces",
)


@check("mig-data-size", "MIG_DATA_SIZE against the bytes STOP_COPY actually produces")
def c_mig_data_size(ctx: Ctx) -> str:
    ctx.enter(ctx.a, S.STOP)
    try:
        reported = ctx.a.mig_data_size()
    except VfioError as e:
        raise Fail(f"MIG_DATA_SIZE failed: {e}", at=DS_ERROR) from e
    ctx.settle()
    actual = ctx.save(ctx.a).length
    if actual > reported:
        raise Fail(
            f"wrong MIG_DATA_SIZE: it reports {reported} bytes but STOP_COPY produced {actual} "
            f"({actual - reported} more than announced)",
            at=DS_SMALL,
        )
    if reported > 2 * actual + 65536:
        raise Fail(
            f"wrong MIG_DATA_SIZE: it reports {reported} bytes but STOP_COPY produced only {actual}",
            at=DS_LARGE,
        )
    exact = "exact" if reported == actual else f"estimate {reported}"
    return f"{actual} bytes ({exact})"
