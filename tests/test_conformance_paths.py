"""Every failure path of the conformance suite fires, and only on a device that earns it.

A failure path is a place where the suite records a failure; each has an id, registered in
``vfiomig.conformance.FAILURES`` by the module that raises it. COVERAGE below is the table
path id -> Case (a key may add `` (variant)`` for a second case of one path): a device that
departs from the uAPI in one way (a defect of the reference device, a model option, another
device kind, or a `Fake` transport: the model kernel with one answer changed) and the check
that must then fail *at that path and no other* (test_the_failure_path_fires[path id]). The
same check must pass on the clean device, so a check that always passes, or one that fails
for the wrong reason, shows here. A path added to the suite without a case fails
test_every_failure_path_has_a_case; a site that raises without naming a registered path, or
two sites sharing one, fails test_every_failure_site_names_its_own_path.

The mutation test at the end (VFIOMIG_MUTATION=1, about 30 s, not part of `make test`)
weakens the checks one comparison at a time (its operator negated, or an ``if`` that raises
a Fail made never true) and asserts that some case then goes wrong.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from errno import E2BIG, EBUSY, EINVAL, EIO, ENODEV, ENOMSG, ENOTTY, EOVERFLOW, EPERM, ERANGE
from pathlib import Path
from typing import Any

import pytest

import vfiomig.conformance as suite
from vfiomig.cli import build_parser
from vfiomig.conformance.checks import data as data_checks
from vfiomig.conformance.checks.dma import DMA_BASE
from vfiomig.host import MigrationState as S
from vfiomig.host import ModelTransport
from vfiomig.host.transport import IoctlArg
from vfiomig.kernel.vfio_fsm import PRECOPY_STATES
from vfiomig.tools import conformance as conf
from vfiomig.uapi import vfio as v

FAIL, PASS = suite.FAIL, suite.PASS
GET, SET, PROBE = v.VFIO_DEVICE_FEATURE_GET, v.VFIO_DEVICE_FEATURE_SET, v.VFIO_DEVICE_FEATURE_PROBE
MIG_STATE = v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
LOG_START = v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START
LOG_REPORT = v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
SRC = Path(suite.__file__).parent


# ------------------------------------------------------------------------------------------
# a kernel with one answer changed


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class DataFd:
    dev: int  # the device fd whose SET returned it
    cur: int  # the state the SET started from
    new: int  # the state it asked for
    eof: bool = False  # a read returned 0 bytes
    reads: int = 0


class Fake(ModelTransport):
    """The model kernel through its syscalls, with hooks a subclass overrides to answer one
    call wrongly; each hook's default is the model's own answer. The fake sees which fds are
    devices and which are data fds (and from which SET), and each device's state."""

    def __init__(self) -> None:
        self.devs: dict[int, str] = {}
        self.data: dict[int, DataFd] = {}

    def plug(self, kernel: Any) -> Fake:
        self.kernel = kernel
        return self

    # -- what a hook may consult or do through the real kernel --------------------------

    def state(self, dev: int) -> int:
        return int(self.kernel.devices[self.devs[dev]].mig_state)

    def real_set(self, dev: int, new: int) -> int | None:
        buf = v.feature_buffer(SET | MIG_STATE, v.vfio_device_feature_mig_state(device_state=new))
        ModelTransport.ioctl(self, dev, v.VFIO_DEVICE_FEATURE, buf)
        fd = int(v.feature_payload(buf, v.vfio_device_feature_mig_state).data_fd)
        return fd if fd >= 0 else None

    def real_reset(self, dev: int) -> None:
        ModelTransport.ioctl(self, dev, v.VFIO_DEVICE_RESET, 0)

    def bogus_fd(self) -> int:
        """An fd the SET did not open a session for (the iommufd node)."""
        return ModelTransport.open(self, "/dev/iommu")

    def strip(self, fd: int | None) -> None:
        """Close a data fd the kernel returned, so that the SET answers no fd."""
        if fd is not None:
            ModelTransport.close(self, fd)

    def saving(self, fd: int) -> bool:
        d = self.data.get(fd)
        return d is not None and d.new != S.RESUMING

    def resuming(self, fd: int) -> bool:
        d = self.data.get(fd)
        return d is not None and d.new == S.RESUMING

    def dev_state(self, fd: int) -> int:
        """The state of the device a data fd belongs to."""
        return self.state(self.data[fd].dev)

    # -- hooks --------------------------------------------------------------------------

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        """SET ``new`` from ``cur``: the data fd to return (None: -1), or raise."""
        return self.real_set(dev, new)

    def get_state(self, dev: int, state: int) -> int:
        """What GET reports when the device is in ``state``."""
        return state

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        """Any other VFIO_DEVICE_FEATURE (``flags``: index | GET/SET/PROBE)."""
        return ModelTransport.ioctl(self, dev, v.VFIO_DEVICE_FEATURE, arg)

    def reset(self, dev: int) -> int:
        return ModelTransport.ioctl(self, dev, v.VFIO_DEVICE_RESET, 0)

    def precopy_info(self, fd: int, info: v.vfio_precopy_info) -> int:
        return ModelTransport.ioctl(self, fd, v.VFIO_MIG_GET_PRECOPY_INFO, info)

    def read(self, fd: int, n: int) -> bytes:
        return ModelTransport.read(self, fd, n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return ModelTransport.write(self, fd, data)

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        return ModelTransport.lseek(self, fd, offset, whence)

    # -- the transport ------------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        fd = super().open(path, flags)
        if path in self.kernel.devices:
            self.devs[fd] = path
        return fd

    def close(self, fd: int) -> None:
        super().close(fd)
        self.devs.pop(fd, None)
        self.data.pop(fd, None)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        if fd in self.devs and request == v.VFIO_DEVICE_FEATURE and not isinstance(arg, int):
            flags = int(v.vfio_device_feature.from_buffer(arg).flags)
            if flags & v.VFIO_DEVICE_FEATURE_MASK != MIG_STATE or flags & PROBE:
                return self.feature(fd, flags, arg)
            mig = v.feature_payload(arg, v.vfio_device_feature_mig_state)  # type: ignore[arg-type]
            if flags & GET:
                ModelTransport.ioctl(self, fd, request, arg)
                mig.device_state = self.get_state(fd, int(mig.device_state))
                return 0
            cur, new = self.state(fd), int(mig.device_state)
            data_fd = self.set_state(fd, cur, new)
            mig.data_fd = -1 if data_fd is None else data_fd
            if data_fd is not None:
                self.data[data_fd] = DataFd(fd, cur, new)
            return 0
        if fd in self.devs and request == v.VFIO_DEVICE_RESET:
            return self.reset(fd)
        if request == v.VFIO_MIG_GET_PRECOPY_INFO and isinstance(arg, v.vfio_precopy_info):
            return self.precopy_info(fd, arg)
        return super().ioctl(fd, request, arg)


# -- SET -------------------------------------------------------------------------------------

Arc = Callable[[int, int], bool]  # (cur, new) -> does the fake change this SET?


def arc(cur: int | None, new: int | None) -> Arc:
    """SETs from ``cur`` (None: any) to ``new`` (None: any)."""
    return lambda c, n: (cur is None or c == cur) and (new is None or n == new)


class SetFails(Fake):
    """The SETs ``on`` fail with ``code``; ``first`` happens before (the kernel's own answer,
    or what the fake does instead): "real" (the SET is carried out), "stop" (the device is
    moved to STOP), "reset" (the device is reset), or nothing."""

    def __init__(self, on: Arc, code: int, first: str = "") -> None:
        super().__init__()
        self.on, self.code, self.first = on, code, first

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        if not self.on(cur, new):
            return super().set_state(dev, cur, new)
        if self.first == "real":
            try:
                self.strip(self.real_set(dev, new))
            except OSError:
                pass
        elif self.first == "stop":
            self.real_set(dev, S.STOP)
        elif self.first == "reset":
            self.real_reset(dev)
        raise oserror(self.code)


class TakesSession(Fake):
    """The ``nth`` resuming session of the run takes whatever it is written and loads
    nothing: writes succeed, its RESUMING -> STOP succeeds."""

    def __init__(self, nth: int) -> None:
        super().__init__()
        self.nth, self.sessions, self.taking = nth, 0, -1

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        if cur == S.RESUMING and self.taking == dev:
            self.taking = -1
            self.real_reset(dev)  # drop the session (nothing loaded) ...
            self.real_set(dev, S.STOP)  # ... and land where a load would
            return self.real_set(dev, new) if new != S.STOP else None
        fd = super().set_state(dev, cur, new)
        if new == S.RESUMING:
            self.sessions += 1
            if self.sessions == self.nth:
                self.taking = dev
        return fd

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        if self.resuming(fd) and self.data[fd].dev == self.taking:
            return len(data)
        return super().write(fd, data)


class RefusalResets(Fake):
    """A SET ``on`` that the kernel refuses also resets the device (it leaves RESUMING)."""

    def __init__(self, on: Arc) -> None:
        super().__init__()
        self.on = on

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        try:
            return super().set_state(dev, cur, new)
        except OSError:
            if self.on(cur, new):
                self.real_reset(dev)
            raise


class SetInstead(Fake):
    """The SETs ``on`` succeed doing ``instead`` (a state, or None: nothing) and return
    ``fd``: "real" (what the SET returned), "none" or "bogus" (an fd of no session)."""

    def __init__(self, on: Arc, instead: int | None = None, fd: str = "real") -> None:
        super().__init__()
        self.on, self.instead, self.fd = on, instead, fd

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        if not self.on(cur, new):
            return super().set_state(dev, cur, new)
        moved = self.instead is not None and self.instead != new
        got = self.real_set(dev, self.instead if self.instead is not None else new)
        if self.fd == "real" and not moved:
            return got
        self.strip(got)
        return self.bogus_fd() if self.fd == "bogus" else None


class Swallowed(Fake):
    """The SETs ``on`` succeed without doing anything."""

    def __init__(self, on: Arc) -> None:
        super().__init__()
        self.on = on

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        return None if self.on(cur, new) else super().set_state(dev, cur, new)


class Stuck(Swallowed):
    """SET RUNNING from any other state fails with EIO, and so does VFIO_DEVICE_RESET."""

    def __init__(self) -> None:
        super().__init__(lambda c, n: False)

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        if new == S.RUNNING and cur != S.RUNNING:
            raise oserror(EIO)
        return super().set_state(dev, cur, new)

    def reset(self, dev: int) -> int:
        raise oserror(EIO)


# -- GET, reset ------------------------------------------------------------------------------


class GetLies(Fake):
    """The first GET after a SET ``on`` succeeded (or, with ``on`` None, each device's first
    GET; with ``only``, the device at that path) reports ``says``."""

    def __init__(self, on: Arc | None, says: int, only: str = "") -> None:
        super().__init__()
        self.on, self.says, self.only = on, says, only
        self.armed: set[int] = set()
        self.seen: set[int] = set()

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        self.armed.discard(dev)
        fd = super().set_state(dev, cur, new)
        if self.on is not None and self.on(cur, new):
            self.armed.add(dev)
        return fd

    def get_state(self, dev: int, state: int) -> int:
        first = self.on is None and dev not in self.seen
        self.seen.add(dev)
        if self.only and self.devs[dev] != self.only:
            return state
        if dev in self.armed or first:
            self.armed.discard(dev)
            return self.says
        return state


class DataSizeOopses(Fake):
    """MIG_DATA_SIZE raises something that is not an OSError: a kernel bug."""

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        if flags & v.VFIO_DEVICE_FEATURE_MASK == v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
            raise RuntimeError("the kernel tripped over its own state")
        return super().feature(dev, flags, arg)


class ResetDoesNothing(Fake):
    """VFIO_DEVICE_RESET succeeds without resetting."""

    def reset(self, dev: int) -> int:
        return 0


class ResetFails(Fake):
    def reset(self, dev: int) -> int:
        raise oserror(EIO)


# -- other features --------------------------------------------------------------------------


class FeatureFails(Fake):
    """VFIO_DEVICE_FEATURE ``index`` (with ``op`` among its flags) fails with ``code``."""

    def __init__(self, index: int, op: int, code: int) -> None:
        super().__init__()
        self.index, self.op, self.code = index, op, code

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        if flags & v.VFIO_DEVICE_FEATURE_MASK == self.index and flags & self.op:
            raise oserror(self.code)
        return super().feature(dev, flags, arg)


class NoLogAnswers(Fake):
    """On a device without DMA logging, ``index`` (START or REPORT, not its PROBE) answers
    EINVAL instead of ENOTTY."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        if flags & v.VFIO_DEVICE_FEATURE_MASK == self.index and not flags & PROBE:
            raise oserror(EINVAL)
        return super().feature(dev, flags, arg)


class FeatureSays(Fake):
    """A GET of feature ``index`` answers, in the payload's ``name`` field, what ``change``
    makes of the kernel's value."""

    def __init__(
        self, index: int, payload: type[ctypes.Structure], name: str, change: Callable[[int], int]
    ) -> None:
        super().__init__()
        self.index, self.payload, self.name, self.change = index, payload, name, change

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        r = super().feature(dev, flags, arg)
        if flags & v.VFIO_DEVICE_FEATURE_MASK == self.index and not flags & PROBE:
            out = v.feature_payload(arg, self.payload)
            setattr(out, self.name, self.change(int(getattr(out, self.name))))
        return r


class FeatureIgnored(Fake):
    """A SET of feature ``index`` succeeds without reaching the kernel."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        if flags & v.VFIO_DEVICE_FEATURE_MASK == self.index and flags & SET:
            return 0
        return super().feature(dev, flags, arg)


class ReportEmptyInside(Fake):
    """A DMA logging report that starts inside the tracked range comes back empty (as if
    its bits counted from the range's start: past the end of the caller's bitmap)."""

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        r = super().feature(dev, flags, arg)
        if flags & v.VFIO_DEVICE_FEATURE_MASK == LOG_REPORT and not flags & PROBE:
            rep = v.feature_payload(arg, v.vfio_device_feature_dma_logging_report)
            if rep.iova != DMA_BASE:
                nbytes = (rep.length // rep.page_size + 63) // 64 * 8
                self.kernel.mm.write(int(rep.bitmap), bytes(nbytes))
        return r


@dataclass
class Rules:
    """How a kernel judges DMA_LOGGING_START / REPORT arguments; the defaults are Linux's
    (vfio_ioctl_device_feature_logging_start / _report)."""

    empty: bool = True  # 0 ranges: EINVAL
    max_ranges: int = 256  # more: E2BIG
    count_first: bool = True  # the number before the ranges
    iova_aligned: bool = True
    length_aligned: bool = True
    align_first: bool = True  # alignment, then the end, per range
    end: bool = True  # iova + length past 2^64: EOVERFLOW
    overlap: bool = True
    in_array_order: bool = True  # each range in turn (else each rule over all ranges)
    min_page: int = 4096  # REPORT page sizes below: EINVAL
    pow2: bool = True  # REPORT page sizes not a power of two: EINVAL
    report_end: bool = True
    page_first: bool = True  # REPORT: the page size, then the end


class LogRules(Fake):
    """DMA_LOGGING_START / REPORT judged by ``rules`` (Linux's but for one); what they let
    through and the real kernel refuses is answered with success."""

    def __init__(self, **changes: Any) -> None:
        super().__init__()
        self.rules = Rules(**changes)

    def feature(self, dev: int, flags: int, arg: Any) -> int:
        index = flags & v.VFIO_DEVICE_FEATURE_MASK
        if flags & PROBE or index not in (LOG_START, LOG_REPORT):
            return super().feature(dev, flags, arg)
        code = self.judge_start(arg) if index == LOG_START else self.judge_report(arg)
        if code:
            raise oserror(code)
        try:
            return super().feature(dev, flags, arg)
        except OSError:
            return 0  # this kernel took it

    def judge_start(self, arg: Any) -> int:
        r = self.rules
        ctl = v.feature_payload(arg, v.vfio_device_feature_dma_logging_control)
        n, page = int(ctl.num_ranges), int(ctl.page_size)
        if not n and r.empty:
            return EINVAL
        if r.count_first and n > r.max_ranges:
            return E2BIG
        ranges = [
            v.vfio_device_feature_dma_logging_range.from_buffer_copy(
                self.kernel.mm.read(int(ctl.ranges) + 16 * i, 16)
            )
            for i in range(n)
        ]
        spans = [(int(x.iova), int(x.length)) for x in ranges]

        def aligned(iova: int, length: int) -> int:
            bad = (r.iova_aligned and iova % page) or (r.length_aligned and length % page)
            return EINVAL if bad else 0

        def ends(iova: int, length: int) -> int:
            return EOVERFLOW if r.end and iova + length > (1 << 64) - 1 else 0

        def overlaps(i: int) -> int:
            s, n_ = spans[i]
            hit = any(s < s2 + n2 and s2 < s + n_ for s2, n2 in spans[:i])
            return EINVAL if r.overlap and hit else 0

        first, second = (aligned, ends) if r.align_first else (ends, aligned)
        if r.in_array_order:
            for i, (s, length) in enumerate(spans):
                code = first(s, length) or second(s, length) or overlaps(i)
                if code:
                    return code
        else:
            for rule in (first, second):
                for s, length in spans:
                    if code := rule(s, length):
                        return code
            for i in range(n):
                if code := overlaps(i):
                    return code
        if not r.count_first and n > r.max_ranges:
            return E2BIG
        return 0

    def judge_report(self, arg: Any) -> int:
        r = self.rules
        rep = v.feature_payload(arg, v.vfio_device_feature_dma_logging_report)
        page, end = int(rep.page_size), int(rep.iova) + int(rep.length)
        bad_page = page < r.min_page or (r.pow2 and page & (page - 1))
        checks = [(bad_page, EINVAL), (r.report_end and end > (1 << 64) - 1, EOVERFLOW)]
        if not r.page_first:
            checks.reverse()
        return next((code for bad, code in checks if bad), 0)


# -- PRECOPY_INFO ----------------------------------------------------------------------------


class InfoFails(Fake):
    """PRECOPY_INFO fails with ``code`` on the data fds ``on`` (fake, data fd) selects."""

    def __init__(self, on: Callable[[Fake, int], bool], code: int) -> None:
        super().__init__()
        self.on, self.code = on, code

    def precopy_info(self, fd: int, info: v.vfio_precopy_info) -> int:
        if self.on(self, fd):
            raise oserror(self.code)
        return super().precopy_info(fd, info)


class InfoAnswers(Fake):
    """PRECOPY_INFO succeeds (zeros) where ``on`` says, whatever the kernel would answer."""

    def __init__(self, on: Callable[[Fake, int, v.vfio_precopy_info], bool]) -> None:
        super().__init__()
        self.on = on

    def precopy_info(self, fd: int, info: v.vfio_precopy_info) -> int:
        if self.on(self, fd, info):
            info.initial_bytes = info.dirty_bytes = 0
            return 0
        return super().precopy_info(fd, info)


class InitialBytes(Fake):
    """PRECOPY_INFO's initial_bytes is what ``change`` (data fd record, kernel's value)
    makes of it."""

    def __init__(self, change: Callable[[DataFd, int], int]) -> None:
        super().__init__()
        self.change = change

    def precopy_info(self, fd: int, info: v.vfio_precopy_info) -> int:
        r = super().precopy_info(fd, info)
        d = self.data[fd]
        info.initial_bytes = self.change(d, int(info.initial_bytes))
        return r

    def read(self, fd: int, n: int) -> bytes:
        out = super().read(fd, n)
        if fd in self.data:
            self.data[fd].reads += 1
        return out


# -- data fds --------------------------------------------------------------------------------


class DataIo(Fake):
    """Reads / writes / lseeks of data fds answered by the hooks ``read_as`` (fake, fd, n,
    real) etc.; ``real`` gives the kernel's answer."""

    def __init__(
        self,
        read_as: Callable[[DataIo, int, int, Callable[[], bytes]], bytes] | None = None,
        write_as: Callable[[DataIo, int, bytes, Callable[[], int]], int] | None = None,
        lseek_as: Callable[[DataIo, int], int | None] | None = None,
    ) -> None:
        super().__init__()
        self.read_as, self.write_as, self.lseek_as = read_as, write_as, lseek_as
        self.blocked: set[int] = set()  # devices a rejected blocked arc left behind

    def read(self, fd: int, n: int) -> bytes:
        real = functools.partial(Fake.read, self, fd, n)
        if self.read_as is None or fd not in self.data:
            return real()
        out = self.read_as(self, fd, n, real)
        if not out and n:
            self.data[fd].eof = True
        return out

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        real = functools.partial(Fake.write, self, fd, data)
        if self.write_as is None or fd not in self.data:
            return real()
        return self.write_as(self, fd, bytes(data), real)

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        got = self.lseek_as(self, fd) if self.lseek_as and fd in self.data else None
        return super().lseek(fd, offset, whence) if got is None else got

    def set_state(self, dev: int, cur: int, new: int) -> int | None:
        try:
            return super().set_state(dev, cur, new)
        except OSError:
            if cur == S.STOP_COPY and new in PRECOPY_STATES:
                self.blocked.add(dev)
            raise


def enodev_gives(value: Any) -> Callable[..., Any]:
    """A hook answering ``value`` where the kernel answers ENODEV (an ended session)."""

    def hook(fake: DataIo, fd: int, what: Any, real: Callable[[], Any]) -> Any:
        try:
            return real()
        except OSError as e:
            if e.errno != ENODEV:
                raise
            return value if value is not None else len(what)

    return hook


def raising(code: int, when: Callable[[DataIo, int], bool]) -> Callable[..., Any]:
    """A hook failing with ``code`` where ``when`` (fake, fd) holds."""

    def hook(fake: DataIo, fd: int, what: Any, real: Callable[[], Any]) -> Any:
        if when(fake, fd):
            raise oserror(code)
        return real()

    return hook


def in_state(*states: int) -> Callable[[Fake, int], bool]:
    return lambda fake, fd: fake.dev_state(fd) in states


def eof_gives(make: Callable[[], bytes]) -> Callable[..., bytes]:
    """Read hook: once a fd has reached EOF, later reads answer ``make()`` (or raise)."""

    def hook(fake: DataIo, fd: int, n: int, real: Callable[[], bytes]) -> bytes:
        return make() if fake.data[fd].eof else real()

    return hook


def stop_copy_eof_is_enomsg(fake: DataIo, fd: int, n: int, real: Callable[[], bytes]) -> bytes:
    out = real()
    if not out and n and fake.dev_state(fd) == S.STOP_COPY:
        raise oserror(ENOMSG)
    return out


def precopy_never_ends(fake: DataIo, fd: int, n: int, real: Callable[[], bytes]) -> bytes:
    try:
        out = real()
    except OSError as e:
        if e.errno != ENOMSG:
            raise
        out = b""
    return out or b"\0" * min(n, 16)


def blocked_then_enodev(fake: DataIo, fd: int, n: int, real: Callable[[], bytes]) -> bytes:
    if fake.data[fd].dev in fake.blocked:
        raise oserror(ENODEV)
    return real()


def eio_late() -> bytes:
    raise oserror(EIO)


# -- opening ---------------------------------------------------------------------------------


class CloseFails(Fake):
    """Closing a device fd releases it but reports EIO."""

    def close(self, fd: int) -> None:
        dev = fd in self.devs
        super().close(fd)
        if dev:
            raise oserror(EIO)


class OpenFails(Fake):
    """The ``nth`` open of ``path`` (counting from 1) fails with ``code``, or raises a
    RuntimeError (a kernel bug) when ``code`` is 0."""

    def __init__(self, path: str, nth: int, code: int) -> None:
        super().__init__()
        self.path, self.nth, self.code, self.count = path, nth, code, 0

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        if path == self.path:
            self.count += 1
            if self.count == self.nth:
                if not self.code:
                    raise RuntimeError("open oopsed")
                raise oserror(self.code)
        return super().open(path, flags)


# ------------------------------------------------------------------------------------------
# the cases

PRIMARY = "/dev/vfio/devices/vfio0"


def on_data(kind: str) -> Callable[[Fake, int], bool]:
    return lambda fake, fd: fake.saving(fd) if kind == "saving" else fake.resuming(fd)


@dataclass(frozen=True)
class Case:
    """A device that departs in one way, and the check that must fail at the path."""

    check: str
    model: str = "reference"
    defects: tuple[str, ...] = ()
    fake: Callable[[], Fake] | None = None
    # module attributes set while it runs: (module, name, value)
    patch: tuple[tuple[Any, str, Any], ...] = ()
    # checks run before it in the same run (each on its own open)
    before: tuple[str, ...] = ()
    # the result to look at when not the check's own ("setup")
    result: str = ""
    # the device on which the check passes (default: the model without defect or fake)
    clean: str = ""
    why: str = field(default="", compare=False)


def sets(cur: int | None, new: int | None, code: int, first: str = "") -> Callable[[], Fake]:
    return lambda: SetFails(arc(cur, new), code, first)


COVERAGE: dict[str, Case] = {
    # -- runner ------------------------------------------------------------------------------
    "runner/setup": Case(
        "initial-state",
        fake=lambda: OpenFails("/dev/iommu", 1, EBUSY),
        result="setup",
        why="/dev/iommu cannot be opened: nothing runs",
    ),
    "runner/setup-internal": Case(
        "initial-state", fake=lambda: OpenFails(PRIMARY, 1, 0), result="setup"
    ),
    "runner/reopen": Case(
        "mig-data-size",
        fake=lambda: OpenFails(PRIMARY, 2, EBUSY),
        before=("initial-state",),
        why="the device is busy when it is opened for the second check",
    ),
    "runner/teardown": Case(
        "initial-state",
        fake=lambda: CloseFails(),
        result="teardown",
    ),
    "runner/unexpected-error": Case(
        "mig-data-size",
        fake=lambda: DataIo(read_as=raising(EIO, in_state(S.STOP_COPY))),
        why="a STOP_COPY read fails with EIO: not a verdict of mig-data-size",
    ),
    "runner/internal-error": Case("mig-data-size", fake=DataSizeOopses),
    # -- the helpers ---------------------------------------------------------------------------
    "core/flags-error": Case(
        "migration-flags", fake=lambda: FeatureFails(v.VFIO_DEVICE_FEATURE_MIGRATION, GET, EIO)
    ),
    "core/settle-stuck": Case("mig-data-size", fake=Stuck),
    "core/settle-not-running": Case(
        "mig-data-size", fake=lambda: Swallowed(lambda c, n: n == S.RUNNING and c != n)
    ),
    "core/enter-refused": Case("mig-data-size", fake=sets(S.RUNNING, S.STOP, EIO)),
    "core/enter-get-differs": Case(
        "mig-data-size", fake=lambda: GetLies(arc(S.RUNNING, S.STOP), S.RUNNING)
    ),
    "core/session-new-fd": Case("end-of-stream", defects=("fd_on_wrong_arc",)),
    "core/no-data-fd": Case(
        "stream-files", fake=lambda: SetInstead(arc(None, S.STOP_COPY), fd="none")
    ),
    "core/enomsg-in-stop-copy": Case(
        "end-of-stream", fake=lambda: DataIo(read_as=stop_copy_eof_is_enomsg)
    ),
    # -- fsm -----------------------------------------------------------------------------------
    "migration-flags/none": Case("migration-flags", model="hisi_acc,pf_driver=0", clean="hisi_acc"),
    "migration-flags/no-stop-copy": Case(
        "migration-flags",
        fake=lambda: FeatureSays(
            v.VFIO_DEVICE_FEATURE_MIGRATION, v.vfio_device_feature_migration, "flags", lambda f: 6
        ),
    ),
    "migration-flags/undefined": Case(
        "migration-flags",
        fake=lambda: FeatureSays(
            v.VFIO_DEVICE_FEATURE_MIGRATION, v.vfio_device_feature_migration, "flags", lambda f: 9
        ),
    ),
    "initial-state/not-running": Case(
        "initial-state", fake=lambda: GetLies(None, S.STOP, only="/dev/vfio/devices/vfio1")
    ),
    "fsm-paths/set-failed": Case(
        "fsm-paths", model="reference,fail_arc=PRE_COPY/RUNNING/5", clean="reference"
    ),
    "fsm-paths/get-differs": Case(
        "fsm-paths", fake=lambda: GetLies(arc(S.STOP, S.STOP_COPY), S.STOP)
    ),
    "fsm-paths/fd-on-wrong-arc": Case(
        "fsm-paths", fake=lambda: SetInstead(arc(S.STOP_COPY, S.STOP), fd="bogus")
    ),
    "fsm-paths/fd-missing": Case(
        "fsm-paths", fake=lambda: SetInstead(arc(None, S.PRE_COPY), fd="none")
    ),
    "fsm-paths/fd-direction": Case(
        "fsm-paths",
        fake=lambda: DataIo(write_as=lambda f, fd, d, real: len(d) if f.saving(fd) else real()),
    ),
    "fsm-paths/session-ended": Case(
        "fsm-paths",
        fake=lambda: DataIo(read_as=raising(ENODEV, in_state(S.PRE_COPY_P2P))),
    ),
    "fsm-paths/ended-saving-fd": Case(
        "fsm-paths", fake=lambda: DataIo(read_as=enodev_gives(b"\0"))
    ),
    "fsm-paths/ended-resuming-fd": Case(
        "fsm-paths", fake=lambda: DataIo(write_as=enodev_gives(None))
    ),
    "fsm-illegal-targets/not-einval": Case("fsm-illegal-targets", fake=sets(None, 8, ERANGE)),
    "fsm-illegal-targets/not-einval (unsupported)": Case(
        "fsm-illegal-targets",
        model="reference,migration_flags=3",
        fake=lambda: Swallowed(arc(None, S.PRE_COPY)),
        why="a device without PRE_COPY takes SET PRE_COPY",
    ),
    "fsm-illegal-targets/moved": Case(
        "fsm-illegal-targets", fake=sets(S.RUNNING, S.ERROR, EINVAL, "stop")
    ),
    "fsm-illegal-targets/no-op-fd": Case(
        "fsm-illegal-targets", fake=lambda: SetInstead(arc(S.STOP, S.STOP), fd="bogus")
    ),
    "fsm-illegal-targets/no-op-moved": Case(
        "fsm-illegal-targets", fake=lambda: SetInstead(arc(S.STOP, S.STOP), instead=S.RUNNING)
    ),
    "fsm-blocked-arcs/wrong-errno": Case(
        "fsm-blocked-arcs", fake=sets(S.STOP_COPY, S.PRE_COPY, EPERM)
    ),
    "fsm-blocked-arcs/accepted": Case("fsm-blocked-arcs", defects=("no_einval_blocked_arc",)),
    "fsm-blocked-arcs/moved": Case(
        "fsm-blocked-arcs", fake=sets(S.STOP_COPY, S.PRE_COPY, EINVAL, "stop")
    ),
    "fsm-blocked-arcs/session-ended": Case(
        "fsm-blocked-arcs", fake=lambda: DataIo(read_as=blocked_then_enodev)
    ),
    # -- data fds ------------------------------------------------------------------------------
    "stream-files/lseek-saving": Case(
        "stream-files", fake=lambda: DataIo(lseek_as=lambda f, fd: 0 if f.saving(fd) else None)
    ),
    "stream-files/write-saving": Case(
        "stream-files",
        fake=lambda: DataIo(write_as=lambda f, fd, d, real: len(d) if f.saving(fd) else real()),
    ),
    "stream-files/lseek-resuming": Case(
        "stream-files",
        fake=lambda: DataIo(lseek_as=lambda f, fd: 0 if f.resuming(fd) else None),
    ),
    "stream-files/read-resuming": Case(
        "stream-files",
        fake=lambda: DataIo(read_as=lambda f, fd, n, real: b"" if f.resuming(fd) else real()),
    ),
    "stream-files/precopy-info-resuming": Case(
        "stream-files", fake=lambda: InfoFails(on_data("resuming"), EINVAL)
    ),
    "end-of-stream/pre-copy-read-error": Case(
        "end-of-stream", fake=lambda: DataIo(read_as=raising(EIO, in_state(S.PRE_COPY)))
    ),
    "end-of-stream/read-after-eof-error": Case(
        "end-of-stream", fake=lambda: DataIo(read_as=eof_gives(eio_late))
    ),
    "end-of-stream/read-after-eof-data": Case(
        "end-of-stream", fake=lambda: DataIo(read_as=eof_gives(lambda: b"late"))
    ),
    "precopy-info-states/pre-copy-error": Case(
        "precopy-info-states", fake=lambda: InfoFails(in_state(S.PRE_COPY), EIO)
    ),
    "precopy-info-states/short-argsz": Case(
        "precopy-info-states", fake=lambda: InfoAnswers(lambda f, fd, info: info.argsz < 24)
    ),
    "precopy-info-states/pre-copy-p2p-error": Case(
        "precopy-info-states", fake=lambda: InfoFails(in_state(S.PRE_COPY_P2P), EIO)
    ),
    "precopy-info-states/stop-copy-session": Case(
        "precopy-info-states",
        fake=lambda: InfoAnswers(
            lambda f, fd, info: f.data[fd].new == S.PRE_COPY and f.dev_state(fd) == S.STOP_COPY
        ),
    ),
    "precopy-info-states/stop-copy-fd": Case(
        "precopy-info-states",
        fake=lambda: InfoAnswers(lambda f, fd, info: f.data[fd].cur == S.STOP),
    ),
    "precopy-info-initial-bytes/grew": Case(
        "precopy-info-initial-bytes",
        fake=lambda: InitialBytes(lambda d, n: n + (1 << 20) if d.reads else n),
    ),
    "precopy-info-initial-bytes/endless": Case(
        "precopy-info-initial-bytes",
        fake=lambda: DataIo(read_as=precopy_never_ends),
        patch=((data_checks, "MAX_PRECOPY_READS", 50),),
    ),
    "precopy-info-initial-bytes/short": Case(
        "precopy-info-initial-bytes",
        fake=lambda: InitialBytes(lambda d, n: n if d.reads else n + 4096),
    ),
    "precopy-info-initial-bytes/left-over": Case(
        "precopy-info-initial-bytes", fake=lambda: InitialBytes(lambda d, n: max(n, 1))
    ),
    "precopy-info-v2/without-pre-copy": Case(
        "precopy-info-v2",
        model="reference,migration_flags=3",
        fake=lambda: FeatureIgnored(v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2),
    ),
    "precopy-info-v2/opt-in-failed": Case(
        "precopy-info-v2",
        fake=lambda: FeatureFails(v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, SET, EIO),
    ),
    "precopy-info-v2/flags": Case(
        "precopy-info-v2",
        fake=lambda: FeatureIgnored(v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2),
        why="the opt-in succeeds but PRECOPY_INFO still echoes the caller's flags",
    ),
    "mig-data-size/error": Case(
        "mig-data-size",
        fake=lambda: FeatureFails(v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, GET, EIO),
    ),
    "mig-data-size/too-small": Case("mig-data-size", defects=("wrong_data_size",)),
    "mig-data-size/too-large": Case(
        "mig-data-size",
        fake=lambda: FeatureSays(
            v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            v.vfio_device_feature_mig_data_size,
            "stop_copy_length",
            lambda n: 10 * n,
        ),
    ),
    # -- resume --------------------------------------------------------------------------------
    "save-resume-roundtrip/refused": Case(
        "save-resume-roundtrip", fake=lambda: DataIo(write_as=raising(EINVAL, on_data("resuming")))
    ),
    "save-resume-roundtrip/load-failed": Case(
        "save-resume-roundtrip", fake=sets(S.RESUMING, S.STOP, EIO)
    ),
    "save-resume-roundtrip/lossy": Case("save-resume-roundtrip", defects=("lossy_resume",)),
    "precopy-roundtrip/refused": Case(
        "precopy-roundtrip", fake=lambda: DataIo(write_as=raising(EINVAL, on_data("resuming")))
    ),
    "precopy-roundtrip/load-failed": Case("precopy-roundtrip", fake=sets(S.RESUMING, S.STOP, EIO)),
    "precopy-roundtrip/lossy": Case("precopy-roundtrip", defects=("lossy_precopy",)),
    "resume-rejects-bad-streams/accepted": Case(
        "resume-rejects-bad-streams", defects=("accepts_truncated",)
    ),
    "resume-rejects-bad-streams/accepted (mismatched)": Case(
        "resume-rejects-bad-streams",
        fake=lambda: TakesSession(3),
        why="the third stream, the mismatched one, is taken",
    ),
    "resume-rejects-bad-streams/state": Case(
        "resume-rejects-bad-streams", fake=lambda: RefusalResets(arc(S.RESUMING, S.STOP))
    ),
    "resume-rechecks-each-session/good-refused": Case(
        "resume-rechecks-each-session", fake=sets(S.RESUMING, S.STOP, EIO)
    ),
    "resume-rechecks-each-session/accepted": Case(
        "resume-rechecks-each-session",
        model="hisi_acc",
        clean="reference",
        why="hisi_acc_vfio_pci checks compatibility once per open (match_done)",
    ),
    "resume-rechecks-each-session/state": Case(
        "resume-rechecks-each-session", fake=lambda: RefusalResets(arc(S.RESUMING, S.STOP))
    ),
    "reset-recovery/failed": Case("reset-recovery", fake=ResetFails),
    "reset-recovery/not-running": Case("reset-recovery", fake=ResetDoesNothing),
    "reset-recovery/fd-alive": Case(
        "reset-recovery", fake=lambda: DataIo(read_as=enodev_gives(b"\0"))
    ),
    "error-recovery/not-einval": Case("error-recovery", fake=sets(S.ERROR, None, EPERM)),
    "error-recovery/left-error": Case("error-recovery", fake=sets(S.ERROR, None, EINVAL, "reset")),
    "error-recovery/reset": Case("error-recovery", fake=ResetDoesNothing),
    # -- DMA logging ---------------------------------------------------------------------------
    "dma-logging-validation/no-log-start": Case(
        "dma-logging-validation",
        model="reference,dma_logging=0",
        fake=lambda: NoLogAnswers(LOG_START),
    ),
    "dma-logging-validation/no-log-report": Case(
        "dma-logging-validation",
        model="reference,dma_logging=0",
        fake=lambda: NoLogAnswers(LOG_REPORT),
    ),
    "dma-logging-validation/probe": Case(
        "dma-logging-validation", fake=lambda: FeatureFails(LOG_START, PROBE, EIO)
    ),
    "dma-logging-validation/no-ranges": Case(
        "dma-logging-validation", fake=lambda: LogRules(empty=False)
    ),
    "dma-logging-validation/too-many-ranges": Case(
        "dma-logging-validation", fake=lambda: LogRules(max_ranges=257)
    ),
    "dma-logging-validation/max-ranges": Case(
        "dma-logging-validation",
        fake=lambda: LogRules(max_ranges=255),
        why="256 ranges fit the kernel's page: an off-by-one E2BIG",
    ),
    "dma-logging-validation/unaligned-iova": Case(
        "dma-logging-validation", fake=lambda: LogRules(iova_aligned=False)
    ),
    "dma-logging-validation/unaligned-length": Case(
        "dma-logging-validation", fake=lambda: LogRules(length_aligned=False)
    ),
    "dma-logging-validation/overlap": Case(
        "dma-logging-validation", fake=lambda: LogRules(overlap=False)
    ),
    "dma-logging-validation/start-overflow": Case(
        "dma-logging-validation", fake=lambda: LogRules(end=False)
    ),
    "dma-logging-validation/report-small-page": Case(
        "dma-logging-validation", fake=lambda: LogRules(min_page=2048)
    ),
    "dma-logging-validation/report-odd-page": Case(
        "dma-logging-validation", fake=lambda: LogRules(pow2=False)
    ),
    "dma-logging-validation/report-overflow": Case(
        "dma-logging-validation", fake=lambda: LogRules(report_end=False)
    ),
    "dma-logging-validation/order-count": Case(
        "dma-logging-validation", fake=lambda: LogRules(count_first=False)
    ),
    "dma-logging-validation/order-align": Case(
        "dma-logging-validation", fake=lambda: LogRules(align_first=False)
    ),
    "dma-logging-validation/order-ranges": Case(
        "dma-logging-validation", fake=lambda: LogRules(in_array_order=False)
    ),
    "dma-logging-validation/order-report": Case(
        "dma-logging-validation", fake=lambda: LogRules(page_first=False)
    ),
    "dma-logging-report/page-size": Case(
        "dma-logging-report",
        fake=lambda: FeatureSays(
            LOG_START, v.vfio_device_feature_dma_logging_control, "page_size", lambda p: 12288
        ),
    ),
    "dma-logging-report/misses-writes": Case("dma-logging-report", defects=("log_misses_writes",)),
    "dma-logging-report/not-cleared": Case("dma-logging-report", defects=("log_not_cleared",)),
    "dma-logging-report/bit-offset": Case("dma-logging-report", fake=ReportEmptyInside),
    # -- P2P -----------------------------------------------------------------------------------
    "p2p-quiescence/set-failed": Case("p2p-quiescence", fake=sets(None, S.RUNNING_P2P, EIO)),
    "p2p-quiescence/get-differs": Case(
        "p2p-quiescence", fake=lambda: GetLies(arc(None, S.RUNNING_P2P), S.RUNNING)
    ),
    "p2p-quiescence/fd-running-p2p": Case(
        "p2p-quiescence", fake=lambda: SetInstead(arc(S.RUNNING, S.RUNNING_P2P), fd="bogus")
    ),
    "p2p-quiescence/no-saving-fd": Case(
        "p2p-quiescence", fake=lambda: SetInstead(arc(None, S.STOP_COPY), fd="none")
    ),
    "p2p-quiescence/no-resuming-fd": Case(
        "p2p-quiescence", fake=lambda: SetInstead(arc(None, S.RESUMING), fd="none")
    ),
    "p2p-quiescence/fd-stop-p2p": Case(
        "p2p-quiescence", fake=lambda: SetInstead(arc(S.STOP, S.RUNNING_P2P), fd="bogus")
    ),
}


# ------------------------------------------------------------------------------------------
# running a case


def target(model: str, defects: tuple[str, ...] = ()) -> suite.Target:
    argv = ["conformance", "--model", model, *(a for d in defects for a in ("--defect", d))]
    return conf.target_from_args(build_parser().parse_args(argv))


def fire(case: Case) -> tuple[suite.CheckResult, list[suite.CheckResult]]:
    """Run the case's check (after ``before``) on its device: the result it is about, and
    all of them."""
    t = target(case.model, case.defects)
    if case.fake is not None:
        assert t.model is not None
        t.transport = case.fake().plug(t.model.kernel)
    results = suite.run_suite(t, [*case.before, case.check])
    name = case.result or case.check
    mine = [r for r in results if r.name == name]
    assert mine, [(r.name, r.status, r.reason) for r in results]
    return mine[-1], results


@functools.cache
def clean(model: str, check: str) -> tuple[str, str]:
    (res,) = suite.run_suite(target(model), [check])
    return res.status, res.reason


def clean_model(case: Case) -> str:
    return case.clean or case.model


@contextmanager
def patched(case: Case) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for module, name, value in case.patch:
            mp.setattr(module, name, value)
        yield


def path_of(key: str) -> str:
    """The failure path a COVERAGE key is about (``path`` or ``path (variant)``)."""
    return key.split(" ", 1)[0]


@pytest.mark.parametrize("key", list(COVERAGE))
def test_the_failure_path_fires(key: str) -> None:
    case, path = COVERAGE[key], path_of(key)
    with patched(case):
        res, results = fire(case)
    # exactly this path, and the reason is a verdict (an internal error only where that is
    # the path)
    assert (res.status, res.failures) == (suite.verdict([path]), [path]), res
    assert res.reason and ("internal error" in res.reason) == ("internal" in path)
    # every other result of the run passed
    others = [r for r in results if r is not res]
    assert all(r.status == PASS for r in others), others
    assert res.name in ("setup", "teardown") or clean(clean_model(case), case.check)[0] == PASS


def test_every_failure_path_has_a_case() -> None:
    missing = sorted(set(suite.FAILURES) - {path_of(k) for k in COVERAGE})
    stale = sorted({path_of(k) for k in COVERAGE} - set(suite.FAILURES))
    assert missing == [] and stale == [], f"paths without a case: {missing}; stale: {stale}"


def test_failure_path_coverage_figure() -> None:
    # Every registered path fires in a case (the figure: fired / total), every check has one.
    assert len(suite.FAILURES) == len({path_of(k) for k in COVERAGE}) >= 100
    assert {c.check for c in COVERAGE.values()} == set(suite.CHECK_NAMES)


@pytest.mark.parametrize("check", suite.CHECK_NAMES)
def test_each_check_has_cases_and_passes_on_their_clean_devices(check: str) -> None:
    # With test_the_failure_path_fires (each case: FAIL at its path on its device, PASS on
    # the clean one), a check that always passes or always fails shows here.
    cases = [c for c in COVERAGE.values() if c.check == check and not c.result]
    assert cases
    for model in {clean_model(c) for c in cases}:
        assert clean(model, check)[0] == PASS, (model, clean(model, check))


def _package_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
    ]


def test_every_failure_site_names_its_own_path() -> None:
    # Each Fail names a path (at=...), each expect_errno one (its 4th argument), and each
    # FAIL result built by hand carries one; every registered path is named by one site.
    registered: dict[str, str] = {}  # constant -> id
    uses: dict[str, int] = {}
    trees = {p: ast.parse(p.read_text()) for p in _package_files()}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "failure"
            ):
                (tgt,) = node.targets
                assert isinstance(tgt, ast.Name), ast.dump(node)
                registered[tgt.id] = ast.literal_eval(node.value.args[0])
        for call in _calls(tree, "Fail"):
            assert any(k.arg == "at" for k in call.keywords), f"{path}:{call.lineno}"
        for call in _calls(tree, "expect_errno"):
            assert len(call.args) + len(call.keywords) == 4, f"{path}:{call.lineno}"
        for call in _calls(tree, "CheckResult"):
            status = call.args[1] if len(call.args) > 1 else None
            if isinstance(status, ast.Name) and status.id == "FAIL":
                assert any(k.arg == "failures" for k in call.keywords), f"{path}:{call.lineno}"
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id in registered:
                    uses[node.id] = uses.get(node.id, 0) + 1
    assert sorted(registered.values()) == sorted(suite.FAILURES)
    assert {name: n for name, n in uses.items() if n != 1} == {}
    assert set(uses) == set(registered)


def test_an_unregistered_path_is_an_internal_error() -> None:
    with pytest.raises(ValueError, match="unregistered failure path"):
        suite.Fail("x", at="no/such-path")
    with pytest.raises(ValueError, match="registered twice"):
        suite.core.failure("runner/setup", "again")


def test_expect_errno_names_both_ways_to_miss() -> None:
    at = "dma-logging-validation/no-ranges"

    def fails(code: int) -> Callable[[], None]:
        def fn() -> None:
            raise oserror(code)

        return fn

    suite.core.expect_errno(fails(EINVAL), EINVAL, "x", at)
    with pytest.raises(suite.Fail) as e:
        suite.core.expect_errno(fails(ENOTTY), EINVAL, "START", at)
    assert e.value.paths == [at] and "expected EINVAL, got ENOTTY" in e.value.args[0]
    with pytest.raises(suite.Fail) as e:
        suite.core.expect_errno(lambda: None, EINVAL, "START", at)
    assert "but it succeeded" in e.value.args[0]


def test_the_json_report_names_the_paths() -> None:
    res, _ = fire(COVERAGE["mig-data-size/too-small"])
    assert res.as_dict()["failures"] == ["mig-data-size/too-small"]
    ok = suite.run_suite(target("reference"), ["mig-data-size"])[0]
    assert "failures" not in ok.as_dict()


# ------------------------------------------------------------------------------------------
# mutation: each comparison of the checks weakened in turn must make some case go wrong

MUTATION = os.environ.get("VFIOMIG_MUTATION") == "1"

_FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


@dataclass
class Mutant:
    module: Any
    owner: str  # "" or the class the function is a method of
    func: ast.FunctionDef
    index: int  # the node's position in ast.walk(func)
    how: str  # "flip" (the comparison's operator negated) or "never" (an if that raises: False)
    # ``function: the comparison (how)``, with " #2" etc. for a repeat: stable when lines move
    name: str = ""


def _raises_fail(node: ast.If) -> bool:
    return any(
        isinstance(s, ast.Raise)
        and isinstance(s.exc, ast.Call)
        and s.exc.func.__dict__.get("id") == "Fail"
        for s in node.body
    )


# Functions of the suite's modules that judge nothing (registration, the CLI's version test).
NOT_CHECKS = frozenset({"failure", "checker", "kernel_release_at_least"})


def mutants() -> list[Mutant]:
    from vfiomig.conformance import core
    from vfiomig.conformance.checks import data, dma, fsm, p2p, resume

    out: list[Mutant] = []
    for mod in (core, fsm, data, resume, dma, p2p):
        tree = ast.parse(Path(mod.__file__ or "").read_text())
        funcs: list[tuple[str, ast.FunctionDef]] = []
        for top in tree.body:
            if isinstance(top, ast.FunctionDef):
                funcs.append(("", top))
            elif isinstance(top, ast.ClassDef) and top.name == "Ctx":
                funcs += [(top.name, f) for f in top.body if isinstance(f, ast.FunctionDef)]
        for owner, fn in funcs:
            if fn.name in NOT_CHECKS:
                continue
            for i, node in enumerate(ast.walk(fn)):
                if isinstance(node, ast.Compare) and type(node.ops[0]) in _FLIP:
                    out.append(Mutant(mod, owner, fn, i, "flip"))
                if isinstance(node, ast.If) and _raises_fail(node):
                    out.append(Mutant(mod, owner, fn, i, "never"))
    seen: dict[str, int] = {}
    for m in out:
        node = list(ast.walk(m.func))[m.index]
        fn_name = f"{m.owner}.{m.func.name}" if m.owner else m.func.name
        shown = ast.unparse(node.test if isinstance(node, ast.If) else node)
        name = f"{fn_name}: {shown} ({m.how})"
        seen[name] = seen.get(name, 0) + 1
        m.name = name + (f" #{seen[name]}" if seen[name] > 1 else "")
    return out


def _compile(m: Mutant) -> Callable[..., Any]:
    import __future__

    import copy

    fn = copy.deepcopy(m.func)
    node = list(ast.walk(fn))[m.index]
    fn.decorator_list = []
    if m.how == "flip":
        assert isinstance(node, ast.Compare)
        node.ops[0] = _FLIP[type(node.ops[0])]()
    else:
        assert isinstance(node, ast.If)
        node.test = ast.Constant(False)
    module = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    flags = __future__.annotations.compiler_flag
    code = compile(module, m.module.__file__, "exec", flags=flags, dont_inherit=True)
    ns = dict(vars(m.module))
    exec(code, ns)
    return ns[fn.name]


@contextmanager
def _applied(m: Mutant) -> Iterator[None]:
    from vfiomig.conformance import core, runner

    new = _compile(m)
    with pytest.MonkeyPatch.context() as mp:
        if m.owner:
            old = vars(core.Ctx)[m.func.name]
            mp.setattr(core.Ctx, m.func.name, property(new) if isinstance(old, property) else new)
        else:
            old = getattr(m.module, m.func.name)
            for mod in list(sys.modules.values()):
                name = getattr(mod, "__name__", "")
                if (
                    name.startswith("vfiomig.conformance")
                    and getattr(mod, m.func.name, None) is old
                ):
                    mp.setattr(mod, m.func.name, new)
            mp.setattr(
                runner, "CHECKS", [(n, d, new if f is old else f) for n, d, f in runner.CHECKS]
            )
        yield


def _survives(m: Mutant) -> bool:
    """Does every case still fail at its path, and every clean device still pass?"""
    if m.module.__name__.endswith(".core"):
        cases = [(path_of(k), c) for k, c in COVERAGE.items()]
    else:
        names = {n for n, _, _ in m.module.CHECKS}
        cases = [(path_of(k), c) for k, c in COVERAGE.items() if c.check in names]
    checks = {(clean_model(c), c.check) for _, c in cases if not c.result}
    with _applied(m):
        try:
            for path, case in cases:
                with patched(case):
                    res, _ = fire(case)
                if (res.status, res.failures) != (suite.verdict([path]), [path]):
                    return False
            for model, check in checks:
                (res,) = suite.run_suite(target(model), [check])
                if res.status != PASS:
                    return False
        except Exception:
            return False
    return True


# Mutants no case can tell from the original: the comparison only words the reason, or
# the kernel's own path rules make both branches equal (name -> why).
EQUIVALENT: dict[str, str] = {
    "Ctx.save: phases is not None (flip) #2": "only the reason's phase list (PRE_COPY phases)",
    "Ctx.save: self.state(dev) != S.STOP (flip)": "SET STOP_COPY from RUNNING passes STOP",
    "c_fsm_blocked: r is not None (flip)": "only the reason's wording",
    "c_precopy_v2: v1.flags == junk (flip)": "only the reason's wording",
    "c_mig_data_size: reported == actual (flip)": "only the reason's wording",
    "c_error: f is not None (flip)": "closing a data fd before a Skip",
    "_log_report: p not in want (flip)": "extra pages are only noted (the uAPI allows them)",
}


@pytest.mark.skipif(not MUTATION, reason="slow: set VFIOMIG_MUTATION=1 to run it")
def test_every_weakened_comparison_is_caught() -> None:
    import signal

    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("the mutant does not finish")

    found = mutants()
    assert len(found) > 100
    assert len({m.name for m in found}) == len(found)
    survivors = []
    old = signal.signal(signal.SIGALRM, timeout)
    try:
        for m in found:
            signal.alarm(10)  # a mutant that loops forever is caught too
            try:
                if _survives(m):
                    survivors.append(m.name)
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert sorted(set(survivors) - set(EQUIVALENT)) == []
    assert sorted(set(EQUIVALENT) - set(survivors)) == []  # no stale entries
