"""What a user sees: QEMU's query-migrate reply, a summary table, live progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vfiomig.sim.costs import CostModel
from vfiomig.sim.run import Result
from vfiomig.vmm.guest_ram import PAGE
from vfiomig.vmm.migration import Migration


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def query_migrate(res: Result) -> dict[str, Any]:
    """QEMU's ``query-migrate`` reply (MigrationInfo) with vfiomig's facts under ``vfiomig``.

    A completed run gets the completed reply; any other the last reply while it was active
    (expected-downtime, ram.remaining, ram.dirty-pages-rate) with its final status."""
    out: dict[str, Any] = {"status": res.status}
    m = res.mig
    if res.blocked:
        out["blocked-reasons"] = list(res.blocked)
    if m is not None:
        s = m.stats
        ram: dict[str, Any] = {
            "transferred": s.transferred,
            "total": res.scenario.memory,
            "duplicate": s.duplicate,
            "normal": s.normal,
            "normal-bytes": s.normal * PAGE,
            "dirty-sync-count": s.dirty_sync_count,
            "mbps": round(s.mbps, 3),
            "page-size": PAGE,
            "precopy-bytes": s.precopy_bytes,
            "downtime-bytes": s.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
            "pages-per-second": int(s.normal / s.total_time) if s.total_time else 0,
            "skipped": 0,
        }
        out["total-time"] = _ms(s.total_time)
        out["setup-time"] = _ms(s.setup_time)
        if res.status == "completed":
            out["downtime"] = _ms(s.downtime)
        else:
            out["expected-downtime"] = int(round(s.expected_downtime))
            ram["remaining"] = m.ram_remaining()
            ram["dirty-pages-rate"] = s.dirty_pages_rate
        out["ram"] = ram
        if m.devices:
            out["vfio"] = {"transferred": s.vfio_transferred}
        if res.scenario.params.cap("auto-converge"):
            out["cpu-throttle-percentage"] = s.throttle_pct
    if res.error:
        out["error-desc"] = res.error
    out["vfiomig"] = _facts(res)
    return out


def _facts(res: Result) -> dict[str, Any]:
    m = res.mig
    f: dict[str, Any] = {
        "tracker": res.tracker,
        "verified": res.verified,
        "corruption": res.corruption,
        "findings": res.findings,
        "warnings": res.warnings,
        "ram-content": res.scenario.mode,
        "wall-seconds": round(res.wall, 3),
    }
    if m is not None:
        f["iterations"] = m.stats.iterations
        f["sync-times"] = [round(t, 4) for t in m.stats.sync_times]
        f["stream-bytes"] = m.stats.transferred
        f["events"] = [{"time": round(t, 4), "what": w} for t, w in m.events]
        if res.status != "completed" and m.failed_step:
            f["failed-step"] = m.failed_step
        f["devices"] = [
            {"name": d.name, "flags": d.flags.name, "transitions": d.transitions} for d in m.devices
        ]
    f["cost-model"] = CostModel().table()
    return f


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1 << 20 else f"{n / 2**20:.1f} MiB"


def print_summary(res: Result) -> None:
    sc = res.scenario
    m = res.mig
    devs = ", ".join(d.kind for d in sc.devices) or "none (a plain VM)"
    print(f"guest: {sc.memory >> 20} MiB ({sc.mode}), devices: {devs}; {sc.workload.describe()}")
    print(f"dirty tracking: {res.tracker}")
    for w in res.warnings:
        print(f"warning: {w}")
    if res.blocked:
        print("migration blocked:")
        for r in res.blocked:
            print(f"  - {r}")
        return
    if m is not None:
        s = m.stats
        rows = [
            ("status", res.status),
            ("total time", f"{s.total_time * 1000:.0f} ms (simulated)"),
            (
                "downtime" if res.status == "completed" else "expected downtime",
                f"{(s.downtime * 1000 if res.status == 'completed' else s.expected_downtime):.0f} ms",
            ),
            ("setup time", f"{s.setup_time * 1000:.1f} ms"),
            (
                "transferred",
                f"{s.transferred / 2**20:.1f} MiB (RAM {s.ram_transferred / 2**20:.1f}"
                f" MiB, device state {_bytes(s.vfio_transferred)})",
            ),
            ("pages", f"{s.normal} normal, {s.duplicate} zero"),
            ("dirty syncs", str(s.dirty_sync_count)),
            ("passes over RAM", str(s.iterations)),
        ]
        if sc.params.cap("auto-converge"):
            rows.append(("cpu throttle", f"{s.throttle_pct} %"))
        for k, v in rows:
            print(f"  {k:18} {v}")
    if res.error:
        print(f"error: {res.error}")
    for f in res.findings:
        print(f"finding: {f}")
    for c in res.corruption:
        print(f"CORRUPTION: {c}")
    verdict = "verified" if res.verified else "NOT verified"
    print(f"result: {verdict} ({res.wall:.1f} s of wall time)")


def progress_printer() -> tuple[Callable[[Migration], None], Callable[[], None]]:
    """A live line on the terminal: iteration, remaining dirty bytes, throughput, expected
    downtime (rich's Live display); returns (update, stop)."""
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    live = Live(console=console, transient=True, auto_refresh=False)
    live.start()

    def show(m: Migration) -> None:
        s = m.stats
        live.update(
            f"[bold]t={m.now:.1f}s[/] pass {s.iterations} dirty "
            f"{m.ram_remaining() / 2**20:.1f} MiB {s.mbps:.0f} Mbit/s expected downtime "
            f"{s.expected_downtime:.0f} ms syncs {s.dirty_sync_count}",
            refresh=True,
        )

    return show, live.stop
