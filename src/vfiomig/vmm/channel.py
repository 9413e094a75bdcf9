"""Where the migration stream goes: a simulated link to a destination, or a file.

A Channel carries encoded sections. Its ``rate`` (bytes per second) and ``latency`` are what
the engine charges simulated time for; the bytes themselves arrive at once. A TCP channel
fits the same interface (send bytes, close). ``fail_after``/``corrupt`` inject faults: the
link drops (ChannelError on the sender) or one section arrives damaged (the destination's
checksum refuses it).
"""

from __future__ import annotations

import abc
import io
from collections.abc import Callable

from vfiomig.vmm.stream import Buffer, Section


class ChannelError(OSError):
    """The channel broke (the connection dropped, the disk is full)."""


class Channel(abc.ABC):
    kind = "link"

    def __init__(self, rate: float, latency: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("a channel's rate must be positive")
        self.rate = rate
        self.latency = latency
        self.sections = 0
        self.encoded = 0
        self.fail_after: int | None = None  # sections that go through before the link drops
        self.corrupt: int | None = None  # the index of a section to damage in flight

    def send(self, section: Section) -> None:
        if self.fail_after is not None and self.sections >= self.fail_after:
            raise ChannelError(104, "migration channel: connection reset by peer")
        header, payload = section.header(), section.payload
        if self.corrupt == self.sections:
            header = header[:-1] + bytes([header[-1] ^ 0xFF])  # the checksum arrives wrong
        self.sections += 1
        self.encoded += len(header) + len(payload)
        self._deliver(header, payload)

    @abc.abstractmethod
    def _deliver(self, header: bytes, payload: Buffer) -> None:
        """Carry one section (its header, then its payload)."""

    def close(self) -> None:  # noqa: B027 - a simulated link has nothing to release
        """Release what the channel holds."""


class LinkChannel(Channel):
    """A simulated network link: each section is handed to the destination's loader."""

    def __init__(
        self, rate: float, latency: float, receive: Callable[[bytes, Buffer], None]
    ) -> None:
        super().__init__(rate, latency)
        self.receive = receive

    def _deliver(self, header: bytes, payload: Buffer) -> None:
        self.receive(header, payload)


class FileChannel(Channel):
    """``--to file:PATH``: the stream written behind a header (see vmm.savefile)."""

    kind = "file"

    def __init__(self, rate: float, f: io.BufferedWriter) -> None:
        super().__init__(rate)
        self.f = f

    def _deliver(self, header: bytes, payload: Buffer) -> None:
        try:
            self.f.write(header)
            self.f.write(payload)
        except OSError as e:
            raise ChannelError(e.errno or 5, f"migration file: {e.strerror}") from None
