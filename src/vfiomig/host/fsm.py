"""What the uAPI promises about migration state transitions, as userspace can compute it.

The kernel's ``vfio_mig_get_next_state()`` (drivers/vfio/vfio_main.c) picks one step toward a
requested state from a literal table; drivers walk those steps until they arrive. This module
restates the same tables from the uAPI text (linux/vfio.h) so that userspace can predict the
*combination path* of a SET, whether it must return a data fd, and which data sessions end on
the way. It is the library's own copy, written from the header, not the model kernel's: the
conformance suite checks a kernel against it.
"""

from __future__ import annotations

from vfiomig.host.device import MigrationFlags, MigrationState

S = MigrationState
ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = (
    S.ERROR,
    S.STOP,
    S.RUNNING,
    S.STOP_COPY,
    S.RESUMING,
    S.RUNNING_P2P,
    S.PRE_COPY,
    S.PRE_COPY_P2P,
)

# state -> migration flags it needs (ERROR needs ~0: never supported as a target or source).
STATE_FLAGS: dict[MigrationState, int] = {
    STOP: MigrationFlags.STOP_COPY,
    RUNNING: MigrationFlags.STOP_COPY,
    STOP_COPY: MigrationFlags.STOP_COPY,
    RESUMING: MigrationFlags.STOP_COPY,
    RUNNING_P2P: MigrationFlags.STOP_COPY | MigrationFlags.P2P,
    PRE_COPY: MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY,
    PRE_COPY_P2P: MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY,
    ERROR: 0xFFFFFFFF,
}

# NEXT[cur][new]: the next single step from cur toward new (vfio_from_fsm_table).
_ORDER = (ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P)
_ROWS = {
    ERROR: "ERROR ERROR ERROR ERROR ERROR ERROR ERROR ERROR",
    STOP: "ERROR STOP RUNNING_P2P STOP_COPY RESUMING RUNNING_P2P RUNNING_P2P RUNNING_P2P",
    RUNNING: "ERROR RUNNING_P2P RUNNING RUNNING_P2P RUNNING_P2P RUNNING_P2P PRE_COPY RUNNING_P2P",
    STOP_COPY: "ERROR STOP STOP STOP_COPY STOP STOP ERROR ERROR",
    RESUMING: "ERROR STOP STOP STOP RESUMING STOP STOP STOP",
    RUNNING_P2P: "ERROR STOP RUNNING STOP STOP RUNNING_P2P RUNNING PRE_COPY_P2P",
    PRE_COPY: "ERROR RUNNING RUNNING PRE_COPY_P2P RUNNING RUNNING PRE_COPY PRE_COPY_P2P",
    PRE_COPY_P2P: (
        "ERROR RUNNING_P2P RUNNING_P2P STOP_COPY RUNNING_P2P RUNNING_P2P PRE_COPY PRE_COPY_P2P"
    ),
}
NEXT: dict[MigrationState, dict[MigrationState, MigrationState]] = {
    cur: dict(zip(_ORDER, (MigrationState[n] for n in row.split()), strict=True))
    for cur, row in _ROWS.items()
}

SAVING_STATES = frozenset({PRE_COPY, PRE_COPY_P2P, STOP_COPY})

# Arcs whose completion hands userspace a new data fd (uAPI text, "data_fd" rules).
FD_ARCS: dict[tuple[MigrationState, MigrationState], str] = {
    (RUNNING, PRE_COPY): "saving",
    (RUNNING_P2P, PRE_COPY_P2P): "saving",
    (STOP, STOP_COPY): "saving",
    (STOP, RESUMING): "resuming",
}


def supported(flags: int, state: int) -> bool:
    """Is ``state`` reachable on a device with these migration flags?"""
    try:
        need = STATE_FLAGS[MigrationState(state)]
    except (ValueError, KeyError):
        return False
    return need & flags == need


def supported_states(flags: int) -> list[MigrationState]:
    return [s for s in _ORDER if supported(flags, s)]


def next_step(flags: int, cur: int, new: int) -> MigrationState | None:
    """One step from ``cur`` toward ``new``; None where the kernel answers EINVAL."""
    if not supported(flags, cur) or not supported(flags, new):
        return None
    c, n = MigrationState(cur), MigrationState(new)
    step = NEXT[c][n]
    while step != ERROR and not supported(flags, step):
        step = NEXT[step][n]
    return None if step == ERROR else step


def path(flags: int, cur: int, new: int) -> list[MigrationState] | None:
    """The states a SET from ``cur`` to ``new`` passes through (excluding ``cur``); ``[]``
    for a no-op, None when the SET must fail with EINVAL."""
    if not supported(flags, new) or not supported(flags, cur):
        return None
    steps: list[MigrationState] = []
    at = MigrationState(cur)
    while at != new:
        step = next_step(flags, at, new)
        if step is None:
            return None
        steps.append(step)
        at = step
        if len(steps) > len(_ORDER):  # the table has no cycles; guard anyway
            return None
    return steps


def fd_expected(flags: int, cur: int, new: int) -> str | None:
    """ "saving" / "resuming" when the SET's final arc opens a data fd, else None."""
    p = path(flags, cur, new)
    if not p:
        return None
    before = p[-2] if len(p) > 1 else MigrationState(cur)
    return FD_ARCS.get((before, p[-1]))


def session_survives(flags: int, cur: int, new: int, kind: str) -> bool:
    """Does a data session open in ``cur`` survive a SET to ``new``?

    A saving session lives while the device stays inside PRE_COPY / PRE_COPY_P2P / STOP_COPY;
    a resuming one only while it stays in RESUMING.
    """
    p = path(flags, cur, new)
    if p is None:  # the SET fails; nothing moved
        return True
    live = SAVING_STATES if kind == "saving" else frozenset({RESUMING})
    return MigrationState(cur) in live and all(s in live for s in p)


def blocked_arcs(flags: int) -> list[tuple[MigrationState, MigrationState]]:
    """Supported (from, to) pairs the table maps to ERROR: EINVAL on 7.2 (a hang before)."""
    return [
        (c, n)
        for c in supported_states(flags)
        for n in supported_states(flags)
        if c != n and path(flags, c, n) is None
    ]
