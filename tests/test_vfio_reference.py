"""The reference device: its state really migrates, its options and its injected defects."""

from __future__ import annotations

import errno
import hashlib
import random
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from conftest import (
    GET,
    SET,
    Dev,
    bits_of,
    errno_of,
    ioas_map,
    report,
    resume_stream,
    resuming,
    save_stream,
    start,
)

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.vfio_fsm import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
)
from vfiomig.kernel.vfio_reference import gen_chunk, vfio_combine_iova_ranges
from vfiomig.uapi import vfio as v

KB, MB = 1024, 1 << 20


def state_bytes(d: Dev) -> bytes:
    """The device's whole state, byte for byte (ground truth)."""
    return d.hw.read_state(0, d.hw.state_size)


# ----------------------------------------------------------------- options


@pytest.mark.parametrize("flags", [0, 2, 4, 6, 8, -1, 15])
def test_invalid_migration_flags(kernel: ModelKernel, flags: int) -> None:
    with pytest.raises(ValueError):
        kernel.add_device("reference", migration_flags=flags)


@pytest.mark.parametrize(
    "opts",
    [
        {"defects": {"nope"}},
        {"fail_arc": ("STOP", "NOWHERE", 5)},
        {"fail_arc": ("STOP", "RUNNING", "explode")},
        {"fail_arc": ("STOP", "RUNNING")},
        {"fail_arc": ("STOP", "RUNNING", 0)},
        {"state_size": -1},
    ],
)
def test_invalid_options(kernel: ModelKernel, opts: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        kernel.add_device("reference", **opts)


def test_unknown_kind(kernel: ModelKernel) -> None:
    with pytest.raises(ValueError):
        kernel.add_device("no-such-kind")


def test_content_is_deterministic_and_seeded(make_dev: Callable[..., Dev]) -> None:
    a, b, c = (make_dev(state_size=10_000, seed=s) for s in (1, 1, 2))
    assert state_bytes(a) == state_bytes(b) != state_bytes(c)
    assert len(state_bytes(a)) == 10_000
    # an independent look at the generator: distinct chunks and versions differ
    assert gen_chunk(1, 0, 0, 64) != gen_chunk(1, 1, 0, 64) != gen_chunk(1, 0, 1, 64)


def test_device_changes_only_while_running(ref: Dev) -> None:
    before = state_bytes(ref)
    assert ref.hw.run(5) == 5
    assert state_bytes(ref) != before
    ref.set_state(STOP)
    frozen = state_bytes(ref)
    assert ref.hw.run(5) == 0
    ref.hw.on_dma_write(0x1000, 8)
    assert state_bytes(ref) == frozen
    ref.set_state(RUNNING_P2P)
    assert ref.hw.run(1) == 1


# ----------------------------------------------------------------- save -> resume


def test_stop_copy_migration_restores_the_state(make_dev: Callable[..., Dev]) -> None:
    src = make_dev(state_size=300_000, chunk_size=64 * KB, seed=3)
    dst = make_dev(state_size=300_000, chunk_size=64 * KB, seed=99)
    src.hw.run(40)
    src.hw.on_dma_write(0x7000, 64)
    want = state_bytes(src)
    assert state_bytes(dst) != want
    resume_stream(dst, save_stream(src), chunk=1000)
    assert state_bytes(dst) == want  # byte for byte
    assert dst.hw.state() == src.hw.state()
    assert dst.hw.digest() == src.hw.digest()


def test_restored_device_continues_from_there(make_dev: Callable[..., Dev]) -> None:
    src = make_dev(state_size=64 * KB, chunk_size=4 * KB, seed=5)
    dst = make_dev(state_size=64 * KB, chunk_size=4 * KB, seed=6)
    src.hw.run(17)
    resume_stream(dst, save_stream(src))
    for d in (src, dst):
        d.set_state(RUNNING)
        d.hw.run(23)
        d.hw.on_dma_write(0x3000, 8)
    assert state_bytes(dst) == state_bytes(src)
    assert dst.hw.steps == src.hw.steps == 40


@pytest.mark.parametrize("flags", [5, 7])
def test_precopy_migration_with_a_busy_device(make_dev: Callable[..., Dev], flags: int) -> None:
    src = make_dev(migration_flags=flags, state_size=128 * KB, chunk_size=4 * KB, seed=1)
    dst = make_dev(migration_flags=flags, state_size=128 * KB, chunk_size=4 * KB, seed=2)
    fd = src.set_state(PRE_COPY)
    stream = [src.k.read(fd, 5000)]
    for i in range(6):  # the device keeps working while we copy
        src.hw.run(7)
        src.hw.on_dma_write(0x1000 * i, 16)
        stream.append(src.read_all(fd, 3000))
        if flags == 7 and i == 3:
            src.set_state(PRE_COPY_P2P)
    src.set_state(STOP_COPY)
    stream.append(src.read_all(fd))
    src.set_state(STOP)
    resume_stream(dst, b"".join(stream), chunk=777)
    assert state_bytes(dst) == state_bytes(src) and dst.hw.state() == src.hw.state()


def test_restored_state_survives_a_second_hop(make_dev: Callable[..., Dev]) -> None:
    a, b, c = (make_dev(state_size=20 * KB, chunk_size=4 * KB, seed=s) for s in (1, 2, 3))
    a.hw.run(9)
    resume_stream(b, save_stream(a))
    b.set_state(RUNNING)
    resume_stream(c, save_stream(b))
    assert state_bytes(c) == state_bytes(a)


def test_a_resumed_stream_can_carry_arbitrary_bytes(make_dev: Callable[..., Dev]) -> None:
    """A stream whose chunk payloads are not generated content (here: tampered in transit,
    header intact) is restored as given: the device holds what the stream said."""
    src = make_dev(state_size=8 * KB, chunk_size=4 * KB)
    dst = make_dev(state_size=8 * KB, chunk_size=4 * KB)
    data = bytearray(save_stream(src))
    data[24 + 32 + 24 + 100] ^= 0xFF  # a byte inside chunk 0's payload
    resume_stream(dst, bytes(data))
    got, want = state_bytes(dst), bytearray(state_bytes(src))
    want[100] ^= 0xFF
    assert got == bytes(want)
    assert resume_and_compare_again(dst)


@pytest.mark.parametrize(
    "field,value", [("type", 9), ("length", 4095), ("index", 2), ("magic", 0), ("dev_first", None)]
)
def test_resume_rejects_malformed_records(
    make_dev: Callable[..., Dev], field: str, value: int | None
) -> None:
    src = make_dev(state_size=8 * KB, chunk_size=4 * KB)
    data = bytearray(save_stream(src))
    chunk0 = 24 + 32  # the first CHUNK record follows the DEV record
    magic, rtype, length, version, index = struct.unpack_from("<IIIIQ", data, chunk0)
    rec = {"magic": magic, "type": rtype, "length": length, "index": index}
    if field == "dev_first":
        data = data[chunk0:]  # a chunk before any DEV record
    else:
        rec[field] = value
        struct.pack_into(
            "<IIIIQ", data, chunk0, rec["magic"], rec["type"], rec["length"], version, rec["index"]
        )
    dst = make_dev(state_size=8 * KB, chunk_size=4 * KB)
    dst.set_state(STOP)
    fd = dst.set_state(RESUMING)
    assert errno_of(dst.k.write, fd, bytes(data)) == errno.EINVAL
    assert dst.try_set_state(STOP)[0] == errno.EINVAL
    assert dst.get_state() == RESUMING


def resume_and_compare_again(d: Dev) -> bool:
    """Migrating the tampered device onward keeps its exact bytes."""
    k = d.k
    e = Dev(k, state_size=8 * KB, chunk_size=4 * KB)
    d.set_state(RUNNING)
    resume_stream(e, save_stream(d))
    return state_bytes(e) == state_bytes(d)


def test_large_state_streams_without_two_copies(make_dev: Callable[..., Dev]) -> None:
    size = 64 * MB
    src = make_dev(state_size=size, seed=11)
    dst = make_dev(state_size=size, seed=12)
    src.hw.run(100)
    sha = hashlib.sha256()
    tracemalloc.start()
    try:
        fd = src.set_state(STOP_COPY)
        dst.set_state(STOP)
        rfd = dst.set_state(RESUMING)
        total = 0
        while chunk := src.k.read(fd, MB):
            sha.update(chunk)
            total += dst.k.write(rfd, chunk)
        dst.set_state(STOP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > size
    assert peak < 8 * MB, peak  # streamed: far below one copy of the state
    assert dst.hw.state() == src.hw.state()


# ----------------------------------------------------------------- failures, reset


def test_fail_arc_with_errno_keeps_last_good_state(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(migration_flags=7, fail_arc=("STOP", "STOP_COPY", errno.ENOSPC))
    e, fd, _ = d.try_set_state(STOP_COPY)  # RUNNING -> RUNNING_P2P -> STOP -x-> STOP_COPY
    assert (e, fd) == (errno.ENOSPC, -1)
    assert d.get_state() == STOP
    assert d.try_set_state(RUNNING)[0] == 0  # the device still works


def test_fail_arc_error_needs_reset(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(migration_flags=5, fail_arc=("PRE_COPY", "STOP_COPY", "error"))
    fd = d.set_state(PRE_COPY)
    assert d.try_set_state(STOP_COPY)[0] == errno.EIO
    assert d.get_state() == ERROR
    assert errno_of(d.k.read, fd, 10) == errno.ENODEV
    for s in (STOP, RUNNING, PRE_COPY, 9):
        assert d.try_set_state(s)[0] == errno.EINVAL
    d.reset()
    assert d.get_state() == RUNNING


def test_reset_returns_to_power_on_content(make_dev: Callable[..., Dev]) -> None:
    d = make_dev(state_size=16 * KB, seed=4)
    fresh = state_bytes(d)
    d.hw.run(10)
    assert state_bytes(d) != fresh
    d.reset()
    assert state_bytes(d) == fresh


# ----------------------------------------------------------------- defects


def test_defect_wrong_data_size(make_dev: Callable[..., Dev]) -> None:
    def size(d: Dev) -> int:
        return int.from_bytes(d.feature(GET | v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8)[8:], "little")

    good, bad = make_dev(), make_dev(defects={"wrong_data_size"})
    assert size(bad) != size(good)
    assert len(save_stream(good)) == size(good)


def test_defect_fd_on_wrong_arc(make_dev: Callable[..., Dev]) -> None:
    good, bad = make_dev(), make_dev(defects={"fd_on_wrong_arc"})
    for d in (good, bad):
        d.set_state(PRE_COPY)
    assert good.set_state(STOP_COPY) == -1
    assert bad.set_state(STOP_COPY) >= 0  # the uAPI says the PRE_COPY fd continues
    assert good.set_state(STOP) == -1
    assert bad.set_state(STOP) >= 0


def test_fd_from_an_interior_arc_is_a_warned_einval(make_dev: Callable[..., Dev]) -> None:
    """The core loop's WARN_ON(res && new_state != mig_state): a driver handing out a file
    on an interior arc fails the SET with EINVAL at the state after that arc."""
    d = make_dev(migration_flags=1, defects={"fd_on_wrong_arc"})
    d.set_state(STOP_COPY)
    assert d.try_set_state(RUNNING)[:2] == (errno.EINVAL, -1)  # STOP_COPY -> STOP -> RUNNING
    assert d.get_state() == STOP
    assert d.vdev.warnings


def test_defect_lossy_resume(make_dev: Callable[..., Dev]) -> None:
    src = make_dev(state_size=8 * KB, chunk_size=4 * KB)
    dst = make_dev(state_size=8 * KB, chunk_size=4 * KB, defects={"lossy_resume"})
    resume_stream(dst, save_stream(src))  # no error anywhere...
    assert state_bytes(dst) != state_bytes(src)  # ...but the state is wrong


def test_defect_log_misses_writes(make_dev: Callable[..., Dev]) -> None:
    for defects, want in ((set(), list(range(8))), ({"log_misses_writes"}, [0, 1, 2, 4, 5, 6])):
        d = make_dev(defects=defects)
        assert start(d, [(0, MB)])[0] == 0
        for page in range(8):
            d.hw.on_dma_write(page * 4096, 8)
        assert bits_of(report(d, 0, MB)[1]) == want


def test_defect_no_einval_blocked_arc(make_dev: Callable[..., Dev]) -> None:
    good, bad = make_dev(), make_dev(defects={"no_einval_blocked_arc"})
    for d in (good, bad):
        d.set_state(STOP_COPY)
    assert good.try_set_state(PRE_COPY)[0] == errno.EINVAL
    assert bad.try_set_state(PRE_COPY)[0] == 0
    assert bad.get_state() == PRE_COPY


def test_defect_accepts_truncated(make_dev: Callable[..., Dev]) -> None:
    src = make_dev(state_size=8 * KB, chunk_size=4 * KB)
    stream = save_stream(src)
    half = stream[: len(stream) // 2]  # the DEV record and part of the first chunk
    for defects, want in ((set(), errno.EINVAL), ({"accepts_truncated"}, 0)):
        dst = make_dev(state_size=8 * KB, chunk_size=4 * KB, defects=defects)
        fd = resuming(dst)
        assert dst.k.write(fd, half) == len(half)
        assert dst.try_set_state(STOP)[0] == want
        dst.k.close(fd)
    # the defective device loaded what arrived: the source's seed, power-on chunks
    assert dst.get_state() == STOP and dst.hw.seed == src.hw.seed


def test_defect_log_not_cleared(make_dev: Callable[..., Dev]) -> None:
    for defects, again in ((set(), []), ({"log_not_cleared"}, [1, 3])):
        d = make_dev(defects=defects)
        assert start(d, [(0, MB)])[0] == 0
        for page in (1, 3):
            d.hw.on_dma_write(page * 4096, 8)
        assert bits_of(report(d, 0, MB)[1]) == [1, 3]
        assert bits_of(report(d, 0, MB)[1]) == again


# ----------------------------------------------------------------- range merging


def test_combine_iova_ranges_matches_a_brute_force_oracle() -> None:
    """vfio_combine_iova_ranges against an independent rule: each merge joins the leftmost
    pair with the smallest gap."""
    rnd = random.Random(1)
    for _ in range(200):
        starts = sorted(rnd.sample(range(0, 1000, 4), rnd.randint(2, 12)))
        nodes = [[s * 4096, s * 4096 + rnd.randint(1, 3) * 4096 - 1] for s in starts]
        nodes = [n for i, n in enumerate(nodes) if i == 0 or n[0] > nodes[i - 1][1]]
        req = rnd.randint(1, len(nodes))
        want = [list(n) for n in nodes]
        if req == 1:
            want = [[want[0][0], want[-1][1]]]
        while len(want) > req:
            best = min(range(1, len(want)), key=lambda i: (want[i][0] - want[i - 1][1], i))
            want[best - 1 : best + 1] = [[want[best - 1][0], want[best][1]]]
        assert vfio_combine_iova_ranges(nodes, req) == want


def test_precopy_info_v2_feature_probe_does_not_enable(ref: Dev) -> None:
    ref.feature(SET | v.VFIO_DEVICE_FEATURE_PROBE | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)
    assert not ref.vdev.precopy_info_v2


def test_device_dma_through_the_iommu_feeds_the_device_log(ref: Dev) -> None:
    """End to end: attach to an IOAS, let the device DMA, read its log through the uAPI."""
    addr, mem = ref.k.mmap(MB)
    ref.attach(ioas_map(ref.k, ref.iommufd, addr, MB, MB))
    assert start(ref, [(MB, MB)])[0] == 0
    before = state_bytes(ref)
    ref.hw.dma_write(MB + 0x5000, b"x" * 5000)  # pages 5 and 6 of the range
    assert mem is not None and bytes(mem[0x5000:0x5003]) == b"xxx"
    assert bits_of(report(ref, MB, MB)[1]) == [5, 6]
    assert state_bytes(ref) != before  # the write also changed the device's own state


@pytest.mark.parametrize(
    "opts",
    [
        {"seed": -1},
        {"log_page_shift": (64, 70)},
        {"log_page_shift": (21, 12)},
        {"log_page_shift": (8, 12)},
        {"log_max_ranges": 0},
        {"log_addr_space": (52, 12)},
    ],
)
def test_impossible_device_capabilities_are_refused_at_add_device(opts: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelKernel().add_device("reference", **opts)
