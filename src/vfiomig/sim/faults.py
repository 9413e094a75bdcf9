"""Fault injection for migrations: make the N-th call of a kind fail with an errno, on the
transport a VMM uses (exactly as a failing kernel would answer), or in the channel.

    inj = Faults(host.t)
    inj.ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, nth=3, errno=EIO)   # the 3rd dirty-bitmap read
    inj.read(nth=2, errno=EIO)                                  # the 2nd read of a data fd
    inj.write(nth=1, errno=EIO)                                 # the 1st write (destination)

``calls`` counts every ioctl (by request), read and write, so a clean run tells how many of
each there are to fail in turn.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vfiomig.host import ModelTransport


class Faults:
    def __init__(self, t: ModelTransport) -> None:
        self.t = t
        self.fired: list[str] = []
        self._ioctls: dict[int, list[int]] = {}  # request -> [calls so far, nth, errno]
        self._orig_ioctl = t.ioctl
        self._orig_read = t.read
        self._orig_write = t.write
        self.calls: dict[int | str, int] = {}
        t.ioctl = self._ioctl  # type: ignore[method-assign]
        self.read(nth=0, errno=0)
        self.write(nth=0, errno=0)

    def ioctl(self, request: int, *, nth: int, errno: int) -> None:
        self._ioctls[request] = [0, nth, errno]

    def read(self, *, nth: int, errno: int) -> None:
        self.t.read = self._counting(self._orig_read, "read", nth, errno)  # type: ignore[method-assign]

    def write(self, *, nth: int, errno: int) -> None:
        self.t.write = self._counting(self._orig_write, "write", nth, errno)  # type: ignore[method-assign]

    def _fire(self, what: str, errno: int) -> OSError:
        self.fired.append(what)
        return OSError(errno, os.strerror(errno))

    def _ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        self.calls[request] = self.calls.get(request, 0) + 1
        rule = self._ioctls.get(request)
        if rule is not None:
            rule[0] += 1
            if rule[0] == rule[1]:
                raise self._fire(f"ioctl {request:#x} #{rule[1]}", rule[2])
        return self._orig_ioctl(fd, request, arg)

    def _counting(self, fn: Callable[..., Any], what: str, nth: int, errno: int) -> Any:
        calls = [0]

        def wrapped(fd: int, *a: Any) -> Any:
            calls[0] += 1
            self.calls[what] = calls[0]
            if calls[0] == nth:
                raise self._fire(f"{what} #{nth}", errno)
            return fn(fd, *a)

        return wrapped
