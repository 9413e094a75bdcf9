"""Library scenarios against the model kernel, through ModelTransport only.

Ground truth below the uAPI (device state, DMA) is reached only through the model's named
test interface, ModelKernel.device(path).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from vfiomig.host import (
    Container,
    DirtyBitmap,
    DmaLoggingError,
    Group,
    HwptError,
    IoasError,
    Iommufd,
    MigrationDataError,
    MigrationFile,
    MigrationFlags,
    MigrationState,
    MigrationStateError,
    ModelTransport,
    VfioDevice,
)
from vfiomig.kernel import ModelKernel
from vfiomig.uapi import vfio as v

S = MigrationState
PAGE = 4096


def session(f: MigrationFile | None) -> MigrationFile:
    """The data fd a SET must have returned."""
    assert f is not None, "the SET returned no data fd"
    return f


@pytest.fixture
def k() -> Iterator[ModelKernel]:
    kernel = ModelKernel(iommu="smmuv3")
    yield kernel
    assert kernel.fdt.files == {}, "a test leaked fds"


@pytest.fixture
def t(k: ModelKernel) -> ModelTransport:
    return ModelTransport(k)


# -- iommufd -------------------------------------------------------------------------------


def test_ioas_map_unmap_copy_ranges(t: ModelTransport) -> None:
    with Iommufd(t) as ictx, t.mmap(16 * PAGE) as mem:
        with ictx.ioas_alloc() as ioas, ictx.ioas_alloc() as other:
            r = ioas.iova_ranges()
            assert r.ranges == ((0, (1 << 64) - 1),) and r.alignment >= 1
            assert ioas.map(mem, iova=1 << 20) == 1 << 20
            auto = ioas.map(mem.addr, 4 * PAGE)
            assert auto != 1 << 20 and auto % PAGE == 0 and auto != 0
            with pytest.raises(IoasError) as e:
                ioas.map(mem, iova=1 << 20)
            assert e.value.errno == errno.EEXIST
            assert ioas.copy(1 << 20, 16 * PAGE, dst=other, dst_iova=1 << 30) == 1 << 30
            assert other.unmap(1 << 30, 16 * PAGE) == 16 * PAGE
            with pytest.raises(IoasError) as e:
                other.unmap(1 << 30, 16 * PAGE)
            assert e.value.errno == errno.ENOENT  # nothing mapped there any more
            assert ioas.unmap_all() == 20 * PAGE
            assert ioas.unmap_all() == 0
            ioas.allow_iovas([(1 << 32, (1 << 33) - 1)])
            assert (1 << 32) <= ioas.map(mem) < (1 << 33)
            ioas.unmap_all()


def test_dirty_tracking_through_a_hwpt(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev, t.mmap(64 * PAGE) as mem:
        dev_id = dev.bind(ictx)
        assert ictx.hw_info(dev_id).dirty_tracking
        ioas = ictx.ioas_alloc()
        ioas.set_huge_pages(False)
        hwpt = ictx.hwpt_alloc(dev_id, ioas, dirty_tracking=True)
        assert dev.attach(hwpt) == hwpt.id
        iova = ioas.map(mem, iova=1 << 21)
        hwpt.set_dirty_tracking(True)
        hw = k.device(path)
        for p in (0, 1, 7, 63):
            hw.dma_write(iova + p * PAGE + 5, b"x" * 8)
        bm = hwpt.get_dirty_bitmap(iova, 64 * PAGE, PAGE, no_clear=True)
        assert bm.pages().tolist() == [0, 1, 7, 63]
        assert list(bm.ranges()) == [
            (iova, 2 * PAGE),
            (iova + 7 * PAGE, PAGE),
            (iova + 63 * PAGE, PAGE),
        ]
        assert hwpt.get_dirty_bitmap(iova, 64 * PAGE, PAGE) == bm  # NO_CLEAR kept them
        assert not hwpt.get_dirty_bitmap(iova, 64 * PAGE, PAGE)  # the read above cleared
        assert mem.read(5, 8) == b"x" * 8  # the DMA landed in user memory
        dev.detach()
        hwpt.destroy()
        ioas.unmap_all()
        ioas.destroy()


def test_dirty_hwpt_needs_a_dirty_capable_iommu(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference", iommu_dirty=False)
    with Iommufd(t) as ictx, VfioDevice(t, path) as dev:
        dev_id = dev.bind(ictx)
        assert not ictx.hw_info(dev_id).dirty_tracking
        with ictx.ioas_alloc() as ioas, pytest.raises(HwptError) as e:
            ictx.hwpt_alloc(dev_id, ioas, dirty_tracking=True)
        assert e.value.errno == errno.EOPNOTSUPP


# -- migration -----------------------------------------------------------------------------


def _bound(t: ModelTransport, ictx: Iommufd, path: str) -> VfioDevice:
    dev = VfioDevice(t, path)
    dev.bind(ictx)
    return dev


def test_precopy_migration_between_two_reference_devices(k: ModelKernel, t: ModelTransport) -> None:
    a_path = k.add_device("reference", state_size=5 * 4096 + 100, chunk_size=4096)
    b_path = k.add_device("reference", state_size=5 * 4096 + 100, chunk_size=4096, seed=9)
    k.device(a_path).run(3)  # the source device did some work: its state differs from b's
    assert k.device(a_path).state() != k.device(b_path).state()
    with Iommufd(t) as ictx, _bound(t, ictx, a_path) as a, _bound(t, ictx, b_path) as b:
        assert (
            a.migration_flags()
            == MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
        )
        assert a.get_state() == S.RUNNING
        stream = bytearray()
        with session(a.set_state(S.PRE_COPY)) as src:
            assert src is not None and src.saving
            info = src.precopy_info()
            assert info.initial_bytes > 0
            stream += src.read_available()
            assert src.read_chunk() is None  # ENOMSG: temporary end of stream
            assert src.precopy_info().initial_bytes == 0
            assert a.set_state(S.PRE_COPY_P2P) is None  # same session
            assert a.set_state(S.STOP_COPY) is None
            stream += src.read_available()
            assert src.read() == b""  # permanent end
        assert a.set_state(S.STOP) is None
        with session(b.set_state(S.RESUMING)) as dst:
            assert dst is not None and not dst.saving
            dst.write_all(bytes(stream))
            assert b.set_state(S.STOP) is None
        assert b.get_state() == S.STOP
    assert k.device(b_path).state() == k.device(a_path).state()


def test_copy_to_streams_between_files(k: ModelKernel, t: ModelTransport) -> None:
    a_path, b_path = k.add_device("mtty"), k.add_device("mtty")
    seen: list[int] = []
    with Iommufd(t) as ictx, _bound(t, ictx, a_path) as a, _bound(t, ictx, b_path) as b:
        a.set_state(S.STOP)
        with session(a.set_state(S.STOP_COPY)) as src, session(b.set_state(S.RESUMING)) as dst:
            assert src is not None and dst is not None
            n = src.copy_to(dst, observe=lambda c: seen.append(len(c)))
        assert n == a.mig_data_size() == sum(seen) == 24 + 36 * 2
        b.set_state(S.RUNNING)
        a.set_state(S.RUNNING)


def test_failed_transition_reports_requested_and_current_state(
    k: ModelKernel, t: ModelTransport
) -> None:
    path = k.add_device("reference", fail_arc=("STOP", "STOP_COPY", errno.EBUSY))
    with Iommufd(t) as ictx, _bound(t, ictx, path) as dev:
        with pytest.raises(MigrationStateError) as e:
            dev.set_state(S.STOP_COPY)  # RUNNING -> ... -> STOP, then the failing arc
        assert e.value.errno == errno.EBUSY
        assert e.value.requested == S.STOP_COPY and e.value.current == S.STOP
        with pytest.raises(MigrationStateError) as e:
            dev.set_state(S.ERROR)
        assert e.value.errno == errno.EINVAL and "SET ERROR" in str(e.value)


def test_reset_ends_sessions(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx, _bound(t, ictx, path) as dev:
        with session(dev.set_state(S.PRE_COPY)) as f:
            assert f is not None
            dev.reset()
            assert dev.get_state() == S.RUNNING
            with pytest.raises(MigrationDataError) as e:
                f.read(16)
            assert e.value.errno == errno.ENODEV


def test_precopy_info_v2_opt_in(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("hisi_acc")
    with Iommufd(t) as ictx, _bound(t, ictx, path) as dev:
        with session(dev.set_state(S.PRE_COPY)) as f:
            assert f is not None
            assert f.precopy_info(flags=0xF0).flags == 0xF0  # v1 echoes
            dev.enable_precopy_info_v2()
            assert f.precopy_info(flags=0xF0).flags == 0
            assert f.precopy_info().initial_bytes == 40
            dev.set_state(S.RUNNING)


def test_dma_logging(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("reference")
    with Iommufd(t) as ictx, _bound(t, ictx, path) as dev, t.mmap(32 * PAGE) as mem:
        assert dev.dma_logging_supported()
        ioas = ictx.ioas_alloc()
        dev.attach(ioas)
        iova = ioas.map(mem, iova=1 << 24)
        assert dev.dma_logging_start([(iova, 32 * PAGE)], 4096) == 4096
        k.device(path).dma_write(iova + 3 * PAGE, b"abc")
        k.device(path).dma_write(iova + 20 * PAGE, b"abc")
        rep = dev.dma_logging_report(iova, 32 * PAGE)
        assert rep == DirtyBitmap.from_pages(iova, 32 * PAGE, PAGE, [3, 20])
        assert not dev.dma_logging_report(iova, 32 * PAGE)
        with pytest.raises(DmaLoggingError) as e:
            dev.dma_logging_report(iova, 32 * PAGE, page_size=1024)
        assert e.value.errno == errno.EINVAL
        dev.dma_logging_stop()
        dev.detach()
        ioas.unmap_all()


def test_dma_logging_absent_is_enotty(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("hisi_acc")
    with Iommufd(t) as ictx, _bound(t, ictx, path) as dev:
        assert not dev.dma_logging_supported()
        with pytest.raises(DmaLoggingError) as e:
            dev.dma_logging_start([(0, PAGE)])
        assert e.value.errno == errno.ENOTTY


# -- legacy type1 ----------------------------------------------------------------------


def test_type1_container_reports_every_mapped_page(k: ModelKernel, t: ModelTransport) -> None:
    path = k.add_device("hisi_acc")
    with Container(t) as c, Group(t, k.group_of(path)) as g, t.mmap(16 * PAGE) as mem:
        assert c.api_version() == 0 and c.check_extension(3) == 1
        assert g.viable
        g.set_container(c)
        c.set_iommu()
        info = c.iommu_info()
        pg = info.min_page_size
        assert info.migration is not None and info.migration.pgsize_bitmap & pg
        c.map_dma(mem, iova=1 << 20)
        c.dirty_pages_start()
        with g.get_device(path.rsplit("/", 1)[1]) as dev:
            assert dev.migration_flags() == MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY
            bm = c.dirty_pages_bitmap(1 << 20, 16 * PAGE, pg)
            # a device behind a real IOMMU: type1 cannot know, so every page is dirty
            assert bm.count() == 16 * PAGE // pg
            unmapped, bm2 = c.unmap_dma_dirty(1 << 20, 16 * PAGE, pg)
            assert unmapped == 16 * PAGE and bm2.count() == bm.count()
        c.dirty_pages_stop()
        g.unset_container()


# -- the bitmap type -----------------------------------------------------------------------


def test_dirty_bitmap_is_vectorised_and_exact() -> None:
    rng = np.random.default_rng(1)
    npages = 1 << 20  # 4 GiB at 4 KiB
    pages = np.unique(rng.integers(0, npages, 5000))
    bm = DirtyBitmap.from_pages(0, npages * PAGE, PAGE, pages)
    assert bm.count() == len(pages)
    assert np.array_equal(bm.pages(), pages)
    first, count = bm.runs()
    assert int(count.sum()) == len(pages)
    rebuilt = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count, strict=True)])
    assert np.array_equal(rebuilt, pages)
    assert bm.is_dirty(int(pages[0]) * PAGE) and bm.dirty_bytes() == len(pages) * PAGE
    # bits past the last page of the range are dropped
    words = np.full(2, np.uint64((1 << 64) - 1), dtype=np.uint64)
    assert DirtyBitmap.from_words(0, 70 * PAGE, PAGE, words).count() == 70


def test_poll_a_data_fd(k: ModelKernel, t: ModelTransport) -> None:
    # ModelKernel.poll takes (fd, events): the transport must not pass its timeout on.
    import select

    path = k.add_device("reference")
    with Iommufd(t) as ictx, _bound(t, ictx, path) as dev:
        with session(dev.set_state(S.PRE_COPY)) as f:
            assert f.poll(timeout_ms=10) & select.POLLIN
            assert t.poll(f.fd, select.POLLIN, 1000) == select.POLLIN
        dev.set_state(S.RUNNING)


# The IOVA ranges type1 advertises (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE): each vendor's
# aperture minus the reserved regions of the group's device (kernel-uapi.md §6, §9; the MSI
# windows and AMD's HyperTransport hole), written out here from those facts.
TYPE1_RANGES = {
    "smmuv3": [(0, 0x07FF_FFFF), (0x0810_0000, (1 << 48) - 1)],
    "vtd": [(0, 0xFEDF_FFFF), (0xFEF0_0000, (1 << 48) - 1)],
    "amd": [
        (0, 0xFEDF_FFFF),
        (0xFEF0_0000, 0xFC_FFFF_FFFF),
        (0x100_0000_0000, (1 << 64) - 1),
    ],
}


def _raw_iova_ranges(k: ModelKernel, fd: int) -> list[tuple[int, int]]:
    """The capability chain of VFIO_IOMMU_GET_INFO walked from its bytes, independently of
    the library's parser: header {id u16, version u16, next u32}, then for IOVA_RANGE
    {nr_iovas u32, reserved u32, {start u64, end u64}[nr]}."""
    buf = bytearray(4096)
    struct.pack_into("<I", buf, 0, len(buf))
    k.ioctl(fd, v.VFIO_IOMMU_GET_INFO, buf)
    flags, cap_offset = struct.unpack_from("<I", buf, 4)[0], struct.unpack_from("<I", buf, 16)[0]
    assert flags & v.VFIO_IOMMU_INFO_CAPS
    off, out = cap_offset, []
    while off:
        cap_id, _ver, nxt = struct.unpack_from("<HHI", buf, off)
        if cap_id == v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            (nr,) = struct.unpack_from("<I", buf, off + 8)
            out = [struct.unpack_from("<QQ", buf, off + 16 + 16 * i) for i in range(nr)]
        off = nxt
    return [(int(a), int(b)) for a, b in out]


@pytest.mark.parametrize("vendor", list(TYPE1_RANGES))
def test_type1_info_iova_ranges_are_what_the_kernel_advertises(vendor: str) -> None:
    k = ModelKernel(iommu=vendor)
    t = ModelTransport(k)
    path = k.add_device("hisi_acc")
    with Container(t) as c, Group(t, k.group_of(path)) as g:
        g.set_container(c)
        c.set_iommu()
        info = c.iommu_info()
        assert list(info.iova_ranges) == TYPE1_RANGES[vendor]
        assert list(info.iova_ranges) == _raw_iova_ranges(k, c.fd)
        assert all(isinstance(x, int) for r in info.iova_ranges for x in r)
        g.unset_container()
    assert k.fdt.files == {}
