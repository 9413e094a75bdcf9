"""Saved migration streams: kept in memory or spilled to a file, compared by hash, and
the damaged copies (truncated, corrupted) the resume checks feed back."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO

READ_CHUNK = 1 << 20
# Saved streams up to this size stay in memory; larger ones go to a temporary file.
KEEP_STREAM = 64 << 20


class Stream:
    """A saved migration stream: length and sha256, its bytes in memory up to KEEP_STREAM
    and in an anonymous temporary file beyond (a device state can be hundreds of MiB)."""

    def __init__(self) -> None:
        self.length = 0
        self._hash = hashlib.sha256()
        self._mem = bytearray()
        self._file: IO[bytes] | None = None

    def add(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.length += len(chunk)
        if self._file is None and len(self._mem) + len(chunk) > KEEP_STREAM:
            self._file = tempfile.TemporaryFile()
            self._file.write(self._mem)
            self._mem = bytearray()
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._mem.extend(chunk)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def chunks(self, n: int = READ_CHUNK) -> Iterator[bytes]:
        if self._file is None:
            for i in range(0, len(self._mem), n):
                yield bytes(self._mem[i : i + n])
            return
        self._file.seek(0)
        while chunk := self._file.read(n):
            yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stream):
            return NotImplemented
        return (self.length, self.digest) == (other.length, other.digest)

    __hash__ = None  # type: ignore[assignment]


def first_difference(a: Stream, b: Stream) -> int:
    """Offset of the first byte where two streams differ (the shorter length if one is a
    prefix of the other)."""
    off = 0
    ia, ib = a.chunks(), b.chunks()
    ca = cb = b""
    while True:
        if not ca:
            ca = next(ia, b"")
        if not cb:
            cb = next(ib, b"")
        if not ca or not cb:
            return off
        n = min(len(ca), len(cb))
        if ca[:n] != cb[:n]:
            return off + next(i for i in range(n) if ca[i] != cb[i])
        off += n
        ca, cb = ca[n:], cb[n:]


def truncated(stream: Stream) -> Iterator[bytes]:
    """The first half of a stream."""
    left = stream.length // 2
    for chunk in stream.chunks():
        if left <= 0:
            return
        yield chunk[:left]
        left -= len(chunk)


def corrupted(stream: Stream) -> Iterator[bytes]:
    """The stream with every bit of its first 8 bytes inverted (its header)."""
    head = 8
    for chunk in stream.chunks():
        if head > 0:
            n = min(head, len(chunk))
            chunk = bytes(x ^ 0xFF for x in chunk[:n]) + chunk[n:]
            head -= n
        yield chunk
