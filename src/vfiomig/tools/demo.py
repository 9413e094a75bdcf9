"""`vfiomig demo`: see what each dirty-tracking design costs the same guest: the main job on
a representative guest, then the seed's argument in one table.

1. `vfiomig migrate` of a guest with a HiSilicon ZIP VF (hisi_acc) compressing jobs its
   driver posts in guest memory, iommufd with IOMMU dirty tracking at 4 KiB IOPTEs: the
   summary, as the command prints it;
2. the same guest with huge IOPTEs (the IOMMU reports dirt per 2 MiB leaf), and behind a
   legacy type1 container (no dirty tracker, so QEMU blocks it unless enable-migration=on,
   and then every sync reports all of RAM: it does not converge at 300 ms, and with a 30 s
   limit its downtime carries the whole guest);
3. labelled apart, since hisi_acc has no DMA logging: a guest with the `reference` device,
   once tracked by the device's own DMA log and once, with x-device-dirty-page-tracking=off,
   by the IOMMU.

Every row is a full migration through the VFIO/iommufd uAPI on two model hosts, verified
(RAM equal, device state as its driver carries it, every ZIP job completed exactly once).
Times are simulated (see README: what they do and do not mean).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace

from vfiomig.sim.report import print_summary
from vfiomig.sim.run import Result
from vfiomig.sim.run import run as simulate
from vfiomig.sim.scenario import Scenario
from vfiomig.sim.workload import Workload
from vfiomig.tools import helptext
from vfiomig.tools.options import add_iommu_hw_argument, arg_type, parse_size
from vfiomig.vmm.params import Params
from vfiomig.vmm.vm import DeviceConfig

M = 1 << 20


EXAMPLES = (
    ("vfiomig demo", "what `make demo` runs: a 256 MiB guest"),
    ("vfiomig demo --memory 64M --seed 7", "a smaller guest (quicker), another seed"),
    ("vfiomig demo --iommu-hw vtd", "the same table behind the Intel VT-d model"),
)

EXIT_STATUS = (
    (
        0,
        "every row as expected: verified (the source intact where a run was cancelled), or "
        "blocked where QEMU blocks it",
    ),
    (1, "a row was not (a migration lost or damaged the guest)"),
    (2, "usage error"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helptext.apply(
        parser,
        __doc__ or "",
        [helptext.examples(*EXAMPLES), helptext.exit_status(*EXIT_STATUS)],
    )
    parser.add_argument(
        "--memory", type=arg_type(parse_size), default=256 * M, metavar="SIZE",
        help="guest RAM (default 256M; 64M to 4G)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="simulation seed (default 1)")
    add_iommu_hw_argument(parser)


@dataclass
class Row:
    name: str
    sc: Scenario
    note: str = ""
    res: Result | None = field(default=None, repr=False)


def rows(base: Scenario) -> list[Row]:
    hisi = [DeviceConfig("hisi_acc")]
    ref = [DeviceConfig("reference", {"dma_logging": True, "migration_flags": 7})]
    ref_off = [DeviceConfig("reference", {"dma_logging": True, "migration_flags": 7}, False)]
    on = replace(base, devices=hisi, iommu="type1", enable_migration="on")
    return [
        Row("iommufd, 4 KiB IOPTEs", replace(base, devices=hisi)),
        Row("iommufd, 2 MiB IOPTEs", replace(base, devices=hisi, hugepages=True)),
        Row("type1 (enable-migration=auto)", replace(base, devices=hisi, iommu="type1")),
        Row("type1 (enable-migration=on)", replace(on, max_time=20)),
        Row("type1 (on, downtime-limit 30 s)", replace(on, params=Params(downtime_limit=30000))),
        Row("reference: device DMA logging", replace(base, devices=ref), "other device"),
        Row("reference: IOMMU (tracking=off)", replace(base, devices=ref_off), "other device"),
    ]


def run(args: argparse.Namespace) -> int:
    if not 64 * M <= args.memory <= 4 << 30 or args.memory % (2 * M):
        print("vfiomig demo: --memory must be a multiple of 2M from 64M to 4G", file=sys.stderr)
        return 2
    if args.seed < 0:
        print("vfiomig demo: --seed must be >= 0", file=sys.stderr)
        return 2
    wss = max(args.memory // 4, 16 * M)
    base = Scenario(
        memory=args.memory,
        iommu_hw=args.iommu_hw,
        workload=Workload("hotcold", wss=wss, hot=wss // 8, rate=96 * M),
        seed=args.seed,
        max_time=60,
    )
    table = rows(base)
    print("$ vfiomig migrate " + argv_of(table[0].sc))
    table[0].res = simulate(table[0].sc)
    print_summary(table[0].res)
    print()
    for r in table[1:]:
        r.res = simulate(r.sc)
    print_table(table)
    ok = all(_ok(r) for r in table)
    return 0 if ok else 1


def _ok(r: Row) -> bool:
    """A row is as expected when it verified, or is the type1 run QEMU blocks / that never
    converges (both are the point of the row)."""
    assert r.res is not None
    return r.res.verified or bool(r.res.blocked)


def argv_of(sc: Scenario) -> str:
    w = sc.workload
    dev = " ".join(f"--device {d.kind}" for d in sc.devices)
    return (
        f"--memory {sc.memory // M}M {dev} --iommu {sc.iommu} --iommu-hw {sc.iommu_hw} "
        f"--workload {w.kind},wss={w.wss // M}M,hot={w.hot // M}M,rate={w.rate // M}M "
        f"--seed {sc.seed}"
    )


def _verdict(res: Result) -> str:
    """Completed: the destination checked; otherwise: the source checked after recovery."""
    if res.status == "completed":
        return "yes" if res.verified else "NO"
    return "source intact" if res.verified else "source DAMAGED"


def print_table(table: list[Row]) -> None:
    head = (
        f"{'the same guest, migrated with':34} {'status':10} {'total ms':>9} {'downtime ms':>11} "
        f"{'MiB sent':>9} {'syncs':>5}  verified"
    )
    print(head)
    print("-" * len(head))
    for r in table:
        res = r.res
        assert res is not None
        if r.note and r is table[5]:
            print("(hisi_acc has no DMA logging: the same guest with a `reference` device)")
        if res.blocked:
            print(f"{r.name:34} {'blocked':10}  {res.blocked[0].split(': ', 1)[1]}")
            continue
        m = res.mig
        assert m is not None
        s = m.stats
        down = f"{s.downtime * 1000:.0f}" if res.status == "completed" else "-"
        print(
            f"{r.name:34} {res.status:10} {s.total_time * 1000:9.0f} {down:>11} "
            f"{s.transferred / M:9.1f} {s.dirty_sync_count:5}  {_verdict(res)}"
        )
