"""The migration FSM, exhaustively, against oracles that do not share the kernel's table.

Oracle 1: a breadth-first search over the direct arcs the uAPI header's comment lists
(parsed from linux/vfio.h in the ziglang wheel), reduced for the device's flags as the uAPI
says ("states behave as though the device was fully running if not supported"; "arcs
touching PRE_COPY and PRE_COPY_P2P are removed if support for PRE_COPY is not present"),
with its path rules: shortest path, no saving-group state inside a path unless the whole
path stays in the saving group (one session continues), and STOP_COPY -> PRE_COPY(_P2P)
refused.
Oracle 2: the tables of the spec (§1.5), copied here as text.
Oracle 3: the uAPI's data-fd rules (§1.6).

The model is driven through ModelKernel ioctls; the arcs the driver executed are recorded by
wrapping the device's step() (ground truth below the uAPI, read only).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections import deque
from collections.abc import Callable
from errno import EBUSY, EINVAL, EIO, ENODEV
from pathlib import Path
from typing import Any

import pytest
from conftest import Dev, save_stream

from vfiomig.kernel import ModelKernel
from vfiomig.kernel import vfio_fsm as fsm
from vfiomig.kernel.vfio_fsm import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
)

NAMES = fsm.STATE_NAMES
SAVING = {STOP_COPY, PRE_COPY, PRE_COPY_P2P}
REQUESTS = [*range(9), 9, 255, 2**32 - 1]
FD_ARCS = {(RUNNING, PRE_COPY), (RUNNING_P2P, PRE_COPY_P2P), (STOP, STOP_COPY), (STOP, RESUMING)}
FLAG_SETS = (1, 3, 5, 7)


# ---------------------------------------------------------------------- oracle 1: uAPI text


def _header_text() -> str:
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        pytest.skip("ziglang (Linux uAPI headers) not installed")
    p = Path(spec.origin).parent / "lib/libc/include/any-linux-any/linux/vfio.h"
    return p.read_text()


@functools.cache
def uapi_arcs() -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(arcs, blocked arcs) from the FSM comment of linux/vfio.h."""
    text = _header_text()
    body = text[text.index("The FSM takes actions on the arcs") : text.index("any -> ERROR")]
    arcs: set[tuple[int, int]] = set()
    blocked: set[tuple[int, int]] = set()
    group: list[tuple[int, int]] = []
    desc: list[str] = []

    def flush() -> None:
        (blocked if "not permitted" in " ".join(desc) else arcs).update(group)

    for line in body.splitlines():
        m = re.fullmatch(r"\s*\*\s+([A-Z_0-9]+) -> ([A-Z_0-9]+)\s*", line)
        if m:
            if desc:
                flush()
                group, desc = [], []
            group.append((NAMES.index(m[1]), NAMES.index(m[2])))
        else:
            desc.append(line)
    flush()
    return arcs, blocked


def reduced_arcs(flags: int) -> set[tuple[int, int]]:
    arcs, _ = uapi_arcs()
    out = set()
    for a, b in arcs:
        if not flags & fsm.MIG_PRE_COPY and {a, b} & {PRE_COPY, PRE_COPY_P2P}:
            continue
        if not flags & fsm.MIG_P2P:  # a P2P state behaves as its running twin
            a = {RUNNING_P2P: RUNNING, PRE_COPY_P2P: PRE_COPY}.get(a, a)
            b = {RUNNING_P2P: RUNNING, PRE_COPY_P2P: PRE_COPY}.get(b, b)
        if a != b:
            out.add((a, b))
    return out


def supported(flags: int) -> set[int]:
    s = {STOP, RUNNING, STOP_COPY, RESUMING}
    if flags & fsm.MIG_P2P:
        s.add(RUNNING_P2P)
    if flags & fsm.MIG_PRE_COPY:
        s.add(PRE_COPY)
    if flags & fsm.MIG_P2P and flags & fsm.MIG_PRE_COPY:
        s.add(PRE_COPY_P2P)
    return s


def oracle(flags: int, cur: int, new: int) -> list[tuple[int, ...]] | None:
    """All shortest valid paths (as tuples of states after cur), or None for EINVAL."""
    if cur == new:
        return [()]
    _, blocked = uapi_arcs()
    if cur == ERROR or new not in supported(flags) or (cur, new) in blocked:
        return None
    arcs = reduced_arcs(flags)
    all_saving = cur in SAVING and new in SAVING
    best: list[tuple[int, ...]] = []
    queue: deque[tuple[int, ...]] = deque([()])
    while queue:
        path = queue.popleft()
        if best and len(path) >= len(best[0]):
            break
        here = path[-1] if path else cur
        for a, b in sorted(arcs):
            if a != here or b in path or b == cur:
                continue
            if b == new:
                best.append((*path, b))
            elif b not in SAVING or all_saving:
                queue.append((*path, b))
    return best or None


def test_oracle_parses_the_header() -> None:
    arcs, blocked = uapi_arcs()
    assert blocked == {(STOP_COPY, PRE_COPY), (STOP_COPY, PRE_COPY_P2P)}
    assert len(arcs) == 15 and (PRE_COPY_P2P, STOP_COPY) in arcs


# ---------------------------------------------------------------------- oracle 2: spec §1.5

SPEC_TABLES = {
    1: """
| STOP | — | RUNNING | STOP_COPY | RESUMING |
| RUNNING | STOP | — | STOP→STOP_COPY | STOP→RESUMING |
| STOP_COPY | STOP | STOP→RUNNING | — | STOP→RESUMING |
| RESUMING | STOP | STOP→RUNNING | STOP→STOP_COPY | — |
""",
    3: """
| STOP | — | RUNNING_P2P→RUNNING | STOP_COPY | RESUMING | RUNNING_P2P |
| RUNNING | RUNNING_P2P→STOP | — | RUNNING_P2P→STOP→STOP_COPY | RUNNING_P2P→STOP→RESUMING | RUNNING_P2P |
| STOP_COPY | STOP | STOP→RUNNING_P2P→RUNNING | — | STOP→RESUMING | STOP→RUNNING_P2P |
| RESUMING | STOP | STOP→RUNNING_P2P→RUNNING | STOP→STOP_COPY | — | STOP→RUNNING_P2P |
| RUNNING_P2P | STOP | RUNNING | STOP→STOP_COPY | STOP→RESUMING | — |
""",
    5: """
| STOP | — | RUNNING | STOP_COPY | RESUMING | RUNNING→PRE_COPY |
| RUNNING | STOP | — | STOP→STOP_COPY | STOP→RESUMING | PRE_COPY |
| STOP_COPY | STOP | STOP→RUNNING | — | STOP→RESUMING | **EINVAL** (pre-7.2: hang) |
| RESUMING | STOP | STOP→RUNNING | STOP→STOP_COPY | — | STOP→RUNNING→PRE_COPY |
| PRE_COPY | RUNNING→STOP | RUNNING | STOP_COPY | RUNNING→STOP→RESUMING | — |
""",
    7: """
| STOP | — | RUNNING_P2P→RUNNING | STOP_COPY | RESUMING | RUNNING_P2P | RUNNING_P2P→RUNNING→PRE_COPY | RUNNING_P2P→PRE_COPY_P2P |
| RUNNING | RUNNING_P2P→STOP | — | RUNNING_P2P→STOP→STOP_COPY | RUNNING_P2P→STOP→RESUMING | RUNNING_P2P | PRE_COPY | RUNNING_P2P→PRE_COPY_P2P |
| STOP_COPY | STOP | STOP→RUNNING_P2P→RUNNING | — | STOP→RESUMING | STOP→RUNNING_P2P | **EINVAL** | **EINVAL** |
| RESUMING | STOP | STOP→RUNNING_P2P→RUNNING | STOP→STOP_COPY | — | STOP→RUNNING_P2P | STOP→RUNNING_P2P→RUNNING→PRE_COPY | STOP→RUNNING_P2P→PRE_COPY_P2P |
| RUNNING_P2P | STOP | RUNNING | STOP→STOP_COPY | STOP→RESUMING | — | RUNNING→PRE_COPY | PRE_COPY_P2P |
| PRE_COPY | RUNNING→RUNNING_P2P→STOP | RUNNING | PRE_COPY_P2P→STOP_COPY | RUNNING→RUNNING_P2P→STOP→RESUMING | RUNNING→RUNNING_P2P | — | PRE_COPY_P2P |
| PRE_COPY_P2P | RUNNING_P2P→STOP | RUNNING_P2P→RUNNING | STOP_COPY | RUNNING_P2P→STOP→RESUMING | RUNNING_P2P | PRE_COPY | — |
""",
}
SPEC_COLUMNS = {
    1: [STOP, RUNNING, STOP_COPY, RESUMING],
    3: [STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P],
    5: [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY],
    7: [STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P],
}


def spec_table(flags: int) -> dict[tuple[int, int], tuple[int, ...] | None]:
    out: dict[tuple[int, int], tuple[int, ...] | None] = {}
    for line in SPEC_TABLES[flags].strip().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        src = NAMES.index(cells[0])
        for dst, cell in zip(SPEC_COLUMNS[flags], cells[1:], strict=True):
            if cell == "—":
                out[src, dst] = ()
            elif "EINVAL" in cell:
                out[src, dst] = None
            else:
                out[src, dst] = tuple(NAMES.index(s) for s in cell.split("→"))
    return out


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_step_function_matches_spec_tables_and_oracle(flags: int) -> None:
    table = spec_table(flags)
    for (cur, new), want in table.items():
        try:
            got: tuple[int, ...] | None = tuple(fsm.mig_path(flags, cur, new))
        except OSError:
            got = None
        assert got == want, (flags, NAMES[cur], NAMES[new])
        paths = oracle(flags, cur, new)
        assert (want is None) == (paths is None), (flags, NAMES[cur], NAMES[new])
        assert want is None or paths is not None and want in paths


def test_blocked_arc_returns_einval_instead_of_hanging() -> None:
    # Linux 7.2 "terminate skip loop on ERROR": before it this spun forever.
    for new in (PRE_COPY, PRE_COPY_P2P):
        with pytest.raises(OSError) as e:
            fsm.vfio_mig_get_next_state(7, STOP_COPY, new)
        assert e.value.errno == EINVAL


# ---------------------------------------------------------------------- through the uAPI

_STREAMS: dict[int, bytes] = {}


def _stream(k: ModelKernel, flags: int) -> bytes:
    if flags not in _STREAMS:
        src = Dev(k, migration_flags=flags, state_size=4096, chunk_size=4096, seed=7)
        _STREAMS[flags] = save_stream(src)
    return _STREAMS[flags]


def reach(k: ModelKernel, flags: int, cur: int) -> tuple[Dev, int]:
    """A fresh device in state `cur`, reached through the uAPI; returns (dev, data fd)."""
    d = Dev(k, migration_flags=flags, state_size=4096, chunk_size=4096)
    fd = -1
    if cur == ERROR:  # an injected hard failure on the first arc toward STOP
        d.vdev.fail_arc = (RUNNING, fsm.mig_path(flags, RUNNING, STOP)[0], "error")
        assert d.try_set_state(STOP)[0] == EIO
        d.vdev.fail_arc = None
    elif cur == RESUMING:
        data = _stream(k, flags)
        fd = d.set_state(RESUMING)
        assert k.write(fd, data) == len(data)
    elif cur != RUNNING:
        fd = d.set_state(cur)
    assert d.get_state() == cur
    return d, fd


def record_arcs(d: Dev) -> list[tuple[int, int]]:
    log: list[tuple[int, int]] = []
    vdev = d.vdev
    step: Callable[[int, int], Any] = vdev.step

    def logged(cur: int, new: int) -> Any:
        log.append((cur, new))
        return step(cur, new)

    vdev.step = logged
    return log


def _fd_alive(k: ModelKernel, fd: int, cur: int) -> bool:
    try:
        if cur == RESUMING:
            k.write(fd, b"")
        else:
            k.read(fd, 0)
    except OSError as e:
        assert e.errno == ENODEV  # session ended
        return False
    return True


@pytest.mark.parametrize(
    "flags,cur",
    [(f, s) for f in FLAG_SETS for s in [ERROR, *sorted(supported(f))]],
)
def test_every_request_from_every_state(flags: int, cur: int) -> None:
    k = ModelKernel()
    for new in REQUESTS:
        d, old_fd = reach(k, flags, cur)
        arcs = record_arcs(d)
        e, data_fd, _ = d.try_set_state(new)
        paths = oracle(flags, cur, new)
        where = (flags, NAMES[cur], new)
        if paths is None:
            assert (e, data_fd, arcs) == (EINVAL, -1, []), where
            assert d.get_state() == cur, where
            continue
        assert e == 0, where
        path = tuple(b for _, b in arcs)
        assert path in paths, (where, path, paths)
        assert d.get_state() == (cur if new == cur else new)
        # data fds: only from the final arc, and only on the arcs the uAPI names
        want_fd = bool(arcs) and arcs[-1] in FD_ARCS
        assert (data_fd >= 0) == want_fd, where
        assert not any(arc in FD_ARCS for arc in arcs[:-1]), where
        if old_fd >= 0 and cur in SAVING | {RESUMING}:
            # one session through the saving group; any other arc ends it
            continues = new == cur or cur in SAVING and new in SAVING
            assert _fd_alive(k, old_fd, cur) == continues, where
        for fd in (data_fd, old_fd):
            if fd >= 0:
                k.close(fd)
        d.close()
        k.close(d.iommufd)


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_failed_arc_leaves_last_good_state(flags: int) -> None:
    """Fail each arc of each multi-step path: SET fails with that errno, echoes the request,
    and GET shows the state reached before the failing arc."""
    k = ModelKernel()
    for cur in sorted(supported(flags) - {RESUMING}):
        for new in sorted(supported(flags)):
            if cur == STOP_COPY and new in (PRE_COPY, PRE_COPY_P2P):
                continue
            path = fsm.mig_path(flags, cur, new)
            for i, nxt in enumerate(path):
                d, fd = reach(k, flags, cur)
                prev = ([cur, *path])[i]
                d.vdev.fail_arc = (prev, nxt, EBUSY)
                e, data_fd, echoed = d.try_set_state(new)
                assert (e, data_fd) == (EBUSY, -1)
                assert echoed[:4] == new.to_bytes(4, "little")
                assert d.get_state() == prev, (flags, NAMES[cur], NAMES[new], i)
                d.vdev.fail_arc = None


def test_set_to_current_state_is_a_noop_even_in_error(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(migration_flags=7)
    arcs = record_arcs(d)
    assert d.try_set_state(RUNNING)[:2] == (0, -1)
    d.vdev.fail_arc = (RUNNING, RUNNING_P2P, "error")
    assert d.try_set_state(STOP)[0] == EIO
    assert d.get_state() == ERROR
    assert d.try_set_state(ERROR)[:2] == (0, -1)  # ERROR -> ERROR: loop never runs
    assert d.try_set_state(RUNNING)[:2] == (EINVAL, -1)  # WARN + EINVAL
    assert d.vdev.warnings  # the kernel WARNs leaving ERROR through SET
    d.reset()
    assert d.get_state() == RUNNING
    assert arcs == [(RUNNING, RUNNING_P2P)]
