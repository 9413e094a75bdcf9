"""`vfiomig migrate`: live-migrate a guest with passthrough devices between two model hosts,
the way QEMU 10.0 does, in simulated time, and check the result: the destination's RAM and
device state against the source's at switchover, and the guest's work going on after it.

Examples:
  vfiomig migrate --memory 4G --device hisi_acc --workload random,wss=256M,rate=64M
  vfiomig migrate --memory 1G,zero=0.9375 --workload sequential,wss=64M,rate=2G --json
  vfiomig migrate --scenario guest.toml --seed 7 --to file:/tmp/guest.vmig

Exit status: 0 completed and verified; 1 corruption detected or migration failed; 2 bad
usage (one line on stderr says what is wrong); 3 cancelled (did not converge within
--max-time); 4 blocked (QEMU's migration blockers, listed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import date, datetime, time
from typing import Any, NoReturn, TypeVar

from vfiomig.host import VfioError
from vfiomig.hw.hisi_qm import PCI_DEVICE_ID_HUAWEI_ZIP_VF
from vfiomig.hw.iommu import VENDORS
from vfiomig.sim.devices import DEFAULTS, MODEL_DEFAULTS, WORKLOAD_KEYS
from vfiomig.sim.report import print_summary, progress_printer, query_migrate
from vfiomig.sim.run import MAX_DEVICES, Result
from vfiomig.sim.run import run as simulate
from vfiomig.sim.savefile import BYTES_MAX, MEMORY_MAX, MEMORY_MIN
from vfiomig.sim.scenario import Scenario
from vfiomig.sim.workload import KINDS, PAGE, Workload
from vfiomig.tools import helptext
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

T = TypeVar("T")
TRACKING_KEY = "x-device-dirty-page-tracking"
PARAMETERS = tuple(f.name.replace("_", "-") for f in fields(Params) if f.name != "capabilities")
RATE_PARAMETERS = ("max-bandwidth", "avail-switchover-bandwidth")  # also take 64M, 10Gbit
MAX_WORKLOAD_RATE = 64 << 30  # B/s of vCPU writes: beyond a guest's memory bandwidth
MAX_CHURN = 1_000_000  # reference device state changes per second
MAX_JOBS = 1_000_000  # hisi_acc ZIP jobs per second
MAX_TIME = 86400.0  # s of simulated time
NOT_IN_FILES = ("help", "scenario", "to", "json")  # options a scenario file cannot set
WORKLOAD_SPECS = {
    "idle": "idle",
    "random": "random,wss=SIZE,rate=RATE",
    "hotcold": "hotcold,wss=SIZE,hot=SIZE,rate=RATE[,hotfrac=F]",
    "sequential": "sequential,wss=SIZE,rate=RATE",
}
WORKLOAD_KEYS_BY_KIND = {
    "idle": (),
    "random": ("wss", "rate"),
    "sequential": ("wss", "rate"),
    "hotcold": ("wss", "rate", "hot", "hotfrac"),
}


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
        help=f"a QEMU migration parameter, one of: {', '.join(PARAMETERS)}; repeatable",
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
        help=f"guest RAM, a multiple of 2M from {MEMORY_MIN >> 20}M to {MEMORY_MAX >> 40}T "
        "(default 1G); F: the fraction of pages that start zero (default 0)",
    )
    g.add_argument(
        "--ram-content",
        choices=("bytes", "versions"),
        help=f"real bytes (default up to 4G, at most {BYTES_MAX >> 30}G) or per-page "
        "write versions",
    )
    g.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="KIND[,opts]",
        help=f"a passthrough device ({', '.join(_device_kinds())}) with model options, "
        f"workload keys and {TRACKING_KEY}=off; repeatable, at most {MAX_DEVICES}",
    )
    g.add_argument("--iommu", choices=("iommufd", "type1"), help="VFIO backend (default iommufd)")
    g.add_argument(
        "--iommu-hw",
        metavar=f"{'|'.join(VENDORS)}[,dirty=off]",
        help=f"the IOMMU model (default {VENDORS[0]}); dirty=off: it cannot track",
    )
    g.add_argument("--hugepages", choices=("on", "off"), help="huge IOPTEs (default off)")
    g.add_argument(
        "--workload",
        metavar="SPEC",
        help=f"vCPU writes: {' | '.join(KINDS)} (default idle), e.g. random,wss=256M,rate=64M",
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
        help=f"cancel after this much simulated time (default 60, at most {MAX_TIME:.0f})",
    )
    s.add_argument(
        "--scenario",
        metavar="FILE.toml",
        help="options from a TOML file (see Scenario files below; the command line wins)",
    )
    s.add_argument(
        "--to",
        metavar="file:PATH",
        help="migrate into a file (then restore it to check it; see vfiomig restore)",
    )
    s.add_argument("--json", action="store_true", help="print query-migrate's reply as JSON")
    parser.epilog = "\n\n".join(
        (
            _epilog(file_keys(parser)),
            helptext.model_devices("--device"),
            helptext.defect_list("defects=NAME+NAME in --device reference,..."),
        )
    )


def _rate0(text: str) -> int:
    return parse_rate(text, allow_zero=True)


def _device_kinds() -> list[str]:
    import vfiomig.kernel  # noqa: F401  (registers the device kinds)
    from vfiomig.kernel.machine import DRIVERS

    return sorted(DRIVERS)


def _wrap(text: str, indent: str = "    ", first: str = "  ") -> str:
    return textwrap.fill(
        text, width=88, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False
    )


def _epilog(keys: dict[str, argparse.Action]) -> str:
    unit = {"rate": "RATE", "churn": "N", "jobs": "N"}
    kinds = []
    for kind in _device_kinds():
        wl = DEFAULTS.get(kind, {})
        opts = ", ".join(f"{k}={unit.get(k, 'N')} (default {_shown(v)})" for k, v in wl.items())
        kinds.append(f"    {kind:10} {('workload: ' + opts) if opts else 'no workload keys'}")
    workloads = "\n".join(f"    {spec}" for spec in WORKLOAD_SPECS.values())
    devices = _wrap(
        "besides the model's own options (as `vfiomig probe --model` takes them, e.g. "
        f"reference,migration_flags=7) and QEMU's {TRACKING_KEY}=off. rate is in bytes per "
        "second; churn (state changes) and jobs (ZIP jobs, at least 1) are per second, at "
        f"most {MAX_CHURN}; a hisi_acc is a ZIP VF.",
        first="    ",
    )
    wl_note = _wrap(
        f"hot < wss <= the guest's RAM less its {WINDOW >> 20}M device window; hotfrac "
        "(default 0.9) is the share of writes that hit the hot set; rate at most "
        f"{MAX_WORKLOAD_RATE >> 30}G.",
        first="    ",
    )
    caps = _wrap(
        f"--capability: {', '.join(CAPABILITIES)}. switchover-ack needs return-path; "
        "postcopy-ram is refused with a --device (QEMU: VFIO migration is not supported "
        "with postcopy migration); --to file: takes none of return-path, switchover-ack, "
        "postcopy-ram."
    )
    params = _wrap(f"--parameter NAME=VALUE, QEMU's names and ranges: {', '.join(PARAMETERS)}.")
    valid = _wrap(f"Valid keys: {', '.join(keys)}.", indent="  ")
    return f"""\
Names and values:
  --device KIND[,opts]: KIND is one of
{chr(10).join(kinds)}
{devices}
  --workload SPEC: one of
{workloads}
{wl_note}
  --iommu-hw: {", ".join(VENDORS)}, with dirty=off for an IOMMU that cannot track.
{caps}
{params}
  Sizes: 4096, 64K, 1.5M, 4G, 1T (K, M, G, T are powers of 1024). Rates: a size per
  second (128M, 1GiB/s) or bits per second with decimal prefixes (800Mbit, 10Gbit).

Scenario files (--scenario FILE.toml): the keys are the long option names, the values what
the option takes (a string, or a number for the numeric ones); device and capability take
a string or a list of them; parameter is a table; hugepages takes true/false too:

    memory = "4G,zero=0.5"
    device = ["hisi_acc", "reference,rate=64M"]
    workload = "random,wss=256M,rate=64M"
    link = "10Gbit"
    downtime-limit = 500
    max-bandwidth = "1G"
    capability = ["auto-converge"]
    seed = 7

    [parameter]
    cpu-throttle-initial = 30

{valid}
  An unknown key is an error. The command line wins: an option given there replaces the
  file's value (device and capability: the whole list); parameter entries merge name by
  name, the command line's winning.
"""


def _shown(v: Any) -> str:
    return f"{v >> 20}M" if isinstance(v, int) and v >= 1 << 20 and not v % (1 << 20) else str(v)


def file_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a scenario file may set (long option names) and their argparse actions."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        longs = [o[2:] for o in action.option_strings if o.startswith("--")]
        if longs and longs[0] not in NOT_IN_FILES:
            keys[longs[0]] = action
    return keys


# -- scenario files -------------------------------------------------------------------------------


class _FileParser(argparse.ArgumentParser):
    """migrate's options, parsed from a scenario file's values: errors are ValueError."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _file_parser() -> argparse.ArgumentParser:
    p = _FileParser(prog="vfiomig migrate", add_help=False, allow_abbrev=False)
    add_arguments(p)
    return p


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, datetime | date | time):
        return "a date or time"
    return repr(v)


def _toml_scalar(key: str, v: Any, onoff: bool) -> str:
    """A scenario file's value as the command line would spell it."""
    if isinstance(v, bool):
        if onoff:
            return "on" if v else "off"
        raise ValueError(f"{key} = {str(v).lower()}: expected a string or a number")
    if isinstance(v, str | int | float):
        return str(v)
    raise ValueError(f"{key}: expected a string or a number, not {_toml_type(v)}")


def _toml_argv(key: str, value: Any, action: argparse.Action) -> list[str]:
    """The command-line arguments a scenario file's ``key = value`` stands for."""
    if key == "parameter":
        if not isinstance(value, dict):
            raise ValueError(
                f"parameter: expected a table (parameter = {{cpu-throttle-initial = 30}} "
                f"or a [parameter] section), not {_toml_type(value)}"
            )
        return [
            f"--parameter={name}={_toml_scalar(f'parameter.{name}', v, True)}"
            for name, v in value.items()
        ]
    if isinstance(action, argparse._AppendAction):  # device, capability
        items = value if isinstance(value, list) else [value]
        out = []
        for v in items:
            if not isinstance(v, str):
                raise ValueError(
                    f"{key}: expected a string or a list of strings, not {_toml_type(v)}"
                )
            out.append(f"--{key}={v}")
        return out
    if isinstance(value, dict):
        raise ValueError(f"{key}: expected a string or a number, not a table")
    return [f"--{key}={_toml_scalar(key, value, action.choices == ('on', 'off'))}"]


def load_scenario_file(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the scenario file's values where the command line gave none; the
    names of the options that came from the file in ``from_file``."""
    path = args.scenario
    try:
        with open(path, "rb") as f:
            toml = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--scenario {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--scenario {path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--scenario {path}: not valid TOML: not UTF-8 text") from None
    parser = _file_parser()
    keys = file_keys(parser)
    argv: list[str] = []
    try:
        for key, value in toml.items():
            if key not in keys:
                raise ValueError(f"unknown key {key!r} (valid keys: {', '.join(keys)})")
            argv += _toml_argv(key, value, keys[key])
        from_file = parser.parse_args(argv)
    except ValueError as e:
        raise ValueError(f"--scenario {path}: {e}") from None
    merged = copy.copy(args)
    merged.from_file = set()
    for key, action in keys.items():
        cli, val = getattr(args, action.dest), getattr(from_file, action.dest)
        if key == "parameter":
            setattr(merged, action.dest, val + cli)  # later entries win: the command line's
            merged.file_parameters = len(val)
        elif cli in (None, []) and val not in (None, []):
            setattr(merged, action.dest, val)
            merged.from_file.add(key)
    return merged


# -- building a Scenario from the options ----------------------------------------------------


@contextmanager
def _about(name: str) -> Iterator[None]:
    """A ValueError inside names the option (or the scenario file's key) it is about."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The Scenario the options describe; ValueError with a one-line message naming the
    option for anything that does not make sense."""
    if args.scenario:
        args = load_scenario_file(args)
    from_file: set[str] = getattr(args, "from_file", set())

    def name(key: str) -> str:
        return f"--scenario {args.scenario}: {key}" if key in from_file else f"--{key}"

    sc = Scenario()
    with _about(name("memory")):
        sc.memory, sc.zero = _memory(_given(args.memory, "1G"))
    with _about(name("ram-content")):
        sc.ram_content = args.ram_content
        if sc.mode == "bytes" and sc.memory > BYTES_MAX:
            raise ValueError(
                f"bytes is limited to {BYTES_MAX >> 30}G of guest RAM on this machine "
                f"(this guest has {sc.memory >> 20}M; use versions)"
            )
    with _about(name("device")):
        if len(args.device) > MAX_DEVICES:
            raise ValueError(
                f"{len(args.device)} devices: at most {MAX_DEVICES} (the guest's device window)"
            )
        sc.devices = [_device(d) for d in args.device]
    sc.iommu = _given(args.iommu, "iommufd")
    with _about(name("iommu-hw")):
        sc.iommu_hw, sc.iommu_dirty = _iommu_hw(_given(args.iommu_hw, VENDORS[0]))
    sc.hugepages = args.hugepages == "on"
    with _about(name("workload")):
        sc.workload = parse_workload(_given(args.workload, "idle"), sc.memory)
    sc.link = args.link
    sc.params = _params(args, name)
    sc.tracker = _given(args.tracker, "auto")
    sc.enable_migration = _given(args.enable_migration, "auto")
    with _about(name("seed")):
        sc.seed = _given(args.seed, 1)
        if not 0 <= sc.seed < 1 << 64:
            raise ValueError(f"{sc.seed}: must be >= 0 and < 2**64")
    with _about(name("max-time")):
        sc.max_time = _given(args.max_time, 60.0)
        if not (math.isfinite(sc.max_time) and 0 < sc.max_time <= MAX_TIME):
            raise ValueError(f"{sc.max_time:g}: must be within (0, {MAX_TIME:.0f}] seconds")
    if sc.params.cap("postcopy-ram") and sc.devices:
        raise ValueError(
            f"{name('capability')} postcopy-ram: VFIO migration is not supported with postcopy "
            "migration (QEMU refuses it with a --device)"
        )
    if args.to is not None:
        _check_to(args.to, sc.params)
    return sc


def _given(value: T | None, default: T) -> T:
    """An option's value, or its default if it was not given (an empty string was)."""
    return default if value is None else value


def _memory(text: str) -> tuple[int, float]:
    size_text, extra = parse_kv_spec(text)
    size = parse_size(size_text)
    zero = 0.0
    for k, v in extra.items():
        if k != "zero":
            raise ValueError(f"unknown option {k!r} (only zero=F)")
        zero = parse_fraction(v)
    if size % (2 << 20):
        raise ValueError(f"{size_text!r} is not a multiple of 2M")
    if not MEMORY_MIN <= size <= MEMORY_MAX:
        raise ValueError(
            f"{size_text!r} is outside {MEMORY_MIN >> 20}M to {MEMORY_MAX >> 40}T of guest RAM"
        )
    return size, zero


def _iommu_hw(text: str) -> tuple[str, bool]:
    hw, opts = parse_kv_spec(text)
    if hw not in VENDORS:
        raise ValueError(f"{hw!r}: one of {', '.join(VENDORS)}")
    dirty = True
    for k, v in opts.items():
        if k != "dirty":
            raise ValueError(f"unknown option {k!r} (only dirty=on|off)")
        if v not in ("on", "off"):
            raise ValueError(f"dirty={v!r}: on or off")
        dirty = v == "on"
    return hw, dirty


def _device(text: str) -> DeviceConfig:
    """One --device: the model's options checked by the model itself (on a scratch kernel),
    so that a value it refuses is a usage error here, not an exception mid-run."""
    kind, _ = parse_kv_spec(text)
    keys = WORKLOAD_KEYS.get(kind, frozenset()) | {TRACKING_KEY}
    spec, extra = parse_device_spec(text, keys)
    if "iommu_dirty" in spec.options:
        raise ValueError(
            f"{text!r}: iommu_dirty belongs to the IOMMU: use --iommu-hw KIND,dirty=off"
        )
    tracking = extra.pop(TRACKING_KEY, "on")
    if tracking not in ("on", "off"):
        raise ValueError(f"{TRACKING_KEY}={tracking!r}: on or off")
    workload: dict[str, int] = {}
    for k, v in extra.items():
        workload[k] = parse_rate(v, allow_zero=True) if k == "rate" else _count(k, v)
    if kind == "hisi_acc":
        dev_id = spec.options.get("dev_id", PCI_DEVICE_ID_HUAWEI_ZIP_VF)
        if dev_id != PCI_DEVICE_ID_HUAWEI_ZIP_VF:
            raise ValueError(
                f"hisi_acc dev_id={dev_id:#x}: the guest's workload drives a ZIP VF "
                f"({PCI_DEVICE_ID_HUAWEI_ZIP_VF:#x}); SEC and HPRE VFs have no engine in the model"
            )
    _model_check(kind, dict(spec.options))
    return DeviceConfig(spec.kind, dict(spec.options), tracking == "on", workload)


def _model_check(kind: str, options: dict[str, Any]) -> None:
    from vfiomig.kernel import ModelKernel

    try:
        ModelKernel().add_device(kind, **{**MODEL_DEFAULTS.get(kind, {}), **options})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{kind}: {e}") from None


# Per-second device workload counts: (least, most). A hisi_acc guest must post jobs: its
# check needs one to have completed (sim.hisi), so jobs=0 would read as corruption.
COUNTS = {"churn": (0, MAX_CHURN), "jobs": (1, MAX_JOBS)}


def _count(key: str, v: str) -> int:
    least, most = COUNTS.get(key, (0, MAX_CHURN))
    try:
        n = int(v, 0)
    except ValueError:
        n = -1
    if not least <= n <= most:
        raise ValueError(f"{key}={v!r}: an integer from {least} to {most} (per second)")
    return n


def parse_workload(text: str, memory: int) -> Workload:
    """A --workload SPEC for a guest of ``memory`` bytes."""
    kind, opts = parse_kv_spec(text)
    if kind not in KINDS:
        raise ValueError(f"{kind!r}: one of {', '.join(KINDS)}")
    allowed = WORKLOAD_KEYS_BY_KIND[kind]
    for k in opts:
        if k not in allowed:
            keys = ", ".join(allowed) or "none"
            raise ValueError(f"{kind}: unknown key {k!r} (its keys: {keys})")
    wl = Workload(kind)
    if kind == "idle":
        return wl
    for k in ("wss", "rate", "hot") if kind == "hotcold" else ("wss", "rate"):
        if k not in opts:
            raise ValueError(f"{kind} needs {k}= (as in {WORKLOAD_SPECS[kind]})")
    wl.wss = parse_size(opts["wss"])
    wl.rate = parse_rate(opts["rate"])
    room = memory - WINDOW
    if wl.wss < PAGE:
        raise ValueError(f"wss={opts['wss']}: at least 4K")
    if wl.wss > room:
        raise ValueError(
            f"wss={opts['wss']} is larger than the guest's {room >> 20}M of CPU-writable RAM "
            f"(--memory less the {WINDOW >> 20}M device window)"
        )
    if wl.rate > MAX_WORKLOAD_RATE:
        raise ValueError(f"rate={opts['rate']}: at most {MAX_WORKLOAD_RATE >> 30}G")
    if kind == "hotcold":
        wl.hot = parse_size(opts["hot"])
        if not PAGE <= wl.hot < wl.wss:
            raise ValueError(f"hot={opts['hot']}: at least 4K and smaller than wss={opts['wss']}")
        if "hotfrac" in opts:
            wl.hotfrac = parse_fraction(opts["hotfrac"])
    wl.check((memory - WINDOW) // PAGE)
    return wl


def _params(args: argparse.Namespace, name: Callable[[str], str]) -> Params:
    p = Params()
    with _about(name("downtime-limit")):
        if args.downtime_limit is not None:
            if not 0 <= args.downtime_limit <= 2_000_000:
                raise ValueError(f"{args.downtime_limit}: must be within [0, 2000000] ms")
            p.downtime_limit = args.downtime_limit
    if args.max_bandwidth is not None:
        p.max_bandwidth = args.max_bandwidth
    if args.avail_switchover_bandwidth is not None:
        p.avail_switchover_bandwidth = args.avail_switchover_bandwidth
    with _about(name("capability")):
        p.capabilities = set(args.capability)
        p.check_capabilities()
    in_file = getattr(args, "file_parameters", 0)  # the first ones came from the file
    for i, item in enumerate(args.parameter):
        where = f"--scenario {args.scenario}: parameter" if i < in_file else "--parameter"
        with _about(where):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"{item!r} is not NAME=VALUE")
            if key in RATE_PARAMETERS:
                value = str(parse_rate(value, allow_zero=key != "max-bandwidth"))
            p.set(key, value)
    with _about("--parameter"):
        p.check()
    return p


def _check_to(target: str, params: Params) -> None:
    if not target.startswith("file:") or len(target) <= len("file:"):
        raise ValueError(f"--to {target!r}: expected file:PATH (the only transport modelled)")
    refused = [c for c in ("return-path", "switchover-ack", "postcopy-ram") if params.cap(c)]
    if refused:
        raise ValueError(
            f"--to file: has no return path, so no {', '.join(refused)} (a file cannot answer)"
        )


# -- running ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        sc = scenario_from_args(args)
    except ValueError as e:
        print(f"vfiomig migrate: {e}", file=sys.stderr)
        return 2
    try:
        if args.to is not None:
            return _run_to_file(sc, args.to[len("file:") :], args.json)
        return _run(sc, args.json)
    except VfioError as e:  # the model refused to set the guest up (a model defect)
        print(f"vfiomig migrate: setting up the guest failed: {e}", file=sys.stderr)
        return 1


def _run(sc: Scenario, as_json: bool) -> int:
    show, stop = progress_printer() if not as_json and sys.stderr.isatty() else (None, None)
    try:
        res = simulate(sc, progress=show)
    finally:
        if stop is not None:
            stop()
    _report(res, as_json)
    return res.exit_code


def _report(res: Result, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        reply = query_migrate(res)
        reply["vfiomig"].update(extra or {})
        print(json.dumps(reply, indent=2))
    else:
        print_summary(res)


def _run_to_file(sc: Scenario, path: str, as_json: bool) -> int:
    from vfiomig.sim.savefile import SaveError, save

    try:
        saved = save(sc, path)
    except SaveError as e:
        print(f"vfiomig migrate: --to file: cannot write {e}", file=sys.stderr)
        return 1
    extra: dict[str, Any] = {}
    if saved.result.status != "none":  # blocked: no file was written
        extra["file"] = path
    if saved.restore is not None:
        extra["restore"] = saved.restore.message
    _report(saved.result, as_json, extra)
    if not as_json and saved.result.status != "none":
        check = f"; restore: {saved.restore.message}" if saved.restore else ""
        print(f"file: {path}{check}")
    return saved.result.exit_code
