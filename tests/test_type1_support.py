"""Helpers for the type1 tests: a process using the legacy container, through bytes only.

`Legacy` opens /dev/vfio/vfio, the groups of its devices, sets the container and the IOMMU
and gets device fds, all with ioctl on buffers as a C program would. User bitmaps live in
the model process's memory (k.mmap), since the kernel writes them through a pointer.

`PinningMdev` is a test-only emulated (mdev-like) device that pins pages and writes guest
memory with vfio_dma_rw through the container, the way mdev drivers such as mbochs do.

`oracle_report` is an independent, pure-Python restatement of how type1 writes a report
into the user bitmap (update_user_bitmap), on Python ints instead of numpy words.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from vfiomig.hw.device import DmaDevice
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.container import (
    vfio_device_container_dma_rw,
    vfio_device_container_pin_pages,
    vfio_device_container_unpin_pages,
)
from vfiomig.kernel.machine import DRIVERS
from vfiomig.kernel.vfio_main import VfioDevice
from vfiomig.uapi import vfio as v

PAGE = 4096
MASK64 = (1 << 64) - 1
RW = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE
START = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START
STOP = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
GET_BITMAP = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
IOMMU_READ, IOMMU_WRITE = 1, 2
PIN_KIND = "test-pinning-mdev"
PIN_PT_KIND = "test-pinning-passthrough"


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    """0 if fn(*args) succeeds, else the errno of the OSError it raises."""
    try:
        fn(*args)
    except OSError as e:
        return int(e.errno or -1)
    return 0


class PinningMdev(VfioDevice):
    """An emulated device that pins guest pages (mdev with ops->dma_unmap)."""

    kind = PIN_KIND
    emulated_iommu = True

    def __init__(self, kernel: ModelKernel, index: int, **_: Any) -> None:
        super().__init__(kernel, index, iommu_dirty=False)
        self.pinned: list[int] = []  # iovas this device holds pinned (one entry per pin)
        self.unmap_calls: list[tuple[int, int]] = []
        self.stubborn = False  # ignore dma_unmap (a buggy driver)

    def pin(self, iova: int, npage: int = 1, prot: int = IOMMU_READ | IOMMU_WRITE) -> list[int]:
        pages = vfio_device_container_pin_pages(self, iova, npage, prot)
        self.pinned += [iova + PAGE * i for i in range(npage)]
        return pages

    def unpin(self, iova: int, npage: int = 1) -> None:
        vfio_device_container_unpin_pages(self, iova, npage)
        for i in range(npage):
            self.pinned.remove(iova + PAGE * i)

    def write(self, iova: int, data: bytes) -> None:
        vfio_device_container_dma_rw(self, iova, data, True)

    def read(self, iova: int, n: int) -> bytes:
        buf = bytearray(n)
        vfio_device_container_dma_rw(self, iova, buf, False)
        return bytes(buf)

    def dma_unmap(self, iova: int, length: int) -> None:
        """ops->dma_unmap: drop every pin in [iova, iova + length)."""
        self.unmap_calls.append((iova, length))
        if self.stubborn:
            return
        for p in [p for p in self.pinned if iova <= p < iova + length]:
            self.unpin(p)


class PinningPassthrough(PinningMdev):
    """A device behind a real IOMMU whose driver also pins pages: type1 promotes its group
    to pinned-page dirty scope on the first pin (vfio_iommu_type1_pin_pages)."""

    kind = PIN_PT_KIND
    emulated_iommu = False

    def __init__(self, kernel: ModelKernel, index: int, **_: Any) -> None:
        super().__init__(kernel, index)
        self.hw = DmaDevice(kernel.mm, f"pinpt{index}")


TEST_KINDS = {PIN_KIND: PinningMdev, PIN_PT_KIND: PinningPassthrough}


def add_device(k: ModelKernel, kind: str) -> str:
    """k.add_device, where the test-only kinds are registered only for the call."""
    if kind not in TEST_KINDS:
        return k.add_device(kind)
    DRIVERS[kind] = TEST_KINDS[kind]
    try:
        return k.add_device(kind)
    finally:
        del DRIVERS[kind]


def bitmap_cmd(
    argsz: int, flags: int, iova: int, size: int, pgsize: int, bsize: int, data: int
) -> bytearray:
    """The 48 bytes of both type1 commands that carry a user bitmap, packed raw so that any
    field may be wrong: VFIO_IOMMU_UNMAP_DMA (header {argsz, flags, iova, size}, then a
    struct vfio_bitmap {pgsize, size, data}) and VFIO_IOMMU_DIRTY_PAGES (header {argsz,
    flags}, then vfio_iommu_type1_dirty_bitmap_get {iova, size, bitmap}): the same fields
    in the same order."""
    return bytearray(struct.pack("<IIQQQQQ", argsz, flags, iova, size, pgsize, bsize, data))


def int_buf(value: int) -> ctypes.Array[ctypes.c_int32]:
    return (ctypes.c_int32 * 1)(value)


def name_buf(name: str) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(name.encode())


class Legacy:
    """One process with a type1 container holding the groups of some devices."""

    def __init__(
        self,
        k: ModelKernel,
        kinds: tuple[str, ...] = ("reference",),
        iommu_type: int | None = v.VFIO_TYPE1v2_IOMMU,
        open_devices: bool = True,
    ) -> None:
        self.k = k
        self.container = k.open("/dev/vfio/vfio")
        self.paths = [add_device(k, kind) for kind in kinds]
        self.groups = [k.open(k.group_of(p)) for p in self.paths]
        self.devfds: list[int] = []
        for g in self.groups:
            k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, int_buf(self.container))
        if iommu_type is not None:
            k.ioctl(self.container, v.VFIO_SET_IOMMU, iommu_type)
            if open_devices:
                self.devfds = [self.get_device_fd(i) for i in range(len(self.paths))]

    def get_device_fd(self, i: int) -> int:
        name = self.paths[i].rsplit("/", 1)[1]
        return self.k.ioctl(self.groups[i], v.VFIO_GROUP_GET_DEVICE_FD, name_buf(name))

    def vdev(self, i: int = 0) -> Any:
        """Below the uAPI: the kernel's device object (for PinningMdev calls)."""
        return self.k.devices[self.paths[i]]

    def hw(self, i: int = 0) -> Any:
        return self.k.device(self.paths[i])

    # -- container ioctls -----------------------------------------------------------

    def ioctl(self, req: int, arg: Any) -> int:
        return self.k.ioctl(self.container, req, arg)

    def map(
        self, iova: int, size: int, vaddr: int | None = None, flags: int = RW, backed: bool = True
    ) -> int:
        """MAP_DMA of fresh process memory (or of `vaddr`); returns the vaddr."""
        if vaddr is None:
            vaddr, _ = self.k.mmap(size, backed=backed)
        m = v.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        self.ioctl(v.VFIO_IOMMU_MAP_DMA, m)
        return vaddr

    def unmap(self, iova: int, size: int, flags: int = 0) -> int:
        buf = v.unmap_dma_buffer(iova, size, flags)
        self.ioctl(v.VFIO_IOMMU_UNMAP_DMA, buf)
        return int(v.vfio_iommu_type1_dma_unmap.from_buffer(buf).size)

    def dirty(self, flags: int) -> int:
        return self.ioctl(v.VFIO_IOMMU_DIRTY_PAGES, v.dirty_pages_buffer(flags))

    def bitmap(self, nbytes: int, fill: bytes = b"") -> tuple[int, Any]:
        """A user bitmap of nbytes in process memory, pre-filled with `fill` (repeated)."""
        addr, mem = self.k.mmap(nbytes)
        assert mem is not None
        if fill:
            mem[:nbytes] = bytearray((fill * (nbytes // len(fill) + 1))[:nbytes])
        return addr, mem

    def get_bitmap_buf(
        self, iova: int, size: int, data: int, bsize: int, pgsize: int = PAGE
    ) -> bytearray:
        get = v.vfio_iommu_type1_dirty_bitmap_get(iova=iova, size=size)
        get.bitmap.pgsize = pgsize
        get.bitmap.size = bsize
        buf = v.dirty_pages_buffer(GET_BITMAP, get)
        struct.pack_into("<Q", buf, 8 + 16 + 16, data)  # bitmap.data: a process address
        return buf

    def get_bitmap(self, iova: int, size: int, fill: bytes = b"") -> list[int]:
        """GET_BITMAP into a fresh, exactly-sized user bitmap; returns its u64 words."""
        nbytes = ((size // PAGE + 63) // 64) * 8
        addr, mem = self.bitmap(nbytes, fill)
        self.ioctl(v.VFIO_IOMMU_DIRTY_PAGES, self.get_bitmap_buf(iova, size, addr, nbytes))
        return words_of(mem, nbytes)

    def unmap_buf(
        self,
        iova: int,
        size: int,
        data: int,
        bsize: int,
        flags: int | None = None,
        pgsize: int = PAGE,
        argsz: int = 48,
    ) -> bytearray:
        """UNMAP_DMA with GET_DIRTY_BITMAP: the header, then a struct vfio_bitmap."""
        if flags is None:
            flags = v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
        return bitmap_cmd(argsz, flags, iova, size, pgsize, bsize, data)

    def unmap_dirty(self, iova: int, size: int, data: int, bsize: int) -> int:
        """UNMAP_DMA + GET_DIRTY_BITMAP; returns the size written back."""
        buf = self.unmap_buf(iova, size, data, bsize)
        self.ioctl(v.VFIO_IOMMU_UNMAP_DMA, buf)
        return int(struct.unpack_from("<Q", buf, 16)[0])


def words_of(mem: Any, nbytes: int) -> list[int]:
    raw = bytes(mem[:nbytes])
    return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, nbytes, 8)]


def bits_to_words(bits: set[int], nwords: int) -> list[int]:
    return [
        sum(1 << (b - 64 * w) for b in bits if 64 * w <= b < 64 * (w + 1)) for w in range(nwords)
    ]


class Type1Oracle:
    """An independent, pure-Python restatement of how type1 reports (update_user_bitmap
    followed by bitmap_clear + re-populate in vfio_iova_dirty_bitmap), on Python ints.

    Each mapping's kernel bitmap is an int of (words(npages) + 1) * 64 bits. A report, per
    mapping in IOVA order: set all its bits if a passthrough device is attached; shift the
    int left by the mapping's bit offset within its first u64 word, keeping only the words
    that will be copied (bits shifted past them are lost; words past them keep their old
    bits); OR the user's whole first word in when the shift is not 0; copy those words over
    the user's; keep the shifted int as the new state and clear its first npages bits (the
    shifted bits at npages and above survive: they are what later reports can leak).
    """

    def __init__(self, maps: list[tuple[int, int]]) -> None:
        self.npages = dict(maps)  # iova -> pages
        self.state = {iova: 0 for iova, _ in maps}
        self.pinned: dict[int, set[int]] = {iova: set() for iova, _ in maps}

    def mark(self, iova: int, page: int) -> None:
        """A dma_rw write or a pin: one bit of the mapping's bitmap."""
        self.state[iova] |= 1 << page

    def report(self, user: list[int], base_iova: int, all_dirty: bool) -> list[int]:
        out = list(user)
        for iova in sorted(self.state):
            n = self.npages[iova]
            st = self.state[iova]
            if all_dirty:
                st |= (1 << n) - 1
            word, shift = divmod((iova - base_iova) // PAGE, 64)
            nwords = (n + shift + 63) // 64
            copied = (1 << (64 * nwords)) - 1
            shifted = (st << shift) & copied
            if shift:
                shifted |= out[word]
            for i in range(nwords):
                out[word + i] = (shifted >> (64 * i)) & MASK64
            allocated = (1 << (64 * ((n + 63) // 64 + 1))) - 1
            st = (shifted | (st & ~copied)) & allocated & ~((1 << n) - 1)
            for p in self.pinned[iova]:
                st |= 1 << p
            self.state[iova] = st
        return out


def oracle_report(
    user: list[int], base_iova: int, mappings: list[tuple[int, int, set[int]]]
) -> list[int]:
    """One report of fresh mappings [(iova, size, dirty page indexes)] (no passthrough)."""
    oracle = Type1Oracle([(iova, size // PAGE) for iova, size, _ in mappings])
    for iova, _, pages in mappings:
        for p in pages:
            oracle.mark(iova, p)
    return oracle.report(user, base_iova, all_dirty=False)
