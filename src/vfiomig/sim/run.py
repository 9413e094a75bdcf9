"""Run one scenario: build both hosts, start the guest, migrate, verify, report.

Verification (the judge) after a completed migration: the destination's RAM equals the
source's at switchover (versions and bytes); each device holds the state its driver
transfers; the workload goes on at the destination (every device job completes exactly
once, correctly). After a failed or cancelled one: the source runs again with its RAM
untouched by the migration and every device RUNNING (unchanged, or reset as QEMU leaves it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.host import MigrationState, VfioError
from vfiomig.sim.costs import CostModel
from vfiomig.sim.devices import DEFAULTS, DeviceLoad, ReferenceLoad
from vfiomig.sim.scenario import Host, Scenario, build_host
from vfiomig.sim.truth import GroundTruth
from vfiomig.sim.world import SimWorld
from vfiomig.vmm.channel import Channel, LinkChannel
from vfiomig.vmm.destination import Destination
from vfiomig.vmm.guest_ram import PAGE, GuestRam
from vfiomig.vmm.migration import Migration
from vfiomig.vmm.vm import Vm

# Each device gets SHARE bytes of the device window, from 1 MiB up: a guest never gives a
# device DMA address 0 (hisi_acc refuses to resume a queue whose EQ is at 0: "resume dma
# addr is NULL!"). Four devices at most.
FIRST_SHARE = 1 << 20
SHARE = 3 << 20
MAX_DEVICES = 4
WARMUP = 0.5  # s the guest runs before migration starts (devices get busy)
AFTER = 1.0  # s the guest runs after migration, on whichever host it lives


@dataclass
class Result:
    scenario: Scenario
    status: str
    mig: Migration | None = None
    blocked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verified: bool = False
    corruption: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    error: str = ""
    tracker: str = "none"
    wall: float = 0.0
    sim_time: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 completed and verified, 1 corruption or failed, 3 cancelled, 4 blocked."""
        if self.blocked:
            return 4
        if self.status == "cancelled":
            return 3 if not self.corruption else 1
        if self.status == "completed" and self.verified:
            return 0
        return 1


def device_loads(host: Host, sc: Scenario, truth: GroundTruth) -> list[DeviceLoad]:
    """Each device's workload, in the device window at the top of guest RAM."""
    loads: list[DeviceLoad] = []
    vm = host.vm
    for i, (cfg, path) in enumerate(zip(sc.devices, host.paths, strict=True)):
        wl = {**DEFAULTS.get(cfg.kind, {}), **cfg.workload}
        iova = iova_of(vm, share_offset(i) // PAGE)
        if cfg.kind == "reference":
            loads.append(
                ReferenceLoad(truth.hw(path), iova, int(wl["rate"]), int(wl["churn"]), sc.seed + i)
            )
        elif cfg.kind == "hisi_acc":
            from vfiomig.sim.hisi import HisiZipLoad

            offset = share_offset(i)
            loads.append(
                HisiZipLoad(truth.hw(path), iova, vm.ram, offset, int(wl["jobs"]), sc.seed + i)
            )
    return loads


def share_offset(i: int) -> int:
    """Where device ``i``'s share of the device window (the bottom of guest RAM) starts."""
    return FIRST_SHARE + i * SHARE


def iova_of(vm: Vm, page: int) -> int:
    for s in vm.sections:
        if s.page <= page < s.page + s.npages:
            return s.iova + (page - s.page) * PAGE
    raise ValueError(f"guest page {page} is not mapped")


def compare_ram(src: GuestRam, dst: GuestRam) -> list[str]:
    """Every page of the destination equals the source's (both planes)."""
    out: list[str] = []
    if src.versions is not None and dst.versions is not None:
        bad = np.flatnonzero(src.versions != dst.versions)
        if bad.size:
            out.append(f"RAM: {bad.size} pages differ (first at page {int(bad[0])}, versions)")
    for a, b in zip(src.backed_chunks(), dst.backed_chunks(), strict=True):
        diff = _differing_pages(a.buf.array, b.buf.array)
        if diff.size:
            first = a.first_page + int(diff[0])
            out.append(f"RAM: {diff.size} pages differ (first at page {first}, bytes)")
    return out


COMPARE_BLOCK = 64 << 20  # bytes compared per numpy pass (bounded temporaries)


def _differing_pages(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Indexes of the 4 KiB pages where two equal-sized byte arrays differ."""
    found = []
    for off in range(0, a.size, COMPARE_BLOCK):
        x = a[off : off + COMPARE_BLOCK].view("<u8")
        y = b[off : off + COMPARE_BLOCK].view("<u8")
        if not np.array_equal(x, y):
            rows = (x != y).reshape(-1, PAGE // 8).any(axis=1)
            found.append(np.flatnonzero(rows) + off // PAGE)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def run(
    sc: Scenario,
    *,
    costs: CostModel | None = None,
    progress: Callable[[Migration], None] | None = None,
    inject: Callable[[Host, Host, Migration | None, Channel | None], None] | None = None,
) -> Result:
    """Migrate the scenario's guest from a source host to a destination host."""
    costs = costs or CostModel()
    wall0 = time.perf_counter()
    src = build_host(sc, source=True)
    dst = build_host(sc, source=False)
    res = Result(sc, "setup")
    try:
        return _run(sc, costs, src, dst, res, progress, inject)
    finally:
        res.wall = time.perf_counter() - wall0
        src.vm.close()
        dst.vm.close()


def _run(
    sc: Scenario,
    costs: CostModel,
    src: Host,
    dst: Host,
    res: Result,
    progress: Callable[[Migration], None] | None,
    inject: Callable[[Host, Host, Migration | None, Channel | None], None] | None,
) -> Result:
    res.blocked = src.vm.blockers(sc.enable_migration)
    res.warnings = list(src.vm.warnings)
    if sc.params.cap("postcopy-ram") and src.vm.devices:
        res.status = "failed"
        res.error = "VFIO migration is not supported with postcopy migration"
        return res
    if res.blocked:
        res.status = "none"
        return res
    truth_s, truth_d = GroundTruth(src.kernel), GroundTruth(dst.kernel)
    loads = device_loads(src, sc, truth_s)
    world = SimWorld(src.vm.ram, sc.workload, loads, sc.seed)
    world.advance(WARMUP)
    world.now = 0.0
    dest = Destination(
        dst.vm,
        now=lambda: world.now,
        load_rate=costs.device_load_rate.value,
        latency=costs.link_latency.value,
    )
    rate = float(sc.link or costs.loopback_rate.value)
    chan = LinkChannel(rate, costs.link_latency.value, dest.receive)
    mig = Migration(
        src.vm,
        chan,
        world,
        costs,
        sc.params,
        tracker=sc.tracker,
        max_time=sc.max_time,
        progress=progress,
        dest_ack=lambda: dest.ack_time,
        dest_busy=lambda: dest.busy_until,
    )
    res.mig = mig
    if inject is not None:
        inject(src, dst, mig, chan)
    try:
        dest.setup()
    except VfioError as e:
        res.status, res.error = "failed", f"destination: {e}"
        return res
    status = mig.run()
    res.status = status
    res.tracker = mig.tracker.label if mig.tracker else "none"
    res.sim_time = mig.stats.total_time
    if status == "completed":
        _verify_completed(sc, src, dst, dest, world, loads, truth_s, truth_d, res)
    else:
        res.error = f"{mig.failed_step}: {mig.failure}" if mig.failure else res.error
        dest.abort()
        _verify_recovered(src, world, loads, mig, res)
    return res


def _verify_completed(
    sc: Scenario,
    src: Host,
    dst: Host,
    dest: Destination,
    world: SimWorld,
    loads: list[DeviceLoad],
    truth_s: GroundTruth,
    truth_d: GroundTruth,
    res: Result,
) -> None:
    res.corruption += compare_ram(src.vm.ram, dst.vm.ram)
    src_states = [truth_s.device_state(p) for p in src.paths]
    try:
        dest.start()
    except (VfioError, Exception) as e:  # noqa: BLE001 - a refused load is a verdict
        res.corruption.append(f"destination refused to start: {e}")
        return
    for cfg, p, want in zip(sc.devices, dst.paths, src_states, strict=True):
        got = truth_d.device_state(p)
        if got != want:  # what the driver carries, so any difference is a loss
            res.corruption.append(f"{cfg.kind}: {_state_diff(want, got)}")
    cpu = json.loads(dest.cpu or b"{}")
    for i, (load, p, st) in enumerate(zip(loads, dst.paths, cpu.get("drivers", []), strict=False)):
        load.move(truth_d.hw(p), st, iova_of(dst.vm, share_offset(i) // PAGE), dst.vm.ram)
    world.ram = dst.vm.ram
    world.start_vcpus()
    world.advance(AFTER)
    for load in loads:
        res.corruption += [f"{load.kind} after migration: {m}" for m in load.check()]
    res.verified = not res.corruption


def _state_diff(want: Any, got: Any) -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        return f"device state differs after resume in {keys}"
    return "device state differs after resume"


def source_recovered(src: Host, mig: Migration) -> list[str]:
    """What is wrong with the source after a failed or cancelled migration: its RAM must be
    as it was when the migration stopped (recovery wrote nothing into it) and every device
    RUNNING (unchanged, or reset as QEMU leaves it)."""
    out = []
    if src.vm.ram.digest() != mig.ram_digest_at_failure:
        out.append("source RAM changed while the migration was undone")
    for pd in src.vm.devices:
        state = pd.dev.get_state()
        if state != MigrationState.RUNNING:
            out.append(f"{pd.name}: left in {MigrationState(state).name}")
    return out


def _verify_recovered(
    src: Host, world: SimWorld, loads: list[DeviceLoad], mig: Migration, res: Result
) -> None:
    """After failure/cancel: the source as source_recovered checks it, and the guest goes on."""
    res.corruption += source_recovered(src, mig)
    world.start_vcpus()
    world.advance(AFTER)
    for load in loads:
        res.corruption += [f"{load.kind} after recovery: {m}" for m in load.check()]
    res.verified = not res.corruption
