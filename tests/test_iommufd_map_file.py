"""IOMMU_IOAS_MAP_FILE and IOMMU_IOAS_CHANGE_PROCESS: every check in the kernel's order, and
guest RAM in a memfd mapped for a device end to end (QEMU 10's way: memfd_create, ftruncate,
mmap for the CPU, IOAS_MAP_FILE for the device)."""

from __future__ import annotations

import ctypes
import errno as E
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_iommufd_util import (
    BASE,
    DIRTY,
    FIXED,
    K4,
    M2,
    RW,
    U64_MAX,
    Iommufd,
    bits,
    errno_of,
    sized,
)

from vfiomig.hw.iommu import IommuFault
from vfiomig.hw.memory import KERNEL_BASE
from vfiomig.kernel.bitops import ULONG_MAX
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

X86_MSI = 0xFEE0_0000


class World:
    """An IOAS with 4 KiB IOPTEs, a device attached to a dirty-tracking HWPT of it, a 16-page
    memfd mapped in the process and 4 pages of it mapped at BASE with IOAS_MAP_FILE."""

    def __init__(self, vendor: str = "vtd", domain: bool = True) -> None:
        self.f = f = Iommufd(vendor=vendor)
        self.k = f.k
        self.ioas = f.ioas_alloc()
        f.huge_pages(self.ioas, False)
        self.memfd = self.k.memfd_create("guest-ram")
        self.k.ftruncate(self.memfd, 16 * K4)
        self.addr, view = self.k.mmap(16 * K4, fd=self.memfd)
        assert view is not None
        self.view = view
        if domain:
            self.dev = f.dev()
            self.hwpt = f.hwpt_alloc(self.dev.devid, self.ioas, DIRTY)
            self.dev.attach(self.hwpt)
        self.map_file(iova=BASE, length=4 * K4)

    def map_file_cmd(self, **kw: Any) -> Any:
        fields = {"flags": RW | FIXED, "ioas_id": self.ioas, "fd": self.memfd, "start": 0}
        fields.update({"length": K4, "iova": BASE + 64 * K4}, **kw)
        return sized(u.iommu_ioas_map_file, **fields)

    def map_file(self, **kw: Any) -> int:
        c = self.map_file_cmd(**kw)
        self.f.ioctl(u.IOMMU_IOAS_MAP_FILE, c)
        return int(c.iova)

    def e(self, req: int, cmd: Any) -> int:
        return self.f.err(req, cmd)


def _raw(cmd: Any, size: int, tail: bytes = b"") -> bytearray:
    """The command with .size = size, extended by `tail` (framing cases)."""
    cmd.size = size
    return bytearray(bytes(cmd)) + bytearray(tail)


def _mf(**kw: Any) -> Callable[[World], int]:
    return lambda w: w.e(u.IOMMU_IOAS_MAP_FILE, w.map_file_cmd(**kw))


def _other_fd(w: World) -> int:
    return w.e(u.IOMMU_IOAS_MAP_FILE, w.map_file_cmd(fd=w.f.fd))  # /dev/iommu: no memfd


MAP_FILE_CASES: list[tuple[str, Callable[[World], int], int]] = [
    # main.c iommufd_fops_ioctl: size first (min size = offsetofend(iova) = 40)
    ("size 39", lambda w: w.e(u.IOMMU_IOAS_MAP_FILE, _raw(w.map_file_cmd(), 39)), E.EINVAL),
    (
        "non-zero byte past the struct",
        lambda w: w.e(u.IOMMU_IOAS_MAP_FILE, _raw(w.map_file_cmd(), 48, b"\0" * 7 + b"\1")),
        E.E2BIG,
    ),
    (
        "zero bytes past the struct",
        lambda w: w.e(u.IOMMU_IOAS_MAP_FILE, _raw(w.map_file_cmd(), 48, bytes(8))),
        0,
    ),
    # ioas.c iommufd_ioas_map_file: flags, then ULONG_MAX, then read/write, then the IOAS
    ("unknown flag", _mf(flags=RW | 8), E.EOPNOTSUPP),
    ("unknown flag before EOVERFLOW", _mf(flags=8, iova=ULONG_MAX), E.EOPNOTSUPP),
    ("iova >= ULONG_MAX", _mf(iova=ULONG_MAX), E.EOVERFLOW),
    ("length >= ULONG_MAX", _mf(length=ULONG_MAX), E.EOVERFLOW),
    ("EOVERFLOW before no read/write", _mf(flags=FIXED, length=ULONG_MAX), E.EOVERFLOW),
    ("neither READABLE nor WRITEABLE", _mf(flags=FIXED), E.EINVAL),
    ("no read/write before the IOAS", _mf(flags=FIXED, ioas_id=999), E.EINVAL),
    ("IOAS missing", _mf(ioas_id=999), E.ENOENT),
    (
        "IOAS id of a HWPT",
        lambda w: w.e(u.IOMMU_IOAS_MAP_FILE, w.map_file_cmd(ioas_id=w.hwpt)),
        E.ENOENT,
    ),
    ("the IOAS before the fd", _mf(ioas_id=999, fd=999), E.ENOENT),
    # io_pagetable.c iopt_map_file_pages: length, overflow, then the fd
    ("length 0", _mf(length=0), E.EINVAL),
    ("length 0 before the fd", _mf(length=0, fd=-1), E.EINVAL),
    ("start + length - 1 overflows", _mf(start=U64_MAX - K4 + 1, length=2 * K4), E.EOVERFLOW),
    ("overflow before the fd", _mf(start=U64_MAX, length=2, fd=-1), E.EOVERFLOW),
    ("fd not open", _mf(fd=999), E.EBADF),
    ("fd -1", _mf(fd=-1), E.EBADF),
    # pages.c iopt_alloc_pages: length > SIZE_MAX - PAGE_SIZE
    ("length > SIZE_MAX - PAGE_SIZE", _mf(length=ULONG_MAX - 1), E.EINVAL),
    # io_pagetable.c iopt_alloc_area_pages / iopt_check_iova / iopt_insert_area
    ("length not IOVA-aligned", _mf(length=100), E.EINVAL),
    ("fixed iova not aligned", _mf(iova=BASE + 64 * K4 + 8), E.EINVAL),
    ("fixed iova in a reserved range", _mf(iova=X86_MSI), E.EINVAL),
    ("fixed iova over an area", _mf(iova=BASE + K4), E.EEXIST),
    ("file offset not page aligned", _mf(start=100, length=K4), E.EINVAL),
    # pages.c pfn_reader_user_pin -> mm/gup.c memfd_pin_folios, when filling the domain
    ("a file that is no memfd", _other_fd, E.EINVAL),
    ("pages past the end of the file", _mf(start=15 * K4, length=2 * K4), E.EINVAL),
    ("first page past the end", _mf(start=16 * K4, length=K4), E.EINVAL),
    ("last page of the file", _mf(start=15 * K4, length=K4), 0),
    ("WRITEABLE only", _mf(flags=u.IOMMU_IOAS_MAP_WRITEABLE | FIXED), 0),
    ("automatic IOVA", _mf(flags=RW), 0),
]


@pytest.mark.parametrize(
    "fn,want", [pytest.param(fn, want, id=name) for name, fn, want in MAP_FILE_CASES]
)
def test_map_file_checks(fn: Callable[[World], int], want: int) -> None:
    assert fn(World()) == want


def test_map_file_pins_lazily() -> None:
    """With no domain nothing is pinned (iopt_area_fill_domains returns early), so any file
    and any range map; the pin fails when a domain needs the pages: the HWPT_ALLOC that fills
    a new domain (iopt_table_add_domain -> iopt_fill_domain) answers EINVAL."""
    w = World(domain=False)
    assert w.e(u.IOMMU_IOAS_MAP_FILE, w.map_file_cmd(fd=w.f.fd)) == 0  # not a memfd
    dev = w.f.dev()
    h = sized(u.iommu_hwpt_alloc, dev_id=dev.devid, pt_id=w.ioas)
    assert w.e(u.IOMMU_HWPT_ALLOC, h) == E.EINVAL
    assert errno_of(dev.attach, w.ioas) == E.EINVAL  # an automatic domain cannot fill either
    assert w.f.unmap(w.ioas, BASE + 64 * K4, K4) == K4
    dev.attach(w.f.hwpt_alloc(dev.devid, w.ioas))  # the memfd's pages alone pin fine


@pytest.mark.parametrize("start,want", [(K4, K4), (M2, M2), (0, M2), (3 * M2, M2)])
def test_map_file_auto_iova_follows_the_file_offset(start: int, want: int) -> None:
    """iopt_alloc_area_pages aligns an allocated IOVA from the file offset (pages->start),
    where IOAS_MAP uses the user address: first fit from PAGE_SIZE at min(roundup(length),
    lowest bit of the offset, 2 MiB); offset 0 counts as no constraint."""
    w = World()
    w.k.ftruncate(w.memfd, 8 * M2)
    assert w.map_file(flags=RW, start=start, length=M2) == want


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["smmuv3", "vtd", "amd"])
def test_guest_ram_in_a_memfd(vendor: str) -> None:
    """The device writes guest RAM through IOAS_MAP_FILE: the bytes are the memfd's (the
    process's mapping sees them), the HWPT reports those pages dirty, the CPU's writes are
    what the device reads, and after IOAS_UNMAP the device faults."""
    w = World(vendor)
    f, k, dev = w.f, w.k, w.dev
    iova = w.map_file(start=8 * K4, length=8 * K4, iova=BASE + 64 * K4)
    f.set_dirty(w.hwpt, True)
    dev.hw.dma_write(iova + 2 * K4 + 7, b"from the device")
    dev.hw.dma_write(iova + 5 * K4, b"x")
    assert bytes(w.view[10 * K4 + 7 : 10 * K4 + 22]) == b"from the device"
    assert k.pread(w.memfd, 1, 13 * K4) == b"x"
    bm, bmv = f.buf(K4)
    assert bmv is not None
    f.get_dirty(w.hwpt, iova, 8 * K4, K4, bm)
    assert bits(bmv, 0, 8).tolist() == [0, 0, 1, 0, 0, 1, 0, 0]
    w.view[9 * K4] = 0x5A  # the CPU writes guest RAM ...
    assert dev.hw.dma_read(iova + K4, 1) == b"\x5a"  # ... the device reads it
    k.close(w.memfd)  # the pinned pages hold the file
    dev.hw.dma_write(iova, b"still")
    assert bytes(w.view[8 * K4 : 8 * K4 + 5]) == b"still"
    assert f.unmap(w.ioas, iova, 8 * K4) == 8 * K4
    with pytest.raises(IommuFault):
        dev.hw.dma_write(iova, b"gone")


def test_copy_of_file_pages_shares_them() -> None:
    """IOAS_COPY of a MAP_FILE area maps the same file pages in another IOAS."""
    w = World()
    other = w.f.ioas_alloc()
    dev2 = w.f.dev()
    dev2.attach(other)
    dst = w.f.copy(other, w.ioas, BASE, 4 * K4, BASE + M2)
    dev2.hw.dma_write(dst + K4, b"copied")
    assert bytes(w.view[K4 : K4 + 6]) == b"copied"
    assert w.dev.hw.dma_read(BASE + K4, 6) == b"copied"


def test_access_reads_file_pages() -> None:
    """An emulated device (mdev, an ACCESS) reaches file pages too (iopt_pages_rw_slow)."""
    w = World(domain=False)
    mdev = w.f.dev("mtty")
    mdev.attach(w.ioas)
    w.view[3] = 0x33
    assert mdev.vdev.iommufd_access.rw(BASE, 4, write=False) == b"\0\0\0\x33"
    # past the file's end the pin fails (memfd_pin_folios), as for a domain
    w.map_file(start=16 * K4, length=K4)
    with pytest.raises(OSError) as e:
        mdev.vdev.iommufd_access.rw(BASE + 64 * K4, 1, write=False)
    assert e.value.errno == E.EINVAL


# -- IOMMU_IOAS_CHANGE_PROCESS ---------------------------------------------------------------


def _change(w: Iommufd, **kw: Any) -> int:
    return w.err(u.IOMMU_IOAS_CHANGE_PROCESS, sized(u.iommu_ioas_change_process, **kw))


def test_change_process_checks() -> None:
    """ioas.c iommufd_ioas_change_process: framing (min size offsetofend(__reserved) = 8),
    __reserved EOPNOTSUPP, any area that is not file pages EINVAL, else success (the model's
    one process already carries the charge)."""
    f = Iommufd()
    c = sized(u.iommu_ioas_change_process)
    assert f.err(u.IOMMU_IOAS_CHANGE_PROCESS, _raw(c, 7)) == E.EINVAL
    assert f.err(u.IOMMU_IOAS_CHANGE_PROCESS, _raw(c, 12, b"\0\0\0\1")) == E.E2BIG
    assert f.err(u.IOMMU_IOAS_CHANGE_PROCESS, _raw(c, 12, bytes(4))) == 0
    assert _change(f) == 0  # nothing mapped
    assert _change(f, __reserved=1) == E.EOPNOTSUPP
    w = World()
    assert _change(w.f) == 0  # file pages only
    assert _change(w.f, __reserved=1) == E.EOPNOTSUPP
    w.f.copy(w.f.ioas_alloc(), w.ioas, BASE, K4)  # a copy shares file pages
    assert _change(w.f) == 0
    buf, _ = w.f.buf(K4)
    w.f.map(w.ioas, buf, K4, BASE + M2)  # user memory
    assert _change(w.f) == E.EINVAL
    w.f.unmap(w.ioas, BASE + M2, K4)
    assert _change(w.f) == 0


def test_change_process_sees_compat_maps() -> None:
    """Every IOAS counts, the VFIO-compat one too: VFIO_IOMMU_MAP_DMA makes user pages."""
    w = World(domain=False)
    op = u.IOMMU_VFIO_IOAS_SET
    w.f.ioctl(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, ioas_id=w.ioas, op=op))
    w.k.ioctl(w.f.fd, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    buf, _ = w.f.buf(K4)
    m = v.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_map))
    m.flags = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE
    m.vaddr, m.iova, m.size = buf, BASE + M2, K4
    w.k.ioctl(w.f.fd, v.VFIO_IOMMU_MAP_DMA, m)
    assert _change(w.f) == E.EINVAL


def test_unmapped_file_pages_release_the_file() -> None:
    """iopt_release_pages drops the file reference and the kernel mapping of its pages."""
    w = World()
    assert len(w.k.mm.regions_in(KERNEL_BASE, 1 << 62)) == 1
    w.k.close(w.memfd)
    w.f.unmap(w.ioas, BASE, 4 * K4)
    assert not w.k.mm.regions_in(KERNEL_BASE, 1 << 62)
    assert np.all(w.view[:K4] == 0)  # the process mapping lives on


def test_the_kernel_address_of_pinned_file_pages_is_no_user_pointer() -> None:
    """Pinned file pages are mapped past TASK_SIZE_MAX (hw/memory.py KERNEL_BASE): a user
    pointer there is EFAULT (access_ok / pin_user_pages) in IOAS_MAP and GET_HW_INFO, and
    the file's bytes stay untouched."""
    w = World()
    kaddr = w.k.mm.regions_in(KERNEL_BASE, 1 << 62)[0].addr
    w.view[:K4] = 0x11
    assert w.e(u.IOMMU_IOAS_MAP, w.f.map_cmd(w.ioas, kaddr, K4, BASE + M2)) == E.EFAULT
    info = sized(u.iommu_hw_info, dev_id=w.dev.devid, data_uptr=kaddr, data_len=64)
    assert w.e(u.IOMMU_GET_HW_INFO, info) == E.EFAULT
    assert (w.view[:K4] == 0x11).all()
    # GET_DIRTY_BITMAP's bitmap pointer: no bit lands in the pinned file pages either
    dirty = sized(
        u.iommu_hwpt_set_dirty_tracking, flags=u.IOMMU_HWPT_DIRTY_TRACKING_ENABLE, hwpt_id=w.hwpt
    )
    assert w.e(u.IOMMU_HWPT_SET_DIRTY_TRACKING, dirty) == 0
    w.k.device(w.dev.path).dma_write(BASE, b"\x22" * K4)
    bm = sized(
        u.iommu_hwpt_get_dirty_bitmap,
        hwpt_id=w.hwpt,
        iova=BASE,
        length=K4 * 64,
        page_size=K4,
        data=kaddr,
    )
    w.e(u.IOMMU_HWPT_GET_DIRTY_BITMAP, bm)
    assert (w.view[:8] == 0x22).all() and (w.view[8:K4] == 0x22).all()


def test_a_dma_log_report_cannot_pin_a_kernel_address() -> None:
    """VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT pins its bitmap (iova_bitmap_get ->
    pin_user_pages_fast): a kernel address, such as pinned file pages, is EFAULT."""
    from vfiomig.kernel.iommufd.iova_bitmap import IovaBitmap

    w = World()
    kaddr = w.k.mm.regions_in(KERNEL_BASE, 1 << 62)[0].addr
    bm = IovaBitmap(w.k.mm, BASE, K4 * 64, K4, kaddr)
    with pytest.raises(OSError) as e:
        bm.pin_run(K4 * 64)
    assert e.value.errno == E.EFAULT
