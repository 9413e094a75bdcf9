"""The parts of drivers/vfio/vfio_main.c behind a device fd's regions and interrupts.

* `vfio_get_region_info`: VFIO_DEVICE_GET_REGION_INFO is answered by the core since the
  get_region_info_caps conversion (Linux 6.19): no driver op EINVAL (before anything is
  read), copy of minsz = 32 bytes EFAULT, argsz < 32 EINVAL, the driver's op fills the
  struct and a capability chain, then the chain (VFIO_REGION_INFO_FLAG_CAPS) is copied
  after the struct if argsz has room, else argsz grows to what is needed and cap_offset is
  0; the 32-byte struct is copied back.
* `VfioInfoCap`: struct vfio_info_cap (vfio_info_cap_add, vfio_info_cap_shift,
  vfio_info_add_capability).
* `vfio_set_irqs_validate_and_prepare`: the common VFIO_DEVICE_SET_IRQS checks.
* `vfio_device_fops_read` / `_write` / `_mmap`: EINVAL before access is granted, EINVAL for a
  driver without the op, else the driver's op (`ops_read(n, pos)`, `ops_write(data, pos)`,
  `ops_mmap(mm, size, pgoff)` on the VfioDevice).

A driver provides the ops as methods of its VfioDevice; one without them answers as a
struct vfio_device_ops with NULL pointers does.
"""

from __future__ import annotations

import ctypes
import struct
from errno import EFAULT, EINVAL
from typing import TYPE_CHECKING, Any

from vfiomig.hw.memory import PAGE_SHIFT
from vfiomig.kernel.errors import err
from vfiomig.kernel.uaccess import UserArg
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.hw.memory import Memory, Region

REGION_INFO_MINSZ = 32  # offsetofend(struct vfio_region_info, offset) == sizeof
IRQ_SET_MINSZ = 20  # offsetofend(struct vfio_irq_set, count)
U32_MAX = 0xFFFFFFFF
_CAP_HDR = struct.Struct("<HHI")  # struct vfio_info_cap_header {u16 id, version; u32 next}


class VfioInfoCap:
    """struct vfio_info_cap: a chain of capabilities built at the head of a buffer, each
    header's `next` relative to the buffer until vfio_info_cap_shift moves it."""

    def __init__(self) -> None:
        self.buf = bytearray()

    @property
    def size(self) -> int:
        return len(self.buf)

    def add(self, cap_id: int, version: int, body: bytes = b"") -> None:
        """vfio_info_add_capability -> vfio_info_cap_add: append a zeroed header + body and
        link it from the end of the chain (the walk starts at the buffer's first header)."""
        start = len(self.buf)
        self.buf += _CAP_HDR.pack(cap_id, version, 0) + body
        tmp = 0
        while True:
            nxt = _CAP_HDR.unpack_from(self.buf, tmp)[2]
            if not nxt:
                break
            tmp = nxt
        struct.pack_into("<I", self.buf, tmp + 4, start)

    def shift(self, offset: int) -> None:
        """vfio_info_cap_shift: every non-zero `next` grows by `offset`."""
        tmp = 0
        while True:
            nxt = _CAP_HDR.unpack_from(self.buf, tmp)[2]
            if not nxt:
                break
            struct.pack_into("<I", self.buf, tmp + 4, nxt + offset)
            tmp = nxt


def vfio_get_region_info(dev: Any, arg: UserArg | int) -> int:
    """vfio_main.c vfio_get_region_info (7.2)."""
    op = getattr(dev, "get_region_info_caps", None)
    if op is None:  # unlikely(!device->ops->get_region_info_caps)
        raise err(EINVAL)
    if isinstance(arg, int):
        raise err(EFAULT)
    info = arg.get(v.vfio_region_info, size=REGION_INFO_MINSZ)  # EFAULT
    if info.argsz < REGION_INFO_MINSZ:
        raise err(EINVAL)
    caps = VfioInfoCap()
    op(info, caps)
    if caps.size:
        info.flags |= v.VFIO_REGION_INFO_FLAG_CAPS
        if info.argsz < ctypes.sizeof(info) + caps.size:
            info.argsz = ctypes.sizeof(info) + caps.size
            info.cap_offset = 0
        else:
            caps.shift(ctypes.sizeof(info))
            arg.write(ctypes.sizeof(info), caps.buf)  # copy_to_user(arg + 1): EFAULT
            info.cap_offset = ctypes.sizeof(info)
    arg.put(info, size=REGION_INFO_MINSZ)  # copy_to_user(arg, &info, minsz): EFAULT
    return 0


def vfio_set_irqs_validate_and_prepare(
    hdr: v.vfio_irq_set, num_irqs: int, max_irq_type: int
) -> int:
    """vfio_main.c vfio_set_irqs_validate_and_prepare: the size of the data that follows
    the 20-byte header (0, count bytes, or 4 * count), or EINVAL. The action bits are not
    checked here (the driver's switch on them answers ENOTTY)."""
    if (
        hdr.argsz < IRQ_SET_MINSZ
        or hdr.index >= max_irq_type
        or hdr.count >= U32_MAX - hdr.start
        or hdr.flags & ~(v.VFIO_IRQ_SET_DATA_TYPE_MASK | v.VFIO_IRQ_SET_ACTION_TYPE_MASK)
    ):
        raise err(EINVAL)
    if hdr.start >= num_irqs or hdr.start + hdr.count > num_irqs:
        raise err(EINVAL)
    data_type = hdr.flags & v.VFIO_IRQ_SET_DATA_TYPE_MASK
    if data_type == v.VFIO_IRQ_SET_DATA_NONE:
        size = 0
    elif data_type == v.VFIO_IRQ_SET_DATA_BOOL:
        size = 1  # sizeof(uint8_t)
    elif data_type == v.VFIO_IRQ_SET_DATA_EVENTFD:
        size = 4  # sizeof(int32_t)
    else:  # no data type, or more than one
        raise err(EINVAL)
    if size and hdr.argsz - IRQ_SET_MINSZ < hdr.count * size:
        raise err(EINVAL)
    return hdr.count * size


def memdup_user(arg: UserArg, off: int, n: int) -> bytes:
    """memdup_user: EFAULT when the bytes are not all readable."""
    try:
        return arg.read(off, n)
    except OSError:
        raise err(EFAULT) from None


# -- file operations ----------------------------------------------------------------------


def vfio_device_fops_read(df: Any, n: int, pos: int) -> bytes:
    """vfio_device_fops_read."""
    if not df.access_granted:
        raise err(EINVAL)
    op = getattr(df.device, "ops_read", None)
    if op is None:
        raise err(EINVAL)
    data: bytes = op(n, pos)
    return data


def vfio_device_fops_write(df: Any, data: bytes, pos: int) -> int:
    """vfio_device_fops_write."""
    if not df.access_granted:
        raise err(EINVAL)
    op = getattr(df.device, "ops_write", None)
    if op is None:
        raise err(EINVAL)
    done: int = op(data, pos)
    return done


def vfio_device_fops_mmap(df: Any, mm: Memory, size: int, offset: int) -> Region:
    """vfio_device_fops_mmap: the driver sees vm_pgoff = offset >> PAGE_SHIFT."""
    if not df.access_granted:
        raise err(EINVAL)
    op = getattr(df.device, "ops_mmap", None)
    if op is None:
        raise err(EINVAL)
    region: Region = op(mm, size, offset >> PAGE_SHIFT)
    return region
