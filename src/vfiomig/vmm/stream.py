"""The migration stream: sections with a checksum each, as the destination reads them.

QEMU's stream is a sequence of sections (``QEMU_VM_SECTION_PART`` / ``_END`` per handler,
RAM pages with their flags, VFIO's ``0xffffffffef10000X`` delimiters). vfiomig's stream keeps
that structure in a simpler framing: every section is a 24-byte header
``<magic u32, type u8, sub u8, index u16, length u64, crc32 u32>`` (the crc is zlib's crc32
of the payload) followed by ``length`` payload bytes:

  RAM     a batch of guest pages: runs of page numbers, a zero-page mask, per-page versions
          (versions mode) and the bytes of every non-zero page the guest has bytes for
  DEVICE  one VFIO device's SETUP / DATA (a chunk read from its data_fd) / INIT_DATA_SENT /
          CONFIG / END, as QEMU's VFIO_MIG_FLAG_DEV_* markers
  CPU     the vCPU and guest-driver state (JSON), sent once the VM has stopped
  EOS     end of stream

What the simulated link is charged is QEMU's byte count for the same content (8-byte page
headers, 4 KiB per normal page, 9 bytes per zero page, device chunks plus their headers), not
the size of this encoding, which is smaller for versions-mode pages.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MAGIC = 0x5646_4D53  # "SMFV"
HEADER = struct.Struct("<IBBHQI")

RAM, DEVICE, CPU, EOS = 1, 2, 3, 4
SECTION_NAMES = {RAM: "RAM", DEVICE: "DEVICE", CPU: "CPU", EOS: "EOS"}
# VFIO device markers (hw/vfio/migration.c VFIO_MIG_FLAG_DEV_*), low byte of the delimiter.
DEV_END, DEV_CONFIG, DEV_SETUP, DEV_DATA, DEV_INIT_DATA_SENT = 1, 2, 3, 4, 5

# QEMU's wire cost (migration/ram.c save_zero_page / save_normal_page; VFIO's u64 markers).
PAGE_HEADER = 8
ZERO_PAGE_WIRE = PAGE_HEADER + 1
VFIO_HEADER = 16  # delimiter + size


class StreamError(Exception):
    """The stream is damaged or out of order (the destination refuses it)."""


Buffer = bytes | bytearray | memoryview


@dataclass
class Section:
    type: int
    sub: int = 0
    index: int = 0
    payload: Buffer = b""

    def header(self) -> bytes:
        crc = zlib.crc32(self.payload)
        return HEADER.pack(MAGIC, self.type, self.sub, self.index, len(self.payload), crc)

    def encode(self) -> bytes:
        return self.header() + bytes(self.payload)


def check(header: Buffer, payload: Buffer, off: int = 0) -> Section:
    """The section a header and its payload make; StreamError if either is damaged. The
    payload is not copied."""
    if len(header) < HEADER.size:
        raise StreamError(f"truncated section header at byte {off}")
    magic, typ, sub, index, length, crc = HEADER.unpack_from(header, 0)
    if magic != MAGIC or typ not in SECTION_NAMES:
        raise StreamError(f"bad section header at byte {off}")
    if len(payload) != length:
        raise StreamError(f"truncated {SECTION_NAMES[typ]} section at byte {off}")
    if zlib.crc32(payload) != crc:
        raise StreamError(f"checksum mismatch in {SECTION_NAMES[typ]} section at byte {off}")
    return Section(typ, sub, index, payload)


def decode(buf: Buffer, off: int = 0) -> tuple[Section, int]:
    """The section at ``off`` of a whole stream and the offset after it (no copy)."""
    mv = memoryview(buf)
    head = mv[off : off + HEADER.size]
    if len(head) < HEADER.size:
        raise StreamError(f"truncated section header at byte {off}")
    length = HEADER.unpack_from(head, 0)[4]
    start = off + HEADER.size
    return check(head, mv[start : start + length], off), start + length


# -- RAM sections ------------------------------------------------------------------------------

RAM_HEAD = struct.Struct("<QQB")  # pages, runs, has versions


def encode_ram(
    pages: npt.NDArray[np.int64],
    zero: npt.NDArray[np.bool_],
    versions: npt.NDArray[np.uint32] | None,
    rows: npt.NDArray[np.uint8],
) -> Section:
    """A RAM section for sorted ``pages``: runs, zero mask, versions, non-zero bytes."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [pages.size])))
    runs = np.stack((pages[starts], counts), axis=1).astype("<i8")
    parts: list[Buffer] = [
        RAM_HEAD.pack(pages.size, runs.shape[0], versions is not None),
        runs.tobytes(),
        np.packbits(zero, bitorder="little").tobytes(),
    ]
    if versions is not None:
        parts.append(versions.astype("<u4").tobytes())
    parts.append(np.ascontiguousarray(rows).data)
    return Section(RAM, payload=b"".join(parts))


def decode_ram(
    payload: Buffer,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.uint32] | None, memoryview]:
    """(pages, zero mask, versions or None, the page bytes that follow) of a RAM section."""
    try:
        n, nruns, has_v = RAM_HEAD.unpack_from(payload, 0)
        off = RAM_HEAD.size
        runs = np.frombuffer(payload, "<i8", nruns * 2, off).reshape(-1, 2)
        off += nruns * 16
        if int(runs[:, 1].sum()) != n or (runs[:, 1] <= 0).any():
            raise StreamError("RAM section: runs do not add up to its page count")
        lens = runs[:, 1]
        idx = np.repeat(runs[:, 0] - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
        pages = (idx + np.arange(n)).astype(np.int64)
        zb = -(-n // 8)
        zero = np.unpackbits(
            np.frombuffer(payload, np.uint8, zb, off), count=n, bitorder="little"
        ).astype(bool)
        off += zb
        versions = None
        if has_v:
            versions = np.frombuffer(payload, "<u4", n, off).astype(np.uint32)
            off += 4 * n
    except (struct.error, ValueError, OverflowError, MemoryError) as e:
        raise StreamError(f"malformed RAM section: {e}") from None
    return pages, zero, versions, memoryview(payload)[off:]
