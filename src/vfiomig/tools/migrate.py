"""`vfiomig migrate`: live-migrate a guest with passthrough devices between two model hosts,
the way QEMU 10.0 does, in simulated time, and check the result.

Examples:
  vfiomig migrate --memory 4G --device hisi_acc --workload random,wss=256M,rate=64M
  vfiomig migrate --memory 1G,zero=0.9375 --workload sequential,wss=64M,rate=2G --json
  vfiomig migrate --device hisi_acc --iommu type1 --enable-migration on --downtime-limit 20000

Exit status: 0 completed and verified; 1 corruption detected or migration failed; 2 bad
usage; 3 cancelled (did not converge within --max-time); 4 blocked (QEMU's migration
blockers, listed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from typing import Any

from vfiomig.sim.devices import WORKLOAD_KEYS
from vfiomig.sim.report import print_summary, progress_printer, query_migrate
from vfiomig.sim.run import MAX_DEVICES
from vfiomig.sim.run import run as simulate
from vfiomig.sim.scenario import Scenario
from vfiomig.sim.workload import KINDS, Workload
from vfiomig.tools.options import (
    arg_type,
    parse_device_spec,
    parse_fraction,
    parse_kv_spec,
    parse_rate,
    parse_size,
)
from vfiomig.vmm.guest_ram import WINDOW
from vfiomig.vmm.params import CAPABILITIES, Params
from vfiomig.vmm.vm import DeviceConfig

TRACKING_KEY = "x-device-dirty-page-tracking"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    q = parser.add_argument_group("QEMU migration parameters and capabilities")
    q.add_argument("--downtime-limit", type=int, metavar="MS", help="default 300")
    q.add_argument(
        "--max-bandwidth",
        type=arg_type(parse_rate),
        metavar="B/s",
        help="pre-copy rate limit (default 128M)",
    )
    q.add_argument(
        "--avail-switchover-bandwidth",
        type=arg_type(_rate0),
        metavar="B/s",
        help="bandwidth assumed at switchover (default 0: measured)",
    )
    q.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="NAME",
        choices=CAPABILITIES,
        help=f"one of: {', '.join(CAPABILITIES)}; repeatable",
    )
    q.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another QEMU migration parameter, e.g. cpu-throttle-initial=30",
    )
    q.add_argument(
        "--enable-migration",
        choices=("auto", "on", "off"),
        help="vfio-pci enable-migration (default auto)",
    )
    g = parser.add_argument_group("guest and hosts")
    g.add_argument(
        "--memory",
        metavar="SIZE[,zero=F]",
        help="guest RAM (default 1G); F: the fraction of pages that start zero (default 0)",
    )
    g.add_argument(
        "--ram-content",
        choices=("bytes", "versions"),
        help="real bytes (default up to 4G) or per-page write versions",
    )
    g.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="KIND[,opts]",
        help="a passthrough device (hisi_acc, reference, mtty) with model options,"
        f" workload keys and {TRACKING_KEY}=off; repeatable",
    )
    g.add_argument("--iommu", choices=("iommufd", "type1"), help="VFIO backend (default iommufd)")
    g.add_argument(
        "--iommu-hw",
        metavar="smmuv3|vtd|amd[,dirty=off]",
        help="the IOMMU model (default smmuv3); dirty=off: it cannot track",
    )
    g.add_argument("--hugepages", choices=("on", "off"), help="huge IOPTEs (default off)")
    g.add_argument(
        "--workload",
        metavar="SPEC",
        help=f"vCPU writes: {' | '.join(KINDS)}, e.g. random,wss=256M,rate=64M",
    )
    g.add_argument(
        "--link",
        type=arg_type(parse_rate),
        metavar="RATE",
        help="link rate, e.g. 10Gbit or 1G (default: loopback, 2 GB/s)",
    )
    s = parser.add_argument_group("simulation")
    s.add_argument(
        "--tracker",
        choices=("auto", "cpu-only"),
        help="cpu-only ignores device writes: unsafe, to show the failure",
    )
    s.add_argument("--seed", type=int, help="default 1")
    s.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="cancel after this much simulated time (default 60)",
    )
    s.add_argument(
        "--scenario",
        metavar="FILE.toml",
        help="options from a TOML file (keys are the option names; the command line wins)",
    )
    s.add_argument("--to", metavar="file:PATH", help="save the stream to a file instead")
    s.add_argument("--json", action="store_true", help="print query-migrate's reply as JSON")


def _rate0(text: str) -> int:
    return parse_rate(text, allow_zero=True)


# -- building a Scenario from the options -------------------------------------------------


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """ValueError with a one-line message for anything that does not make sense."""
    toml: dict[str, Any] = {}
    if args.scenario:
        try:
            with open(args.scenario, "rb") as f:
                toml = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--scenario {args.scenario}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--scenario {args.scenario}: {e}") from None

    def opt(name: str, default: Any = None) -> Any:
        v = getattr(args, name.replace("-", "_"), None)
        if v not in (None, []):
            return v
        return toml.get(name, default)

    sc = Scenario()
    mem = str(opt("memory", "1G"))
    size_text, extra = _split_first(mem)
    sc.memory = parse_size(size_text)
    for k, v in extra.items():
        if k != "zero":
            raise ValueError(f"--memory: unknown option {k!r} (only zero=F)")
        sc.zero = parse_fraction(v)
    if sc.memory % (2 << 20) or sc.memory < 32 << 20 or sc.memory > 1 << 40:
        raise ValueError("--memory must be a multiple of 2M between 32M and 1T")
    sc.ram_content = opt("ram-content")
    if sc.mode == "bytes" and sc.memory > 16 << 30:
        raise ValueError("--ram-content bytes is limited to 16G of guest RAM on this machine")
    devs = opt("device", [])
    sc.devices = [_device(d) for d in ([devs] if isinstance(devs, str) else devs)]
    if len(sc.devices) > MAX_DEVICES:
        raise ValueError(f"at most {MAX_DEVICES} --device (the guest's device window)")
    sc.iommu = opt("iommu", "iommufd")
    hw, hw_opts = _split_first(str(opt("iommu-hw", "smmuv3")))
    if hw not in ("smmuv3", "vtd", "amd"):
        raise ValueError(f"--iommu-hw {hw!r}: one of smmuv3, vtd, amd")
    sc.iommu_hw = hw
    for k, v in hw_opts.items():
        if k != "dirty" or v not in ("on", "off"):
            raise ValueError("--iommu-hw takes only dirty=on|off")
        sc.iommu_dirty = v == "on"
    sc.hugepages = _onoff(opt("hugepages", "off"), "--hugepages")
    sc.workload = parse_workload(str(opt("workload", "idle")))
    link = opt("link")
    sc.link = parse_rate(str(link)) if isinstance(link, str) else link
    sc.params = _params(args, toml, opt)
    sc.tracker = opt("tracker", "auto")
    sc.enable_migration = opt("enable-migration", "auto")
    sc.seed = int(opt("seed", 1))
    if sc.seed < 0:
        raise ValueError("--seed must be >= 0")
    sc.max_time = float(opt("max-time", 60.0))
    if not 0 < sc.max_time <= 86400:
        raise ValueError("--max-time must be within (0, 86400] seconds")
    sc.workload.check((sc.memory - WINDOW) // 4096)
    return sc


def _split_first(text: str) -> tuple[str, dict[str, str]]:
    kind, opts = parse_kv_spec(text)
    return kind, opts


def _onoff(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if v not in ("on", "off"):
        raise ValueError(f"{what} takes on or off, not {v!r}")
    return v == "on"


def _device(text: str) -> DeviceConfig:
    kind, _ = parse_kv_spec(text)
    keys = WORKLOAD_KEYS.get(kind, frozenset()) | {TRACKING_KEY}
    spec, extra = parse_device_spec(text, keys)
    tracking = _onoff(extra.pop(TRACKING_KEY, "on"), TRACKING_KEY)
    workload: dict[str, int] = {}
    for k, v in extra.items():
        workload[k] = parse_rate(v, allow_zero=True) if k == "rate" else _count(k, v)
    return DeviceConfig(spec.kind, dict(spec.options), tracking, workload)


def _count(key: str, v: str) -> int:
    try:
        n = int(v, 0)
    except ValueError:
        raise ValueError(f"device option {key}={v!r}: an integer >= 0") from None
    if n < 0:
        raise ValueError(f"device option {key}={v!r}: an integer >= 0")
    return n


def parse_workload(text: str) -> Workload:
    kind, opts = parse_kv_spec(text)
    if kind not in KINDS:
        raise ValueError(f"--workload {kind!r}: one of {', '.join(KINDS)}")
    allowed = {
        "idle": set(),
        "random": {"wss", "rate"},
        "sequential": {"wss", "rate"},
        "hotcold": {"wss", "rate", "hot", "hotfrac"},
    }[kind]
    for k in opts:
        if k not in allowed:
            raise ValueError(
                f"--workload {kind}: unknown key {k!r} (keys: {', '.join(sorted(allowed)) or 'none'})"
            )
    wl = Workload(kind)
    wl.wss = parse_size(opts.get("wss", "0"))
    wl.hot = parse_size(opts.get("hot", "0"))
    wl.rate = parse_rate(opts.get("rate", "0"), allow_zero=True)
    if "hotfrac" in opts:
        wl.hotfrac = parse_fraction(opts["hotfrac"])
    return wl


def _params(args: argparse.Namespace, toml: dict[str, Any], opt: Any) -> Params:
    p = Params()
    if opt("downtime-limit") is not None:
        p.downtime_limit = int(opt("downtime-limit"))
    for name in ("max-bandwidth", "avail-switchover-bandwidth"):
        v = opt(name)
        if v is not None:
            setattr(
                p,
                name.replace("-", "_"),
                parse_rate(str(v), allow_zero=True) if isinstance(v, str) else int(v),
            )
    caps = opt("capability", [])
    p.capabilities = set([caps] if isinstance(caps, str) else caps)
    p.check_capabilities()
    params = dict(toml.get("parameter", {}) or {})
    for item in args.parameter:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--parameter {item!r} is not NAME=VALUE")
        params[name] = value
    for name, value in params.items():
        p.set(name, str(value))
    p.check()
    return p


# -- running ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        sc = scenario_from_args(args)
    except ValueError as e:
        print(f"vfiomig migrate: {e}", file=sys.stderr)
        return 2
    if args.to is not None:
        return _run_to_file(sc, args.to, args.json)
    show, stop = progress_printer() if not args.json and sys.stderr.isatty() else (None, None)
    try:
        res = simulate(sc, progress=show)
    finally:
        if stop is not None:
            stop()
    if args.json:
        print(json.dumps(query_migrate(res), indent=2))
    else:
        print_summary(res)
    return res.exit_code


def _run_to_file(sc: Scenario, target: str, as_json: bool) -> int:
    from vfiomig.sim.savefile import SaveError, save

    if not target.startswith("file:") or len(target) <= len("file:"):
        print("vfiomig migrate: --to takes file:PATH", file=sys.stderr)
        return 2
    refused = [c for c in ("return-path", "switchover-ack", "postcopy-ram") if sc.params.cap(c)]
    if refused:
        print(
            f"vfiomig migrate: --to file: has no return path, so no {', '.join(refused)}",
            file=sys.stderr,
        )
        return 2
    path = target[len("file:") :]
    try:
        saved = save(sc, path)
    except SaveError as e:
        print(f"vfiomig migrate: --to file: cannot write {e}", file=sys.stderr)
        return 1
    res = saved.result
    if as_json:
        reply = query_migrate(res)
        reply["vfiomig"]["file"] = path
        if saved.restore is not None:
            reply["vfiomig"]["restore"] = saved.restore.message
        print(json.dumps(reply, indent=2))
    else:
        print_summary(res)
        if res.status != "none":
            check = f"; restore: {saved.restore.message}" if saved.restore else ""
            print(f"file: {path}{check}")
    return res.exit_code
