"""``vfiomig migrate --to file:PATH`` and ``vfiomig restore PATH``.

A save file is a 4 KiB header, then the migration stream (vmm.stream sections). The header
is ``MAGIC``, then JSON padded with spaces to 4095 bytes, then a newline:

  version   the format version (``VERSION``; another one is refused, not guessed at)
  scenario  enough to build a matching destination (Scenario.to_dict)
  digest    the source at switchover: its RAM and its vCPU state; empty until the source
            has stopped, so a save that did not complete reads as incomplete
  ram       the RAM part of ``digest`` alone (to say which part differs)
  devices   per device, a hash of what its driver transfers (sim.truth)

``restore`` checks the header, builds a fresh destination from its scenario, loads the
stream into it section by section (each section's checksum checked, its length checked
against what the file still holds before anything is read), starts it, and compares the
digests. Every way a file can be wrong (not a save file, another version, a damaged or
incomplete header, a damaged, truncated or inconsistent stream, a restored guest that
differs) is a one-line message, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from vfiomig.host import VfioError
from vfiomig.hw.iommu import VENDORS
from vfiomig.sim.costs import CostModel
from vfiomig.sim.run import MAX_DEVICES, WARMUP, Result, device_loads, source_recovered
from vfiomig.sim.scenario import Host, Scenario, build_host
from vfiomig.sim.truth import GroundTruth
from vfiomig.sim.world import SimWorld
from vfiomig.vmm import stream as st
from vfiomig.vmm.channel import FileChannel
from vfiomig.vmm.destination import Destination
from vfiomig.vmm.guest_ram import WINDOW
from vfiomig.vmm.migration import Migration

MAGIC = b"VFIOMIG-SAVE\n"
HEADER_SIZE = 4096
VERSION = 2  # 2: device digests are hashes, the RAM digest is recorded apart

# What this machine builds a guest of (migrate checks its options against the same limits).
MEMORY_MIN = 2 * WINDOW  # 32 MiB
MEMORY_MAX = 1 << 40
BYTES_MAX = 16 << 30  # real bytes for at most this much guest RAM


def check_guest(memory: int, mode: str) -> None:
    """ValueError unless a guest of ``memory`` bytes with ``mode`` RAM can be built here."""
    if memory % (2 << 20) or not MEMORY_MIN <= memory <= MEMORY_MAX:
        raise ValueError(
            f"{memory} bytes of guest RAM: it must be a multiple of 2M from "
            f"{MEMORY_MIN >> 20}M to {MEMORY_MAX >> 40}T"
        )
    if mode not in ("bytes", "versions"):
        raise ValueError(f"RAM content {mode!r}: bytes or versions")
    if mode == "bytes" and memory > BYTES_MAX:
        raise ValueError(
            f"RAM content bytes is limited to {BYTES_MAX >> 30}G of guest RAM on this machine"
        )


def _hash(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _digest(ram_digest: str, cpu: bytes) -> str:
    return _hash(ram_digest.encode() + cpu)


def _header(meta: dict[str, Any]) -> bytes:
    body = MAGIC + json.dumps(meta, sort_keys=True).encode()
    if len(body) > HEADER_SIZE - 1:
        raise ValueError("save-file header too large")
    return body + b" " * (HEADER_SIZE - 1 - len(body)) + b"\n"


# -- saving -----------------------------------------------------------------------------------


class SaveError(Exception):
    """The save file could not be written at all (one line: the path and the reason)."""


@dataclass
class Saved:
    """A ``--to file:PATH`` run: the migration's Result (verified from the restore check)
    and what restoring the file found (None if the migration did not complete)."""

    result: Result
    path: str
    restore: Restore | None = None


def save(sc: Scenario, path: str, *, costs: CostModel | None = None) -> Saved:
    """Migrate the scenario's guest into ``path``, then restore the file into a fresh
    destination to check it. The result's exit_code is `vfiomig migrate`'s.

    Blockers keep the file from being created (QEMU checks them before it opens the
    channel). SaveError if the file cannot be created; VfioError if the source host cannot
    be set up."""
    costs = costs or CostModel()
    wall0 = time.perf_counter()
    res = Result(sc, "setup")
    src = build_host(sc, source=True)
    try:
        _save(sc, path, costs, src, res)
    finally:
        src.vm.close()
        res.wall = time.perf_counter() - wall0
    saved = Saved(res, path)
    if res.status == "completed":
        saved.restore = restore(path)
        res.verified = saved.restore.ok
        res.corruption += saved.restore.problems
        res.wall = time.perf_counter() - wall0
    return saved


def _save(sc: Scenario, path: str, costs: CostModel, src: Host, res: Result) -> None:
    res.blocked = src.vm.blockers(sc.enable_migration)
    res.warnings = list(src.vm.warnings)
    if res.blocked:
        res.status = "none"
        return
    world = SimWorld(
        src.vm.ram, sc.workload, device_loads(src, sc, GroundTruth(src.kernel)), sc.seed
    )
    world.advance(WARMUP)  # as sim.run: the devices are busy when the migration starts
    world.now = 0.0
    meta: dict[str, Any] = {
        "version": VERSION,
        "scenario": sc.to_dict(),
        "digest": "",
        "ram": "",
        "devices": [],
    }
    try:
        f = open(path, "wb")
    except OSError as e:
        raise SaveError(f"{path}: {e.strerror}") from None
    try:
        _write(sc, path, costs, src, world, meta, f, res)
    finally:
        try:
            f.close()  # the last buffered bytes: a full disk may only show here
        except OSError as e:
            if res.status == "completed":
                res.status, res.error = "failed", f"{path}: {e.strerror}"


def _write(
    sc: Scenario,
    path: str,
    costs: CostModel,
    src: Host,
    world: SimWorld,
    meta: dict[str, Any],
    f: io.BufferedWriter,
    res: Result,
) -> None:
    try:
        f.write(_header(meta))
    except OSError as e:
        res.status, res.error = "failed", f"{path}: {e.strerror}"
        return
    chan = FileChannel(float(sc.link or costs.loopback_rate.value), f)
    mig = Migration(src.vm, chan, world, costs, sc.params, tracker=sc.tracker, max_time=sc.max_time)
    res.mig = mig
    res.status = mig.run()
    res.tracker = mig.tracker.label if mig.tracker else "none"
    res.sim_time = mig.stats.total_time
    if res.status != "completed":
        res.error = f"{mig.failed_step}: {mig.failure}" if mig.failure else ""
        _check_recovered(src, mig, res)
        return
    truth = GroundTruth(src.kernel)
    ram = src.vm.ram.digest()
    meta["ram"] = ram
    meta["digest"] = _digest(ram, world.cpu_state())
    meta["devices"] = [_hash(truth.device_digest(p)) for p in src.paths]
    try:
        f.seek(0)
        f.write(_header(meta))
        f.flush()
    except OSError as e:
        res.status, res.error = "failed", f"{path}: {e.strerror}"


def _check_recovered(src: Host, mig: Migration, res: Result) -> None:
    """After a failed or cancelled save: the source checked as sim.run checks it."""
    res.corruption += source_recovered(src, mig)
    res.verified = not res.corruption


# -- restoring --------------------------------------------------------------------------------


class RestoreError(Exception):
    """Why a file does not restore (one line)."""


@dataclass
class Restore:
    """What ``restore`` found. ``problems`` are differences between the restored guest and
    the source (corruption); a file that does not load has ``message`` only."""

    ok: bool
    message: str
    problems: list[str] = field(default_factory=list)


def restore(path: str) -> Restore:
    """Load a save file into a fresh destination and compare it with the source's digests."""
    try:
        with open(path, "rb") as f:
            meta = read_header(f)
            sc = _scenario(meta)
            return _restore(sc, meta, f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        return Restore(False, f"{path}: {e.strerror or e}")
    except RestoreError as e:
        return Restore(False, str(e))


def read_header(f: IO[bytes]) -> dict[str, Any]:
    """The header of an open save file, checked; RestoreError says what is wrong."""
    raw = f.read(HEADER_SIZE)
    if not raw.startswith(MAGIC):
        if raw and MAGIC.startswith(raw):
            raise RestoreError(f"truncated save file: {len(raw)} bytes, no header")
        raise RestoreError("not a vfiomig save file (no VFIOMIG-SAVE header)")
    if len(raw) < HEADER_SIZE:
        raise RestoreError(f"truncated save file: the header is {len(raw)} of {HEADER_SIZE} bytes")
    try:
        meta = json.loads(raw[len(MAGIC) :])
    except ValueError:
        raise RestoreError("damaged save-file header (not JSON)") from None
    if not isinstance(meta, dict) or "version" not in meta:
        raise RestoreError("damaged save-file header (no format version)")
    if meta["version"] != VERSION:
        raise RestoreError(
            f"save file of format version {meta['version']!r}: this vfiomig reads "
            f"version {VERSION} (save it again with this vfiomig)"
        )
    if meta.get("digest") == "":
        raise RestoreError(
            "incomplete save file: the migration into it did not complete (no digest)"
        )
    for key in ("digest", "ram"):
        if not isinstance(meta.get(key), str):
            raise RestoreError(f"damaged save-file header ({key!r} missing)")
    if not isinstance(meta.get("devices"), list) or not isinstance(meta.get("scenario"), dict):
        raise RestoreError("damaged save-file header (no scenario or device digests)")
    return meta


def _scenario(meta: dict[str, Any]) -> Scenario:
    """The header's scenario, checked against what this machine builds."""
    try:
        sc = Scenario.from_dict(meta["scenario"])
        check_guest(sc.memory, sc.mode)
        if not 0.0 <= sc.zero <= 1.0:
            raise ValueError(f"zero fraction {sc.zero}")
        if sc.iommu not in ("iommufd", "type1") or sc.iommu_hw not in VENDORS:
            raise ValueError(f"IOMMU {sc.iommu}/{sc.iommu_hw}")
        if len(sc.devices) > MAX_DEVICES:
            raise ValueError(f"{len(sc.devices)} devices")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RestoreError(f"damaged save-file header (its scenario: {e})") from None
    if len(meta["devices"]) != len(sc.devices):
        raise RestoreError("damaged save-file header (device digests do not match its devices)")
    return sc


def _sections(f: IO[bytes], size: int) -> Iterator[st.Section]:
    """The stream's sections, read one at a time; a length larger than what the file still
    holds is refused before anything is read (a damaged length must not allocate)."""
    off = HEADER_SIZE
    while True:
        head = f.read(st.HEADER.size)
        if not head:
            return
        if len(head) < st.HEADER.size:
            raise st.StreamError(f"truncated section header at byte {off}")
        length = st.HEADER.unpack_from(head, 0)[4]
        left = size - off - st.HEADER.size
        if length > left:
            raise st.StreamError(
                f"truncated section at byte {off}: {length} bytes announced, {left} in the file"
            )
        yield st.check(head, f.read(length), off)
        off += st.HEADER.size + length


def _restore(sc: Scenario, meta: dict[str, Any], f: IO[bytes], size: int) -> Restore:
    try:
        dst = build_host(sc, source=False)
    except (ValueError, TypeError, VfioError) as e:
        raise RestoreError(f"damaged save-file header (its scenario does not build: {e})") from None
    dest = Destination(dst.vm)
    try:
        try:
            dest.setup()
            for sec in _sections(f, size):
                dest.apply(sec)
            if not dest.eos:
                raise st.StreamError("the stream did not reach its end (END OF STREAM)")
            missing = [d.name for i, d in enumerate(dest.devices) if i not in dest.configured]
            if missing:
                raise st.StreamError(f"no device CONFIG section for {', '.join(missing)}")
            dest.start()
        except (st.StreamError, VfioError) as e:
            dest.abort()
            return Restore(False, f"the stream does not load: {e}")
        except Exception as e:  # a section the loader did not expect to be malformed
            dest.abort()
            return Restore(False, f"the stream does not load: {type(e).__name__}: {e}")
        return _compare(sc, meta, dst, dest)
    finally:
        dst.vm.close()


def _compare(sc: Scenario, meta: dict[str, Any], dst: Host, dest: Destination) -> Restore:
    problems: list[str] = []
    ram = dst.vm.ram.digest()
    if ram != meta["ram"]:
        problems.append("guest RAM differs from the source at switchover")
    elif _digest(ram, dest.cpu or b"") != meta["digest"]:
        problems.append("vCPU state differs from the source at switchover")
    truth = GroundTruth(dst.kernel)
    for pd, want in zip(dst.vm.devices, meta["devices"], strict=True):
        if _hash(truth.device_digest(pd.path)) != want:
            problems.append(f"{pd.name}: device state differs from what the source transferred")
    if problems:
        return Restore(False, "CORRUPTION: " + "; ".join(problems), problems)
    n = len(sc.devices)
    what = (
        f"guest RAM, vCPU state and {n} device{'s' if n != 1 else ''}"
        if n
        else ("guest RAM and vCPU state")
    )
    return Restore(True, f"restored and verified: {what} match the source at switchover")
