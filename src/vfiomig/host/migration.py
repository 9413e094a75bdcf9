"""The migration data fd a VFIO device hands out when a state transition opens a session.

A *saving* file (RUNNING -> PRE_COPY, STOP -> STOP_COPY, ...) is read-only: ``read`` returns the
device state, ``b""`` at the permanent end of the stream (STOP_COPY, all read) and, on devices
that do it, ``ENOMSG`` at the *temporary* end in PRE_COPY (more may come later).
``precopy_info()`` (VFIO_MIG_GET_PRECOPY_INFO) says how much is left. A *resuming* file
(STOP -> RESUMING) is write-only. Once its session ends (the device left the saving or resuming
states, or was reset), every read or write is ``ENODEV``; the fd stays open until closed.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from errno import EIO, ENOMSG

from vfiomig.host.cstruct import check_int, fill
from vfiomig.host.errors import MigrationDataError, call
from vfiomig.host.resource import Resource
from vfiomig.host.transport import POLLIN, Transport
from vfiomig.uapi import vfio as v

DEFAULT_CHUNK = 1 << 20
SSIZE_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class PrecopyInfo:
    """VFIO_MIG_GET_PRECOPY_INFO. ``flags`` is only meaningful after the v2 opt-in
    (``VfioDevice.enable_precopy_info_v2``); v1 kernels echo what the caller put there."""

    initial_bytes: int
    dirty_bytes: int
    flags: int

    @property
    def reinit(self) -> bool:
        return bool(self.flags & v.VFIO_PRECOPY_INFO_REINIT)


class MigrationFile(Resource):
    """A migration data fd; a context manager that closes it (and, if dropped open, its
    finalizer does, with a ResourceWarning)."""

    _owns_fd = True

    def __init__(self, transport: Transport, fd: int, *, saving: bool) -> None:
        self.transport = transport
        self.fd = fd
        self.saving = saving

    # -- saving -------------------------------------------------------------------------

    def read(self, n: int = DEFAULT_CHUNK) -> bytes:
        """One read(2): up to ``n`` bytes; ``b""`` at end of stream; ENOMSG raises."""
        op = "read(data_fd)"
        self._check_open(op)
        n = check_int(op, "count", n, 0, SSIZE_MAX, "size_t")
        return call(MigrationDataError, f"read(data_fd, {n})", self.transport.read, self.fd, n)

    def read_chunk(self, n: int = DEFAULT_CHUNK) -> bytes | None:
        """Like :meth:`read`, but the temporary end of stream (ENOMSG) returns None."""
        try:
            return self.read(n)
        except MigrationDataError as e:
            if e.errno == ENOMSG:
                return None
            raise

    def chunks(self, n: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """Read until the stream ends for now (0 bytes or ENOMSG)."""
        while True:
            chunk = self.read_chunk(n)
            if not chunk:
                return
            yield chunk

    def read_available(self, n: int = DEFAULT_CHUNK) -> bytes:
        """Everything that can be read now (until 0 bytes or ENOMSG)."""
        return b"".join(self.chunks(n))

    def precopy_info(self, flags: int = 0) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO (only in PRE_COPY / PRE_COPY_P2P, else EINVAL).

        ``flags`` is what goes into the struct: a v1 kernel hands it back unchanged."""
        op = "VFIO_MIG_GET_PRECOPY_INFO"
        self._check_open(op)
        info = fill(
            v.vfio_precopy_info, op, argsz=ctypes.sizeof(v.vfio_precopy_info), flags=flags
        )
        call(
            MigrationDataError,
            op,
            self.transport.ioctl,
            self.fd,
            v.VFIO_MIG_GET_PRECOPY_INFO,
            info,
        )
        return PrecopyInfo(int(info.initial_bytes), int(info.dirty_bytes), int(info.flags))

    def poll(self, timeout_ms: int = 0, events: int = POLLIN) -> int:
        op = "poll(data_fd)"
        self._check_open(op)
        events = check_int(op, "events", events, 0, 0xFFFF, "short")  # struct pollfd
        timeout_ms = check_int(op, "timeout", timeout_ms, -(1 << 31), (1 << 31) - 1, "int")
        return call(
            MigrationDataError, "poll(data_fd)", self.transport.poll, self.fd, events, timeout_ms
        )

    # -- resuming -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """One write(2); returns how many bytes the kernel took."""
        self._check_open("write(data_fd)")
        return call(
            MigrationDataError, f"write(data_fd, {len(data)})", self.transport.write, self.fd, data
        )

    def write_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, continuing after short writes."""
        view = memoryview(data).cast("B")  # bytes-like only (TypeError otherwise)
        while view:
            n = self.write(view)
            if n <= 0:
                raise MigrationDataError(
                    EIO, f"write(data_fd, {len(view)})", "the kernel took 0 bytes"
                )
            view = view[n:]

    def copy_to(
        self,
        dest: MigrationFile,
        n: int = DEFAULT_CHUNK,
        observe: Callable[[bytes], None] | None = None,
    ) -> int:
        """Stream what is available now from this saving file into a resuming one."""
        total = 0
        for chunk in self.chunks(n):
            if observe is not None:
                observe(chunk)
            dest.write_all(chunk)
            total += len(chunk)
        return total

    # -- lifetime -----------------------------------------------------------------------

    def _release(self) -> None:
        call(MigrationDataError, "close(data_fd)", self.transport.close, self.fd)

    def __repr__(self) -> str:
        kind = "saving" if self.saving else "resuming"
        return f"MigrationFile(fd={self.fd}, {kind}{', closed' if self.closed else ''})"
