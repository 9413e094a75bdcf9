"""Library defects a fuzzer found (issue "Hardening"), each pinned by a test.

On the model through ModelTransport, and on the Linux seam with a recording fake where the
point is what reaches (or does not reach) the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_host_linux import FakeSyscalls

from vfiomig.host import (
    Container,
    DirtyBitmap,
    Hwpt,
    Ioas,
    IoasError,
    Iommufd,
    LinuxTransport,
    MigrationState,
    ModelTransport,
    VfioDevice,
    VfioError,
)
from vfiomig.host.errors import ArgumentError
from vfiomig.kernel import ModelKernel
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

PAGE = 4096
S = MigrationState


@pytest.fixture
def k() -> Iterator[ModelKernel]:
    kernel = ModelKernel(iommu="smmuv3")
    yield kernel
    gc.collect()  # finalizers of dropped handles
    assert kernel.fdt.files == {}, "a test leaked fds"


@pytest.fixture
def t(k: ModelKernel) -> ModelTransport:
    return ModelTransport(k)


@pytest.fixture
def fake() -> FakeSyscalls:
    return FakeSyscalls()


@pytest.fixture
def lt(fake: FakeSyscalls) -> LinuxTransport:
    return LinuxTransport(fake)


def _dirty_setup(
    k: ModelKernel, t: ModelTransport, ictx: Iommufd, dev: VfioDevice
) -> tuple[Ioas, Hwpt]:
    dev_id = dev.bind(ictx)
    ioas = ictx.ioas_alloc()
    ioas.set_huge_pages(False)
    hwpt = ictx.hwpt_alloc(dev_id, ioas, dirty_tracking=True)
    dev.attach(hwpt)
    return ioas, hwpt


# -- g: bitmaps sized as the kernel uses them ------------------------------------------------------


def test_dirty_bitmap_granule_is_the_lowest_bit_of_page_size(
    k: ModelKernel, t: ModelTransport
) -> None:
    """page_size 3 passes iommufd_check_iova_range as a mask (3 - 1 = 2) and the kernel
    records at __ffs(3) = 0: one bit per byte, 8 KiB of bitmap for 64 KiB, not 2.7 KiB."""
    path = k.add_device("reference")
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev, t.mmap(16 * PAGE) as mem:
        ioas, hwpt = _dirty_setup(k, t, ictx, dev)
        iova = ioas.map(mem, iova=1 << 21)
        hwpt.set_dirty_tracking(True)
        k.device(path).dma_write(iova + 15 * PAGE + 1, b"x")
        bm = hwpt.get_dirty_bitmap(iova, 16 * PAGE, 3)
        assert bm.page_size == 1 and bm.npages == 16 * PAGE
        assert list(bm.ranges()) == [(iova + 15 * PAGE, PAGE)]
        dev.detach()
        hwpt.destroy()
        ioas.unmap_all()
        ioas.destroy()


def test_type1_bitmap_size_is_what_type1_requires(fake: FakeSyscalls, lt: LinuxTransport) -> None:
    """verify_bitmap_size(size >> __ffs(pgsize), bitmap.size): the declared size follows
    the shift, so a page size of 3 is refused for what it is (not a short buffer)."""
    seen: list[tuple[int, int]] = []

    def dirty(fd: int, arg: Any) -> int:
        pgsize, size = struct.unpack_from("<QQ", arg, 8 + 16)
        seen.append((pgsize, size))
        return 0

    fake.handlers[v.VFIO_IOMMU_DIRTY_PAGES] = dirty
    with Container(lt) as c:
        c.dirty_pages_bitmap(0, 64 * PAGE, 3)
        c.dirty_pages_bitmap(0, 64 * PAGE, PAGE)
    assert seen == [(3, 64 * PAGE // 8), (PAGE, 8)]


def test_dirty_bitmap_buffer_covers_what_the_kernel_may_write(
    fake: FakeSyscalls, lt: LinuxTransport
) -> None:
    """iova_bitmap_alloc: (length - 1) >> __ffs(page_size), in u64 words. The fake kernel
    writes every word it may; the library's buffer must hold them."""

    def hwpt_bitmap(fd: int, arg: Any) -> int:
        nbits = ((arg.length - 1) >> ((arg.page_size & -arg.page_size).bit_length() - 1)) + 1
        words = (nbits + 63) // 64
        ctypes.memset(arg.data, 0xFF, words * 8)  # a real kernel writes through the pointer
        return 0

    fake.handlers[u.IOMMU_HWPT_GET_DIRTY_BITMAP] = hwpt_bitmap
    with Iommufd(lt) as ictx:
        hwpt = Hwpt(ictx, 9)
        bm = hwpt.get_dirty_bitmap(0, 1 << 20, 3 << 10)  # granule 1 KiB: 1024 bits
        assert bm.page_size == 1024 and bm.count() == 1024
    assert all(b.length >= 128 for b in fake.buffers)


# -- h: integers that do not fit their C field ---------------------------------------------------


def test_out_of_range_integers_are_refused_before_any_ioctl(
    fake: FakeSyscalls, lt: LinuxTransport
) -> None:
    with Iommufd(lt) as ictx, VfioDevice(lt, "/dev/vfio/devices/vfio0") as dev:
        ioas, hwpt = Ioas(ictx, 1), Hwpt(ictx, 2)
        with Container(lt) as c:
            mem = lt.mmap(PAGE)
            cases: list[tuple[Any, str]] = [
                (lambda: ioas.map(mem, iova=2**64), "iova"),
                (lambda: ioas.map(mem, length=-1, iova=0), "length"),
                (lambda: ioas.map(-PAGE, PAGE), "user_va"),
                (lambda: ioas.unmap(0, 2**64), "length"),
                (lambda: ioas.copy(-1, PAGE), "src_iova"),
                (lambda: ioas.allow_iovas([(0, 2**64)]), "last"),
                (lambda: hwpt.get_dirty_bitmap(2**64, PAGE), "iova"),
                (lambda: hwpt.get_dirty_bitmap(0, PAGE, -4096), "page_size"),
                (lambda: ictx.hwpt_alloc(2**32, ioas), "dev_id"),
                (lambda: ictx.destroy(-1), "id"),
                (lambda: ictx.hw_info(1, data_len=2**32), "data_len"),
                (lambda: dev.attach(2**32), "pt_id"),
                (lambda: dev.set_state(2**32), "device_state"),
                (lambda: dev.dma_logging_start([(0, 2**64)]), "length"),
                (lambda: dev.dma_logging_start([(0, PAGE)], page_size=-1), "page_size"),
                (lambda: dev.dma_logging_report(-1, PAGE), "iova"),
                (lambda: dev.feature(1 << 40), "flags"),
                (lambda: c.map_dma(mem, iova=2**64), "iova"),
                (lambda: c.unmap_dma(0, -PAGE), "size"),
                (lambda: c.dirty_pages_bitmap(0, PAGE, 2**64), "pgsize"),
                (lambda: c.set_iommu(-1), "iommu_type"),
                (lambda: c.check_extension(2**64), "extension"),
            ]
            for call, field in cases:
                with pytest.raises(ArgumentError) as e:
                    call()
                assert e.value.field.endswith(field), (e.value.field, field)
                assert e.value.errno == errno.ERANGE and field in str(e.value)
                assert isinstance(e.value, VfioError) and isinstance(e.value, ValueError)
            with pytest.raises(TypeError):
                ioas.map(mem, iova=1.5)  # type: ignore[arg-type]
            mem.close()
    assert fake.ioctls() == []  # nothing reached the kernel


def test_model_map_at_2_64_does_not_map_at_0(t: ModelTransport) -> None:
    with Iommufd(t) as ictx, t.mmap(PAGE) as mem, ictx.ioas_alloc() as ioas:
        with pytest.raises(ArgumentError, match="iova"):
            ioas.map(mem, iova=2**64)
        with pytest.raises(IoasError):  # nothing was mapped at 0 (ctypes would have)
            ioas.unmap(0, PAGE)


# -- i: DirtyBitmap arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [0, -4096])
def test_dirty_bitmap_rejects_a_page_size_that_is_not_positive(page_size: int) -> None:
    words = np.zeros(1, dtype=np.uint64)
    with pytest.raises(ValueError, match="page_size"):
        DirtyBitmap.from_words(0, PAGE, page_size, words)
    with pytest.raises(ValueError, match="page_size"):
        DirtyBitmap.from_pages(0, PAGE, page_size, [])
    with pytest.raises(ValueError):
        DirtyBitmap.from_words(0, -1, PAGE, words)
    with pytest.raises(TypeError):
        DirtyBitmap.from_words(0, PAGE, 4096.0, words)  # type: ignore[arg-type]
