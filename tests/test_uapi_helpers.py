"""Payload helpers and ioctl encoders of vfiomig.uapi (no kernel needed)."""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiomig.uapi import ioctl, iommufd, vfio


def _u32s(buf: bytearray, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}I", buf)


# ---------------------------------------------------------------- VFIO_DEVICE_FEATURE


def test_feature_buffer_with_struct_payload() -> None:
    state = vfio.vfio_device_feature_mig_state(
        device_state=vfio.VFIO_DEVICE_STATE_STOP_COPY, data_fd=-1
    )
    flags = vfio.VFIO_DEVICE_FEATURE_SET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    buf = vfio.feature_buffer(flags, state)
    assert len(buf) == 16
    assert _u32s(buf, 2) == (16, flags)
    assert bytes(buf[8:]) == bytes(state)


def test_feature_payload_is_a_live_view() -> None:
    flags = vfio.VFIO_DEVICE_FEATURE_GET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    buf = vfio.feature_buffer(flags, ctypes.sizeof(vfio.vfio_device_feature_mig_state))
    assert _u32s(buf, 1) == (16,)
    assert bytes(buf[8:]) == bytes(8)
    # What the kernel does on GET: write the payload in place.
    struct.pack_into("<Ii", buf, 8, vfio.VFIO_DEVICE_STATE_RUNNING, 7)
    view = vfio.feature_payload(buf, vfio.vfio_device_feature_mig_state)
    assert (view.device_state, view.data_fd) == (vfio.VFIO_DEVICE_STATE_RUNNING, 7)
    assert vfio.vfio_device_mig_state(view.device_state).name == "VFIO_DEVICE_STATE_RUNNING"
    view.data_fd = -1
    assert struct.unpack_from("<i", buf, 12) == (-1,)


def test_feature_buffer_bytes_and_empty_payloads() -> None:
    probe = vfio.VFIO_DEVICE_FEATURE_PROBE | vfio.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2
    assert vfio.feature_buffer(probe) == bytearray(struct.pack("<II", 8, probe))
    token = bytes(range(16))  # PCI_VF_TOKEN payload is a raw 16-byte UUID
    buf = vfio.feature_buffer(vfio.VFIO_DEVICE_FEATURE_SET, token)
    assert _u32s(buf, 1) == (24,) and bytes(buf[8:]) == token
    with pytest.raises(ValueError):
        vfio.feature_buffer(vfio.VFIO_DEVICE_FEATURE_GET, -1)


def test_feature_payload_rejects_short_buffer() -> None:
    buf = vfio.feature_buffer(vfio.VFIO_DEVICE_FEATURE_GET)
    with pytest.raises(ValueError):
        vfio.feature_payload(buf, vfio.vfio_device_feature_mig_data_size)


# ---------------------------------------------------------------- Type1 dirty pages / unmap


def test_dirty_pages_start_stop_have_no_payload() -> None:
    buf = vfio.dirty_pages_buffer(vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    assert buf == bytearray(struct.pack("<II", 8, vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_START))


def test_dirty_pages_get_bitmap_layout() -> None:
    bitmap, backing = vfio.alloc_bitmap(length=1 << 20, pgsize=4096)
    get = vfio.vfio_iommu_type1_dirty_bitmap_get(iova=0x10000, size=1 << 20, bitmap=bitmap)
    buf = vfio.dirty_pages_buffer(vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, get)
    # argsz covers header + get but not the bitmap memory itself.
    assert len(buf) == 8 + ctypes.sizeof(get) == 48
    assert _u32s(buf, 2) == (48, vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
    view = vfio.dirty_pages_get(buf)
    assert (view.iova, view.size) == (0x10000, 1 << 20)
    assert (view.bitmap.pgsize, view.bitmap.size) == (4096, 32)
    addr = ctypes.cast(view.bitmap.data, ctypes.c_void_p).value
    assert addr == ctypes.addressof(backing)


def test_dirty_pages_flag_and_payload_must_agree() -> None:
    get = vfio.vfio_iommu_type1_dirty_bitmap_get()
    with pytest.raises(ValueError):
        vfio.dirty_pages_buffer(vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
    with pytest.raises(ValueError):
        vfio.dirty_pages_buffer(vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, get)


def test_unmap_dma_buffer() -> None:
    plain = vfio.unmap_dma_buffer(iova=0x1000, size=0x2000)
    assert plain == bytearray(struct.pack("<IIQQ", 24, 0, 0x1000, 0x2000))

    bitmap, backing = vfio.alloc_bitmap(length=0x2000, pgsize=4096)
    flags = vfio.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    buf = vfio.unmap_dma_buffer(0x1000, 0x2000, flags, bitmap)
    assert len(buf) == 24 + 24
    header = vfio.vfio_iommu_type1_dma_unmap.from_buffer(buf)
    assert (header.argsz, header.flags, header.iova, header.size) == (48, flags, 0x1000, 0x2000)
    view = vfio.unmap_dma_bitmap(buf)
    assert (view.pgsize, view.size) == (4096, 8)
    backing[0] = 0b10
    assert view.data[0] == 0b10  # the pointer in the buffer reaches the backing array

    with pytest.raises(ValueError):
        vfio.unmap_dma_buffer(0, 0, flags)
    with pytest.raises(ValueError):
        vfio.unmap_dma_buffer(0, 0, 0, bitmap)


@pytest.mark.parametrize(
    ("length", "pgsize", "size"),
    [(0, 4096, 8), (4096, 4096, 8), (64 * 4096, 4096, 8), (65 * 4096, 4096, 16), (1, 2 << 20, 8)],
)
def test_alloc_bitmap_rounds_to_u64_words(length: int, pgsize: int, size: int) -> None:
    bitmap, backing = vfio.alloc_bitmap(length, pgsize)
    assert bitmap.size == size == ctypes.sizeof(backing)
    assert not any(backing)


@pytest.mark.parametrize(("length", "pgsize"), [(4096, 0), (4096, 3000), (-1, 4096)])
def test_alloc_bitmap_rejects_bad_arguments(length: int, pgsize: int) -> None:
    with pytest.raises(ValueError):
        vfio.alloc_bitmap(length, pgsize)


# ---------------------------------------------------------------- ioctl encoders


def test_io_accepts_char_or_int_type() -> None:
    assert ioctl._IO(";", 117) == ioctl._IO(0x3B, 117) == vfio.VFIO_DEVICE_FEATURE == 0x3B75
    assert iommufd.IOMMU_HWPT_GET_DIRTY_BITMAP == ioctl._IO(";", 0x8C)


def test_sized_encoders_take_ctypes_types() -> None:
    req = ioctl._IOWR(";", 8, vfio.vfio_region_info)
    assert req == ioctl._IOWR(";", 8, 32) == 0xC0203B08
    assert ioctl._IOR("b", 1, ctypes.c_uint64) >> 30 == ioctl._IOC_READ
    assert ioctl._IOW("b", 1, ctypes.c_uint64) >> 30 == ioctl._IOC_WRITE


@given(
    dir_=st.integers(0, 3),
    type_=st.integers(0, 255),
    nr=st.integers(0, 255),
    size=st.integers(0, (1 << 14) - 1),
)
def test_ioc_round_trip(dir_: int, type_: int, nr: int, size: int) -> None:
    req = ioctl._IOC(dir_, type_, nr, size)
    assert 0 <= req < 1 << 32
    decoded = (ioctl._IOC_DIR(req), ioctl._IOC_TYPE(req), ioctl._IOC_NR(req), ioctl._IOC_SIZE(req))
    assert decoded == (dir_, type_, nr, size)


@pytest.mark.parametrize(
    ("type_", "nr", "size"),
    [(";", 256, 0), ("ab", 0, 0), ("", 0, 0), (256, 0, 0), (";", -1, 0), (";", 0, 1 << 14)],
)
def test_ioc_rejects_out_of_range_fields(type_: int | str, nr: int, size: int) -> None:
    with pytest.raises(ValueError):
        ioctl._IOWR(type_, nr, size)


# ---------------------------------------------------------------- naming


def test_enum_members_double_as_module_ints() -> None:
    assert (
        vfio.VFIO_DEVICE_STATE_STOP_COPY is vfio.vfio_device_mig_state.VFIO_DEVICE_STATE_STOP_COPY
    )
    assert vfio.VFIO_DEVICE_STATE_NR == len(vfio.vfio_device_mig_state) - 1
    assert iommufd.IOMMU_HW_INFO_TYPE_DEFAULT == iommufd.IOMMU_HW_INFO_TYPE_NONE == 0


def test_c_member_names_through_anonymous_unions() -> None:
    dev = vfio.vfio_pci_dependent_device(segment=1, bus=2, devfn=3)
    dev.devid = 0xFFFFFFFF
    assert dev.group_id == 0xFFFFFFFF  # same storage, as in the C union
    ctl = vfio.vfio_device_feature_dma_logging_control()
    ctl.__reserved = 5  # C's double-underscore names are plain attributes outside classes
    assert struct.unpack_from("<I", bytes(ctl), 12) == (5,)
