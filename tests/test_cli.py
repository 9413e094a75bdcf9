"""The `vfiomig` command line."""

from __future__ import annotations

import pytest

from vfiomig.cli import main


def table(out: str) -> dict[str, list[str]]:
    """The demo's side-by-side rows, by name: the columns after it."""
    rows: dict[str, list[str]] = {}
    names = [
        "iommufd, 4 KiB IOPTEs",
        "iommufd, 2 MiB IOPTEs",
        "type1 (enable-migration=auto)",
        "type1 (enable-migration=on)",
        "type1 (on, downtime-limit 30 s)",
        "reference: device DMA logging",
        "reference: IOMMU (tracking=off)",
    ]
    for line in out.splitlines():
        for name in names:
            if line.startswith(name):
                rows[name] = line[len(name) :].split()
    assert sorted(rows) == sorted(names)
    return rows


def test_demo_runs_the_main_job_and_compares_the_trackers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--memory", "64M"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("$ vfiomig migrate --memory 64M --device hisi_acc")
    assert "dirty tracking: IOMMU dirty bits" in out and "result: verified" in out
    rows = table(out)
    small, huge = rows["iommufd, 4 KiB IOPTEs"], rows["iommufd, 2 MiB IOPTEs"]
    assert small[0] == huge[0] == "completed" and small[-1] == huge[-1] == "yes"
    assert float(huge[3]) > float(small[3])  # MiB sent: dirt is reported per 2 MiB leaf
    assert rows["type1 (enable-migration=auto)"][0] == "blocked"
    assert rows["type1 (enable-migration=on)"][:1] == ["cancelled"]
    assert rows["type1 (enable-migration=on)"][-2:] == ["source", "intact"]
    slow = rows["type1 (on, downtime-limit 30 s)"]
    # the whole guest (64 MiB of data less the device window) goes in the downtime
    assert slow[0] == "completed" and float(slow[2]) >= 48 * 2**20 / 2e9 * 1000
    for name in ("reference: device DMA logging", "reference: IOMMU (tracking=off)"):
        assert rows[name][0] == "completed" and rows[name][-1] == "yes"


@pytest.mark.parametrize("argv", [["--memory", "1M"], ["--memory", "65M"], ["--seed", "-1"]])
def test_demo_rejects_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *argv]) == 2
    assert "vfiomig demo:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["probe", "conformance", "demo"])
def test_every_command_names_the_iommu_model_iommu_hw(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--iommu-hw {smmuv3,vtd,amd}" in out and "--iommu is a deprecated alias" in out
    if command != "demo":
        assert "--model KIND[,key=value,...]" in out


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["demo", "--iommu-hw", "arm"], "vfiomig demo: error: argument --iommu-hw: invalid choice"),
        (["demo", "--iommu"], "vfiomig demo: error: argument --iommu: expected one argument"),
        (["demo", "--memory", "x"], "vfiomig demo: error: argument --memory: invalid size"),
        (["demo", "--mem", "8M"], "vfiomig demo: error: unrecognized arguments: --mem 8M"),
        (["probe", "--model", "reference,x"], "vfiomig probe: error: argument --model: invalid"),
        (["probe", "--iommu-h", "vtd"], "vfiomig probe: error: unrecognized arguments: --iommu-h"),
        (["--bogus"], "vfiomig: error: "),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(phrase) and err.count("\n") == 1 and "Traceback" not in err
    assert err.endswith("--help)\n")


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_not_a_traceback() -> None:
    # `vfiomig probe --json | head -1`: the reader is gone; no traceback, SIGPIPE's status.
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # nobody will read: the first write fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vfiomig.cli", "probe", "--model", "mtty", "--json"],
            stdout=w,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert proc.returncode == 141
