"""``vfiomig migrate --to file:PATH`` and ``vfiomig restore PATH``.

A save file is a 4 KiB header, then the migration stream (vmm.stream sections). The header
is JSON padded with spaces: the format version, the scenario (enough to build a matching
destination), and, filled in once the source has stopped, a digest of the source at
switchover (its RAM and the vCPU state) and a digest per device of what its driver
transfers. ``restore`` builds a fresh destination, loads the stream into it, starts it, and
compares the same digests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from vfiomig.host import VfioError
from vfiomig.sim.costs import CostModel
from vfiomig.sim.run import device_loads
from vfiomig.sim.scenario import Scenario, build_host
from vfiomig.sim.truth import GroundTruth
from vfiomig.sim.world import SimWorld
from vfiomig.vmm import stream as st
from vfiomig.vmm.channel import FileChannel
from vfiomig.vmm.destination import Destination
from vfiomig.vmm.migration import Migration

MAGIC = b"VFIOMIG-SAVE\n"
HEADER_SIZE = 4096
VERSION = 1


def _digest(ram_digest: str, cpu: bytes) -> str:
    return hashlib.blake2b(ram_digest.encode() + cpu, digest_size=16).hexdigest()


def _header(meta: dict[str, Any]) -> bytes:
    body = MAGIC + json.dumps(meta, sort_keys=True).encode()
    if len(body) > HEADER_SIZE - 1:
        raise ValueError("save-file header too large")
    return body + b" " * (HEADER_SIZE - 1 - len(body)) + b"\n"


def migrate_to_file(sc: Scenario, target: str, *, as_json: bool = False) -> int:
    """Migrate the guest into a file, then restore it to check the file. Exit status as
    `vfiomig migrate`'s."""
    if not target.startswith("file:") or len(target) <= 5:
        print("vfiomig migrate: --to takes file:PATH", file=sys.stderr)
        return 2
    path = target[5:]
    if sc.params.cap("return-path") or sc.params.cap("switchover-ack"):
        print(
            "vfiomig migrate: a file has no return path (return-path, switchover-ack)",
            file=sys.stderr,
        )
        return 2
    costs = CostModel()
    src = build_host(sc, source=True)
    try:
        world = SimWorld(
            src.vm.ram, sc.workload, device_loads(src, sc, GroundTruth(src.kernel)), sc.seed
        )
        meta: dict[str, Any] = {
            "version": VERSION,
            "scenario": sc.to_dict(),
            "digest": "",
            "devices": [],
        }
        try:
            f = open(path, "wb")
        except OSError as e:
            print(f"vfiomig migrate: {path}: {e.strerror}", file=sys.stderr)
            return 1
        with f:
            f.write(_header(meta))
            chan = FileChannel(float(sc.link or costs.loopback_rate.value), f)
            mig = Migration(
                src.vm, chan, world, costs, sc.params, tracker=sc.tracker, max_time=sc.max_time
            )
            status = mig.run()
            if status == "completed":
                truth = GroundTruth(src.kernel)
                meta["digest"] = _digest(src.vm.ram.digest(), world.cpu_state())
                meta["devices"] = [truth.device_digest(p) for p in src.paths]
                f.seek(0)
                f.write(_header(meta))
    finally:
        src.vm.close()
    if status != "completed":
        print(f"vfiomig migrate: {status}: {mig.failed_step}: {mig.failure}", file=sys.stderr)
        return 3 if status == "cancelled" else 1
    ok, msg = restore(path)
    out = {
        "status": status,
        "total-time": int(mig.stats.total_time * 1000),
        "downtime": int(mig.stats.downtime * 1000),
        "file": path,
        "vfiomig": {"verified": ok, "restore": msg},
    }
    print(json.dumps(out, indent=2) if as_json else f"saved {path}; restore check: {msg}")
    return 0 if ok else 1


def read_header(f: Any) -> dict[str, Any]:
    raw = f.read(HEADER_SIZE)
    if not raw.startswith(MAGIC) or len(raw) != HEADER_SIZE:
        raise ValueError("not a vfiomig save file")
    try:
        meta = json.loads(raw[len(MAGIC) :])
    except ValueError:
        raise ValueError("damaged save-file header") from None
    if meta.get("version") != VERSION:
        raise ValueError(f"save-file version {meta.get('version')} (this vfiomig reads {VERSION})")
    if not meta.get("digest"):
        raise ValueError("the save file is incomplete (the migration did not finish)")
    return dict(meta)


def restore(path: str) -> tuple[bool, str]:
    """Load a save file into a fresh destination; (verified, what was found)."""
    try:
        with open(path, "rb") as f:
            meta = read_header(f)
            data = f.read()
    except OSError as e:
        return False, f"{path}: {e.strerror}"
    except ValueError as e:
        return False, str(e)
    sc = Scenario.from_dict(meta["scenario"])
    dst = build_host(sc, source=False)
    try:
        dest = Destination(dst.vm)
        dest.setup()
        off = 0
        while off < len(data):
            sec, off = st.decode(data, off)
            dest.apply(sec)
        dest.start()
        digest = _digest(dst.vm.ram.digest(), dest.cpu or b"")
        if digest != meta["digest"]:
            return False, "CORRUPTION: the restored guest differs from the source at switchover"
        truth = GroundTruth(dst.kernel)
        notes = []
        for cfg, p, want in zip(sc.devices, dst.paths, meta["devices"], strict=True):
            if truth.device_digest(p) != want:
                if cfg.kind != "hisi_acc":
                    return False, f"CORRUPTION: {cfg.kind} state differs from the source"
                notes.append("hisi_acc: fields its driver does not carry differ (finding)")
        return True, "restored guest matches the source digest" + "".join(f"; {n}" for n in notes)
    except (st.StreamError, VfioError) as e:
        dest_abort(dst)
        return False, f"the stream does not load: {e}"
    finally:
        dst.vm.close()


def dest_abort(dst: Any) -> None:
    for pd in dst.vm.devices:
        if pd.mig is not None:
            pd.mig.close_data()
