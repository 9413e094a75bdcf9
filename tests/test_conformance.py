"""The conformance suite: it passes clean devices and names each injected defect."""

from __future__ import annotations

import argparse
import errno
import json
import os
from typing import Any

import pytest

import vfiomig.conformance as suite
from vfiomig.cli import build_parser, main
from vfiomig.conformance import runner
from vfiomig.conformance import stream as stream_mod
from vfiomig.host import LinuxTransport, Syscalls, fsm
from vfiomig.host.transport import IoctlArg
from vfiomig.tools import conformance as conf
from vfiomig.uapi import iommufd as u

FAIL, PASS, SKIP, FINDING = suite.FAIL, suite.PASS, suite.SKIP, suite.FINDING


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["conformance", *argv])


def _results(*argv: str) -> dict[str, suite.CheckResult]:
    target = conf.target_from_args(_args(*argv))
    return {r.name: r for r in suite.run_suite(target)}


@pytest.mark.parametrize("flags", [1, 3, 5, 7])
def test_the_suites_fsm_agrees_with_the_uapi_oracles(flags: int) -> None:
    # vfiomig.host.fsm is what the suite judges a kernel by, so it is checked here against the
    # oracles of test_vfio_fsm (the spec tables, the header's arcs and its data-fd rules),
    # not against the model kernel's table.
    from test_vfio_fsm import FD_ARCS, oracle, spec_table

    for (cur, new), want in spec_table(flags).items():
        got = fsm.path(flags, cur, new)
        assert (None if got is None else tuple(got)) == want, (flags, cur, new)
        paths = oracle(flags, cur, new)
        assert (got is None) == (paths is None) and (got is None or tuple(got) in paths)
        if got:
            last_arc = ((got[-2] if len(got) > 1 else cur), got[-1])
            assert (fsm.fd_expected(flags, cur, new) is not None) == (last_arc in FD_ARCS)
    assert {(a, b) for a, b in fsm.blocked_arcs(flags)} == {
        arc for arc, want in spec_table(flags).items() if want is None
    }


def test_every_check_runs_once_and_names_are_unique() -> None:
    assert len(set(suite.CHECK_NAMES)) == len(suite.CHECK_NAMES) >= 18
    res = _results("--model", "reference")
    assert list(res) == suite.CHECK_NAMES


def test_clean_reference_device_passes_everything() -> None:
    res = _results("--model", "reference")
    bad = {n: r.reason for n, r in res.items() if r.status != PASS}
    # Every check applies to the default reference device (flags 7, DMA logging, fault
    # injection, a second device): nothing may fail and nothing may be skipped.
    assert bad == {}


@pytest.mark.parametrize(
    ("defect", "check", "phrase"),
    [
        ("wrong_data_size", "mig-data-size", "wrong MIG_DATA_SIZE"),
        ("fd_on_wrong_arc", "fsm-paths", "data fd on the wrong arc"),
        ("lossy_resume", "save-resume-roundtrip", "lossy resume"),
        ("lossy_precopy", "precopy-roundtrip", "lossy pre-copy"),
        ("log_misses_writes", "dma-logging-report", "dirty log misses writes"),
        ("no_einval_blocked_arc", "fsm-blocked-arcs", "no EINVAL on the blocked arc"),
        ("accepts_truncated", "resume-rejects-bad-streams", "accepted a truncated resume stream"),
        ("log_not_cleared", "dma-logging-report", "the report did not clear the log"),
    ],
)
def test_each_injected_defect_fails_with_a_message_naming_it(
    defect: str, check: str, phrase: str
) -> None:
    res = _results("--model", "reference", "--defect", defect)
    assert res[check].status == FAIL, res[check]
    assert phrase in res[check].reason
    failed = [r for r in res.values() if r.status == FAIL]
    # every failure this defect causes is explained by it, none is an internal error
    assert all("internal error" not in r.reason for r in failed)
    clean = _results("--model", "reference")
    assert clean[check].status == PASS


@pytest.mark.parametrize("flags", ["1", "3", "5"])
def test_reference_passes_with_each_flag_set(flags: str) -> None:
    res = _results("--model", "reference", "--migration-flags", flags, "--dma-logging", "0")
    assert [r.reason for r in res.values() if r.status == FAIL] == []
    skipped = {n for n, r in res.items() if r.status == SKIP}
    assert "dma-logging-report" in skipped  # no DMA logging: skipped with its reason
    if flags in ("1", "3"):
        assert {"fsm-blocked-arcs", "precopy-info-states", "precopy-roundtrip"} <= skipped
        assert "PRE_COPY" in res["precopy-roundtrip"].reason
    else:
        assert res["precopy-roundtrip"].status == PASS
    if flags in ("1", "5"):
        assert "p2p-quiescence" in skipped


def test_mtty_passes() -> None:
    res = _results("--model", "mtty")
    assert [(n, r.reason) for n, r in res.items() if r.status == FAIL] == []
    assert res["precopy-roundtrip"].status == PASS  # mtty cannot DMA: it reads what is there
    assert (
        res["error-recovery"].status == SKIP and "fault injection" in res["error-recovery"].reason
    )


def test_hisi_acc_only_departs_on_its_latched_resume_check() -> None:
    # HiSilicon latches its resume compatibility check (match_done) until the device is
    # opened again: a second resume within one open accepts a corrupted 40-byte stream. That
    # is its own check; every other check opens the devices anew and is not affected.
    res = _results("--model", "hisi_acc")
    assert [n for n, r in res.items() if r.status == FAIL] == []
    found = {n: r.reason for n, r in res.items() if r.status == FINDING}
    assert set(found) == {"resume-rechecks-each-session"}  # a finding: the run passes
    reason = found["resume-rechecks-each-session"]
    assert "accepted a corrupted resume stream" in reason and "once per open" in reason
    assert res["resume-rejects-bad-streams"].status == PASS
    assert "corrupted: write EFAULT" in res["resume-rejects-bad-streams"].reason
    assert res["dma-logging-validation"].status == PASS  # ENOTTY without log ops
    assert res["precopy-roundtrip"].status == PASS
    assert res["p2p-quiescence"].status == SKIP


def _verdicts(results: list[suite.CheckResult]) -> dict[str, str]:
    return {r.name: r.status for r in results}


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "reference"],
        ["--model", "hisi_acc"],
        ["--model", "mtty"],
        ["--model", "reference", "--defect", "fd_on_wrong_arc", "--defect", "lossy_resume"],
        ["--model", "reference,migration_flags=5,dma_logging=0"],
    ],
)
def test_verdicts_do_not_depend_on_which_checks_ran_before(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each check opens the devices anew: alone, in the full run and in the reverse order it
    # gives the same verdict (hisi_acc's latched match check stays its own check's finding).
    full = _verdicts(suite.run_suite(conf.target_from_args(_args(*argv))))
    alone = {
        name: _verdicts(suite.run_suite(conf.target_from_args(_args(*argv)), [name]))[name]
        for name in suite.CHECK_NAMES
    }
    assert alone == full
    monkeypatch.setattr(runner, "CHECKS", list(reversed(suite.CHECKS)))
    backwards = _verdicts(suite.run_suite(conf.target_from_args(_args(*argv))))
    assert list(backwards) == list(reversed(suite.CHECK_NAMES))
    assert backwards == full


def test_each_check_gets_devices_opened_for_it() -> None:
    # The runner opens /dev/iommu and both devices once per check and closes all of them
    # before the next one: never two checks' objects at once.
    target = conf.target_from_args(_args("--model", "reference"))
    opened: list[str] = []
    live: set[int] = set()
    most = 0
    real_open, real_close = target.transport.open, target.transport.close

    def tracking_open(path: str, flags: int = os.O_RDWR) -> int:
        nonlocal most
        fd = real_open(path, flags)
        opened.append(path)
        live.add(fd)
        most = max(most, len(live))
        return fd

    def tracking_close(fd: int) -> None:
        live.discard(fd)
        real_close(fd)

    target.transport.open = tracking_open  # type: ignore[method-assign]
    target.transport.close = tracking_close  # type: ignore[method-assign]
    res = suite.run_suite(target, ["initial-state", "mig-data-size", "stream-files"])
    assert [r.status for r in res] == [PASS] * 3
    assert opened.count("/dev/iommu") == 3
    assert opened.count(target.primary) == 3 and opened.count(str(target.secondary)) == 3
    assert live == set() and most <= 6  # iommufd, 2 devices, a few data fds at most


def test_lossy_precopy_passes_the_stop_copy_round_trip_and_fails_the_precopy_one() -> None:
    # The defect drops only the data a save through PRE_COPY sends again for chunks the
    # device changed: the STOP_COPY round trip cannot see it, and the precopy one sees it
    # because the device DMAs between the two PRE_COPY reads.
    res = _results("--model", "reference", "--defect", "lossy_precopy")
    assert {n for n, r in res.items() if r.status != PASS} == {"precopy-roundtrip"}
    reason = res["precopy-roundtrip"].reason
    assert reason.startswith("lossy pre-copy:") and "first difference at byte" in reason
    clean = _results("--model", "reference")["precopy-roundtrip"].reason
    assert "the device wrote 8 pages between the PRE_COPY reads" in clean
    assert " in PRE_COPY again" in clean and " 0 in PRE_COPY again" not in clean  # dirty data


def test_precopy_roundtrip_without_model_hooks_reads_what_is_there() -> None:
    # As on a real device: no way to make the device change, so no dirty data to lose.
    target = conf.target_from_args(
        _args("--model", "reference", "--defect", "lossy_precopy", "--check", "precopy-roundtrip")
    )
    target.model = None
    (res,) = suite.run_suite(target, ["precopy-roundtrip"])
    assert res.status == PASS and "read what it offered" in res.reason
    assert "0 in PRE_COPY again" in res.reason


def test_cli_exit_status_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert conf.run(_args("--model", "reference", "--check", "mig-data-size")) == 0
    out = capsys.readouterr().out
    assert "PASS  mig-data-size" in out and "1 checks: 1 pass" in out
    code = conf.run(
        _args(
            "--model",
            "reference",
            "--defect",
            "wrong_data_size",
            "--check",
            "mig-data-size",
            "--json",
        )
    )
    assert code == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"] == {"pass": 0, "fail": 1, "skip": 0, "finding": 0}
    assert doc["results"][0]["check"] == "mig-data-size"
    assert "wrong MIG_DATA_SIZE" in doc["results"][0]["reason"]


def test_real_device_needs_yes(capsys: pytest.CaptureFixture[str]) -> None:
    assert conf.run(_args("--device", "/dev/vfio/devices/vfio0")) == 2
    assert "--yes" in capsys.readouterr().err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert conf.run(_args()) == 2
    assert conf.run(_args("--model", "reference", "--check", "nope")) == 2
    assert conf.run(_args("--model", "reference:migration_flags=6")) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "migration_flags" in err
    assert conf.run(_args("--list")) == 0
    assert "fsm-paths" in capsys.readouterr().out


def test_suite_leaves_no_fds_open() -> None:
    target = conf.target_from_args(_args("--model", "reference"))
    suite.run_suite(target)
    assert target.model is not None
    assert target.model.kernel.fdt.files == {}


HW_DEVICE = os.environ.get("VFIOMIG_TEST_DEVICE")


@pytest.mark.hardware
@pytest.mark.skipif(
    not (os.path.exists("/dev/iommu") and os.path.isdir("/dev/vfio/devices")),
    reason="no /dev/iommu or /dev/vfio/devices on this machine",
)
@pytest.mark.skipif(
    not HW_DEVICE,
    reason="set VFIOMIG_TEST_DEVICE=/dev/vfio/devices/vfioN (a device no VM uses) to run it",
)
def test_conformance_on_a_real_device(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--device", str(HW_DEVICE), "--yes", "--json"]
    if os.environ.get("VFIOMIG_TEST_DEVICE2"):
        argv += ["--device2", os.environ["VFIOMIG_TEST_DEVICE2"]]
    code = conf.run(_args(*argv))
    doc = json.loads(capsys.readouterr().out)
    assert all("internal error" not in r["reason"] for r in doc["results"])
    assert code == (1 if doc["summary"]["fail"] else 0)


def test_large_streams_spill_to_a_file_and_still_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    spilled: list[object] = []
    real = stream_mod.tempfile.TemporaryFile

    def temporary_file() -> Any:
        f = real()
        spilled.append(f)
        return f

    monkeypatch.setattr(stream_mod, "KEEP_STREAM", 4096)  # every saved stream spills
    monkeypatch.setattr(stream_mod.tempfile, "TemporaryFile", temporary_file)
    clean = _results("--model", "reference")
    assert spilled  # the comparisons below really ran on spilled streams
    assert [r.reason for r in clean.values() if r.status != PASS] == []
    lossy = _results("--model", "reference", "--defect", "lossy_resume")
    reason = lossy["save-resume-roundtrip"].reason
    assert "lossy resume" in reason and "first difference at byte" in reason


def test_stream_helpers() -> None:
    a, b = suite.Stream(), suite.Stream()
    for s in (a, b):
        s.add(b"0123456789")
    assert a == b and suite.first_difference(a, b) == 10
    b.add(b"x")
    assert a != b and suite.first_difference(a, b) == 10
    c = suite.Stream()
    c.add(b"0123")
    c.add(b"4X6789")
    assert suite.first_difference(a, c) == 5
    assert b"".join(suite.truncated(a)) == b"01234"
    assert b"".join(suite.corrupted(a)) == bytes(x ^ 0xFF for x in b"01234567") + b"89"


def test_kernel_release_parsing() -> None:
    assert suite.kernel_release_at_least("7.2.0", 7, 2)
    assert suite.kernel_release_at_least("7.10.1-arch1", 7, 2)
    assert suite.kernel_release_at_least("8.0", 7, 2)
    assert not suite.kernel_release_at_least("6.12.58-generic", 7, 2)
    assert not suite.kernel_release_at_least("7.1.9", 7, 2)
    assert not suite.kernel_release_at_least("weird", 7, 2)


def test_blocked_arcs_are_skipped_when_unsafe() -> None:
    target = conf.target_from_args(_args("--model", "reference", "--check", "fsm-blocked-arcs"))
    target.blocked_arcs_safe = False
    (res,) = suite.run_suite(target, ["fsm-blocked-arcs"])
    assert res.status == SKIP and "hang" in res.reason


def test_device_without_migration_fails_one_check_and_skips_the_rest() -> None:
    # hisi_acc without its PF driver is plain vfio-pci: MIGRATION is ENOTTY. Every check
    # that needs migration must skip with that reason, not fail on a GET state it cannot do.
    res = _results("--model", "hisi_acc:pf_driver=0")
    assert res["migration-flags"].status == FAIL
    assert "does not support migration" in res["migration-flags"].reason
    assert res["dma-logging-validation"].status == PASS
    others = {n: r for n, r in res.items() if n not in suite.WITHOUT_MIGRATION}
    assert {r.status for r in others.values()} == {SKIP}
    assert all("does not support migration" in r.reason for r in others.values())


class _Host(Syscalls):
    """A fake Linux host: nodes in `missing` are ENOENT, nodes in `busy` EBUSY."""

    def __init__(self, missing: set[str], busy: set[str] | None = None) -> None:
        self.missing, self.busy, self.fds = missing, busy or set(), set[int]()

    def open(self, path: str, flags: int) -> int:
        for nodes, code in ((self.missing, errno.ENOENT), (self.busy, errno.EBUSY)):
            if path in nodes:
                raise OSError(code, os.strerror(code))
        fd = 100 + len(self.fds)
        self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.remove(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg) -> int:
        if request == u.IOMMU_IOAS_ALLOC:
            assert isinstance(arg, u.iommu_ioas_alloc)
            arg.out_ioas_id = 1
            return 0
        if request == u.IOMMU_DESTROY:
            return 0
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


@pytest.mark.parametrize(
    ("missing", "busy", "phrase"),
    [
        ({"/dev/iommu", "/dev/vfio/devices/vfio3"}, set(), "this host has no iommufd"),
        ({"/dev/vfio/devices/vfio3"}, set(), "no such device node"),
        (set(), {"/dev/vfio/devices/vfio3"}, "in use"),
    ],
)
def test_a_device_that_cannot_be_opened_is_one_clear_failure(
    missing: set[str], busy: set[str], phrase: str
) -> None:
    host = _Host(missing, busy)
    target = suite.Target(LinuxTransport(host), "/dev/vfio/devices/vfio3", None)
    (res,) = suite.run_suite(target)
    assert (res.name, res.status, res.failures) == ("setup", FAIL, ["runner/setup"])
    assert "cannot open the device" in res.reason and phrase in res.reason
    assert host.fds == set()  # what was opened before the failure is closed again


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--model", "reference", "--device2", "/dev/vfio/devices/vfio1"], "--device2 goes with"),
        (["--model", "mtty", "--defect", "lossy_resume"], "not of mtty"),
        (["--model", "hisi_acc", "--migration-flags", "5"], "not of hisi_acc"),
        (
            ["--device", "/dev/vfio/devices/vfio0", "--yes", "--state-size", "4096"],
            "not of --device",
        ),
        (["--model", "reference", "--defect", "bogus"], "unknown defects"),
        (["--model", "reference,defects=bogus"], "unknown defects"),
    ],
)
def test_bad_argument_combinations_are_usage_errors(
    argv: list[str], phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert conf.run(_args(*argv)) == 2
    cap = capsys.readouterr()
    assert phrase in cap.err and cap.out == ""


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--model", "reference:bogus=1"], "reference has no option 'bogus' (its options: "),
        (["--model", "reference,bogus=1"], "reference has no option 'bogus' (its options: "),
        (["--model", "reference:state_size=abc"], "state_size=abc: expected an integer"),
        (["--model", "reference,state_size=abc"], "state_size=abc: expected an integer"),
        (["--model", "reference,log_page_shift=5"], "expected 2 integers"),
        (["--model", "reference,seed=1,seed=2"], "option 'seed' given twice"),
        (["--model", "reference,nokey"], "option 'nokey' is not key=value"),
        (["--model", "bogus"], "unknown device kind 'bogus'"),
        (["--model", "reference", "--state-size", "1.5"], "invalid size '1.5'"),
        (["--model", "reference", "--state-size=-4K"], "invalid size '-4K': negative"),
        (["--model", "reference", "--iommu-hw", "arm"], "argument --iommu-hw: invalid choice"),
        (["--model", "reference", "--iommu", "arm"], "argument --iommu: invalid choice"),
        (["--model", "reference", "--iommu-h", "vtd"], "unrecognized arguments: --iommu-h"),
        (["--model", "reference", "--iommuf", "/dev/iommu"], "unrecognized arguments"),
    ],
)
def test_bad_values_are_one_line_usage_errors(
    argv: list[str], phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["conformance", *argv])
    assert e.value.code == 2
    cap = capsys.readouterr()
    assert cap.out == "" and phrase in cap.err and "Traceback" not in cap.err
    assert cap.err.startswith("vfiomig conformance: error: ") and cap.err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--iommu-hw", "--iommu"])
def test_iommu_hw_and_its_deprecated_spelling(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # --iommu is exactly the old option, not a prefix of --iommufd or --iommu-hw.
    argv = ["conformance", "--model", "reference", flag, "vtd", "--iommufd", "/dev/iommu"]
    assert main([*argv, "--check", "mig-data-size", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["target"] == "model reference (vtd)"
    if flag == "--iommu":
        assert cap.err == "vfiomig conformance: warning: --iommu is deprecated, use --iommu-hw\n"
    else:
        assert cap.err == ""


@pytest.mark.parametrize("sep", [",", ":"])
def test_both_spec_syntaxes_build_the_same_device(sep: str) -> None:
    spec = f"reference{sep}migration_flags=5,dma_logging=0,state_size=0x10000"
    target = conf.target_from_args(_args("--model", spec))
    label = "model reference,migration_flags=5,dma_logging=0,state_size=65536 (smmuv3)"
    assert target.label == label
    assert target.model is not None
    assert target.model.options == {"migration_flags": 5, "dma_logging": False, "state_size": 65536}
    # the shorthand flags say the same (--state-size takes a size)
    argv = ["--migration-flags", "5", "--dma-logging", "0", "--state-size", "64K"]
    assert conf.target_from_args(_args("--model", "reference", *argv)).label == label


@pytest.mark.parametrize(
    "spec", ["reference:log_page_shift=16/21", "reference,log_page_shift=16/21"]
)
def test_pair_options_reach_the_model(spec: str) -> None:
    # MIN/MAX options are parsed into the pair the device expects (a 64 KiB minimum log
    # page: the report check negotiates 64 KiB, still fine enough for its 256 KiB window).
    target = conf.target_from_args(_args("--model", spec))
    (res,) = suite.run_suite(target, ["dma-logging-report"])
    assert res.status == PASS and "at 0x10000" in res.reason


def test_devices_the_suite_adds_get_the_checked_options() -> None:
    # The mismatched and fault-injected devices are built from the --model options too: they
    # must get the parsed values (the pair 16/21), not the text of the command line.
    target = conf.target_from_args(_args("--model", "reference:log_page_shift=16/21"))
    res = suite.run_suite(target, ["resume-rejects-bad-streams", "error-recovery"])
    assert [(r.name, r.status) for r in res] == [
        ("resume-rejects-bad-streams", PASS),
        ("error-recovery", PASS),
    ], [r.reason for r in res]
    assert "mismatched: " in res[0].reason


def test_a_teardown_failure_keeps_the_setup_result() -> None:
    class NoDestroy(_Host):
        def ioctl(self, fd: int, request: int, arg: IoctlArg) -> int:
            if request == u.IOMMU_DESTROY:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return super().ioctl(fd, request, arg)

    target = suite.Target(
        LinuxTransport(NoDestroy({"/dev/vfio/devices/vfio3"})), "/dev/vfio/devices/vfio3", None
    )
    res = suite.run_suite(target)
    assert [(r.name, r.status) for r in res] == [("setup", FAIL), ("teardown", FAIL)]


def test_an_internal_error_says_where_and_keeps_the_traceback_for_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(ctx: suite.Ctx) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "CHECKS", [("broken", "a check with a bug", broken)])
    target = conf.target_from_args(_args("--model", "reference"))
    (res,) = suite.run_suite(target)
    assert res.status == FAIL and res.reason.startswith("internal error: RuntimeError: boom (at ")
    assert "test_conformance.py:" in res.reason
    text = suite.render([res], "x")
    assert "Traceback" not in text and "boom" in text  # the table stays one line per check
    doc = res.as_dict()
    assert (
        doc["traceback"][0].startswith("Traceback") and "RuntimeError: boom" in doc["traceback"][-1]
    )
    assert conf.run(_args("--model", "reference")) == 1
    assert "Traceback" not in capsys.readouterr().out


def test_a_finding_is_reported_without_failing_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    code = conf.run(_args("--model", "hisi_acc", "--check", "resume-rechecks-each-session"))
    out = capsys.readouterr().out
    assert code == 0
    assert "FIND  resume-rechecks-each-session" in out and "1 finding" in out
    assert suite.verdict(["resume-rechecks-each-session/accepted"]) == FINDING
    assert suite.verdict(["resume-rechecks-each-session/accepted", "runner/teardown"]) == FAIL
