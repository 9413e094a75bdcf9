"""The legacy container and groups (drivers/vfio/container.c, group.c) through their bytes.

Every step is an open/ioctl/close on the ModelKernel, as a C program would do it. Below the
uAPI the tests only look at the device's DMA engine (k.device(path)) and its faults.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest
from test_type1_support import (
    PIN_KIND,
    RW,
    Legacy,
    errno_of,
    int_buf,
    name_buf,
)

from vfiomig.hw.iommu import IommuFault
from vfiomig.kernel import ModelKernel
from vfiomig.uapi import vfio as v

GiB = 1 << 30


def status(k: ModelKernel, gfd: int) -> int:
    st = v.vfio_group_status(argsz=ctypes.sizeof(v.vfio_group_status))
    k.ioctl(gfd, v.VFIO_GROUP_GET_STATUS, st)
    return int(st.flags)


# -- /dev/vfio/vfio -------------------------------------------------------------------------


def test_api_version_and_a_fresh_container_per_open() -> None:
    k = ModelKernel()
    a, b = k.open("/dev/vfio/vfio"), k.open("/dev/vfio/vfio")
    assert a != b
    assert k.ioctl(a, v.VFIO_GET_API_VERSION) == v.VFIO_API_VERSION == 0


CHECK_UNSET = [
    (v.VFIO_TYPE1_IOMMU, 1),
    (v.VFIO_TYPE1v2_IOMMU, 1),
    (v.VFIO_UNMAP_ALL, 1),
    (v.VFIO_UPDATE_VADDR, 0),  # needs a backend instance
    (v.VFIO_DMA_CC_IOMMU, 0),  # likewise
    (v.VFIO_SPAPR_TCE_IOMMU, 0),
    (v.VFIO_SPAPR_TCE_v2_IOMMU, 0),
    (v.VFIO_NOIOMMU_IOMMU, 0),
    (v.__VFIO_RESERVED_TYPE1_NESTING_IOMMU, 0),
    (0, 0),
    (12345, 0),
]


@pytest.mark.parametrize(("ext", "want"), CHECK_UNSET)
def test_check_extension_without_backend(ext: int, want: int) -> None:
    k = ModelKernel()
    c = k.open("/dev/vfio/vfio")
    assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, ext) == want


@pytest.mark.parametrize(
    ("kinds", "ext", "want"),
    [
        (("reference",), v.VFIO_UPDATE_VADDR, 1),
        (("reference", "mtty"), v.VFIO_UPDATE_VADDR, 0),  # no vaddr updates with an mdev
        (("reference",), v.VFIO_DMA_CC_IOMMU, 1),
        (("reference",), v.VFIO_TYPE1_IOMMU, 1),
        (("reference",), v.VFIO_SPAPR_TCE_IOMMU, 0),
    ],
)
def test_check_extension_with_type1(kinds: tuple[str, ...], ext: int, want: int) -> None:
    lg = Legacy(ModelKernel(), kinds)
    assert lg.ioctl(v.VFIO_CHECK_EXTENSION, ext) == want


@pytest.mark.parametrize(
    ("ext", "want"),
    [
        (v.VFIO_TYPE1_IOMMU, 0),
        (v.VFIO_TYPE1v2_IOMMU, 0),
        (v.__VFIO_RESERVED_TYPE1_NESTING_IOMMU, errno.ENODEV),  # no backend reports it
        (v.VFIO_SPAPR_TCE_IOMMU, errno.ENODEV),
        (v.VFIO_NOIOMMU_IOMMU, errno.ENODEV),
        (v.VFIO_UPDATE_VADDR, errno.ENODEV),  # reported only by an instance
        (v.VFIO_UNMAP_ALL, errno.EINVAL),  # reported, but type1's open refuses it
        (0, errno.ENODEV),
    ],
)
def test_set_iommu_extension(ext: int, want: int) -> None:
    lg = Legacy(ModelKernel(), iommu_type=None)
    assert errno_of(lg.ioctl, v.VFIO_SET_IOMMU, ext) == want
    # a failed SET_IOMMU leaves the container unset: backend ioctls are still EINVAL
    if want:
        assert errno_of(lg.ioctl, v.VFIO_IOMMU_GET_INFO, bytearray(64)) == errno.EINVAL


def test_set_iommu_needs_a_group_and_only_once() -> None:
    k = ModelKernel()
    c = k.open("/dev/vfio/vfio")
    assert errno_of(k.ioctl, c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU) == errno.EINVAL
    lg = Legacy(k)
    assert errno_of(lg.ioctl, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU) == errno.EINVAL
    assert errno_of(lg.ioctl, v.VFIO_SET_IOMMU, v.VFIO_TYPE1_IOMMU) == errno.EINVAL


def test_backend_ioctls_before_set_iommu_are_einval_after_enotty() -> None:
    lg = Legacy(ModelKernel(), iommu_type=None)
    map_ = v.vfio_iommu_type1_dma_map(argsz=32, flags=RW, vaddr=0, iova=0, size=4096)
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_MAP_DMA, map_) == errno.EINVAL
    assert errno_of(lg.ioctl, v.VFIO_GROUP_GET_STATUS, bytearray(8)) == errno.EINVAL
    lg.ioctl(v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    assert errno_of(lg.ioctl, v.VFIO_GROUP_GET_STATUS, bytearray(8)) == errno.ENOTTY
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_ENABLE, 0) == errno.ENOTTY  # SPAPR-only


def test_backend_ioctl_through_a_non_pointer_faults() -> None:
    lg = Legacy(ModelKernel())
    for req in (v.VFIO_IOMMU_MAP_DMA, v.VFIO_IOMMU_UNMAP_DMA, v.VFIO_IOMMU_GET_INFO):
        assert errno_of(lg.ioctl, req, 0) == errno.EFAULT


# -- /dev/vfio/N ----------------------------------------------------------------------------


def test_every_device_has_its_own_group_node() -> None:
    k = ModelKernel()
    paths = [k.add_device("reference"), k.add_device("mtty"), k.add_device("reference")]
    assert [k.group_of(p) for p in paths] == ["/dev/vfio/0", "/dev/vfio/1", "/dev/vfio/2"]
    for p in paths:
        k.close(k.open(k.group_of(p)))
    assert errno_of(k.open, "/dev/vfio/3") == errno.ENOENT


def bind_cdev(k: ModelKernel, cdev: int) -> None:
    bind = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
    bind.iommufd = k.open("/dev/iommu")
    k.ioctl(cdev, v.VFIO_DEVICE_BIND_IOMMUFD, bind)


def test_group_opens_once_and_not_beside_a_bound_cdev() -> None:
    k = ModelKernel()
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    assert errno_of(k.open, k.group_of(p)) == errno.EBUSY
    k.close(g)
    g = k.open(k.group_of(p))  # free again after close
    k.close(g)
    cdev = k.open(p)
    k.close(k.open(k.group_of(p)))  # an open but unbound cdev does not block the group
    bind_cdev(k, cdev)
    assert errno_of(k.open, k.group_of(p)) == errno.EBUSY  # group.c vfio_group_fops_open
    k.close(cdev)
    k.close(k.open(k.group_of(p)))


def test_group_status_flags() -> None:
    k = ModelKernel()
    lg = Legacy(k, iommu_type=None)
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    assert status(k, g) == v.VFIO_GROUP_FLAGS_VIABLE
    set_ = v.VFIO_GROUP_FLAGS_VIABLE | v.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert status(k, lg.groups[0]) == set_
    k.ioctl(lg.groups[0], v.VFIO_GROUP_UNSET_CONTAINER)
    assert status(k, lg.groups[0]) == v.VFIO_GROUP_FLAGS_VIABLE


def test_bind_is_ebusy_while_the_group_is_open() -> None:
    """vfio_df_ioctl_bind_iommufd -> vfio_device_block_group: the group fd excludes bind."""
    k = ModelKernel()
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    cdev = k.open(p)  # opening the cdev itself is allowed
    bind = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
    bind.iommufd = k.open("/dev/iommu")
    assert errno_of(k.ioctl, cdev, v.VFIO_DEVICE_BIND_IOMMUFD, bind) == errno.EBUSY
    k.close(g)
    assert k.ioctl(cdev, v.VFIO_DEVICE_BIND_IOMMUFD, bind) == 0


def test_group_unknown_ioctl_is_enotty() -> None:
    k = ModelKernel()
    g = k.open(k.group_of(k.add_device("reference")))
    assert errno_of(k.ioctl, g, v.VFIO_DEVICE_GET_INFO, bytearray(32)) == errno.ENOTTY


def test_set_container_errno() -> None:
    k = ModelKernel()
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    c = k.open("/dev/vfio/vfio")
    iommufd = k.open("/dev/iommu")
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, c) == errno.EFAULT  # not a pointer
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, bytearray(2)) == errno.EFAULT
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(999)) == errno.EBADF
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(-1)) == errno.EBADF
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(g)) == errno.EBADFD
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(iommufd)) == errno.EBADFD
    assert k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, int_buf(c)) == 0
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(c)) == errno.EINVAL
    c2 = k.open("/dev/vfio/vfio")
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(c2)) == errno.EINVAL


def test_set_container_on_a_container_with_a_backend_attaches_at_once() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    assert k.device(p).domain is None
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container))
    assert k.device(p).domain is lg.hw(0).domain is not None  # one shared domain


def test_unset_container_errno_and_deprivileging() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    g = lg.groups[0]
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_UNSET_CONTAINER) == errno.EBUSY  # device open
    k.close(lg.devfds[0])
    assert k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER) == 0
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_UNSET_CONTAINER) == errno.EINVAL
    assert lg.hw().domain is None
    # the container lost its last group: the backend is gone
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_GET_INFO, bytearray(64)) == errno.EINVAL
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container))
    assert lg.ioctl(v.VFIO_SET_IOMMU, v.VFIO_TYPE1_IOMMU) == 0  # and can be chosen again


# -- VFIO_GROUP_GET_DEVICE_FD ----------------------------------------------------------------


def test_get_device_fd_errno() -> None:
    k = ModelKernel()
    lg = Legacy(k, iommu_type=None)
    g = lg.groups[0]
    name = lg.paths[0].rsplit("/", 1)[1]
    assert name == "vfio0"
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, 0) == errno.EFAULT
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(b"vfio0")) == errno.EFAULT
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(b"x" * 4096)) == errno.EINVAL
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, name_buf("vfio1")) == errno.ENODEV
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, name_buf("")) == errno.ENODEV
    # container set, but no VFIO_SET_IOMMU yet: vfio_group_use_container
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, name_buf(name)) == errno.EINVAL
    k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER)
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_GET_DEVICE_FD, name_buf(name)) == errno.EINVAL
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container))
    lg.ioctl(v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    assert lg.vdev().open_count == 0
    fd = k.ioctl(g, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(b"vfio0\0trailing"))
    assert fd >= 3 and lg.vdev().open_count == 1


def test_get_device_fd_gives_an_open_device_and_opens_twice() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    fd1 = lg.devfds[0]
    info = v.vfio_device_info(argsz=ctypes.sizeof(v.vfio_device_info))
    k.ioctl(fd1, v.VFIO_DEVICE_GET_INFO, info)  # access granted: no bind needed
    assert info.num_regions > 0
    assert errno_of(k.ioctl, fd1, v.VFIO_DEVICE_BIND_IOMMUFD, bytearray(24)) == errno.EINVAL
    fd2 = lg.get_device_fd(0)  # the group path may open a device more than once
    assert lg.vdev().open_count == 2
    k.close(fd1)
    assert lg.vdev().open_count == 1
    assert errno_of(k.ioctl, lg.groups[0], v.VFIO_GROUP_UNSET_CONTAINER) == errno.EBUSY
    k.close(fd2)
    assert lg.vdev().open_count == 0
    assert k.ioctl(lg.groups[0], v.VFIO_GROUP_UNSET_CONTAINER) == 0


def test_get_device_fd_emfile_opens_nothing() -> None:
    k = ModelKernel()
    lg = Legacy(k, open_devices=False)
    k.fdt.limit = max(k.fdt.files) + 1  # below the uAPI: shrink RLIMIT_NOFILE
    assert errno_of(lg.get_device_fd, 0) == errno.EMFILE
    assert lg.vdev().open_count == 0


# -- DMA through the type1 domain ------------------------------------------------------------


def test_device_dma_goes_through_the_container_mappings() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    dev = lg.hw()
    addr, mem = k.mmap(2 << 20)
    assert mem is not None
    lg.map(GiB, 2 << 20, vaddr=addr)
    dev.dma_write(GiB + 4096 + 3, b"type1")
    assert bytes(mem[4096 + 3 : 4096 + 8]) == b"type1"
    assert dev.dma_read(GiB + 4096 + 3, 5) == b"type1"
    with pytest.raises(IommuFault):
        dev.dma_write(2 * GiB, b"x")  # nothing mapped there
    lg.unmap(GiB, 2 << 20)
    with pytest.raises(IommuFault):
        dev.dma_write(GiB, b"x")
    assert bytes(mem[:1]) == b"\0"


def test_read_only_mapping_refuses_device_writes() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    addr, mem = k.mmap(4096)
    assert mem is not None
    lg.map(0x10000, 4096, vaddr=addr, flags=v.VFIO_DMA_MAP_FLAG_READ)
    with pytest.raises(IommuFault):
        lg.hw().dma_write(0x10000, b"no")
    assert not any(mem) and lg.hw().faults


def test_mappings_made_before_an_iommu_group_joins_are_replayed() -> None:
    k = ModelKernel()
    lg = Legacy(k, (PIN_KIND,))  # an emulated-only container: nothing is pinned or mapped
    addr, mem = k.mmap(8192)
    assert mem is not None
    lg.map(0x40000, 8192, vaddr=addr)
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container))
    k.device(p).dma_write(0x41000, b"replayed")
    assert bytes(mem[4096:4104]) == b"replayed"


def test_replay_of_an_unpinnable_mapping_fails_the_attach() -> None:
    k = ModelKernel()
    lg = Legacy(k, (PIN_KIND,))
    lg.map(0x40000, 8192, vaddr=0x1000_0000)  # never mmap'ed: fine without an IOMMU domain
    p = k.add_device("reference")
    g = k.open(k.group_of(p))
    assert errno_of(k.ioctl, g, v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container)) == errno.EFAULT
    assert k.device(p).domain is None
    assert status(k, g) == v.VFIO_GROUP_FLAGS_VIABLE  # not in the container


def test_closing_the_group_fd_keeps_an_open_device_working() -> None:
    k = ModelKernel()
    lg = Legacy(k)
    addr, mem = k.mmap(4096)
    assert mem is not None
    lg.map(0x80000, 4096, vaddr=addr)
    k.close(lg.groups[0])
    k.close(lg.container)
    lg.hw().dma_write(0x80000, b"alive")  # the device fd holds the group and container
    assert bytes(mem[:5]) == b"alive"
    assert errno_of(k.open, k.group_of(lg.paths[0])) == errno.EBUSY  # still open inside
    k.close(lg.devfds[0])  # last reference: detach, backend released, mappings gone
    assert lg.hw().domain is None
    g = k.open(k.group_of(lg.paths[0]))
    assert status(k, g) == v.VFIO_GROUP_FLAGS_VIABLE


def test_last_group_leaving_removes_every_mapping() -> None:
    k = ModelKernel()
    lg = Legacy(k, ("reference", "reference"))
    lg.map(0x100000, 4096)
    k.close(lg.devfds[0])
    k.ioctl(lg.groups[0], v.VFIO_GROUP_UNSET_CONTAINER)
    lg.hw(1).dma_write(0x100000, b"still")  # the other group keeps the domain and mapping
    with pytest.raises(IommuFault):
        lg.hw(0).dma_write(0x100000, b"x")
    k.close(lg.devfds[1])
    k.ioctl(lg.groups[1], v.VFIO_GROUP_UNSET_CONTAINER)
    for i in (0, 1):
        k.ioctl(lg.groups[i], v.VFIO_GROUP_SET_CONTAINER, int_buf(lg.container))
    lg.ioctl(v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    lg.get_device_fd(0)
    assert lg.unmap(0, 1 << 40) == 0  # the old mapping did not survive


# -- VFIO_IOMMU_GET_INFO ---------------------------------------------------------------------


def parse_caps(buf: bytes | bytearray) -> dict[int, bytes]:
    """Walk the capability chain from cap_offset, as userspace does."""
    off = struct.unpack_from("<I", buf, 16)[0]
    caps: dict[int, bytes] = {}
    while off:
        cid, _ver, nxt = struct.unpack_from("<HHI", buf, off)
        caps[cid] = bytes(buf[off : nxt or len(buf)])
        off = nxt
    return caps


@pytest.mark.parametrize(
    ("vendor", "ranges"),
    [
        ("smmuv3", [(0, 0x7FF_FFFF), (0x810_0000, (1 << 48) - 1)]),
        ("vtd", [(0, 0xFEDF_FFFF), (0xFEF0_0000, (1 << 48) - 1)]),
        (
            "amd",
            [(0, 0xFEDF_FFFF), (0xFEF0_0000, 0xFC_FFFF_FFFF), (0x100_0000_0000, (1 << 64) - 1)],
        ),
    ],
)
def test_get_info_capabilities(vendor: str, ranges: list[tuple[int, int]]) -> None:
    k = ModelKernel(vendor)
    lg = Legacy(k)
    lg.map(0x100000, 4096)
    buf = bytearray(512)
    struct.pack_into("<I", buf, 0, len(buf))
    lg.ioctl(v.VFIO_IOMMU_GET_INFO, buf)
    argsz, flags, pgsizes, cap_offset, _ = struct.unpack_from("<IIQII", buf)
    assert (argsz, cap_offset) == (512, 24)
    assert flags == v.VFIO_IOMMU_INFO_PGSIZES | v.VFIO_IOMMU_INFO_CAPS
    assert pgsizes == 4096 | 2 << 20 | 1 << 30
    caps = parse_caps(buf)
    mig = caps[v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION]
    assert struct.unpack_from("<IQQ", mig, 8)[0] == 0  # flags
    assert struct.unpack_from("<QQ", mig, 16) == (4096, 256 << 20)  # smallest page, 256 MiB
    avail = caps[v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL]
    assert struct.unpack_from("<I", avail, 8)[0] == 65535 - 1
    iova = caps[v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE]
    nr = struct.unpack_from("<I", iova, 8)[0]
    got = [struct.unpack_from("<QQ", iova, 16 + 16 * i) for i in range(nr)]
    assert got == ranges


def test_get_info_argsz_growth_and_short_copies() -> None:
    lg = Legacy(ModelKernel())
    buf = bytearray(24)
    struct.pack_into("<I", buf, 0, 24)
    lg.ioctl(v.VFIO_IOMMU_GET_INFO, buf)
    argsz, flags, _pg, cap_offset, _ = struct.unpack_from("<IIQII", buf)
    # caps: migration 32 + dma_avail 16 + iova ranges 16 + 2 * 16
    assert (argsz, cap_offset) == (24 + 32 + 16 + 48, 0)
    assert flags & v.VFIO_IOMMU_INFO_CAPS
    buf = bytearray(b"\xee" * 24)
    struct.pack_into("<I", buf, 0, 20)
    lg.ioctl(v.VFIO_IOMMU_GET_INFO, buf)
    assert buf[20:24] == b"\xee" * 4  # min(argsz, sizeof) bytes copied back
    assert struct.unpack_from("<I", buf, 0)[0] == 120


@pytest.mark.parametrize(
    ("argsz", "bufsize", "want"),
    [(15, 16, errno.EINVAL), (0, 16, errno.EINVAL), (16, 8, errno.EFAULT), (200, 24, errno.EFAULT)],
)
def test_get_info_errno(argsz: int, bufsize: int, want: int) -> None:
    lg = Legacy(ModelKernel())
    buf = bytearray(bufsize)
    struct.pack_into("<I", buf, 0, argsz)
    assert errno_of(lg.ioctl, v.VFIO_IOMMU_GET_INFO, buf) == want


def test_emulated_only_container_has_no_iova_ranges_and_maps_anything() -> None:
    lg = Legacy(ModelKernel(), ("mtty",))
    lg.map(0x800_0000, 4096, vaddr=0x5000)  # the SW MSI window and an unmapped vaddr
    buf = bytearray(256)
    struct.pack_into("<I", buf, 0, 256)
    lg.ioctl(v.VFIO_IOMMU_GET_INFO, buf)
    caps = parse_caps(buf)
    assert v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE not in caps
    assert struct.unpack_from("<Q", buf, 8)[0] == (1 << 64) - 4096  # PAGE_MASK, no domain
