"""The VFIO migration state machine, as literal data (drivers/vfio/vfio_main.c).

This file is the single source of the FSM: `vfio_from_fsm_table` and `state_flags_table`
are copied cell for cell from vfio_mig_get_next_state(), and the function of the same name
walks them exactly as the kernel does, including the Linux 7.2 fix ("vfio_mig_get_next_state:
terminate skip loop on ERROR"): the blocked arcs STOP_COPY -> PRE_COPY / PRE_COPY_P2P map to
ERROR, which is "unsupported" for every device, so the pre-7.2 skip loop spun forever; 7.2
stops the loop at ERROR and returns EINVAL.

The function is only the *step* function. A driver reaches a requested state by calling it
repeatedly (see vfio_migration.mig_set_state). `mig_path()` runs that loop on paper and is
meant for documentation and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from errno import EINVAL

from vfiomig.kernel.errors import err
from vfiomig.uapi import vfio as v

# enum vfio_device_mig_state and the migration flags, from the uAPI mirror (plain ints:
# they index the tables and are compared on every ioctl)
ERROR = int(v.VFIO_DEVICE_STATE_ERROR)
STOP = int(v.VFIO_DEVICE_STATE_STOP)
RUNNING = int(v.VFIO_DEVICE_STATE_RUNNING)
STOP_COPY = int(v.VFIO_DEVICE_STATE_STOP_COPY)
RESUMING = int(v.VFIO_DEVICE_STATE_RESUMING)
RUNNING_P2P = int(v.VFIO_DEVICE_STATE_RUNNING_P2P)
PRE_COPY = int(v.VFIO_DEVICE_STATE_PRE_COPY)
PRE_COPY_P2P = int(v.VFIO_DEVICE_STATE_PRE_COPY_P2P)
NUM_STATES = PRE_COPY_P2P + 1  # the tables' dimension
# The states in which VFIO_MIG_GET_PRECOPY_INFO answers (vfio_check_precopy_ioctl's drivers).
PRECOPY_STATES = (PRE_COPY, PRE_COPY_P2P)

STATE_NAMES: tuple[str, ...] = (
    "ERROR",
    "STOP",
    "RUNNING",
    "STOP_COPY",
    "RESUMING",
    "RUNNING_P2P",
    "PRE_COPY",
    "PRE_COPY_P2P",
)

MIG_STOP_COPY = v.VFIO_MIGRATION_STOP_COPY
MIG_P2P = v.VFIO_MIGRATION_P2P
MIG_PRE_COPY = v.VFIO_MIGRATION_PRE_COPY
# The flag sets the uAPI defines; every other combination is "to be defined".
VALID_MIGRATION_FLAGS = (
    MIG_STOP_COPY,
    MIG_STOP_COPY | MIG_P2P,
    MIG_STOP_COPY | MIG_PRE_COPY,
    MIG_STOP_COPY | MIG_P2P | MIG_PRE_COPY,
)

_E, _S, _R, _SC, _RS, _RP, _PC, _PP = range(NUM_STATES)

# vfio_from_fsm_table[cur][new] = next single step from cur toward new.
# Columns in enum order: ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY,
# PRE_COPY_P2P. Only STOP_COPY -> PRE_COPY(_P2P) are blocked (ERROR) besides ERROR itself.
# fmt: off
vfio_from_fsm_table: tuple[tuple[int, ...], ...] = (
    # to:  E   S    R    SC   RS   RP   PC   PP
    (_E, _E,  _E,  _E,  _E,  _E,  _E,  _E),   # from ERROR
    (_E, _S,  _RP, _SC, _RS, _RP, _RP, _RP),  # from STOP
    (_E, _RP, _R,  _RP, _RP, _RP, _PC, _RP),  # from RUNNING
    (_E, _S,  _S,  _SC, _S,  _S,  _E,  _E),   # from STOP_COPY
    (_E, _S,  _S,  _S,  _RS, _S,  _S,  _S),   # from RESUMING
    (_E, _S,  _R,  _S,  _S,  _RP, _R,  _PP),  # from RUNNING_P2P
    (_E, _R,  _R,  _PP, _R,  _R,  _PC, _PP),  # from PRE_COPY
    (_E, _RP, _RP, _SC, _RP, _RP, _PC, _PP),  # from PRE_COPY_P2P
)

# state_flags_table[state] = migration_flags bits the device needs for that state.
# ERROR needs ~0U, which no device has: ERROR is never "supported".
state_flags_table: tuple[int, ...] = (
    0xFFFF_FFFF,                                  # ERROR
    MIG_STOP_COPY,                                # STOP
    MIG_STOP_COPY,                                # RUNNING
    MIG_STOP_COPY,                                # STOP_COPY
    MIG_STOP_COPY,                                # RESUMING
    MIG_STOP_COPY | MIG_P2P,                      # RUNNING_P2P
    MIG_STOP_COPY | MIG_PRE_COPY,                 # PRE_COPY
    MIG_STOP_COPY | MIG_P2P | MIG_PRE_COPY,       # PRE_COPY_P2P
)
# fmt: on


def state_supported(migration_flags: int, state: int) -> bool:
    """(state_flags_table[state] & migration_flags) == state_flags_table[state]."""
    need = state_flags_table[state]
    return need & migration_flags == need


def vfio_mig_get_next_state(
    migration_flags: int, cur: int, new: int, warn: Callable[[str], None] | None = None
) -> int:
    """The next single arc from `cur` toward `new`, or EINVAL (vfio_main.c, same name).

    `warn` receives the message of the kernel's WARN_ON (an unsupported or out-of-range
    current state, e.g. asking to leave ERROR); the errno is EINVAL either way.
    """
    if not 0 <= cur < NUM_STATES or not state_supported(migration_flags, cur):
        if warn is not None:
            warn(f"vfio_mig_get_next_state: current state {cur} not supported")
        raise err(EINVAL)
    if not 0 <= new < NUM_STATES or not state_supported(migration_flags, new):
        raise err(EINVAL)
    nxt = vfio_from_fsm_table[cur][new]
    # Skip unsupported intermediate states by re-indexing from the skipped state. The 7.2
    # fix ends the loop at ERROR (table[ERROR][*] == ERROR would spin forever).
    while nxt != ERROR and not state_supported(migration_flags, nxt):
        nxt = vfio_from_fsm_table[nxt][new]
    if nxt == ERROR:
        raise err(EINVAL)
    return nxt


def mig_path(migration_flags: int, cur: int, new: int) -> list[int]:
    """The arcs a driver executes from `cur` to `new` (empty when cur == new).

    Raises OSError(EINVAL) when the kernel would refuse the first step; a path is all or
    nothing here because every step's validity depends only on (flags, state, target).
    """
    path: list[int] = []
    while cur != new:
        cur = vfio_mig_get_next_state(migration_flags, cur, new)
        path.append(cur)
    return path


def state_from_name(name: str | int) -> int:
    """Accept "STOP_COPY", "stop_copy", "VFIO_DEVICE_STATE_STOP_COPY" or an int."""
    if isinstance(name, int):
        return name
    key = name.upper().removeprefix("VFIO_DEVICE_STATE_")
    try:
        return STATE_NAMES.index(key)
    except ValueError:
        raise ValueError(f"unknown migration state {name!r}") from None


def state_name(state: int) -> str:
    return STATE_NAMES[state] if 0 <= state < NUM_STATES else f"<{state}>"
