"""P2P: two devices quiesce in the two-phase order."""

from __future__ import annotations

from vfiomig.conformance.core import CheckSpec, Ctx, Fail, S, checker, read_to_eof
from vfiomig.conformance.stream import Stream
from vfiomig.host import MigrationFile, MigrationFlags, VfioError
from vfiomig.host.device import state_name

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)


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
