"""`vfiomig probe` on the model, on a faked Linux host, and (marked) on this machine."""

from __future__ import annotations

import argparse
import errno
import json
import os
from typing import Any

import pytest

from vfiomig.cli import build_parser, main
from vfiomig.host import LinuxTransport, Syscalls
from vfiomig.host.transport import IoctlArg
from vfiomig.tools import probe
from vfiomig.uapi import iommufd as u


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["probe", *argv])


def _model_report(*specs: str, iommu: str = "smmuv3") -> dict[str, Any]:
    parsed = [probe.parse_model_spec(s) for s in specs]
    k, paths = probe.build_model(parsed, iommu)
    from vfiomig.host import ModelTransport

    return probe.probe_host(ModelTransport(k), paths)


@pytest.mark.parametrize("sep", [",", ":"])
def test_parse_model_spec(sep: str) -> None:
    s = probe.parse_model_spec(
        f"reference{sep}migration_flags=5,dma_logging=0,defects=lossy_resume+wrong_data_size,"
        "fail_arc=stop/stop_copy/error,state_size=0x1000"
    )
    assert s.kind == "reference"
    assert s.options == {
        "migration_flags": 5,
        "dma_logging": False,
        "defects": frozenset({"lossy_resume", "wrong_data_size"}),
        "fail_arc": ("STOP", "STOP_COPY", "error"),
        "state_size": 4096,
    }
    with pytest.raises(ValueError):
        probe.parse_model_spec("reference:nokey")
    with pytest.raises(ValueError):
        probe.parse_model_spec(":x=1")
    with pytest.raises(ValueError):
        probe.parse_model_spec("reference,nokey")


def test_model_probe_reports_each_device() -> None:
    r = _model_report("mtty", "hisi_acc", "reference", "reference:migration_flags=3,dma_logging=0")
    assert r["transport"] == "model" and r["iommufd"] and r["access"] == "iommufd"
    mtty, hisi, ref, ref3 = r["devices"]
    assert mtty["migration"]["flag_names"] == ["STOP_COPY", "P2P", "PRE_COPY"]
    assert mtty["migration"]["data_size"] == 24 + 36 * 2
    assert hisi["migration"]["flags"] == 5 and hisi["migration"]["data_size"] == 176
    assert hisi["migration"]["precopy_info_v2"] is True
    assert hisi["dma_logging"] == {"supported": False}
    assert hisi["iommu"] == {"type": "arm-smmuv3", "dirty_tracking": True}
    assert ref["migration"]["state"] == "RUNNING"
    assert ref["dma_logging"]["supported"] and ref["dma_logging"]["page_size"] == 4096
    assert ref3["migration"]["flag_names"] == ["STOP_COPY", "P2P"]
    assert ref3["migration"]["precopy_info_v2"] is False  # EINVAL without PRE_COPY
    assert ref3["dma_logging"] == {"supported": False}


def test_iommu_without_dirty_tracking_is_reported() -> None:
    r = _model_report("reference:iommu_dirty=0", iommu="vtd")
    dev = r["devices"][0]
    assert dev["iommu"]["type"] == "intel-vtd" and dev["iommu"]["dirty_tracking"] is False


def test_probe_leaves_no_fds_and_state_untouched() -> None:
    from vfiomig.host import Iommufd, MigrationState, ModelTransport, VfioDevice

    k, paths = probe.build_model([probe.parse_model_spec("reference")])
    probe.probe_host(ModelTransport(k), paths)
    assert k.fdt.files == {}
    # mtty keeps its migration state across close and open: leave it in STOP, probe, and
    # the probe must see STOP and leave it there.
    k, (path,) = probe.build_model([probe.parse_model_spec("mtty")])
    t = ModelTransport(k)
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        dev.bind(ictx)
        assert dev.set_state(MigrationState.STOP) is None
    (entry,) = probe.probe_host(t, [path])["devices"]
    assert entry["migration"]["state"] == "STOP"
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        dev.bind(ictx)
        assert dev.get_state() == MigrationState.STOP
    assert k.fdt.files == {}


def test_cli_model_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.run(_args("--model", "hisi_acc", "--model", "reference")) == 0
    out = capsys.readouterr().out
    assert "STOP_COPY|PRE_COPY" in out and "STOP_COPY|P2P|PRE_COPY" in out
    assert "DMA LOG" in out and "yes, 0x1000" in out
    assert probe.run(_args("--model", "mtty", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["devices"][0]["model"] == "mtty"


class NoVfio(Syscalls):
    def exists(self, path: str) -> bool:
        return False

    def listdir(self, path: str) -> list[str]:
        return []


def test_host_without_vfio_says_so_and_shows_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "LinuxTransport", lambda: LinuxTransport(NoVfio()))
    assert probe.run(_args()) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("No VFIO on this host")
    assert len([line for line in out if line.startswith("/dev/vfio/devices/")]) == 3


class OnlyIommufdAt(NoVfio):
    """A host whose one VFIO node is an iommufd at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def exists(self, path: str) -> bool:
        return path == self.path


@pytest.mark.parametrize(
    ("node", "argv", "on_linux"),
    [
        ("/run/iommu", ["--iommufd", "/run/iommu"], True),
        ("/dev/iommu", ["--iommufd", "/run/iommu"], False),
        ("/dev/iommu", [], True),
    ],
)
def test_no_vfio_decision_follows_iommufd_option(
    node: str,
    argv: list[str],
    on_linux: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(probe, "LinuxTransport", lambda: LinuxTransport(OnlyIommufdAt(node)))
    assert probe.run(_args(*argv, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["transport"] == ("linux" if on_linux else "model")
    if on_linux:
        assert doc["iommufd"] is True and doc["devices"] == []
    else:
        assert doc["note"].startswith("No VFIO on this host") and "/run/iommu" in doc["note"]


class BusyHost(Syscalls):
    """A host with iommufd and two cdevs, one held by a VM."""

    def __init__(self) -> None:
        self.fds: set[int] = set()

    def exists(self, path: str) -> bool:
        return path in ("/dev/iommu", "/dev/vfio/devices") or path in {
            f"/dev/vfio/devices/{n}" for n in self.listdir("/dev/vfio/devices")
        }

    def listdir(self, path: str) -> list[str]:
        return ["vfio10", "vfio2"] if path == "/dev/vfio/devices" else []

    def realpath(self, path: str) -> str:
        return path

    def open(self, path: str, flags: int) -> int:
        if path.endswith("vfio10"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        fd = 100 + len(self.fds)
        self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.remove(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg) -> int:
        # /dev/iommu answers as an iommufd (an IOAS comes and goes); nothing else is served
        if request in (u.IOMMU_IOAS_ALLOC, u.IOMMU_DESTROY):
            return 0
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


def test_linux_probe_through_the_seam() -> None:
    sysc = BusyHost()
    r = probe.probe_host(LinuxTransport(sysc))
    paths = [d["path"] for d in r["devices"]]
    assert paths == ["/dev/vfio/devices/vfio2", "/dev/vfio/devices/vfio10"]  # natural order
    assert "EBUSY" in r["devices"][1]["error"] and "in use" in r["devices"][1]["error"]
    assert "VFIO_DEVICE_BIND_IOMMUFD" in r["devices"][0]["error"]
    assert sysc.fds == set()
    table = probe.render_table(r)
    assert "vfio10" in table and "in use" in table


@pytest.mark.hardware
@pytest.mark.skipif(
    not (os.path.exists("/dev/iommu") or os.path.exists("/dev/vfio")),
    reason="no /dev/iommu or /dev/vfio on this machine",
)
def test_probe_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.run(_args("--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["transport"] == "linux"
    for dev in doc["devices"]:
        assert "error" in dev or "migration" in dev


def test_emulated_device_has_no_iommu() -> None:
    r = _model_report("mtty")
    assert r["devices"][0]["iommu"] == {"type": "emulated", "dirty_tracking": False}


@pytest.mark.parametrize(
    ("device", "phrase"),
    [("/dev/vfio/devices/vfio10", "in use"), ("/dev/vfio/devices/vfio7", "no such device node")],
)
def test_a_named_device_that_cannot_be_probed_is_a_failure(
    device: str, phrase: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "LinuxTransport", lambda: LinuxTransport(BusyHost()))
    assert probe.run(_args("--device", device)) == 1
    assert phrase in capsys.readouterr().out
    # listing every device: one held by a VM is reported, not a failure of the probe
    assert probe.run(_args()) == 0


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ("reference:bogus=1", "reference has no option 'bogus' (its options: migration_flags,"),
        ("reference,bogus=1", "reference has no option 'bogus' (its options: migration_flags,"),
        ("mtty:defects=lossy_resume", "mtty has no option 'defects'"),
        ("mtty,defects=lossy_resume", "mtty has no option 'defects'"),
        ("reference:state_size=abc", "state_size=abc: expected an integer"),
        ("reference,dma_logging=2", "dma_logging=2: expected 0 or 1"),
        ("reference,log_page_shift=5", "log_page_shift=5: expected 2 integers like 12/21"),
        ("hisi_acc:qp_num=x", "qp_num=x: expected an integer"),
        ("hisi_acc,qp_num=1,qp_num=2", "option 'qp_num' given twice"),
        ("reference,fail_arc=STOP", "fail_arc=STOP: expected FROM/TO/MODE"),
        ("bogus", "unknown device kind 'bogus'"),
        (",x=1", "no KIND before ','"),
    ],
)
def test_bad_model_options_are_usage_errors(
    spec: str, phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["probe", "--model", "mtty", "--model", spec])
    assert e.value.code == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "Traceback" not in cap.err
    assert cap.err.startswith("vfiomig probe: error: argument --model: ") and phrase in cap.err
    assert cap.err.count("\n") == 1


def test_a_model_that_fails_to_build_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # a value of the right type the device refuses (the device checks values)
    assert probe.run(_args("--model", "reference,migration_flags=6")) == 2
    assert "vfiomig probe: bad --model: migration_flags must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--iommu-hw", "--iommu"])
@pytest.mark.parametrize("sep", [",", ":"])
def test_iommu_hw_and_both_spec_syntaxes(
    flag: str, sep: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["probe", "--iommufd", "/dev/iommu", flag, "amd", "--json"]
    assert main([*argv, "--model", f"reference{sep}migration_flags=5,dma_logging=0"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["iommu_model"] == "amd"
    (dev,) = doc["devices"]
    assert dev["model"] == "reference,migration_flags=5,dma_logging=0"  # the canonical syntax
    assert dev["iommu"]["type"] == "amd"
    assert dev["migration"]["flag_names"] == ["STOP_COPY", "PRE_COPY"]
    assert dev["dma_logging"]["supported"] is False
    deprecated = "vfiomig probe: warning: --iommu is deprecated, use --iommu-hw\n"
    assert cap.err == (deprecated if flag == "--iommu" else "")


def test_model_option_types_follow_the_device() -> None:
    opts = probe.check_model_options(
        "reference", probe.parse_model_spec("reference:log_page_shift=13/20,iommu_dirty=0").options
    )
    assert opts == {"log_page_shift": (13, 20), "iommu_dirty": False}
    k, (path,) = probe.build_model([probe.parse_model_spec("reference:log_page_shift=13/20")])
    from vfiomig.host import ModelTransport

    r = probe.probe_host(ModelTransport(k), [path])
    assert r["devices"][0]["dma_logging"]["page_size"] == 1 << 13


def test_a_bug_below_the_uapi_is_reported_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only OSError is a kernel's answer; anything else (a model bug) must not end the probe.
    from vfiomig.host import ModelTransport

    def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(probe, "_probe_bound", broken)
    k, paths = probe.build_model([probe.parse_model_spec("reference")])
    (dev,) = probe.probe_host(ModelTransport(k), paths)["devices"]
    assert dev["error"].startswith("internal error: RuntimeError: boom (at test_probe.py:")
    assert k.fdt.files == {}  # the device and iommufd were closed on the way out
    assert probe.run(_args("--model", "mtty")) == 1
    out = capsys.readouterr().out
    assert "internal error: RuntimeError: boom" in out and "Traceback" not in out
