"""The `vfiomig` command line."""

from __future__ import annotations

import pytest

from vfiomig.cli import main
from vfiomig.uapi import iommufd as u


def test_demo_prints_real_request_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("IOMMU_")}
    assert int(rows["IOMMU_HWPT_GET_DIRTY_BITMAP"][1], 16) == u.IOMMU_HWPT_GET_DIRTY_BITMAP
    assert rows["IOMMU_HWPT_GET_DIRTY_BITMAP"][-1] == "(48)"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
