"""`vfiomig migrate --to file:PATH` and `vfiomig restore PATH`: a save restores and verifies;
every way a file can be wrong (damaged, truncated, incomplete, another version, not a save
file) is one clear line and exit status 1; and the judge fails on a save whose RAM, vCPU or
device state was altered after the header was written (CORRUPTION)."""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from vfiomig.cli import main
from vfiomig.sim.savefile import HEADER_SIZE, MAGIC
from vfiomig.vmm import stream as st

# The smallest guest, mostly zero pages: a save file of a few MiB.
SMALL = ["--memory", "32M,zero=0.75", "--workload", "random,wss=4M,rate=8M"]


@dataclass
class Sec:
    """One section of a save file's stream: its header fields and payload."""

    type: int
    sub: int
    index: int
    payload: bytearray

    def encode(self, crc: bool = True) -> bytes:
        c = zlib.crc32(self.payload) if crc else 0
        head = st.HEADER.pack(st.MAGIC, self.type, self.sub, self.index, len(self.payload), c)
        return head + bytes(self.payload)


def split(path: Path) -> tuple[bytes, list[Sec]]:
    data = path.read_bytes()
    header, body = data[:HEADER_SIZE], data[HEADER_SIZE:]
    secs, off = [], 0
    while off < len(body):
        s, off = st.decode(body, off)
        secs.append(Sec(s.type, s.sub, s.index, bytearray(s.payload)))
    return header, secs


def join(path: Path, header: bytes, secs: list[Sec]) -> Path:
    path.write_bytes(header + b"".join(s.encode() for s in secs))
    return path


def rewrite_header(header: bytes, **changes: object) -> bytes:
    meta = json.loads(header[len(MAGIC) :])
    meta.update(changes)
    body = MAGIC + json.dumps(meta).encode()
    return body + b" " * (HEADER_SIZE - 1 - len(body)) + b"\n"


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two saves made once: a guest with a reference device (PRE_COPY) and one with a
    hisi_acc ZIP VF (each migration is checked by restoring it)."""
    d = tmp_path_factory.mktemp("saves")
    out = {}
    for name, device in (("reference", "reference,migration_flags=7"), ("hisi", "hisi_acc")):
        path = d / f"{name}.vmig"
        assert main(["migrate", *SMALL, "--device", device, "--to", f"file:{path}"]) == 0
        out[name] = path
    return out


@pytest.fixture
def ref(saves: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the reference save, free to damage."""
    return Path(shutil.copy(saves["reference"], tmp_path / "guest.vmig"))


def restore_fails(capsys: pytest.CaptureFixture[str], path: Path, *words: str) -> str:
    code, out, err = cli(capsys, ["restore", str(path)])
    assert "Traceback" not in out + err
    assert code == 1, (code, out, err)
    assert out == "" and err.startswith("vfiomig restore: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# -- saving and restoring -------------------------------------------------------------------------


def test_save_then_restore_verifies(
    saves: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for path in saves.values():
        code, out, err = cli(capsys, ["restore", str(path)])
        assert code == 0 and err == ""
        assert "verified: guest RAM, vCPU state and 1 device match the source" in out
    # the file: spelling of --to is taken too
    assert cli(capsys, ["restore", f"file:{saves['reference']}"])[0] == 0


def test_save_reports_like_a_migration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.vmig"
    code, out, err = cli(capsys, ["migrate", *SMALL, "--to", f"file:{path}", "--json"])
    assert code == 0, err
    q = json.loads(out)
    assert q["status"] == "completed" and isinstance(q["downtime"], int)
    assert q["ram"]["total"] == 32 << 20 and q["ram"]["normal"] > 0
    assert q["vfiomig"]["file"] == str(path) and q["vfiomig"]["verified"] is True
    assert "match the source" in q["vfiomig"]["restore"]
    code, out, _ = cli(capsys, ["migrate", *SMALL, "--to", f"file:{path}"])
    assert code == 0 and out.splitlines()[-1].startswith(f"file: {path}; restore: restored")


def test_a_blocked_save_writes_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.vmig"
    argv = ["migrate", *SMALL, "--device", "hisi_acc", "--iommu", "type1", "--to", f"file:{path}"]
    code, out, _ = cli(capsys, argv)
    assert code == 4 and "migration blocked" in out
    assert not path.exists()


def test_a_save_into_nowhere_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, ["migrate", *SMALL, "--to", f"file:{tmp_path}/no/such/dir/g"])
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and "No such file or directory" in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_fails_the_save(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, ["migrate", *SMALL, "--to", "file:/dev/full", "--json"])
    q = json.loads(out)
    assert code == 1 and "Traceback" not in err
    assert q["status"] == "failed" and "No space left on device" in q["error-desc"]


# -- files that are not what they claim ------------------------------------------------------------


def test_a_flipped_byte_in_the_stream(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(ref.read_bytes())
    data[HEADER_SIZE + 5000] ^= 0x40  # inside the first RAM section's payload
    ref.write_bytes(data)
    restore_fails(capsys, ref, "does not load", "checksum mismatch")


@pytest.mark.parametrize(
    ("cut", "words"),
    [
        (lambda n, ends: n - 100, ("truncated",)),  # inside the last section
        (lambda n, ends: ends[-2], ("did not reach its end",)),  # before END OF STREAM
        (lambda n, ends: ends[-2] + 7, ("truncated section header",)),
        (lambda n, ends: HEADER_SIZE, ("did not reach its end",)),  # the header alone
        (lambda n, ends: 2000, ("truncated", "header")),
        (lambda n, ends: 5, ("truncated",)),
    ],
    ids=["mid-section", "at-a-boundary", "mid-header", "header-only", "in-header", "in-magic"],
)
def test_a_truncated_file(
    ref: Path, cut: object, words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    header, secs = split(ref)
    ends, off = [], HEADER_SIZE
    for s in secs:
        off += st.HEADER.size + len(s.payload)
        ends.append(off)
    data = ref.read_bytes()
    n = cut(len(data), ends)  # type: ignore[operator]
    ref.write_bytes(data[:n])
    restore_fails(capsys, ref, *words)


def test_a_header_from_another_version(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, secs = split(ref)
    join(ref, rewrite_header(header, version=99), secs)
    restore_fails(capsys, ref, "version 99")


def test_not_a_save_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(1).bytes(3 * HEADER_SIZE))
    restore_fails(capsys, path, "not a vfiomig save file")


def test_an_incomplete_save(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, secs = split(ref)
    join(ref, rewrite_header(header, digest=""), secs)
    restore_fails(capsys, ref, "incomplete")


def test_a_cancelled_save_leaves_an_incomplete_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "g.vmig"
    argv = ["migrate", "--memory", "32M", "--workload", "sequential,wss=12M,rate=2G"]
    argv += ["--downtime-limit", "10"]  # never converges: 12M rewritten, 1.3M allowed
    code, _, _ = cli(capsys, [*argv, "--max-time", "0.5", "--to", f"file:{path}"])
    assert code == 3
    restore_fails(capsys, path, "incomplete")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda h: h[:30] + b"\x00" + h[31:], ("damaged", "not JSON")),
        (lambda h: MAGIC + b"[1, 2]".ljust(HEADER_SIZE - len(MAGIC)), ("damaged",)),
        (lambda h: rewrite_header(h, scenario={"memory": 1}), ("damaged", "scenario")),
        (lambda h: _scenario(h, memory=1 << 41), ("damaged", "scenario")),
        (lambda h: _scenario(h, memory="64M"), ("damaged", "scenario")),
        (lambda h: _scenario(h, ram_content="bytes", memory=1 << 40), ("damaged", "16G")),
        (lambda h: _scenario(h, iommu="vfio"), ("damaged", "scenario")),
        (lambda h: _scenario(h, devices=[{"kind": "bogus"}]), ("damaged", "scenario")),
        (lambda h: rewrite_header(h, devices=[]), ("damaged", "device")),
    ],
    ids=[
        "not-json",
        "not-a-table",
        "scenario",
        "2T",
        "memory-str",
        "bytes-1T",
        "iommu",
        "kind",
        "digests",
    ],
)
def test_a_damaged_header(
    ref: Path, change: object, words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    header, secs = split(ref)
    join(ref, change(header), secs)  # type: ignore[operator]
    restore_fails(capsys, ref, *words)


def _scenario(header: bytes, **changes: object) -> bytes:
    meta = json.loads(header[len(MAGIC) :])
    return rewrite_header(header, scenario={**meta["scenario"], **changes})


def test_a_section_length_beyond_the_file(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, secs = split(ref)
    raw = b"".join(s.encode() for s in secs)
    # the first section's length field says 2**62 bytes: refused without reading them
    head = bytearray(raw[: st.HEADER.size])
    head[8:16] = (1 << 62).to_bytes(8, "little")
    ref.write_bytes(header + bytes(head) + raw[st.HEADER.size :])
    restore_fails(capsys, ref, "truncated section", "announced")


def test_a_section_of_the_wrong_type_is_refused(
    ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The vCPU state, relabelled as RAM (its checksum still right): the RAM decoder reads
    # JSON as page counts.
    header, secs = split(ref)
    cpu = next(s for s in secs if s.type == st.CPU)
    cpu.type = st.RAM
    join(ref, header, secs)
    restore_fails(capsys, ref, "does not load")


def test_a_stream_without_device_config(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, secs = split(ref)
    secs = [s for s in secs if not (s.type == st.DEVICE and s.sub == st.DEV_CONFIG)]
    join(ref, header, secs)
    restore_fails(capsys, ref, "does not load", "CONFIG", "reference0")


# -- the judge: altered after the header was written, checksums made right again ---------------


def test_judge_catches_altered_ram(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, secs = split(ref)
    ram = [s for s in secs if s.type == st.RAM]
    # a page with bytes in the last RAM section that carries any, sent by no later section
    for i in range(len(ram) - 1, -1, -1):
        pages, zero, _, rows = st.decode_ram(ram[i].payload)
        if len(rows):
            break
    later = set()
    for s in ram[i + 1 :]:
        later |= set(st.decode_ram(s.payload)[0].tolist())
    k = next(j for j, p in enumerate(pages[~zero].tolist()) if p not in later)
    at = len(ram[i].payload) - len(rows) + k * 4096 + 123
    ram[i].payload[at] ^= 0x01
    join(ref, header, secs)
    restore_fails(capsys, ref, "CORRUPTION", "RAM")


def test_judge_catches_altered_vcpu_state(ref: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, secs = split(ref)
    cpu = next(s for s in secs if s.type == st.CPU)
    state = json.loads(cpu.payload)
    state["workload_pos"] = state.get("workload_pos", 0) + 1
    cpu.payload = bytearray(json.dumps(state, sort_keys=True).encode())
    join(ref, header, secs)
    restore_fails(capsys, ref, "CORRUPTION", "vCPU")


def _alter_device_data(path: Path, offset: int) -> None:
    header, secs = split(path)
    data = [s for s in secs if s.type == st.DEVICE and s.sub == st.DEV_DATA]
    data[-1].payload[offset] ^= 0x01
    join(path, header, secs)


def test_judge_catches_altered_reference_state(
    ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The last byte of the last CHUNK record: the END record (24 + 16 bytes) follows it.
    _alter_device_data(ref, -41)
    restore_fails(capsys, ref, "CORRUPTION", "reference0")


def test_judge_catches_altered_hisi_acc_state(
    saves: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hisi_acc VF's migration data (struct acc_vf_data): byte 64 is qm_eqc_dw[0], the
    event queue context it resumes with. Restore must not call that a mere finding."""
    path = Path(shutil.copy(saves["hisi"], tmp_path / "hisi.vmig"))
    _alter_device_data(path, 64)
    restore_fails(capsys, path, "CORRUPTION", "hisi_acc0")


def test_judge_catches_an_unsafe_tracker_in_a_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tracker cpu-only misses the device's DMA writes: the file holds stale pages, and
    the restore check says so (the migration itself completed)."""
    path = tmp_path / "g.vmig"
    argv = ["migrate", *SMALL, "--device", "reference", "--tracker", "cpu-only", "--json"]
    code, out, _ = cli(capsys, [*argv, "--to", f"file:{path}"])
    q = json.loads(out)
    assert code == 1 and q["status"] == "completed" and q["vfiomig"]["verified"] is False
    assert q["vfiomig"]["restore"].startswith("CORRUPTION") and "RAM" in q["vfiomig"]["restore"]
    restore_fails(capsys, path, "CORRUPTION", "RAM")
