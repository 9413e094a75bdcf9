"""The conformance suite: it passes clean devices and names each injected defect."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from vfiomig.tools import conformance as conf

FAIL, PASS, SKIP = conf.FAIL, conf.PASS, conf.SKIP


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    conf.add_arguments(p)
    return p.parse_args(list(argv))


def _results(*argv: str) -> dict[str, conf.CheckResult]:
    target = conf.target_from_args(_args(*argv))
    return {r.name: r for r in conf.run_suite(target)}


def test_every_check_runs_once_and_names_are_unique() -> None:
    assert len(set(conf.CHECK_NAMES)) == len(conf.CHECK_NAMES) >= 18
    res = _results("--model", "reference")
    assert list(res) == conf.CHECK_NAMES


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
        ("log_misses_writes", "dma-logging-report", "dirty log misses writes"),
        ("no_einval_blocked_arc", "fsm-blocked-arcs", "no EINVAL on the blocked arc"),
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
        assert {"fsm-blocked-arcs", "precopy-info-states"} <= skipped
    if flags in ("1", "5"):
        assert "p2p-quiescence" in skipped


def test_mtty_passes() -> None:
    res = _results("--model", "mtty")
    assert [(n, r.reason) for n, r in res.items() if r.status == FAIL] == []
    assert (
        res["error-recovery"].status == SKIP and "fault injection" in res["error-recovery"].reason
    )


def test_hisi_acc_only_departs_on_its_latched_resume_check() -> None:
    # HiSilicon latches its resume compatibility check (match_done) until the device is
    # opened again: a second resume within one open accepts a corrupted 40-byte stream.
    res = _results("--model", "hisi_acc")
    failed = {n: r.reason for n, r in res.items() if r.status == FAIL}
    assert set(failed) <= {"resume-rejects-bad-streams"}
    if failed:
        assert "had loaded" in failed["resume-rejects-bad-streams"]
    assert res["dma-logging-validation"].status == PASS  # ENOTTY without log ops
    assert res["p2p-quiescence"].status == SKIP


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
    assert doc["summary"] == {"pass": 0, "fail": 1, "skip": 0}
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
    conf.run_suite(target)
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
    monkeypatch.setattr(conf, "KEEP_STREAM", 4096)  # every saved stream goes to a temp file
    clean = _results("--model", "reference")
    assert [r.reason for r in clean.values() if r.status != PASS] == []
    lossy = _results("--model", "reference", "--defect", "lossy_resume")
    reason = lossy["save-resume-roundtrip"].reason
    assert "lossy resume" in reason and "first difference at byte" in reason


def test_stream_helpers() -> None:
    a, b = conf.Stream(), conf.Stream()
    for s in (a, b):
        s.add(b"0123456789")
    assert a == b and conf.first_difference(a, b) == 10
    b.add(b"x")
    assert a != b and conf.first_difference(a, b) == 10
    c = conf.Stream()
    c.add(b"0123")
    c.add(b"4X6789")
    assert conf.first_difference(a, c) == 5
    assert b"".join(conf.truncated(a)) == b"01234"
    assert b"".join(conf.corrupted(a)) == bytes(x ^ 0xFF for x in b"01234567") + b"89"


def test_kernel_release_parsing() -> None:
    assert conf.kernel_release_at_least("7.2.0", 7, 2)
    assert conf.kernel_release_at_least("7.10.1-arch1", 7, 2)
    assert conf.kernel_release_at_least("8.0", 7, 2)
    assert not conf.kernel_release_at_least("6.12.58-generic", 7, 2)
    assert not conf.kernel_release_at_least("7.1.9", 7, 2)
    assert not conf.kernel_release_at_least("weird", 7, 2)


def test_blocked_arcs_are_skipped_when_unsafe() -> None:
    target = conf.target_from_args(_args("--model", "reference", "--check", "fsm-blocked-arcs"))
    target.blocked_arcs_safe = False
    (res,) = conf.run_suite(target, ["fsm-blocked-arcs"])
    assert res.status == SKIP and "hang" in res.reason
