"""Fault injection as the kernel's fail-nth gives it (lib/fault-inject.c, fs/proc/base.c).

CONFIG_IOMMUFD_TEST depends on CONFIG_FAULT_INJECTION, and the iommufd selftests
(iommufd_fail_nth.c) drive it through /proc/self/task/TID/fail-nth: writing N makes the
N-th fallible step the task takes from then on fail; reading it back says how many steps
were still to go ("0\\n": the failure happened). Every should_fail() the task passes counts
(should_fail_ex: with current->fail_nth set, any fault attribute counts, enabled or not),
whatever the attribute's own probability.

The model's fallible steps, each failing with the errno its kernel counterpart returns:

=================  ==================================================  ========
attribute          model steps                                         errno
=================  ==================================================  ========
failslab           kmalloc / kzalloc of an object, a domain, an area,  ENOMEM
                   an access item (iommufd_object_alloc, ...)
fail_page_alloc    pinning user pages for a domain or an access        ENOMEM
fail_usercopy      copy_from_user / copy_to_user of an ioctl struct    EFAULT
                   or through a pointer in it (not get_user)
fail_iommufd       the mock domain's map_pages (iommufd_should_fail)   ENOENT
=================  ==================================================  ========

As in mm/failslab.c and mm/fail_page_alloc.c, failslab and fail_page_alloc skip
allocations that may sleep while their ``ignore-gfp-wait`` is ``Y`` (the default; every
iommufd allocation is GFP_KERNEL): the selftest writes ``N`` first. Under `vfiomig run
--iommufd-test` those attribute files are the ones the run serves as /sys/kernel/debug;
on a bare ModelKernel they are `FaultInject.attrs`.

Tasks: the model knows processes (the pid of the caller, hw/process_memory.py), not
threads: every thread of a process shares one fail-nth counter.
"""

from __future__ import annotations

import os
import re
import weakref
from errno import EINVAL, ENOENT, ERANGE, ESRCH
from pathlib import Path
from typing import TYPE_CHECKING

from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory
    from vfiomig.kernel.machine import ModelKernel

UINT_MAX = (1 << 32) - 1

# The fault attributes and their debugfs files (include/linux/fault-inject.h
# fault_create_debugfs_attr, mm/failslab.c, mm/fail_page_alloc.c, lib/fault-inject-usercopy.c,
# drivers/iommu/iommufd/selftest.c "fail_iommufd"): the files the run serves, with their
# kernel defaults.
_COMMON = {
    "probability": "0",
    "interval": "1",
    "times": "1",
    "space": "0",
    "verbose": "2",
    "verbose_ratelimit_interval_ms": "5000",
    "verbose_ratelimit_burst": "10",
    "task-filter": "N",
    "stacktrace-depth": "32",
    "require-start": "0",
    "require-end": "18446744073709551615",
    "reject-start": "0",
    "reject-end": "0",
}
ATTRS: dict[str, dict[str, str]] = {
    "failslab": {**_COMMON, "ignore-gfp-wait": "Y", "cache-filter": "N"},
    "fail_page_alloc": {
        **_COMMON,
        "ignore-gfp-wait": "Y",
        "ignore-gfp-highmem": "Y",
        "min-order": "1",
    },
    "fail_usercopy": dict(_COMMON),
    "fail_iommufd": dict(_COMMON),
}
# Attributes whose should_fail() is skipped for a sleeping allocation while ignore-gfp-wait
# is Y (should_failslab, should_fail_alloc_page: every model allocation is GFP_KERNEL).
_GFP_GATED = ("failslab", "fail_page_alloc")

# mm -> the injector of the kernel whose process memory it is (a UserPtr knows only its mm).
_BY_MM: weakref.WeakKeyDictionary[Memory, FaultInject] = weakref.WeakKeyDictionary()


def populate_debugfs(root: Path) -> None:
    """Make the attribute directories and files of a served /sys/kernel/debug."""
    for name, files in ATTRS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for fname, value in files.items():
            (root / name / fname).write_text(value + "\n")


class FaultInject:
    """The fail-nth counters of a ModelKernel's tasks and its fault attributes."""

    def __init__(self, kernel: ModelKernel, debugfs: Path | None = None) -> None:
        self.kernel = kernel
        self.debugfs = debugfs  # the served /sys/kernel/debug, if any
        self.attrs = {name: dict(files) for name, files in ATTRS.items()}
        self.fail_nth: dict[int, int] = {}  # task (pid) -> current->fail_nth
        _BY_MM[kernel.mm] = self

    def current(self) -> int:
        """The calling task: the pid whose call is served (0 for a bare ModelKernel)."""
        return int(getattr(self.kernel.mm, "pid", 0) or 0)

    def attr(self, name: str, fname: str) -> str:
        """A fault attribute's file as the program left it (the served file wins)."""
        if self.debugfs is not None:
            try:
                return (self.debugfs / name / fname).read_text().strip()
            except OSError:
                pass
        return self.attrs[name][fname]

    def should_fail(self, attr: str) -> bool:
        """should_fail_ex(attr) for the current task, under fail-nth only: the model never
        fails at random (every attribute's probability stays 0)."""
        task = self.current()
        nth = self.fail_nth.get(task, 0)
        if not nth:
            return False
        if attr in _GFP_GATED and self.attr(attr, "ignore-gfp-wait")[:1] in ("Y", "y", "1"):
            return False  # should_failslab / should_fail_alloc_page: ignore_gfp_reclaim
        nth -= 1
        self.fail_nth[task] = nth
        return nth == 0


def injector(mm: Memory) -> FaultInject | None:
    return _BY_MM.get(mm)


def should_fail(mm: Memory, attr: str) -> bool:
    """should_fail(attr) in the task whose memory `mm` is: False where fault injection is
    not configured (a ModelKernel without iommufd_test)."""
    fi = _BY_MM.get(mm)
    return fi is not None and fi.should_fail(attr)


def fail_point(mm: Memory, attr: str, errno: int) -> None:
    """Raise `errno` if this step is the one fail-nth picked."""
    if should_fail(mm, attr):
        raise err(errno)


def kstrtouint(data: bytes) -> int:
    """kstrtouint(s, 0, &n) as kstrtouint_from_user reads a write: base auto-detected,
    one trailing newline allowed; EINVAL for anything else, ERANGE above UINT_MAX."""
    s = data.decode("latin-1")
    if s.endswith("\n"):
        s = s[:-1]
    if s.startswith("+"):
        s = s[1:]
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", s)
    if not m:
        raise err(EINVAL)
    if s[:2] in ("0x", "0X"):
        n = int(s[2:], 16)
    else:
        n = int(s, 8 if s.startswith("0") else 10)
    if n > UINT_MAX:
        raise err(ERANGE)
    return n


class FailNthFile(File):
    """/proc/<pid>/task/<tid>/fail-nth (proc_fail_nth_operations): read and write only,
    positioned (simple_read_from_buffer); a write sets the task's counter."""

    def __init__(self, fi: FaultInject, task: int) -> None:
        super().__init__()
        self.fi = fi
        self.task = task
        self.pos = 0

    def _alive(self) -> None:
        """get_proc_task: ESRCH once the task is gone."""
        if self.task and not os.path.exists(f"/proc/{self.task}"):
            raise err(ESRCH)

    def read(self, n: int) -> bytes:
        self._alive()
        text = f"{self.fi.fail_nth.get(self.task, 0)}\n".encode()
        out = text[self.pos : self.pos + n] if self.pos < len(text) else b""
        self.pos += len(out)
        return out

    def write(self, data: bytes) -> int:
        value = kstrtouint(data)
        self._alive()
        self.fi.fail_nth[self.task] = value
        return len(data)

    def llseek(self, offset: int, whence: int) -> int:
        """default_llseek (proc files): SEEK_SET / SEEK_CUR."""
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self.pos + offset
        else:
            raise err(EINVAL)
        if new < 0:
            raise err(EINVAL)
        self.pos = new
        return new


_FAIL_NTH = re.compile(r"/proc/(?:thread-self|(self|\d+)/task/(\d+))/fail-nth")


def fail_nth_opener(fi: FaultInject, path: str) -> File | None:
    """The fail-nth file a path names, or None. Counters are per process (module doc):
    /proc/self/task/TID and /proc/thread-self are the caller's, /proc/PID/task/TID PID's."""
    m = _FAIL_NTH.fullmatch(path)
    if m is None:
        return None
    who = m.group(1)
    task = fi.current() if who in (None, "self") else int(who)
    if task and not os.path.exists(f"/proc/{task}"):
        raise err(ENOENT)  # proc_pid_lookup: no such process
    return FailNthFile(fi, task)
