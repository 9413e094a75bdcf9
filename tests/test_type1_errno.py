"""type1's errno rules, case by case (vfio_iommu_type1.c as of Linux 7.2).

Each case is one bad (or borderline) input and the errno userspace sees. The containers are
v2 with a passthrough device unless a case says otherwise. Overflow is EOVERFLOW since the
6.18 "handle DMA map/unmap up to the addressable limit" series (check_add_overflow).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Any

import pytest
from test_type1_support import (
    GET_BITMAP,
    PAGE,
    PIN_KIND,
    RW,
    START,
    STOP,
    Legacy,
    bitmap_cmd,
    errno_of,
    int_buf,
)

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.container import (
    vfio_device_container_dma_rw,
    vfio_device_container_pin_pages,
)
from vfiomig.uapi import vfio as v

U64 = (1 << 64) - 1
R, W = v.VFIO_DMA_MAP_FLAG_READ, v.VFIO_DMA_MAP_FLAG_WRITE
VADDR = v.VFIO_DMA_MAP_FLAG_VADDR
GET_DIRTY = v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
ALL = v.VFIO_DMA_UNMAP_FLAG_ALL
U_VADDR = v.VFIO_DMA_UNMAP_FLAG_VADDR
M = 0x100_0000  # an IOVA with a mapping of 4 pages (16 KiB)


def ctx(kinds: tuple[str, ...] = ("reference",), iommu: int = v.VFIO_TYPE1v2_IOMMU) -> Legacy:
    lg = Legacy(ModelKernel(), kinds, iommu_type=iommu)
    lg.map(M, 4 * PAGE)
    return lg


def bitmap_case(req: int, case: dict[str, Any]) -> tuple[Legacy, bytearray, int]:
    """One UNMAP_DMA or DIRTY_PAGES call on ctx(): the case's fields over the defaults
    (the 4-page mapping at M, a 4 KiB granule, an 8-byte bitmap in a fresh user page,
    "unbacked" to give that page no bytes), tracking started unless "start" is False.
    Returns the container, the buffer as the kernel left it and the errno."""
    lg = ctx()
    f = {"iova": M, "size": 4 * PAGE, "pgsize": PAGE, "bsize": 8, "start": True, **case}
    bitmap, _ = lg.k.mmap(PAGE, backed=not f.pop("unbacked", False))
    f.setdefault("data", bitmap)
    if f.pop("start"):
        lg.dirty(START)
    buf = bitmap_cmd(
        f["argsz"], f["flags"], f["iova"], f["size"], f["pgsize"], f["bsize"], f["data"]
    )
    return lg, buf, errno_of(lg.ioctl, req, buf)


# -- VFIO_IOMMU_MAP_DMA ---------------------------------------------------------------------

MAP_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("ok", {}, 0),
    ("read-only", {"flags": R}, 0),
    ("write-only", {"flags": W}, 0),
    ("argsz < 32", {"argsz": 31}, errno.EINVAL),
    ("unknown flag", {"flags": RW | 1 << 3}, errno.EINVAL),
    ("size 0", {"size": 0}, errno.EINVAL),
    ("iova + size wraps", {"iova": U64 - PAGE + 1, "size": 2 * PAGE}, errno.EOVERFLOW),
    ("vaddr + size wraps", {"vaddr": U64 - PAGE + 1, "size": 2 * PAGE}, errno.EOVERFLOW),
    ("wrap beats no prot", {"flags": 0, "iova": U64 - PAGE + 1, "size": 2 * PAGE}, errno.EOVERFLOW),
    ("no READ/WRITE", {"flags": 0}, errno.EINVAL),
    ("VADDR with prot", {"flags": RW | VADDR}, errno.EINVAL),
    ("iova unaligned", {"iova": 0x200_0800}, errno.EINVAL),
    ("size unaligned", {"size": PAGE + 1}, errno.EINVAL),
    ("vaddr unaligned", {"vaddr_off": 8}, errno.EINVAL),
    ("overlaps a mapping", {"iova": M + PAGE}, errno.EEXIST),
    ("ends inside a mapping", {"iova": M - PAGE, "size": 2 * PAGE}, errno.EEXIST),
    ("inside a reserved region (SMMUv3 MSI)", {"iova": 0x800_0000}, errno.EINVAL),
    ("past the aperture", {"iova": 1 << 48}, errno.EINVAL),
    ("vaddr not mapped in the process", {"vaddr": 0x1000}, errno.EFAULT),
    ("VADDR for nothing", {"flags": VADDR, "iova": 0x300_0000}, errno.ENOENT),
    ("VADDR for a valid vaddr", {"flags": VADDR, "iova": M, "size": 4 * PAGE}, errno.EINVAL),
]


@pytest.mark.parametrize(("case", "fields", "want"), MAP_CASES, ids=[c[0] for c in MAP_CASES])
def test_map_dma_errno(case: str, fields: dict[str, Any], want: int) -> None:
    lg = ctx()
    vaddr, _ = lg.k.mmap(2 * PAGE)
    f = {"argsz": 32, "flags": RW, "vaddr": vaddr, "iova": 0x200_0000, "size": PAGE}
    f.update(fields)
    f["vaddr"] += f.pop("vaddr_off", 0)
    buf = bytearray(struct.pack("<IIQQQ", f["argsz"], f["flags"], f["vaddr"], f["iova"], f["size"]))
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_MAP_DMA, buf) == want, case


def test_map_dma_short_buffer_and_non_pointer() -> None:
    lg = ctx()
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_MAP_DMA, bytearray(31)) == errno.EFAULT
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_MAP_DMA, 0) == errno.EFAULT


def test_map_dma_entry_limit_is_enospc() -> None:
    lg = Legacy(ModelKernel(), (PIN_KIND,))  # no pinning: 65535 mappings are cheap
    for i in range(65535):
        lg.map(i * PAGE, PAGE, vaddr=0x1000)
    assert errno_of(lg.map, 65535 * PAGE, PAGE, 0x1000) == errno.ENOSPC
    assert lg.unmap(0, PAGE) == PAGE
    lg.map(65535 * PAGE, PAGE, vaddr=0x1000)  # dma_avail came back


def test_map_dma_top_of_the_address_space() -> None:
    """A mapping may end at 2^64 - 1 exactly (AMD's aperture is the whole 64-bit space)."""
    lg = Legacy(ModelKernel("amd"), (PIN_KIND,))
    lg.map(U64 - 2 * PAGE + 1, 2 * PAGE, vaddr=0x1000)
    assert errno_of(lg.map, U64 - PAGE + 1, 2 * PAGE, 0x1000) == errno.EOVERFLOW
    assert lg.unmap(U64 - 2 * PAGE + 1, 2 * PAGE) == 2 * PAGE


# -- VFIO_IOMMU_UNMAP_DMA -------------------------------------------------------------------

UNMAP_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("ok", {}, 0),
    ("argsz < 24", {"argsz": 23}, errno.EINVAL),
    ("unknown flag", {"flags": 1 << 3}, errno.EINVAL),
    ("GET_DIRTY with ALL", {"flags": GET_DIRTY | ALL}, errno.EINVAL),
    ("GET_DIRTY with VADDR", {"flags": GET_DIRTY | U_VADDR}, errno.EINVAL),
    ("GET_DIRTY, argsz < 48", {"flags": GET_DIRTY, "argsz": 47}, errno.EINVAL),
    ("GET_DIRTY, bitmap not access_ok", {"flags": GET_DIRTY, "data": 1 << 48}, errno.EINVAL),
    ("GET_DIRTY, bitmap size 0", {"flags": GET_DIRTY, "bsize": 0}, errno.EINVAL),
    (
        "GET_DIRTY, bitmap too small",
        {"flags": GET_DIRTY, "size": 65 * PAGE, "bsize": 8},
        errno.EINVAL,
    ),
    ("GET_DIRTY, bitmap > 256 MiB", {"flags": GET_DIRTY, "bsize": (256 << 20) + 8}, errno.EINVAL),
    ("GET_DIRTY, pgsize 0", {"flags": GET_DIRTY, "pgsize": 0}, errno.EINVAL),
    ("GET_DIRTY, no pages (size < pgsize)", {"flags": GET_DIRTY, "pgsize": 8 * PAGE}, errno.EINVAL),
    ("GET_DIRTY, not tracking", {"flags": GET_DIRTY, "start": False}, errno.EINVAL),
    (
        "GET_DIRTY, pgsize 2 MiB",
        {"flags": GET_DIRTY, "pgsize": 2 << 20, "size": 2 << 20},
        errno.EINVAL,
    ),
    ("GET_DIRTY, ok", {"flags": GET_DIRTY}, 0),
    ("GET_DIRTY, bitmap unmapped", {"flags": GET_DIRTY, "data": 0x1000}, errno.EFAULT),
    ("iova unaligned", {"iova": M + 1}, errno.EINVAL),
    ("size 0", {"size": 0}, errno.EINVAL),
    ("size unaligned", {"size": 4 * PAGE + 8}, errno.EINVAL),
    ("iova + size wraps", {"iova": U64 - PAGE + 1, "size": 2 * PAGE}, errno.EOVERFLOW),
    ("ALL with iova", {"flags": ALL, "iova": M, "size": 0}, errno.EINVAL),
    ("ALL with size", {"flags": ALL, "iova": 0, "size": PAGE}, errno.EINVAL),
    ("ALL", {"flags": ALL, "iova": 0, "size": 0}, 0),
    ("v2: starts inside a mapping", {"iova": M + PAGE, "size": 3 * PAGE}, errno.EINVAL),
    ("v2: ends inside a mapping", {"size": 2 * PAGE}, errno.EINVAL),
    ("nothing mapped there", {"iova": 0x400_0000}, 0),
]


@pytest.mark.parametrize(("case", "fields", "want"), UNMAP_CASES, ids=[c[0] for c in UNMAP_CASES])
def test_unmap_dma_errno(case: str, fields: dict[str, Any], want: int) -> None:
    flags = fields.get("flags", 0)
    f = {"argsz": 48 if flags & GET_DIRTY else 24, "flags": 0, **fields}
    lg, buf, got = bitmap_case(v.VFIO_IOMMU_UNMAP_DMA, f)
    assert got == want, case
    size_back = struct.unpack_from("<Q", buf, 16)[0]
    if want:
        assert size_back == f.get("size", 4 * PAGE)  # nothing is copied back on failure
        assert lg.unmap(M, 4 * PAGE) == 4 * PAGE  # and the mapping is still there
    elif f.get("iova", M) == M or flags & ALL:
        assert size_back == 4 * PAGE
    else:
        assert size_back == 0


def test_unmap_vaddr_with_an_mdev_is_ebusy() -> None:
    lg = ctx((PIN_KIND,))
    assert errno_of(lg.unmap, M, 4 * PAGE, U_VADDR) == errno.EBUSY


def test_unmap_v1_semantics() -> None:
    """v1: a request starting inside a mapping unmaps nothing (size 0, success); one that
    covers a mapping's first page unmaps all of it, even past the request."""
    lg = ctx(iommu=v.VFIO_TYPE1_IOMMU)
    assert lg.unmap(M + PAGE, PAGE) == 0
    assert lg.unmap(M, PAGE) == 4 * PAGE
    assert lg.unmap(M, 4 * PAGE) == 0


def test_unmap_and_remap_vaddr() -> None:
    """VFIO_UPDATE_VADDR: invalidate, then give the mapping a new vaddr."""
    lg = ctx()
    assert lg.ioctl(v.VFIO_CHECK_EXTENSION, v.VFIO_UPDATE_VADDR) == 1
    assert lg.unmap(M, 4 * PAGE, U_VADDR) == 4 * PAGE
    assert errno_of(lg.unmap, M, 4 * PAGE, U_VADDR) == errno.EINVAL  # already invalid
    new, mem = lg.k.mmap(4 * PAGE)
    assert errno_of(lg.map, M, 2 * PAGE, new, VADDR) == errno.EINVAL  # size must match
    lg.map(M, 4 * PAGE, vaddr=new, flags=VADDR)
    assert errno_of(lg.map, M, 4 * PAGE, new, VADDR) == errno.EINVAL  # valid again
    assert lg.unmap(M, 4 * PAGE) == 4 * PAGE


def test_unmap_vaddr_failure_rolls_back_this_call() -> None:
    lg = ctx()
    lg.map(M + 4 * PAGE, PAGE)
    lg.unmap(M + 4 * PAGE, PAGE, U_VADDR)  # the second mapping is already invalid
    assert errno_of(lg.unmap, M, 5 * PAGE, U_VADDR) == errno.EINVAL
    # the first mapping was marked in that call and unmarked again: invalidating it works
    assert lg.unmap(M, 4 * PAGE, U_VADDR) == 4 * PAGE


def test_pins_and_attach_wait_for_invalid_vaddrs() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    lg.map(M, 4 * PAGE)
    lg.unmap(M, 4 * PAGE, U_VADDR)
    g = k.open(k.group_of(k.add_device("reference")))
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container)) == errno.EBUSY


# -- VFIO_IOMMU_DIRTY_PAGES -----------------------------------------------------------------

DIRTY_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("ok", {}, 0),
    ("argsz < 8", {"argsz": 7}, errno.EINVAL),
    ("no flag", {"flags": 0}, errno.EINVAL),
    ("two flags", {"flags": START | STOP}, errno.EINVAL),
    ("all flags", {"flags": START | STOP | GET_BITMAP}, errno.EINVAL),
    ("unknown flag", {"flags": 1 << 3}, errno.EINVAL),
    ("GET_BITMAP, argsz < 48", {"argsz": 47}, errno.EINVAL),
    ("GET_BITMAP, argsz 8", {"argsz": 8}, errno.EINVAL),
    ("size 0", {"size": 0}, errno.EINVAL),
    ("iova + size wraps", {"iova": U64 - PAGE + 1, "size": 2 * PAGE}, errno.EOVERFLOW),
    ("bitmap not access_ok", {"data": (1 << 48) - 4}, errno.EINVAL),
    ("no pages (size < pgsize)", {"size": PAGE // 2}, errno.EINVAL),
    ("bitmap size 0", {"bsize": 0}, errno.EINVAL),
    ("bitmap too small", {"size": 65 * PAGE, "bsize": 8}, errno.EINVAL),
    ("bitmap > 256 MiB", {"bsize": (256 << 20) + 8}, errno.EINVAL),
    ("pgsize 0", {"pgsize": 0}, errno.EINVAL),
    ("pgsize 8 KiB", {"pgsize": 2 * PAGE}, errno.EINVAL),
    ("pgsize not a power of two", {"pgsize": 3 * PAGE}, errno.EINVAL),
    ("iova unaligned", {"iova": M + 8}, errno.EINVAL),
    ("size unaligned", {"size": 4 * PAGE + 8}, errno.EINVAL),
    ("not started", {"start": False}, errno.EINVAL),
    ("starts inside a mapping", {"iova": M + PAGE, "size": 3 * PAGE}, errno.EINVAL),
    ("ends inside a mapping", {"size": 3 * PAGE}, errno.EINVAL),
    ("covers holes around it", {"iova": M - 8 * PAGE, "size": 20 * PAGE}, 0),
    ("only a hole", {"iova": M + 16 * PAGE}, 0),
    ("bitmap unmapped", {"data": 0x1000}, errno.EFAULT),
    ("bitmap in unbacked memory", {"unbacked": True}, errno.EFAULT),
]


@pytest.mark.parametrize(("case", "fields", "want"), DIRTY_CASES, ids=[c[0] for c in DIRTY_CASES])
def test_dirty_pages_errno(case: str, fields: dict[str, Any], want: int) -> None:
    f = {"argsz": 48, "flags": GET_BITMAP, **fields}
    assert bitmap_case(v.VFIO_IOMMU_DIRTY_PAGES, f)[2] == want, case


@pytest.mark.parametrize(
    ("buf", "want"),
    [
        (bytearray(4), errno.EFAULT),  # copy_from_user of the 8-byte header
        (0, errno.EFAULT),
        (bytearray(struct.pack("<II", 48, GET_BITMAP)), errno.EFAULT),  # the range faults
    ],
)
def test_dirty_pages_faults(buf: Any, want: int) -> None:
    lg = ctx()
    lg.dirty(START)
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_DIRTY_PAGES, buf) == want


@pytest.mark.parametrize(
    "buf",
    [bytearray(2), bytearray(struct.pack("<II", 8, START)), bytearray(struct.pack("<II", 0, 99))],
)
def test_dirty_pages_on_v1_is_eacces_first(buf: bytearray) -> None:
    lg = ctx(iommu=v.VFIO_TYPE1_IOMMU)
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_DIRTY_PAGES, buf) == errno.EACCES


# -- the emulated-device interface ----------------------------------------------------------


def pin(lg: Legacy, iova: int, npage: int = 1, prot: int = 3, dev: int = 0) -> list[int]:
    return vfio_device_container_pin_pages(lg.vdev(dev), iova, npage, prot)


PIN_CASES: list[tuple[str, Callable[[Legacy], Any], int]] = [
    ("ok", lambda lg: pin(lg, M, 4), 0),
    ("npage 0", lambda lg: pin(lg, M, 0), errno.EINVAL),
    ("npage < 0", lambda lg: pin(lg, M, -1), errno.EINVAL),
    ("npage > 512", lambda lg: pin(lg, M, 513), errno.E2BIG),
    ("iova not mapped", lambda lg: pin(lg, 0x400_0000), errno.EINVAL),
    ("runs off the mapping", lambda lg: pin(lg, M + 3 * PAGE, 2), errno.EINVAL),
    ("write into a read-only mapping", lambda lg: pin(lg, M + 16 * PAGE, 1, 2), errno.EPERM),
    ("read of a read-only mapping", lambda lg: pin(lg, M + 16 * PAGE, 1, 1), 0),
    ("vaddr not in the process", lambda lg: pin(lg, M + 32 * PAGE), errno.EFAULT),
    ("iova + npage wraps", lambda lg: pin(lg, U64 - PAGE + 1, 2), errno.EOVERFLOW),
    ("dma_rw ok", lambda lg: vfio_device_container_dma_rw(lg.vdev(), M, b"ab", True), 0),
    (
        "dma_rw no data",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), M, b"", True),
        errno.EINVAL,
    ),
    (
        "dma_rw read into bytes",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), M, b"ab", False),
        errno.EINVAL,
    ),
    (
        "dma_rw not mapped",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), 0x400_0000, b"a", True),
        errno.EINVAL,
    ),
    (
        "dma_rw write read-only",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), M + 16 * PAGE, b"a", True),
        errno.EPERM,
    ),
    (
        "dma_rw read write-only",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), M + 24 * PAGE, bytearray(1), False),
        errno.EPERM,
    ),
    (
        "dma_rw vaddr not in the process",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), M + 32 * PAGE, b"a", True),
        errno.EFAULT,
    ),
    (
        "dma_rw past the mapping",
        lambda lg: vfio_device_container_dma_rw(lg.vdev(), M + 4 * PAGE - 1, b"ab", True),
        errno.EINVAL,
    ),
]


@pytest.mark.parametrize(("case", "call", "want"), PIN_CASES, ids=[c[0] for c in PIN_CASES])
def test_emulated_device_calls_errno(case: str, call: Callable[[Legacy], Any], want: int) -> None:
    lg = ctx((PIN_KIND,))
    lg.map(M + 16 * PAGE, PAGE, flags=R)
    lg.map(M + 24 * PAGE, PAGE, flags=W)
    lg.map(M + 32 * PAGE, PAGE, vaddr=0x1000)  # no IOMMU domain: mapped without pinning
    assert errno_of(call, lg) == want, case


def test_failed_pins_are_unwound() -> None:
    lg = ctx((PIN_KIND,))
    lg.dirty(START)
    assert errno_of(pin, lg, M + 3 * PAGE, 2) == errno.EINVAL  # page 3 pinned, then undone
    assert lg.get_bitmap(M, 4 * PAGE) == [1 << 3]  # the bit was set while pinned...
    assert lg.get_bitmap(M, 4 * PAGE) == [0]  # ...but nothing stays pinned


def test_pins_need_an_open_device_with_dma_unmap_on_a_v2_container() -> None:
    k = ModelKernel()
    lg = Legacy(k, (PIN_KIND, "mtty"))
    lg.map(M, PAGE)
    assert errno_of(pin, lg, M, 1, 3, 1) == errno.EINVAL  # mtty has no ops->dma_unmap
    assert errno_of(vfio_device_container_dma_rw, lg.vdev(1), M, b"ok", True) == 0
    k.close(lg.devfds[0])
    assert errno_of(pin, lg, M) == errno.EINVAL  # not open
    assert errno_of(vfio_device_container_dma_rw, lg.vdev(0), M, b"x", True) == errno.EINVAL


def test_pinned_pages_are_the_process_pages() -> None:
    lg = ctx((PIN_KIND,))
    vaddr, mem = lg.k.mmap(2 * PAGE)
    assert mem is not None
    lg.map(M + 8 * PAGE, 2 * PAGE, vaddr=vaddr)
    assert pin(lg, M + 8 * PAGE, 2) == [vaddr, vaddr + PAGE]
    lg.vdev().write(M + 9 * PAGE + 1, b"pinned")
    assert bytes(mem[PAGE + 1 : PAGE + 7]) == b"pinned"
    assert lg.vdev().read(M + 9 * PAGE + 1, 6) == b"pinned"


def test_dma_rw_crosses_adjacent_mappings() -> None:
    lg = ctx((PIN_KIND,))
    a, ma = lg.k.mmap(PAGE)
    b, mb = lg.k.mmap(PAGE)
    assert ma is not None and mb is not None
    lg.map(M + 8 * PAGE, PAGE, vaddr=a)
    lg.map(M + 9 * PAGE, PAGE, vaddr=b)
    lg.vdev().write(M + 9 * PAGE - 2, b"abcd")
    assert bytes(ma[-2:]) == b"ab" and bytes(mb[:2]) == b"cd"


def test_unmap_asks_every_registered_mdev_to_unpin() -> None:
    lg = ctx((PIN_KIND, PIN_KIND))
    pin(lg, M, 1, 3, 0)
    pin(lg, M + PAGE, 1, 3, 1)
    assert lg.unmap(M, 4 * PAGE) == 4 * PAGE
    assert lg.vdev(0).unmap_calls and lg.vdev(1).unmap_calls
    assert lg.vdev(0).pinned == lg.vdev(1).pinned == []
