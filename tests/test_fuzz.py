"""bench/fuzz.py, the structure-aware fuzzer of the model kernel's syscalls, as a test.

A few seeds (every IOMMU vendor) of a few thousand calls each: no exception but OSError may
leave a syscall (IommuFault / UnbackedDma / OSError from the hardware side), and no
invariant the fuzzer checks through the uAPI may break. Defects already recorded as xfail
tests (tests/test_fuzz_findings.py) are KNOWN_DEFECTS and do not fail this test. The
fuzzer itself is tested too: every ioctl of both headers has a template, a seed replays
identically, and an injected defect or broken invariant is reported with its seed and call.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.vfio_main import VfioDevice
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("vfiomig_bench_fuzz", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


fuzz = _load()

SEEDS = range(9)  # three machines per IOMMU vendor (smmuv3, vtd, amd by seed % 3)
CALLS = 4000


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_run_finds_nothing_new(seed: int) -> None:
    fz = fuzz.run_seed(seed, CALLS)
    new = [f for f in fz.findings if f.known is None]
    assert not new, "\n".join(str(f) for f in new)
    if not fz.findings:
        assert fz.ncalls == CALLS  # and the seed ran to its end (then closed everything)
    assert fz.results["ok"] > CALLS // 10
    assert fz.by_call["MIG", "ok"] and fz.by_call["dma_write", "ok"]
    assert fz.maxrss < 1 << 20  # KiB: well under 1 GiB


def test_every_ioctl_of_both_headers_has_a_template() -> None:
    ioctls = fuzz.uapi_ioctls()
    assert set(fuzz.TEMPLATES) == set(ioctls)
    for name, tpl in fuzz.TEMPLATES.items():
        assert tpl.req == ioctls[name], name
    assert len(ioctls) == 55 and u.IOMMU_HW_QUEUE_ALLOC in ioctls.values()


def test_a_seed_replays_the_same_calls() -> None:
    a = fuzz.run_seed(4, 400, record=True)
    b = fuzz.run_seed(4, 400, record=True)
    assert [c.render() for c in a.calls] == [c.render() for c in b.calls]
    assert a.results == b.results


def test_an_exception_other_than_oserror_is_reported_with_seed_and_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = VfioDevice.ioctl_get_info

    def buggy(self: VfioDevice, arg: Any) -> int:
        if not isinstance(arg, int) and arg.len >= 4 and arg.u32(0) == 32:  # argsz 32
            raise IndexError("injected")
        return int(real(self, arg))

    monkeypatch.setattr(VfioDevice, "ioctl_get_info", buggy)
    fz = fuzz.run_seed(1, 20000, record=True)
    f = fz.findings[0]
    assert (f.kind, f.what, f.seed) == ("exception", "IndexError", 1)
    assert "vfio_device_fops_unl_ioctl" in f.where  # the innermost frame in vfiomig
    assert f.call == fz.calls[f.step - 1].render() and "0x3b6b" in f.call
    assert f.known is None
    calls = fz.calls[: f.step]
    small = fuzz.minimize(1, calls, f)
    assert len(small) < max(len(calls) // 10, 4) and "0x3b6b" in small[-1].render()
    again = fuzz.replay(1, small)
    assert again is not None and again.signature == f.signature


def test_a_broken_invariant_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose state changes behind the user's back (here: every DMA read moves a
    reference device to STOP) breaks "the state changes only by a call that may"."""
    from vfiomig.kernel.vfio_reference import ReferenceHw

    real = ReferenceHw.dma_read

    def buggy(self: ReferenceHw, iova: int, length: int) -> bytes:
        self.dev.mig_state = v.VFIO_DEVICE_STATE_STOP
        return bytes(real(self, iova, length))

    monkeypatch.setattr(ReferenceHw, "dma_read", buggy)
    fz = fuzz.run_seed(2, 20000)
    f = fz.findings[0]
    assert f.kind == "invariant" and "state" in f.what and "dma_read" in f.call


def test_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--seed", "5", "--calls", "300"]) == 0
    out = capsys.readouterr().out
    for word in ("calls: 300 in", "calls/s", "OSError:", "other exceptions: 0", "peak RSS:"):
        assert word in out


def test_the_machine_has_every_kind_in_every_state() -> None:
    fz = fuzz.Fuzzer(0)
    fz.build()
    k: ModelKernel = fz.k
    live: dict[str, set[int]] = {k.devices[p].kind: set() for p in fz.devs}
    for p in fz.devs:
        live[k.devices[p].kind].add(k.devices[p].mig_state)  # below the uAPI: ground truth
    assert live["reference"] >= set(range(8))  # ERROR included
    assert live["mtty"] >= set(range(1, 8))
    assert live["hisi_acc"] >= {1, 2, 3, 4, 6}
    kinds = {i.kind for i in fz.fds.values()}
    assert kinds >= {"iommufd", "container", "group", "device", "saving", "resuming"}
