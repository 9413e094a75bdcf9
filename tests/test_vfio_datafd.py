"""Data fd rules (spec kernel-uapi.md §1.6 and §4): stream files, direction, sessions,
VFIO_MIG_GET_PRECOPY_INFO, temporary and permanent end of stream."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from errno import EBADF, EFAULT, EINVAL, ENODEV, ENOMSG, ENOTTY, ESPIPE

import pytest
from conftest import SET, Dev, errno_of, save_stream

from vfiomig.kernel.vfio_fsm import (
    PRE_COPY,
    PRE_COPY_P2P,
    RESUMING,
    RUNNING,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
)
from vfiomig.uapi import vfio as v

INFO = v.VFIO_MIG_GET_PRECOPY_INFO
REINIT = v.VFIO_PRECOPY_INFO_REINIT


def info_errno(d: Dev, fd: int, arg: object, cmd: int = INFO) -> int:
    return errno_of(d.k.ioctl, fd, cmd, arg)


# ----------------------------------------------------------------- PRECOPY_INFO (§4.1)


def test_precopy_info_check_order(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    good = v.vfio_precopy_info(argsz=24)
    assert info_errno(ref, fd, bytearray(8), cmd=v.VFIO_DEVICE_GET_INFO) == ENOTTY  # 1
    assert info_errno(ref, fd, bytearray(23)) == EFAULT  # 2: 24 bytes are copied in
    assert info_errno(ref, fd, 0) == EFAULT
    assert info_errno(ref, fd, v.vfio_precopy_info(argsz=23)) == EINVAL  # 3
    assert info_errno(ref, fd, good) == 0
    ref.set_state(PRE_COPY_P2P)
    assert info_errno(ref, fd, good) == 0
    ref.set_state(STOP_COPY)  # same session, but not a PRE_COPY state
    assert info_errno(ref, fd, good) == EINVAL  # 4
    assert info_errno(ref, fd, v.vfio_precopy_info(argsz=23)) == EINVAL


def test_precopy_info_on_disabled_fd_is_enodev(ref: Dev) -> None:
    old = ref.set_state(PRE_COPY)
    ref.set_state(RUNNING)  # PRE_COPY -> RUNNING ends the session
    new = ref.set_state(PRE_COPY)
    good = v.vfio_precopy_info(argsz=24)
    assert info_errno(ref, old, good) == ENODEV  # 5: the device is in PRE_COPY again
    assert info_errno(ref, new, good) == 0
    ref.set_state(RUNNING)
    assert info_errno(ref, old, good) == EINVAL  # the state check comes first


def test_precopy_info_v1_echoes_flags_v2_zeroes_them(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    assert ref.precopy_info(fd, flags=0xDEAD).flags == 0xDEAD
    ref.feature(SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)
    assert ref.precopy_info(fd, flags=0xDEAD).flags == 0  # also applies to a live fd


def test_precopy_info_writes_back_24_bytes_only(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    buf = bytearray(struct.pack("<IIQQ", 32, 0, 0, 0) + b"\xaa" * 8)
    ref.k.ioctl(fd, INFO, buf)
    assert buf[24:] == b"\xaa" * 8
    assert struct.unpack_from("<Q", buf, 8)[0] > 0


def test_precopy_sizes_follow_reads_and_device_activity(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    first = ref.precopy_info(fd)
    assert first.initial_bytes > 64 * 1024 and first.dirty_bytes == 0
    ref.k.read(fd, 1000)
    assert ref.precopy_info(fd).initial_bytes == first.initial_bytes - 1000
    ref.read_all(fd)
    after = ref.precopy_info(fd)
    assert (after.initial_bytes, after.dirty_bytes) == (0, 0)
    assert errno_of(ref.k.read, fd, 100) == ENOMSG  # temporary end of stream
    ref.hw.run(1)  # the running device changes one chunk (4 KiB)
    assert ref.precopy_info(fd).dirty_bytes == 24 + 4096
    assert len(ref.read_all(fd)) == 24 + 4096
    assert ref.precopy_info(fd).dirty_bytes == 0


def test_reinit_flag_is_v2_only(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    ref.read_all(fd)
    ref.hw.reinit()
    i = ref.precopy_info(fd)  # v1: no REINIT bit, but the new initial data is there
    assert i.flags == 0 and i.initial_bytes > 64 * 1024
    ref.read_all(fd)
    ref.feature(SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)
    ref.hw.reinit()
    i = ref.precopy_info(fd, flags=0)
    assert i.flags == REINIT and i.dirty_bytes == 0 and i.initial_bytes > 64 * 1024
    assert ref.precopy_info(fd).flags == 0  # reported once


def test_precopy_info_v2_survives_sessions_until_last_close(make_dev: Callable[..., Dev]) -> None:
    d = make_dev()
    d.feature(SET | v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2)
    d.set_state(PRE_COPY)
    d.set_state(RUNNING)
    fd = d.set_state(PRE_COPY)
    assert d.precopy_info(fd, flags=0xF0).flags == 0
    d.close()
    d.reopen()
    fd = d.set_state(PRE_COPY)
    assert d.precopy_info(fd, flags=0xF0).flags == 0xF0


# ----------------------------------------------------------------- read / write (§4.2, §4.3)


def test_saving_fd_is_a_read_only_stream(ref: Dev) -> None:
    fd = ref.set_state(STOP_COPY)
    k = ref.k
    assert errno_of(k.write, fd, b"x") == EBADF
    assert errno_of(k.pread, fd, 10, 0) == ESPIPE
    assert errno_of(k.lseek, fd, 0, os.SEEK_SET) == ESPIPE
    assert errno_of(k.lseek, fd, 0, os.SEEK_CUR) == ESPIPE


def test_resuming_fd_is_a_write_only_stream_without_ioctl(ref: Dev) -> None:
    ref.set_state(STOP)
    fd = ref.set_state(RESUMING)
    k = ref.k
    assert errno_of(k.read, fd, 10) == EBADF
    assert errno_of(k.pread, fd, 10, 0) == EBADF
    assert errno_of(k.lseek, fd, 0, os.SEEK_SET) == ESPIPE
    assert errno_of(k.ioctl, fd, INFO, v.vfio_precopy_info(argsz=24)) == ENOTTY


def test_stop_copy_reaches_permanent_eof(ref: Dev) -> None:
    fd = ref.set_state(STOP_COPY)
    assert ref.read_all(fd, 777)
    assert ref.k.read(fd, 100) == b"" and ref.k.read(fd, 100) == b""  # never ENOMSG
    assert ref.k.read(fd, 0) == b""


def _data_size(d: Dev) -> bytes:
    buf = d.feature(v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8)
    return bytes(buf[8:])


def test_data_size_predicts_the_stop_copy_stream(ref: Dev) -> None:
    want = struct.unpack("<Q", _data_size(ref))[0]
    fd = ref.set_state(STOP_COPY)
    assert len(ref.read_all(fd)) == want


def test_precopy_then_stop_copy_continues_the_same_fd(ref: Dev) -> None:
    fd = ref.set_state(PRE_COPY)
    part = ref.read_all(fd)
    ref.hw.run(3)
    assert ref.set_state(PRE_COPY_P2P) == -1
    assert ref.set_state(STOP_COPY) == -1
    rest = ref.read_all(fd)
    assert rest and ref.k.read(fd, 10) == b""
    assert len(part) > 64 * 1024


def test_session_ends_on_the_named_arcs(ref: Dev) -> None:
    fd = ref.set_state(STOP_COPY)
    ref.set_state(STOP)
    assert errno_of(ref.k.read, fd, 1) == ENODEV
    fd = ref.set_state(RUNNING_P2P)  # no fd
    assert fd == -1
    fd = ref.set_state(PRE_COPY_P2P)
    ref.set_state(RUNNING_P2P)
    assert errno_of(ref.k.read, fd, 1) == ENODEV


def test_closing_a_data_fd_does_not_end_the_session(ref: Dev) -> None:
    fd = ref.set_state(STOP_COPY)
    ref.k.close(fd)
    f = ref.vdev.saving_file
    assert f is not None and f.live and f.user_closed  # the driver still holds it
    assert ref.set_state(STOP) == -1
    assert ref.vdev.saving_file is None and not f.live


def test_resume_write_rules(make_dev: Callable[..., Dev]) -> None:
    src = make_dev(state_size=8192, chunk_size=4096)
    data = save_stream(src)
    dst = make_dev(state_size=8192, chunk_size=4096)
    dst.set_state(STOP)
    fd = dst.set_state(RESUMING)
    k = dst.k
    assert k.write(fd, data[:30]) == 30  # records may be split anywhere
    assert dst.try_set_state(STOP)[:2] == (EINVAL, -1)  # incomplete: stays RESUMING
    assert dst.get_state() == RESUMING
    assert k.write(fd, data[30:]) == len(data) - 30  # the fd is still usable
    assert dst.set_state(STOP) == -1
    assert errno_of(k.write, fd, b"x") == ENODEV  # session over


def test_resume_garbage_is_einval_then_enodev(make_dev: Callable[..., Dev]) -> None:
    d = make_dev()
    d.set_state(STOP)
    fd = d.set_state(RESUMING)
    assert errno_of(d.k.write, fd, b"\0" * 24) == EINVAL  # bad magic
    assert errno_of(d.k.write, fd, b"\0" * 24) == ENODEV  # the file is in error (mlx5)
    assert d.try_set_state(STOP)[0] == EINVAL


def test_resume_from_an_incompatible_device(make_dev: Callable[..., Dev]) -> None:
    data = save_stream(make_dev(state_size=8192))
    d = make_dev(state_size=4096)
    d.set_state(STOP)
    fd = d.set_state(RESUMING)
    assert errno_of(d.k.write, fd, data) == EINVAL


def test_reset_disables_both_kinds_of_fd(ref: Dev) -> None:
    ref.set_state(STOP)
    fd = ref.set_state(RESUMING)
    ref.reset()
    assert errno_of(ref.k.write, fd, b"x") == ENODEV
    assert ref.get_state() == RUNNING


def test_precopy_info_struct_has_24_bytes() -> None:
    assert ctypes.sizeof(v.vfio_precopy_info) == 24


@pytest.mark.parametrize("flags", [1, 3])
def test_stop_copy_only_devices_never_answer_enomsg(
    make_dev: Callable[..., Dev], flags: int
) -> None:
    d = make_dev(migration_flags=flags, state_size=100)
    fd = d.set_state(STOP_COPY)
    assert len(d.k.read(fd, 1 << 20)) > 100
    assert d.k.read(fd, 1 << 20) == b""
