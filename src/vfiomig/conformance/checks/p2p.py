"""P2P: two devices quiesce in the two-phase order."""

from __future__ import annotations

from vfiomig.conformance.core import CheckSpec, Ctx, Fail, S, checker, failure, read_to_eof
from vfiomig.conformance.stream import Stream
from vfiomig.host import MigrationFile, MigrationFlags, VfioError
from vfiomig.host.device import state_name

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)


P2P_SET = failure("p2p-quiescence/set-failed", "a SET of the two-phase order failed")
P2P_GET = failure("p2p-quiescence/get-differs", "a SET succeeded but GET reports another state")
P2P_FD_RUNNING = failure(
    "p2p-quiescence/fd-running-p2p", "RUNNING -> RUNNING_P2P returned a data fd"
)
P2P_NO_SAVE_FD = failure(
    "p2p-quiescence/no-saving-fd", "STOP -> STOP_COPY of one of the two returned no data fd"
)
P2P_NO_RESUME_FD = failure(
    "p2p-quiescence/no-resuming-fd", "STOP -> RESUMING of one of the two returned no data fd"
)
P2P_FD_STOP = failure("p2p-quiescence/fd-stop-p2p", "STOP -> RUNNING_P2P returned a data fd")


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
                raise Fail(f"{d.path}: SET {state_name(state)} failed: {e}", at=P2P_SET) from e
        for d in devs:
            got = ctx.state(d)
            if got != state:
                raise Fail(
                    f"{d.path}: SET {state_name(state)} but GET says {state_name(got)}", at=P2P_GET
                )
        return out

    for f in all_to(S.RUNNING_P2P):
        if f is not None:
            raise Fail(
                "data fd on the wrong arc: RUNNING -> RUNNING_P2P returned a data fd",
                at=P2P_FD_RUNNING,
            )
    all_to(S.STOP)
    files = all_to(S.STOP_COPY)
    streams: list[Stream] = []
    for f in files:
        if f is None:
            raise Fail("STOP -> STOP_COPY returned no data fd", at=P2P_NO_SAVE_FD)
        st = ctx.stream()
        read_to_eof(f, st.add)
        streams.append(st)
    all_to(S.STOP)
    ctx.close_files()
    for f, data in zip(all_to(S.RESUMING), streams, strict=True):
        if f is None:
            raise Fail("STOP -> RESUMING returned no data fd", at=P2P_NO_RESUME_FD)
        for chunk in data.chunks():
            f.write_all(chunk)
    all_to(S.STOP)
    for f in all_to(S.RUNNING_P2P):
        if f is not None:
            raise Fail(
                "data fd on the wrong arc: STOP -> RUNNING_P2P returned a data fd", at=P2P_FD_STOP
            )
    all_to(S.RUNNING)
    return "RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY and RESUMING -> STOP -> RUNNING_P2P -> RUNNING, both devices in step"
