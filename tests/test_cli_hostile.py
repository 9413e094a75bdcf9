"""Every subcommand over hostile and careless arguments: exit status 2 (usage) or 1, one line
on stderr that names the real problem, never a traceback. `vfiomig run` passes its program's
exit status through, so only the no-traceback rule applies to what it runs."""

from __future__ import annotations

import pytest
from conftest import cli

HUGE = "99999999999999999"

CASES = [
    # (argv, exit status, words the one line must hold)
    (["probe", "--model", f"reference,state_size={HUGE}"], 2, ["state_size", "at most"]),
    (["probe", "--model", "hisi_acc,qp_base=abc"], 2, ["qp_base=abc", "integer"]),
    (["probe", "--model", "hisi_acc:qp_base=abc"], 2, ["qp_base=abc", "integer"]),
    (["probe", "--model", "reference,migration_flags=9"], 2, ["migration_flags"]),
    (["probe", "--model", "bogus"], 2, ["unknown device kind", "bogus"]),
    (["probe", "--model", "reference,nope=1"], 2, ["no option", "nope"]),
    (["conformance", "--model", "reference", "--state-size", HUGE], 2, ["state_size"]),
    (["conformance", "--device", "", "--yes"], 2, ["--device", "empty"]),
    (["conformance", "--model", "reference", "--defect", "bogus"], 2, ["bogus"]),
    (["conformance", "--model", "reference", "--check", "bogus"], 2, ["bogus"]),
    (["conformance", "--model", "reference", "--migration-flags", "4"], 2, ["invalid choice"]),
    (["demo", "--memory", "99999T"], 2, ["--memory"]),
    (["demo", "--seed", "-1"], 2, ["--seed"]),
    (["demo", "--memory", "abc"], 2, ["--memory", "abc"]),
    (["migrate", "--memory", "1Q"], 2, ["--memory", "1Q"]),
    (["migrate", "--device", f"reference,state_size={HUGE}"], 2, ["state_size"]),
    (["migrate", "--capability", "bogus"], 2, ["--capability", "bogus"]),
    (["migrate", "--workload", "random,wss=1T,rate=1G"], 2, ["wss"]),
    (["restore", "/nonexistent/save.vmig"], 1, ["No such file"]),
    (["run"], 2, ["no program"]),
    (["bogus"], 2, ["bogus"]),
]


@pytest.mark.parametrize(("argv", "code", "words"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_hostile_arguments_get_one_line(
    argv: list[str], code: int, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    got, out, err = cli(capsys, argv)
    assert "Traceback" not in out + err
    assert got == code, (got, out, err)
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_a_non_iommufd_node_is_not_reported_as_iommufd(capsys: pytest.CaptureFixture[str]) -> None:
    got, out, err = cli(capsys, ["probe", "--iommufd", "/dev/null"])
    assert got == 0 and "Traceback" not in out + err
    assert "iommufd: no" in out


def test_a_missing_device_behind_a_non_iommufd_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["conformance", "--device", "/dev/vfio/devices/vfio0", "--iommufd", "/dev/null", "--yes"]
    got, out, err = cli(capsys, argv)
    assert got == 1 and "Traceback" not in out + err
    assert "/dev/null does not answer as an iommufd" in out


def test_run_passes_a_missing_program_as_127(capsys: pytest.CaptureFixture[str]) -> None:
    got, out, err = cli(capsys, ["run", "--", "/nonexistent/program"])
    assert got == 127 and "Traceback" not in out + err
    assert err.count("\n") == 1 and "/nonexistent/program" in err
