"""eventfd(2) in the model kernel (fs/eventfd.c; kernel/eventfd.py)."""

from __future__ import annotations

import os
import select
import struct
from errno import EAGAIN, EBADF, EINVAL, ENODEV

import pytest
from conftest import errno_of

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.eventfd import (
    EFD_NONBLOCK,
    EFD_SEMAPHORE,
    ULLONG_MAX,
    EventfdFile,
    eventfd_ctx_fdget,
)

U64 = struct.Struct("<Q")


def test_counter_read_write() -> None:
    k = ModelKernel()
    fd = k.eventfd(3)
    assert k.write(fd, U64.pack(4)) == 8
    assert U64.unpack(k.read(fd, 8))[0] == 7  # the whole count, then zero
    assert errno_of(k.read, fd, 8) == EAGAIN  # see module doc: no blocking in the model
    assert k.write(fd, U64.pack(1) + b"ignored") == 8  # only the first 8 bytes
    assert U64.unpack(k.read(fd, 64))[0] == 1


def test_semaphore_reads_one_at_a_time() -> None:
    k = ModelKernel()
    fd = k.eventfd(2, EFD_SEMAPHORE)
    assert [U64.unpack(k.read(fd, 8))[0] for _ in range(2)] == [1, 1]
    assert errno_of(k.read, fd, 8) == EAGAIN


@pytest.mark.parametrize(
    "call,want",
    [
        (lambda k, fd: k.read(fd, 7), EINVAL),  # eventfd_read: fewer than 8 bytes
        (lambda k, fd: k.write(fd, b"1234567"), EINVAL),
        (lambda k, fd: k.write(fd, U64.pack(ULLONG_MAX)), EINVAL),
        (lambda k, fd: k.write(fd, U64.pack(ULLONG_MAX - 1)), EAGAIN),  # would reach the max
        (lambda k, fd: k.eventfd(0, 0x10), EINVAL),  # do_eventfd: unknown flag
        (lambda k, fd: k.eventfd("1"), EINVAL),
    ],
)
def test_errors(call: object, want: int) -> None:
    k = ModelKernel()
    fd = k.eventfd(1, EFD_NONBLOCK)
    assert errno_of(call, k, fd) == want


def test_poll_and_lseek() -> None:
    k = ModelKernel()
    fd = k.eventfd(0)
    assert k.poll(fd) == select.POLLOUT
    k.write(fd, U64.pack(1))
    assert k.poll(fd) == select.POLLIN | select.POLLOUT
    assert k.lseek(fd, 10, os.SEEK_SET) == 0  # noop_llseek


def test_ctx_fdget_and_signal_outlive_the_fd() -> None:
    k = ModelKernel()
    fd = k.eventfd(0)
    ctx = eventfd_ctx_fdget(k.fdt.files, fd)
    mem = k.memfd_create("x")
    assert errno_of(eventfd_ctx_fdget, k.fdt.files, mem) == EINVAL  # not an eventfd
    assert errno_of(eventfd_ctx_fdget, k.fdt.files, 999) == EBADF
    seen: list[int] = []
    ctx.waiters.append(seen.append)
    ctx.signal()
    assert ctx.count == 1 and seen == [select.POLLIN]
    f = k.fdt.get(fd)
    assert isinstance(f, EventfdFile)
    k.close(fd)  # eventfd_release wakes waiters with EPOLLHUP; the ctx lives on
    assert seen[-1] == select.POLLHUP
    ctx.signal()
    assert ctx.count == 2
    ctx.count = ULLONG_MAX
    ctx.signal()  # saturates
    assert ctx.count == ULLONG_MAX


def test_eventfd_is_no_positional_file() -> None:
    k = ModelKernel()
    fd = k.eventfd(5)
    assert U64.unpack(k.pread(fd, 8, 0))[0] == 5  # position ignored
    assert errno_of(k.pwrite, fd, U64.pack(1), -1) == EINVAL  # ksys_pwrite64: pos < 0
    assert errno_of(lambda: k.mmap(4096, fd=fd)) == ENODEV  # do_mmap: no ->mmap
