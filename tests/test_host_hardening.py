"""Library defects a fuzzer found (issue "Hardening"), each pinned by a test.

On the model through ModelTransport, and on the Linux seam with a recording fake where the
point is what reaches (or does not reach) the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_host_linux import FakeSyscalls

from vfiomig.host import (
    Container,
    DirtyBitmap,
    DmaLoggingError,
    Hwpt,
    Ioas,
    IoasError,
    Iommufd,
    IommufdError,
    LinuxTransport,
    MigrationFile,
    MigrationState,
    ModelTransport,
    VfioDevice,
    VfioError,
)
from vfiomig.host.errors import ArgumentError, ClosedError
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


# -- e: handles of destroyed or closed objects refuse use ----------------------------------------


def test_destroyed_ioas_handle_refuses_and_never_drives_its_successor(t: ModelTransport) -> None:
    with Iommufd(t) as ictx, t.mmap(4 * PAGE) as mem:
        old = ictx.ioas_alloc()
        old.destroy()
        new = ictx.ioas_alloc()
        assert new.id == old.id  # the kernel hands the id out again
        calls: list[Any] = [
            lambda: old.map(mem, iova=1 << 20),
            lambda: old.unmap(1 << 20, PAGE),
            lambda: old.unmap_all(),
            lambda: old.copy(0, PAGE, dst=new),
            lambda: new.copy(0, PAGE, dst=old),
            lambda: old.iova_ranges(),
            lambda: old.allow_iovas([(1 << 32, (1 << 33) - 1)]),
            lambda: old.set_huge_pages(False),
            lambda: old.huge_pages(),
        ]
        for call in calls:
            with pytest.raises(ClosedError) as e:
                call()
            assert isinstance(e.value, VfioError) and e.value.errno == errno.ENOENT
            assert e.value.op.startswith("IOMMU_")
        assert "IOMMU_IOAS_MAP" in str(pytest.raises(ClosedError, old.map, mem, iova=0).value)
        assert new.huge_pages() and new.unmap_all() == 0  # the new IOAS was never touched
        old.destroy()  # still a no-op
        new.destroy()


def test_destroyed_hwpt_refuses_and_attach_checks_handles(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        ioas, hwpt = _dirty_setup(k, t, ictx, dev)
        dev.attach(ioas)  # off the HWPT, so that it can go
        hwpt.destroy()
        for call in (
            lambda: hwpt.set_dirty_tracking(True),
            lambda: hwpt.get_dirty_bitmap(0, PAGE),
            lambda: dev.attach(hwpt),
        ):
            with pytest.raises(ClosedError):
                call()
        dev.detach()
        ioas.destroy()
        with pytest.raises(ClosedError, match="IOMMU_HWPT_ALLOC"):
            ictx.hwpt_alloc(1, ioas)
        with Iommufd(t) as other:
            foreign = other.ioas_alloc()
            with pytest.raises(ValueError, match="another iommufd"):
                ictx.hwpt_alloc(1, foreign)
            with pytest.raises(ValueError, match="another iommufd"):
                dev.attach(foreign)


def test_destroy_by_id_and_closing_the_iommufd_retire_handles(t: ModelTransport) -> None:
    ictx = Iommufd(t)
    a, b = ictx.ioas_alloc(), ictx.ioas_alloc()
    ictx.destroy(a.id)
    with pytest.raises(ClosedError):
        a.iova_ranges()
    ictx.close()
    with pytest.raises(ClosedError, match="its iommufd is closed"):
        b.iova_ranges()
    with pytest.raises(ClosedError) as e:
        ictx.ioas_alloc()
    assert e.value.errno == errno.EBADF
    b.destroy()  # nothing left to destroy: a no-op


def test_closed_fd_objects_and_unmapped_memory_refuse(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx:
        ioas = ictx.ioas_alloc()
        mem = t.mmap(PAGE)
        mem.close()
        with pytest.raises(ClosedError) as e:
            ioas.map(mem, iova=1 << 20)  # its address may be another mapping's now
        assert e.value.errno == errno.EFAULT and e.value.op == "IOMMU_IOAS_MAP"
        dev = VfioDevice(t, path)
        dev.bind(ictx)
        dev.set_state(S.STOP)
        f = dev.set_state(S.STOP_COPY)
        assert f is not None
        f.close()
        dev.close()
        for call in (dev.reset, dev.info, lambda: dev.set_state(S.RUNNING), f.read, f.poll):
            with pytest.raises(ClosedError) as e:
                call()
            assert e.value.errno == errno.EBADF
            assert isinstance(e.value, ValueError)  # also the ValueError it used to be


# -- f: a failed destroy stays retryable; __exit__ never masks the block's exception ------------


def test_busy_destroy_can_be_retried(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        ioas, hwpt = _dirty_setup(k, t, ictx, dev)
        with pytest.raises(IommufdError) as e:
            ioas.destroy()  # the HWPT holds it
        assert e.value.errno == errno.EBUSY
        assert not ioas.closed and ioas.iova_ranges().alignment  # still usable
        dev.detach()
        hwpt.destroy()
        ioas.destroy()  # the retry succeeds
        assert ioas.closed
        assert ictx.ioas_alloc().id == ioas.id  # it really went


def test_exit_keeps_the_blocks_exception(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        ioas, hwpt = _dirty_setup(k, t, ictx, dev)

        class Boom(Exception):
            pass

        with pytest.raises(Boom) as e, ioas:
            raise Boom("the user's own error")
        notes = getattr(e.value, "__notes__", [])
        assert len(notes) == 1 and "EBUSY" in notes[0]  # the destroy's failure, as a note
        assert not ioas.closed  # and it can still be destroyed later
        with pytest.raises(IommufdError):  # without an exception in the block, it raises
            with ioas:
                pass
        dev.detach()
        hwpt.destroy()
        with ioas:
            pass
        assert ioas.closed


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


# -- j: dropped fd owners are closed with a ResourceWarning --------------------------------------


def test_dropped_fd_owners_warn_and_close(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    ictx = Iommufd(t)
    dev = VfioDevice(t, path)
    dev.bind(ictx)
    dev.set_state(S.STOP)
    f = dev.set_state(S.STOP_COPY)
    assert isinstance(f, MigrationFile)
    fd = f.fd
    assert fd in k.fdt.files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del f
        gc.collect()
    assert fd not in k.fdt.files
    assert [w.category for w in caught] == [ResourceWarning]
    assert "unclosed MigrationFile" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del dev, ictx
        gc.collect()
    assert sorted(str(w.message).split("(")[0] for w in caught) == [
        "unclosed Iommufd",
        "unclosed VfioDevice",
    ]
    assert k.fdt.files == {}


def test_closed_or_failed_opens_do_not_warn(t: ModelTransport) -> None:
    gc.collect()  # whatever earlier tests dropped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Iommufd(t):
            pass
        with pytest.raises(VfioError):
            VfioDevice(t, "/dev/vfio/devices/vfio99")  # open fails: nothing to close
        gc.collect()
    assert [w for w in caught if w.category is ResourceWarning] == []


def test_dma_logging_errors_stay_in_the_hierarchy(k: ModelKernel, t: ModelTransport) -> None:
    """A bitmap request of length 0 asks the driver about nothing; the kernel's own
    refusals come back as DmaLoggingError."""
    path = k.add_device("reference")
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        dev.bind(ictx)
        dev.dma_logging_start([(0, 1 << 20)])
        assert dev.dma_logging_report(0, 0).npages == 0
        with pytest.raises(DmaLoggingError) as e:
            dev.dma_logging_report(0, 1 << 20, 2048)
        assert e.value.errno == errno.EINVAL
        dev.dma_logging_stop()
