"""`vfiomig migrate` and `vfiomig restore` as a user meets them: hostile and careless input is
one line on stderr naming the problem and exit status 2 (never a traceback); a run's --json
is QEMU's query-migrate reply; a scenario file sets options and the command line wins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import cli

from vfiomig.cli import build_parser
from vfiomig.sim.scenario import Scenario
from vfiomig.tools.migrate import scenario_from_args

M = 1 << 20
SMALL = ["--memory", "64M", "--workload", "random,wss=8M,rate=16M"]


def assert_usage_error(code: int, out: str, err: str, command: str, *words: str) -> None:
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.startswith(f"vfiomig {command}") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a --to file:x that wrongly runs writes here, not in the tree


# -- hostile and careless command lines ---------------------------------------------------------

BAD: list[tuple[list[str], tuple[str, ...]]] = [
    # sizes and rates
    (["--memory", "64X"], ("--memory", "'64X'")),
    (["--memory=-64M"], ("--memory", "negative")),
    (["--memory", "1.5"], ("--memory", "whole number")),
    (["--memory", ""], ("--memory", "empty")),
    (["--memory", "63M"], ("--memory", "multiple of 2M")),
    (["--memory", "16M"], ("--memory", "32M")),
    (["--memory", "2T"], ("--memory", "1T")),
    (["--memory", "64M,zero=1.5"], ("--memory", "more than 1")),
    (["--memory", "64M,zero=x"], ("--memory", "'x'")),
    (["--memory", "64M,zeros=0.5"], ("--memory", "'zeros'")),
    (["--memory", "32G", "--ram-content", "bytes"], ("--ram-content", "16G")),
    (["--max-bandwidth", "0"], ("--max-bandwidth", "must not be 0")),
    (["--max-bandwidth", "lots"], ("--max-bandwidth", "'lots'")),
    (["--max-bandwidth", "99999999999999999999999"], ("--max-bandwidth", "2**64")),
    (["--avail-switchover-bandwidth=-5"], ("--avail-switchover-bandwidth", "negative")),
    (["--downtime-limit", "-1"], ("--downtime-limit", "2000000")),
    (["--downtime-limit", "9999999999"], ("--downtime-limit", "2000000")),
    (["--downtime-limit", "1.5"], ("--downtime-limit", "int")),
    (["--link", "0"], ("--link", "must not be 0")),
    (["--link", "10Gbps"], ("--link", "'10Gbps'")),
    # capabilities and parameters
    (["--capability", "bogus"], ("--capability", "invalid choice", "auto-converge")),
    (["--capability", "xbzrle"], ("--capability", "invalid choice")),
    (["--capability", "switchover-ack"], ("switchover-ack", "return-path")),
    (["--capability", "postcopy-ram", "--device", "reference"], ("postcopy", "VFIO")),
    (["--parameter", "bogus=1"], ("--parameter", "'bogus'", "cpu-throttle-initial")),
    (["--parameter", "cpu-throttle-initial"], ("--parameter", "NAME=VALUE")),
    (["--parameter", "=5"], ("--parameter", "NAME=VALUE")),
    (["--parameter", "cpu-throttle-initial=abc"], ("--parameter", "integer")),
    (["--parameter", "cpu-throttle-initial=0"], ("--parameter", "cpu-throttle-initial")),
    (["--parameter", "max-cpu-throttle=100"], ("--parameter", "max-cpu-throttle")),
    (["--parameter", "throttle-trigger-threshold=101"], ("--parameter", "[1, 100]")),
    (["--parameter", "cpu-throttle-tailslow=maybe"], ("--parameter", "on or off")),
    (["--parameter", "max-bandwidth=lots"], ("--parameter", "'lots'")),
    (["--enable-migration", "maybe"], ("--enable-migration", "invalid choice")),
    # devices
    (["--device", "bogus"], ("--device", "unknown device kind", "reference")),
    (["--device", "vfio-pci,host=0000:3b:00.1"], ("--device", "unknown device kind")),
    (["--device", ""], ("--device", "empty")),
    (["--device", "reference,bogus=1"], ("--device", "'bogus'", "churn")),
    (["--device", "reference,rate=abc"], ("--device", "'abc'")),
    (["--device", "reference,churn=-1"], ("--device", "churn")),
    (["--device", "reference,churn=1000000000"], ("--device", "churn", "1000000")),
    (["--device", "reference,rate=1M,rate=2M"], ("--device", "twice")),
    (["--device", "hisi_acc,rate=1M"], ("--device", "'rate'", "jobs")),
    (["--device", "hisi_acc,jobs=0"], ("--device", "jobs", "from 1")),
    (["--device", "hisi_acc,dev_id=0xa259"], ("--device", "dev_id=0xa259", "ZIP VF")),
    (["--device", "reference,x-device-dirty-page-tracking=maybe"], ("--device", "on or off")),
    (["--device", "reference,dma_logging=2"], ("--device", "dma_logging")),
    (["--device", "reference,migration_flags=999"], ("--device", "migration_flags")),
    (["--device", "reference,chunk_size=0"], ("--device", "chunk_size")),
    (["--device", "reference,defects=bogus"], ("--device", "bogus")),
    (["--device", "reference,iommu_dirty=0"], ("--device", "iommu_dirty", "--iommu-hw")),
    (["--device", "hisi_acc,qp_num=0"], ("--device", "qp_num")),
    (["--device", "reference"] * 5, ("--device", "at most 4")),
    # workloads
    (["--workload", "bogus"], ("--workload", "'bogus'", "hotcold")),
    (["--workload", "random"], ("--workload", "wss")),
    (["--workload", "random,wss=8M"], ("--workload", "rate")),
    (["--workload", "random,wss=8M,rate=0"], ("--workload", "rate")),
    (["--workload", "random,wss=2K,rate=1M"], ("--workload", "4K")),
    (["--workload", "random,wss=abc,rate=1M"], ("--workload", "'abc'")),
    (["--memory", "64M", "--workload", "random,wss=2G,rate=1M"], ("--workload", "wss", "48M")),
    (["--workload", "random,wss=8M,rate=1T"], ("--workload", "rate", "64G")),
    (["--workload", "random,wss=8M,rate=1M,hot=1M"], ("--workload", "'hot'")),
    (["--workload", "random,wss=8M,rate=1M,wss=4M"], ("--workload", "twice")),
    (["--workload", "hotcold,wss=8M,rate=1M"], ("--workload", "hot")),
    (["--workload", "hotcold,wss=8M,hot=8M,rate=1M"], ("--workload", "hot", "smaller")),
    (["--workload", "hotcold,wss=8M,hot=16M,rate=1M"], ("--workload", "hot", "smaller")),
    (["--workload", "hotcold,wss=8M,hot=1M,rate=1M,hotfrac=2"], ("--workload", "more than 1")),
    (["--workload", "idle,wss=1M"], ("--workload", "'wss'")),
    # the IOMMU
    (["--iommu", "vfio"], ("--iommu", "invalid choice")),
    (["--iommu-hw", "bogus"], ("--iommu-hw", "'bogus'", "smmuv3")),
    (["--iommu-hw", "smmuv3,dirty=maybe"], ("--iommu-hw", "'maybe'")),
    (["--iommu-hw", "vtd,foo=off"], ("--iommu-hw", "'foo'")),
    (["--hugepages", "maybe"], ("--hugepages", "invalid choice")),
    # the simulation
    (["--tracker", "none"], ("--tracker", "invalid choice")),
    (["--seed", "-1"], ("--seed", ">= 0")),
    (["--seed", "x"], ("--seed", "int")),
    (["--max-time", "0"], ("--max-time", "86400")),
    (["--max-time", "-5"], ("--max-time", "86400")),
    (["--max-time", "nan"], ("--max-time", "86400")),
    (["--max-time", "inf"], ("--max-time", "86400")),
    (["--max-time", "1e9"], ("--max-time", "86400")),
    (["--to", "guest.vmig"], ("--to", "file:PATH")),
    (["--to", "file:"], ("--to", "file:PATH")),
    (["--to", "tcp:localhost:4444"], ("--to", "file:PATH")),
    (["--to", "file:x", "--capability", "return-path"], ("--to", "return-path")),
    (["--to", "file:x", "--capability", "postcopy-ram"], ("--to", "postcopy-ram")),
    (["--scenario", "missing.toml"], ("--scenario", "missing.toml", "No such file")),
    (["--scenario", "."], ("--scenario", "directory")),
    # the command line itself
    (["--bogus"], ("unrecognized arguments: --bogus",)),
    (["--mem", "64M"], ("unrecognized arguments: --mem",)),
    (["--memory"], ("--memory", "expected one argument")),
]


@pytest.mark.parametrize(("argv", "words"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_migrate_input_is_one_line_and_exit_2(
    argv: list[str], words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert_usage_error(*cli(capsys, ["migrate", *argv]), "migrate", *words)


def test_no_file_is_written_for_a_refused_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["migrate", *SMALL, "--to", "file:x", "--capability", "postcopy-ram"]
    assert cli(capsys, argv)[0] == 2
    assert not (tmp_path / "x").exists()


# -- hostile scenario files ----------------------------------------------------------------------

BAD_TOML: list[tuple[str, tuple[str, ...]]] = [
    ('memroy = "64M"', ("unknown key 'memroy'", "valid keys", "downtime-limit")),
    ("downtime_limit = 5", ("unknown key 'downtime_limit'", "downtime-limit")),
    ("json = true", ("unknown key 'json'",)),
    ('scenario = "other.toml"', ("unknown key 'scenario'",)),
    ('to = "file:x"', ("unknown key 'to'",)),
    ("memory = ", ("not valid TOML", "line 1")),
    ('[memory]\nsize = "64M"', ("memory", "table")),
    ("memory = true", ("memory", "true")),
    ('memory = "63M"', ("memory", "multiple of 2M")),
    ("memory = 1.5", ("memory", "whole number")),
    ("device = 5", ("device", "not 5")),
    ("device = [5]", ("device", "not 5")),
    ('device = {kind = "reference"}', ("device", "table")),
    ('device = "reference,bogus=1"', ("device", "'bogus'")),
    ('parameter = "x"', ("parameter", "table")),
    ("parameter = 5", ("parameter", "table")),
    ("parameter = {bogus = 1}", ("parameter", "'bogus'")),
    ("parameter = {cpu-throttle-initial = [1]}", ("parameter", "array")),
    ("link = 0", ("link", "must not be 0")),
    ("link = -5", ("link", "negative")),
    ("link = true", ("link", "true")),
    ('downtime-limit = "abc"', ("downtime-limit", "'abc'")),
    ("downtime-limit = 1.5", ("downtime-limit", "'1.5'")),
    ("max-bandwidth = -1", ("max-bandwidth", "negative")),
    ('seed = "x"', ("seed", "'x'")),
    ("seed = 1.9", ("seed", "'1.9'")),
    ('max-time = "x"', ("max-time", "'x'")),
    ("max-time = 0", ("max-time", "86400")),
    ('capability = ["bogus"]', ("capability", "'bogus'")),
    ("capability = [1]", ("capability", "list of strings")),
    ('iommu = "bogus"', ("iommu", "'bogus'")),
    ('iommu-hw = "vtd,dirty=maybe"', ("iommu-hw", "'maybe'")),
    ('tracker = "bogus"', ("tracker", "'bogus'")),
    ('enable-migration = "bogus"', ("enable-migration", "'bogus'")),
    ('ram-content = "bogus"', ("ram-content", "'bogus'")),
    ('hugepages = "maybe"', ("hugepages", "'maybe'")),
    ('workload = "random,wss=128M,rate=1M"\nmemory = "64M"', ("workload", "wss")),
    ("workload = 5", ("workload", "'5'")),
    ("seed = 1979-05-27", ("seed", "date")),
]


@pytest.mark.parametrize(("text", "words"), BAD_TOML, ids=[t[:40] for t, _ in BAD_TOML])
def test_bad_scenario_file_is_one_line_and_exit_2(
    text: str, words: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s.toml").write_text(text + "\n")
    # --max-time keeps a run short if a case is not refused (unless the case is max-time)
    short = [] if "max-time" in text else ["--max-time", "0.01"]
    code, out, err = cli(capsys, ["migrate", "--scenario", "s.toml", *short])
    assert_usage_error(code, out, err, "migrate", "s.toml", *words)


def test_scenario_file_that_is_not_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s.toml").write_bytes(b"\xff\xfe\x00memory")
    code, out, err = cli(capsys, ["migrate", "--scenario", "s.toml"])
    assert_usage_error(code, out, err, "migrate", "s.toml", "not valid TOML")


# -- restore's command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], ("PATH",)),
        (["a", "b"], ("unrecognized arguments: b",)),
        (["--bogus", "a"], ("unrecognized arguments: --bogus",)),
    ],
)
def test_bad_restore_usage_is_exit_2(
    argv: list[str], words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert_usage_error(*cli(capsys, ["restore", *argv]), "restore", *words)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (None, ("No such file",)),
        ("dir", ("directory",)),
        ("", ("not a vfiomig save file",)),
        ("hello\n", ("not a vfiomig save file",)),
        ("VFIOMIG", ("truncated",)),
    ],
)
def test_restore_of_what_is_not_a_save_file_is_exit_1(
    make: str | None, words: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "f"
    if make == "dir":
        path.mkdir()
    elif make is not None:
        path.write_text(make)
    code, out, err = cli(capsys, ["restore", str(path)])
    assert code == 1 and "Traceback" not in out + err
    assert err.startswith("vfiomig restore: ") and err.count("\n") == 1
    for w in words:
        assert w in err, err


# -- --help ------------------------------------------------------------------------------------


def test_help_says_what_it_is_for_with_examples_exit_codes_and_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = cli(capsys, ["migrate", "--help"])
    assert code == 0
    text = " ".join(out.split())  # unwrapped
    assert "live-migrate a guest" in text
    assert text.count(" vfiomig migrate --") >= 3  # examples
    for status in ("0 completed", "1 corruption", "2 bad usage", "3 cancelled", "4 blocked"):
        assert status in text
    names = ["auto-converge", "return-path", "switchover-ack", "postcopy-ram"]
    names += ["cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow"]
    names += ["max-cpu-throttle", "throttle-trigger-threshold"]
    names += ["hisi_acc", "reference", "mtty", "jobs=N", "churn=N", "x-device-dirty-page-tracking"]
    names += ["idle", "random,wss=SIZE,rate=RATE", "hotcold,wss=SIZE,hot=SIZE,rate=RATE"]
    names += ["sequential,wss=SIZE,rate=RATE", "smmuv3", "vtd", "amd", "dirty=off"]
    names += ["iommufd", "type1", "10Gbit"]
    for name in names:
        assert name in text, name
    # the scenario file's keys and its precedence
    assert "Scenario files" in text and "[parameter]" in text
    for key in ("memory", "device", "workload", "link", "downtime-limit", "max-bandwidth"):
        assert f"{key} =" in text or f" {key}," in text, key
    assert "command line wins" in text


def test_restore_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, ["restore", "--help"])
    text = " ".join(out.split())
    assert code == 0 and "--to file:PATH" in text and "0 restored and verified" in text


# -- runs ----------------------------------------------------------------------------------------


def query(capsys: pytest.CaptureFixture[str], argv: list[str], status: int) -> dict[str, Any]:
    code, out, err = cli(capsys, ["migrate", *argv, "--json"])
    assert code == status, (code, err)
    assert "Traceback" not in err
    reply = json.loads(out)
    assert isinstance(reply, dict)
    return reply


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def test_json_is_query_migrate_completed(capsys: pytest.CaptureFixture[str]) -> None:
    q = query(capsys, SMALL, 0)
    assert q["status"] == "completed"
    for key in ("total-time", "downtime", "setup-time"):
        assert is_int(q[key]) and q[key] >= 0, key
    ram = q["ram"]
    for key in ("transferred", "total", "duplicate", "normal", "normal-bytes", "dirty-sync-count"):
        assert is_int(ram[key]) and ram[key] >= 0, key
    assert isinstance(ram["mbps"], int | float) and not isinstance(ram["mbps"], bool)
    assert ram["total"] == 64 * M and ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["dirty-sync-count"] >= 2
    assert "vfio" not in q and "blocked-reasons" not in q
    assert q["vfiomig"]["verified"] is True


def test_json_with_a_device_has_vfio_transferred(capsys: pytest.CaptureFixture[str]) -> None:
    q = query(capsys, [*SMALL, "--device", "reference,migration_flags=7"], 0)
    assert q["status"] == "completed"
    assert is_int(q["vfio"]["transferred"]) and q["vfio"]["transferred"] > 0


def test_json_of_a_blocked_run_lists_the_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    q = query(capsys, [*SMALL, "--device", "hisi_acc", "--iommu", "type1"], 4)
    reasons = q["blocked-reasons"]
    assert reasons and all(isinstance(r, str) for r in reasons)
    assert "dirty tracking" in reasons[0]


def test_json_of_a_cancelled_run_has_expected_downtime(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--memory", "64M", "--workload", "sequential,wss=40M,rate=1G", "--max-time", "1.2"]
    q = query(capsys, argv, 3)
    assert q["status"] == "cancelled"
    assert is_int(q["expected-downtime"]) and q["expected-downtime"] > 0
    assert is_int(q["ram"]["remaining"]) and q["ram"]["remaining"] > 0
    assert "downtime" not in q


def test_human_summary_ends_with_a_result_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, ["migrate", *SMALL, "--link", "10Gbit"])
    assert code == 0 and err == ""
    assert out.splitlines()[-1].startswith("result: verified")


def test_a_device_the_model_cannot_set_up_is_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # mtty is an emulated (mdev) device; whatever the engine makes of it behind iommufd,
    # the user gets a verdict, not a Python exception.
    code, out, err = cli(capsys, ["migrate", *SMALL, "--device", "mtty"])
    assert code in (0, 1) and "Traceback" not in out + err


# -- scenario files ------------------------------------------------------------------------------

TOML = """\
memory = "64M"
device = ["reference,migration_flags=7", "reference,rate=1M"]
workload = "random,wss=8M,rate=16M"
link = "10Gbit"
downtime-limit = 500
max-bandwidth = 268435456
capability = ["auto-converge"]
seed = 3
max-time = 20

[parameter]
cpu-throttle-initial = 30
cpu-throttle-tailslow = true
"""


def scenario(tmp_path: Path, text: str, *argv: str) -> Scenario:
    (tmp_path / "s.toml").write_text(text)
    args = build_parser().parse_args(["migrate", "--scenario", str(tmp_path / "s.toml"), *argv])
    return scenario_from_args(args)


def test_scenario_file_values_are_used(tmp_path: Path) -> None:
    sc = scenario(tmp_path, TOML)
    assert sc.memory == 64 * M
    assert [d.kind for d in sc.devices] == ["reference", "reference"]
    assert sc.devices[0].options == {"migration_flags": 7}
    assert sc.devices[1].workload == {"rate": 1 * M}
    assert (sc.workload.kind, sc.workload.wss, sc.workload.rate) == ("random", 8 * M, 16 * M)
    assert sc.link == 1_250_000_000
    p = sc.params
    assert (p.downtime_limit, p.max_bandwidth, p.capabilities) == (500, 256 * M, {"auto-converge"})
    assert (p.cpu_throttle_initial, p.cpu_throttle_tailslow) == (30, True)
    assert (sc.seed, sc.max_time) == (3, 20.0)


def test_the_command_line_wins_over_the_scenario_file(tmp_path: Path) -> None:
    sc = scenario(
        tmp_path,
        TOML,
        "--memory",
        "96M",
        "--device",
        "hisi_acc",
        "--downtime-limit",
        "100",
        "--capability",
        "return-path",
        "--parameter",
        "cpu-throttle-initial=40",
        "--parameter",
        "cpu-throttle-increment=5",
        "--seed",
        "9",
    )
    assert sc.memory == 96 * M
    assert [d.kind for d in sc.devices] == ["hisi_acc"]  # a list replaces the file's
    assert sc.params.downtime_limit == 100 and sc.params.capabilities == {"return-path"}
    # parameters merge, name by name
    p = sc.params
    assert (p.cpu_throttle_initial, p.cpu_throttle_increment, p.cpu_throttle_tailslow) == (
        40,
        5,
        True,
    )
    assert sc.seed == 9 and sc.link == 1_250_000_000  # what the command line left alone


def test_scenario_file_takes_a_single_device_and_on_off_booleans(tmp_path: Path) -> None:
    sc = scenario(tmp_path, 'memory = 67108864\ndevice = "reference"\nhugepages = true\n')
    assert sc.memory == 64 * M and [d.kind for d in sc.devices] == ["reference"]
    assert sc.hugepages is True


def test_scenario_file_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s.toml").write_text(TOML)
    q = query(capsys, ["--scenario", "s.toml", "--memory", "96M"], 0)
    assert q["ram"]["total"] == 96 * M  # the command line's
    assert is_int(q["vfio"]["transferred"])  # the file's devices
    assert "cpu-throttle-percentage" in q  # the file's auto-converge


def test_an_error_names_where_the_value_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s.toml").write_text(TOML)
    code, out, err = cli(capsys, ["migrate", "--scenario", "s.toml", "--parameter", "bogus=1"])
    assert_usage_error(code, out, err, "migrate", "migrate: --parameter: ", "'bogus'")
    code, out, err = cli(capsys, ["migrate", "--scenario", "s.toml", "--workload", "random"])
    assert_usage_error(code, out, err, "migrate", "migrate: --workload: ")
    (tmp_path / "s.toml").write_text(TOML.replace('"random,wss=8M', '"random,wss=80M'))
    code, out, err = cli(capsys, ["migrate", "--scenario", "s.toml"])
    assert_usage_error(code, out, err, "migrate", "migrate: --scenario s.toml: workload: ")


def test_the_scenario_file_in_help_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = cli(capsys, ["migrate", "--help"])[1]
    lines = out.split("hugepages takes true/false too:\n", 1)[1].splitlines()
    example = []
    for line in lines[1:]:
        if line and not line.startswith("    "):
            break
        example.append(line[4:])
    sc = scenario(tmp_path, "\n".join(example))
    assert sc.memory == 4 << 30 and sc.zero == 0.5
    assert [d.kind for d in sc.devices] == ["hisi_acc", "reference"]
    assert sc.params.cpu_throttle_initial == 30 and sc.params.max_bandwidth == 1 << 30
