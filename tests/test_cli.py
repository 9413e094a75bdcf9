"""The `vfiomig` command line."""

from __future__ import annotations

import pytest

from vfiomig.cli import main


def table(out: str) -> dict[str, list[int]]:
    """The demo's 'pages sent per round' rows, by dirty-tracking name."""
    rows: dict[str, list[int]] = {}
    for line in out.splitlines():
        for name in ("iommufd, 4 KiB IOPTEs", "iommufd, 2 MiB IOPTEs", "type1 (pinned = dirty)"):
            if line.startswith(name):
                rows[name] = [int(x) for x in line[len(name) :].split()[:-1]]
    return rows


def test_demo_migrates_and_reports_what_each_tracker_costs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--ram-mib", "8", "--rounds", "2", "--dma-pages", "50"]) == 0
    out = capsys.readouterr().out
    assert out.count("guest RAM identical: yes; accelerator queue state identical: yes") == 2
    rows = table(out)
    pages = 8 << 20 >> 12
    # 4 KiB IOPTEs: round 0 sends all RAM, then exactly the pages the device wrote per round,
    # then a few pages the stopped queue manager wrote back on its way to STOP_COPY.
    small = rows["iommufd, 4 KiB IOPTEs"]
    assert small[:3] == [pages, 50, 50] and 0 < small[3] < 50
    # 2 MiB IOPTEs: dirty at leaf granularity, so whole 512-page multiples.
    assert all(n % 512 == 0 and n > 0 for n in rows["iommufd, 2 MiB IOPTEs"])
    # type1 with a passthrough device: every mapped page, every round.
    assert rows["type1 (pinned = dirty)"] == [pages] * 4


def test_demo_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--ram-mib", "4", "--rounds", "1", "--dma-pages", "20", "--seed", "7"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv", [["--ram-mib", "0"], ["--ram-mib", "1", "--dma-pages", "100000"]])
def test_demo_rejects_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *argv]) == 2
    assert "vfiomig demo:" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--iommu-hw", "--iommu"])
def test_demo_takes_the_iommu_under_both_names(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--ram-mib", "4", "--rounds", "1", "--dma-pages", "20", flag, "vtd"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out.count("source: intel-vtd IOMMU") == 2
    deprecated = "vfiomig demo: warning: --iommu is deprecated, use --iommu-hw\n"
    assert cap.err == (deprecated if flag == "--iommu" else "")


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
        (["demo", "--ram-mib", "x"], "vfiomig demo: error: argument --ram-mib: invalid int value"),
        (["demo", "--ram", "8"], "vfiomig demo: error: unrecognized arguments: --ram 8"),
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
