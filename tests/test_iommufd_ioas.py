"""IOAS, HWPT and attach behaviour: ports of the kernel selftest's iommufd / iommufd_ioas /
iommufd_mock_domain / vfio_compat tests that apply to a real-device model, plus the object
lifetimes and the emulated (ACCESS) path.

Port notes: the mock domain (test_cmd_mock_domain) is a `reference` device bound and
attached to the IOAS; MOCK_APERTURE_START is BASE (4 GiB), clear of every vendor's MSI
window; the selftest-only test ops (ADD_RESERVED, MD_CHECK_MAP, ACCESS_PAGES) become the
reserved MSI window of an attached device, hw page-table lookups and the ACCESS API.
"""

from __future__ import annotations

import ctypes
import errno
import itertools

import numpy as np
import pytest
from test_iommufd_util import (
    BASE,
    DIRTY,
    K4,
    M2,
    NO_CLEAR,
    U64_MAX,
    Iommufd,
    errno_of,
    sized,
)

from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v

SIZE_MAX = U64_MAX
BUFFER_SIZE = 16 * K4


@pytest.fixture(params=[0, 1, 2], ids=["no_domain", "mock_domain", "two_mock_domain"])
def ioas_fx(request: pytest.FixtureRequest) -> tuple[Iommufd, int, list[int], int]:
    """FIXTURE(iommufd_ioas): (f, ioas_id, device ids, buffer address)."""
    f = Iommufd()
    ioas = f.ioas_alloc()
    devs = []
    for _ in range(request.param):
        d = f.dev()
        d.attach(ioas)
        devs.append(d.devid)
    buf, _ = f.buf(BUFFER_SIZE)
    return f, ioas, devs, buf


def test_cmd_fail() -> None:
    f = Iommufd()
    assert f.err(u.IOMMU_DESTROY, sized(u.iommu_destroy, id=0)) == errno.ENOENT
    assert f.err(u.IOMMU_DESTROY, 0) == errno.EFAULT


def test_cmd_ex_fail() -> None:
    f = Iommufd()
    buf = bytearray(16)
    buf[0:4] = (16).to_bytes(4, "little")
    assert f.err(u.IOMMU_DESTROY, buf) == errno.ENOENT  # longer command, zero future
    buf[8] = 1
    assert f.err(u.IOMMU_DESTROY, buf) == errno.E2BIG
    buf[0:4] = (8).to_bytes(4, "little")
    assert f.err(u.IOMMU_DESTROY, buf) == errno.ENOENT
    buf[0:4] = (7).to_bytes(4, "little")
    assert f.err(u.IOMMU_DESTROY, buf) == errno.EINVAL


def test_global_options() -> None:
    f = Iommufd()
    rl = u.IOMMU_OPTION_RLIMIT_MODE
    assert f.option(rl, u.IOMMU_OPTION_OP_GET, val64=1) == 0
    f.option(rl, u.IOMMU_OPTION_OP_SET, val64=1)
    assert f.err(u.IOMMU_OPTION, sized(u.iommu_option, option_id=rl, op=0, val64=2)) == errno.EINVAL
    assert f.option(rl, u.IOMMU_OPTION_OP_GET) == 1
    f.option(rl, u.IOMMU_OPTION_OP_SET, val64=0)
    hp = u.IOMMU_OPTION_HUGE_PAGES
    assert f.err(u.IOMMU_OPTION, sized(u.iommu_option, option_id=hp, op=1)) == errno.ENOENT
    assert f.err(u.IOMMU_OPTION, sized(u.iommu_option, option_id=hp, op=0)) == errno.ENOENT


def test_option_writes_back_only_val64() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    c = sized(u.iommu_option, option_id=u.IOMMU_OPTION_HUGE_PAGES, op=1, object_id=ioas, val64=9)
    buf = bytearray(bytes(c))
    f.ioctl(u.IOMMU_OPTION, buf)
    out = u.iommu_option.from_buffer(buf)
    assert out.val64 == 1 and out.object_id == ioas


def test_ioas_destroy(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, devs, buf = ioas_fx
    f.map(ioas, buf, K4, BASE)  # ioas_area_destroy: an area changes nothing
    if devs:
        assert errno_of(f.destroy, ioas) == errno.EBUSY
    else:
        f.destroy(ioas)


def test_ioas_area_auto_destroy(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, _devs, buf = ioas_fx
    for i in range(10):
        f.map(ioas, buf, K4, BASE + i * K4)
    f.k.close(f.fd)  # teardown: everything destroyed leaf first (devices keep their ref)


def test_area(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, _devs, buf = ioas_fx
    for i in range(10):
        assert errno_of(f.unmap, ioas, i * K4, K4) == errno.ENOENT
    for i in range(10):
        f.map(ioas, buf, K4, BASE + i * K4)
    for i in range(10):
        assert f.unmap(ioas, BASE + i * K4, K4) == K4
    # Split fails
    f.map(ioas, buf, 2 * K4, BASE + 16 * K4)
    assert errno_of(f.unmap, ioas, BASE + 16 * K4, K4) == errno.ENOENT
    assert errno_of(f.unmap, ioas, BASE + 17 * K4, K4) == errno.ENOENT
    # Over map fails
    for length, at in ((2, 16), (1, 16), (1, 17), (2, 15), (3, 15)):
        assert errno_of(f.map, ioas, buf, length * K4, BASE + at * K4) == errno.EEXIST
    assert f.unmap(ioas, 0, U64_MAX) == 2 * K4
    assert f.unmap(ioas, 0, U64_MAX) == 0  # unmap all succeeds on an empty IOAS


def test_unmap_fully_contained_areas(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, _devs, buf = ioas_fx
    base = BASE + 4 * K4
    for i in range(4):
        f.map(ioas, buf, 8 * K4, base + i * 16 * K4)
    assert errno_of(f.unmap, ioas, base - 4 * K4, 8 * K4) == errno.ENOENT
    assert errno_of(f.unmap, ioas, base + 3 * 16 * K4 + 4 * K4, 8 * K4) == errno.ENOENT
    assert f.unmap(ioas, base - 4 * K4, 3 * 16 * K4 + 8 * K4 + 4 * K4) == 32 * K4


def test_unmap_partial_failure_keeps_what_was_removed() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, _ = f.buf(4 * K4)
    f.map(ioas, buf, K4, BASE)
    f.map(ioas, buf, 2 * K4, BASE + 2 * K4)
    assert errno_of(f.unmap, ioas, BASE, 3 * K4) == errno.ENOENT  # 2nd area sticks out
    assert errno_of(f.unmap, ioas, BASE, K4) == errno.ENOENT  # ... but the 1st is gone
    assert f.unmap(ioas, BASE + 2 * K4, 2 * K4) == 2 * K4


def test_area_auto_iova(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, devs, buf = ioas_fx
    iovas = [f.map(ioas, buf, K4) for _ in range(10)]
    assert all(iova != 0 for iova in iovas)
    for iova in iovas:
        f.unmap(ioas, iova, K4)
    # automatically aligned to the length's lowest bit (and keeps the page offset)
    for i in range(10):
        length = K4 * (i + 1)
        uva = buf if devs else 1 << 31  # without domains the memory is not even pinned
        iova = f.map(ioas, uva, length)
        assert iova % (1 << ((length & -length).bit_length() - 1)) == 0
        f.unmap(ioas, iova, length)
    # Avoids a reserved region (the device MSI window) and honours the allowed list
    if devs:
        _, ranges, _ = f.iova_ranges(ioas)
        assert all(not (s <= 0x0800_0000 <= e) for s, e in ranges)
    f.allow(ioas, [(BASE + K4, BASE + 600 * K4 - 1)])
    for i in range(10):
        length = K4 * (i + 1)
        iova = f.map(ioas, buf, length)
        assert BASE + K4 <= iova and iova + length <= BASE + 600 * K4
        f.unmap(ioas, iova, length)


def test_auto_iova_keeps_user_va_alignment() -> None:
    """iopt_alloc_iova: alignment = min(roundup_pow2(length), lowest set bit of user_va, THP)."""
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, _ = f.buf(8 * M2)  # 2 MiB aligned
    iova = f.map(ioas, buf, 4 * M2)
    assert iova % M2 == 0  # capped at the THP size
    iova2 = f.map(ioas, buf + 3 * K4, K4)
    assert iova2 % K4 == 0 and iova2 != 0
    iova3 = f.map(ioas, buf + 0x123, 0x100)  # no domain: byte granular, offset kept
    assert iova3 % K4 == 0x123
    # The alignment is capped at the THP size: a 2 MiB aligned hole will do for a big,
    # very aligned user_va (not pinned: the IOAS has no domain).
    other = f.ioas_alloc()
    f.allow(other, [(BASE + M2, BASE + 16 * M2 - 1)])
    assert f.map(other, 1 << 40, 4 * M2) == BASE + M2


def test_area_allowed() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    f.allow(ioas, [(BASE, BASE + 600 * K4)])
    d = f.dev()
    # a device whose MSI window intersects the allowed list cannot attach
    f.allow(ioas, [(0x0800_0000 - K4, 0x0800_0000 + K4)])
    assert errno_of(d.attach, ioas) == errno.EADDRINUSE
    f.allow(ioas, [])
    d.attach(ioas)
    # and once reserved, an allowed range over it is refused
    assert errno_of(f.allow, ioas, [(0x0800_0000 - K4, 0x0800_0000 + K4)]) == errno.EADDRINUSE


def test_copy_area(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, _devs, buf = ioas_fx
    f.map(ioas, buf, K4, BASE)
    assert f.copy(ioas, ioas, BASE, K4, BASE + K4) == BASE + K4  # inside one IOAS
    dst = f.ioas_alloc()
    assert f.copy(dst, ioas, BASE, K4, 0) == 0  # between IOASes (FIXED at 0)


def test_copy_spanning_areas_makes_one_area_per_source_area() -> None:
    f = Iommufd()
    src = f.ioas_alloc()
    a, _ = f.buf(2 * K4)
    b, _ = f.buf(2 * K4)
    f.map(src, a, 2 * K4, BASE)
    f.map(src, b, 2 * K4, BASE + 2 * K4)
    dst = f.ioas_alloc()
    f.copy(dst, src, BASE + K4, 2 * K4, BASE)
    assert errno_of(f.unmap, dst, BASE, K4) == 0  # first copied area alone
    assert f.unmap(dst, BASE + K4, K4) == K4


def test_copy_shares_the_pages() -> None:
    f = Iommufd()
    src = f.ioas_alloc()
    buf, mem = f.buf(4 * K4)
    assert mem is not None
    f.map(src, buf, 4 * K4, BASE)
    dst = f.ioas_alloc()
    f.copy(dst, src, BASE + K4, 2 * K4, BASE + 64 * K4)
    d = f.dev()
    d.attach(dst)
    d.hw.dma_write(BASE + 64 * K4 + 8, b"copied")  # lands in the source's user memory
    assert mem[K4 + 8 : K4 + 14].tobytes() == b"copied"


def test_iova_ranges(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    f, ioas, devs, _buf = ioas_fx
    n, ranges, align = f.iova_ranges(ioas)
    if not devs:
        assert (n, ranges, align) == (1, [(0, SIZE_MAX)], 1)
    else:
        # SMMUv3: 48-bit aperture and the SW MSI window reserved
        assert ranges == [(0, 0x0800_0000 - 1), (0x0810_0000, (1 << 48) - 1)]
        assert align == K4
    # Buffer too small: EMSGSIZE, the total written back, nothing copied
    addr, mem = f.buf(K4)
    assert mem is not None
    c = sized(u.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=0, allowed_iovas=addr)
    assert f.err(u.IOMMU_IOAS_IOVA_RANGES, c) == errno.EMSGSIZE
    assert c.num_iovas == n and not mem.any()


AMD_HT = 0xFD_0000_0000  # HyperTransport range, to 0xFF_FFFF_FFFF (no EFR2 HTRangeIgnore)


@pytest.mark.parametrize(
    "vendor,expect",
    [
        ("vtd", [(0, 0xFEE0_0000 - 1), (0xFEF0_0000, (1 << 48) - 1)]),
        # amd_iommu_get_resv_regions: the MSI window and the HyperTransport range, the same
        # regions type1 excludes (test_type1_container.test_get_info_capabilities)
        ("amd", [(0, 0xFEE0_0000 - 1), (0xFEF0_0000, AMD_HT - 1), (1 << 40, U64_MAX)]),
    ],
)
def test_iova_ranges_per_vendor(vendor: str, expect: list[tuple[int, int]]) -> None:
    f = Iommufd(vendor=vendor)
    ioas = f.ioas_alloc()
    d = f.dev()
    d.attach(ioas)
    assert f.iova_ranges(ioas)[1] == expect
    buf, _ = f.buf(K4)
    for (_, before), (after, _) in itertools.pairwise(expect):
        for iova in (before + 1, after - K4):  # a reserved range's first and last page
            assert f.err(u.IOMMU_IOAS_MAP, f.map_cmd(ioas, buf, K4, iova)) == errno.EINVAL
    d.detach()  # the auto HWPT goes, and with it every reservation
    assert f.iova_ranges(ioas)[1] == [(0, U64_MAX)]


def test_get_hw_info_buffers() -> None:
    for vendor, typ, size in (
        ("smmuv3", u.IOMMU_HW_INFO_TYPE_ARM_SMMUV3, ctypes.sizeof(u.iommu_hw_info_arm_smmuv3)),
        ("vtd", u.IOMMU_HW_INFO_TYPE_INTEL_VTD, ctypes.sizeof(u.iommu_hw_info_vtd)),
        ("amd", u.IOMMU_HW_INFO_TYPE_AMD, ctypes.sizeof(u.iommu_hw_info_amd)),
    ):
        f = Iommufd(vendor=vendor)
        d = f.dev()
        c = f.hw_info(d.devid)  # zero-size user buffer
        assert (c.out_data_type, c.data_len) == (typ, size)
        assert c.out_capabilities == u.IOMMU_HW_CAP_DIRTY_TRACKING
        addr, mem = f.buf(K4)
        assert mem is not None
        mem[:] = 0xAA
        f.hw_info(d.devid, addr, size + 8)  # larger: trailing bytes zeroed
        assert not mem[size : size + 8].any() and mem[size + 8] == 0xAA
        exact = mem[:size].copy()
        mem[:] = 0xAA
        f.hw_info(d.devid, addr, 4)  # smaller: only those bytes
        assert mem[:4].tobytes() == exact[:4].tobytes() and mem[4] == 0xAA
        nd = f.dev(iommu_dirty=False)
        assert f.hw_info(nd.devid).out_capabilities == 0
        mem[:] = 0
        f.hw_info(nd.devid, addr, size)
        assert mem[:size].tobytes() != exact.tobytes()  # the dirty capability bit differs


def test_hw_info_writes_every_out_field() -> None:
    """iommufd_get_hw_info (drivers/iommu/iommufd/device.c) writes data_len, out_data_type,
    out_capabilities and out_max_pasid_log2 on every success: 0 for a device without PASID,
    whatever the caller left there. The model's devices have no PASID capability."""
    f = Iommufd()
    d = f.dev()
    c = sized(
        u.iommu_hw_info,
        dev_id=d.devid,
        out_data_type=0xDEAD,
        out_max_pasid_log2=0x55,
        out_capabilities=U64_MAX,
    )
    f.ioctl(u.IOMMU_GET_HW_INFO, c)
    assert c.out_max_pasid_log2 == 0
    assert c.out_capabilities == u.IOMMU_HW_CAP_DIRTY_TRACKING
    assert c.out_data_type == u.IOMMU_HW_INFO_TYPE_ARM_SMMUV3


def test_hw_info_of_an_access_is_enoent() -> None:
    f = Iommufd()
    m = f.dev("mtty")
    assert errno_of(f.hw_info, m.devid) == errno.ENOENT


# -- attach / replace / detach ------------------------------------------------------------


def test_attach_to_ioas_creates_or_reuses_an_auto_hwpt() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    d1, d2 = f.dev(), f.dev()
    h1 = d1.attach(ioas)
    h2 = d2.attach(ioas)
    assert h1 == h2 != ioas  # output pt_id is the HWPT actually attached
    assert errno_of(f.destroy, h1) == errno.EBUSY
    d1.detach()
    d2.detach()  # last device: the automatic HWPT is destroyed
    assert errno_of(f.destroy, h1) == errno.ENOENT
    f.destroy(ioas)


def test_replace(ioas_fx: tuple[Iommufd, int, list[int], int]) -> None:
    """iommufd_mock_domain replace: replacing the IOAS drops the old auto HWPT."""
    f, ioas, _devs, _buf = ioas_fx
    d = f.dev()
    old = d.attach(ioas)
    other = f.ioas_alloc()
    new = d.attach(other)
    assert new != old
    if not _devs:  # the device was its only user
        assert errno_of(d.attach, old) == errno.ENOENT
    assert d.attach(other) == new
    assert d.attach(ioas) != new
    f.destroy(other)


def test_alloc_hwpt_rotation() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    d = f.dev()
    d.attach(ioas)
    assert (
        errno_of(f.hwpt_alloc, d.devid, ioas, ~u.IOMMU_HWPT_ALLOC_NEST_PARENT & 0xFFFFFFFF)
        == errno.EOPNOTSUPP
    )
    h0 = f.hwpt_alloc(d.devid, ioas, 0)
    h1 = f.hwpt_alloc(d.devid, ioas, u.IOMMU_HWPT_ALLOC_NEST_PARENT)
    d.attach(h0)
    assert errno_of(f.destroy, h0) == errno.EBUSY
    d.attach(h1)
    assert errno_of(f.destroy, h1) == errno.EBUSY
    d.attach(ioas)
    f.destroy(h1)
    d2 = f.dev()
    d2.attach(h0)  # a device attached directly to a HWPT
    d2.close()
    f.destroy(h0)


def test_new_hwpt_is_filled_with_every_mapping() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, mem = f.buf(4 * M2)
    assert mem is not None
    f.map(ioas, buf, 4 * M2, BASE)
    f.map(ioas, buf, K4, BASE + 8 * M2, u.IOMMU_IOAS_MAP_READABLE)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, 0)
    d.attach(hwpt)
    dom = d.hw.domain  # below the uAPI: the HWPT's page table
    assert dom.leaf(BASE) == (BASE, M2)  # huge pages on: 2 MiB leaves
    assert dom.iova_to_phys(BASE + 3 * M2 + 5) == buf + 3 * M2 + 5
    d.hw.dma_write(BASE + 100, b"hello")
    assert mem[100:105].tobytes() == b"hello"
    # A later map reaches the HWPT too; an unmap leaves it
    f.map(ioas, buf, K4, BASE + 16 * M2)
    assert dom.iova_to_phys(BASE + 16 * M2) == buf
    f.unmap(ioas, BASE + 16 * M2, K4)
    assert dom.iova_to_phys(BASE + 16 * M2) is None


def test_device_never_writes_without_a_writable_mapping() -> None:
    from vfiomig.hw.iommu import IommuFault

    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, mem = f.buf(2 * K4)
    assert mem is not None
    f.map(ioas, buf, K4, BASE, u.IOMMU_IOAS_MAP_READABLE)
    d = f.dev()
    with pytest.raises(IommuFault):
        d.hw.dma_write(BASE, b"x")  # not attached: blocked
    d.attach(ioas)
    with pytest.raises(IommuFault):
        d.hw.dma_write(BASE, b"x")  # read-only
    with pytest.raises(IommuFault):
        d.hw.dma_write(BASE + K4, b"x")  # unmapped
    assert not mem.any() and len(d.hw.faults) == 3
    d.detach()
    with pytest.raises(IommuFault):
        d.hw.dma_read(BASE, 1)


def test_huge_pages_option_controls_iopte_size() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    assert f.option(u.IOMMU_OPTION_HUGE_PAGES, u.IOMMU_OPTION_OP_GET, ioas) == 1
    f.huge_pages(ioas, False)
    assert f.option(u.IOMMU_OPTION_HUGE_PAGES, u.IOMMU_OPTION_OP_GET, ioas) == 0
    assert f.iova_ranges(ioas)[2] == K4  # PAGE_SIZE alignment with huge pages off
    buf, _ = f.buf(2 * M2)
    f.map(ioas, buf, 2 * M2, BASE)
    d = f.dev()
    d.attach(ioas)
    assert d.hw.domain.leaf(BASE + M2) == (BASE + M2, K4)


def test_ioas_destroy_unmaps_and_object_ids_reuse() -> None:
    f = Iommufd()
    a = f.ioas_alloc()
    b = f.ioas_alloc()
    assert (a, b) == (1, 2)
    f.destroy(a)
    assert f.ioas_alloc() == 1  # lowest free id


def test_close_destroys_everything_leaf_first() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, _ = f.buf(K4)
    f.map(ioas, buf, K4, BASE)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.k.close(f.fd)  # the device fd still holds the iommufd
    assert d.hw.domain is not None
    d.close()  # unbind detaches; then the last reference goes
    assert d.hw.domain is None


# -- the emulated (ACCESS) path -----------------------------------------------------------


def test_emulated_device_gets_an_access_and_pins() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, mem = f.buf(4 * K4)
    assert mem is not None
    f.map(ioas, buf, 4 * K4, BASE)
    m = f.dev("mtty")
    assert m.attach(ioas) == ioas  # an ACCESS attaches to the IOAS itself
    access = m.vdev.iommufd_access  # below the uAPI: the driver's handle
    assert access.pin_pages(BASE + K4, 2 * K4) == [(buf + K4, 2 * K4)]
    assert m.hw.domain is None  # no IO page table for an mdev
    assert errno_of(f.destroy, ioas) == errno.EBUSY
    # unmap with pinned pages: the driver is asked to unpin; it does not -> EDEADLOCK
    assert errno_of(f.unmap, ioas, BASE, 4 * K4) == errno.EDEADLOCK
    access.unpin_pages(BASE + K4, 2 * K4)
    # the area stays marked prevent_access after the failed unmap (as in the kernel)
    assert errno_of(access.rw, BASE + 8, b"emul", True) == errno.EINVAL
    assert f.unmap(ioas, BASE, 4 * K4) == 4 * K4  # nothing pinned now
    f.map(ioas, buf, 4 * K4, BASE)
    access.rw(BASE + 8, b"emul", write=True)
    assert mem[8:12].tobytes() == b"emul"
    assert access.rw(BASE + 8, 4, write=False) == b"emul"
    # no dirty tracking sees an ACCESS's writes: there is no HWPT to ask
    m.detach()
    assert errno_of(access.pin_pages, BASE, K4) == errno.ENOENT
    assert f.unmap(ioas, BASE, 4 * K4) == 4 * K4


def test_emulated_access_driver_unpin_callback() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, _ = f.buf(4 * K4)
    f.map(ioas, buf, 4 * K4, BASE)
    m = f.dev("mtty")
    m.attach(ioas)
    access = m.vdev.iommufd_access
    calls = []

    def dma_unmap(iova: int, length: int) -> None:
        calls.append((iova, length))
        access.unpin_pages(BASE, K4)

    m.vdev.dma_unmap = dma_unmap
    access.pin_pages(BASE, K4)
    assert f.unmap(ioas, BASE, 4 * K4) == 4 * K4
    assert calls == [(BASE, 4 * K4)]


def test_emulated_access_alignment_and_permissions() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    buf, _ = f.buf(4 * K4)
    f.map(ioas, buf + 0x100, 0x100, BASE)  # byte granular while nothing needs pages
    m = f.dev("mtty")
    assert errno_of(m.attach, ioas) == errno.EADDRINUSE  # access needs PAGE_SIZE alignment
    f.unmap(ioas, 0, U64_MAX)
    f.map(ioas, buf, K4, BASE, u.IOMMU_IOAS_MAP_READABLE)
    m.attach(ioas)
    access = m.vdev.iommufd_access
    assert errno_of(access.pin_pages, BASE, K4, True) == errno.EPERM
    assert access.pin_pages(BASE, K4, False) == [(buf, K4)]


# -- the VFIO compat container on /dev/iommu ----------------------------------------------


def _compat(f: Iommufd, ioas: int) -> None:
    f.ioctl(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, ioas_id=ioas, op=u.IOMMU_VFIO_IOAS_SET))


def test_vfio_ioas_get_set_clear() -> None:
    f = Iommufd()
    c = sized(u.iommu_vfio_ioas, op=u.IOMMU_VFIO_IOAS_GET)
    assert f.err(u.IOMMU_VFIO_IOAS, c) == errno.ENODEV
    ioas = f.ioas_alloc()
    _compat(f, ioas)
    f.ioctl(u.IOMMU_VFIO_IOAS, c)
    assert c.ioas_id == ioas
    f.ioctl(u.IOMMU_VFIO_IOAS, sized(u.iommu_vfio_ioas, op=u.IOMMU_VFIO_IOAS_CLEAR))
    assert f.err(u.IOMMU_VFIO_IOAS, c) == errno.ENODEV
    _compat(f, ioas)
    f.destroy(ioas)  # destroying the compat IOAS clears the pointer
    assert f.err(u.IOMMU_VFIO_IOAS, c) == errno.ENODEV


def test_simple_compat_ioctls() -> None:
    f = Iommufd()
    assert f.k.ioctl(f.fd, v.VFIO_GET_API_VERSION, 0) == v.VFIO_API_VERSION
    assert f.k.ioctl(f.fd, v.VFIO_CHECK_EXTENSION, v.VFIO_TYPE1v2_IOMMU) == 1
    assert f.k.ioctl(f.fd, v.VFIO_CHECK_EXTENSION, v.VFIO_UNMAP_ALL) == 1
    assert f.k.ioctl(f.fd, v.VFIO_CHECK_EXTENSION, v.VFIO_UPDATE_VADDR) == 0
    assert errno_of(f.k.ioctl, f.fd, v.VFIO_CHECK_EXTENSION, v.VFIO_DMA_CC_IOMMU) == errno.ENODEV
    for req in (v.VFIO_IOMMU_MAP_DMA, v.VFIO_IOMMU_UNMAP_DMA, v.VFIO_IOMMU_GET_INFO):
        bad = bytearray(32)
        bad[0] = 1  # argsz 1
        assert errno_of(f.k.ioctl, f.fd, req, bad) == errno.EINVAL
    assert errno_of(f.k.ioctl, f.fd, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU) == errno.ENODEV


@pytest.mark.parametrize("version", [v.VFIO_TYPE1v2_IOMMU, v.VFIO_TYPE1_IOMMU])
def test_compat_map_unmap(version: int) -> None:
    """vfio_compat_mock_domain map / huge_map / option_huge_pages / get_info."""
    f = Iommufd()
    ioas = f.ioas_alloc()
    d = f.dev()
    d.attach(ioas)
    _compat(f, ioas)
    f.k.ioctl(f.fd, v.VFIO_SET_IOMMU, version)
    huge = f.option(u.IOMMU_OPTION_HUGE_PAGES, u.IOMMU_OPTION_OP_GET, ioas)
    assert huge == (0 if version == v.VFIO_TYPE1_IOMMU else 1)
    buf, _ = f.buf(2 * M2)
    mp = v.vfio_iommu_type1_dma_map(
        argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_map), flags=3, vaddr=buf, iova=BASE, size=2 * M2
    )
    f.k.ioctl(f.fd, v.VFIO_IOMMU_MAP_DMA, mp)
    un = v.vfio_iommu_type1_dma_unmap(argsz=24, flags=v.VFIO_DMA_UNMAP_FLAG_ALL, iova=BASE, size=K4)
    assert errno_of(f.k.ioctl, f.fd, v.VFIO_IOMMU_UNMAP_DMA, un) == errno.EINVAL
    # type1 (v1) can cut up mappings, v2 cannot
    un = v.vfio_iommu_type1_dma_unmap(argsz=24, flags=0, iova=BASE + M2, size=M2 // 16)
    rc = errno_of(f.k.ioctl, f.fd, v.VFIO_IOMMU_UNMAP_DMA, un)
    if version == v.VFIO_TYPE1_IOMMU:
        assert rc == 0 and un.size == M2 // 16
    else:
        assert rc == errno.ENOENT
    un = v.vfio_iommu_type1_dma_unmap(argsz=24, flags=v.VFIO_DMA_UNMAP_FLAG_ALL)
    f.k.ioctl(f.fd, v.VFIO_IOMMU_UNMAP_DMA, un)
    assert un.size == (2 * M2 - M2 // 16 if version == v.VFIO_TYPE1_IOMMU else 2 * M2)


def test_compat_get_info_caps() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    d = f.dev()
    d.attach(ioas)
    _compat(f, ioas)
    info = v.vfio_iommu_type1_info(argsz=16)  # pre-cap ABI
    f.k.ioctl(f.fd, v.VFIO_IOMMU_GET_INFO, info)
    assert info.flags == v.VFIO_IOMMU_INFO_PGSIZES | v.VFIO_IOMMU_INFO_CAPS
    assert info.iova_pgsizes & K4
    info = v.vfio_iommu_type1_info(argsz=ctypes.sizeof(v.vfio_iommu_type1_info))
    f.k.ioctl(f.fd, v.VFIO_IOMMU_GET_INFO, info)
    assert info.cap_offset == 0 and info.argsz > ctypes.sizeof(info)
    buf = bytearray(info.argsz)
    buf[0:4] = info.argsz.to_bytes(4, "little")
    f.k.ioctl(f.fd, v.VFIO_IOMMU_GET_INFO, buf)
    full = v.vfio_iommu_type1_info.from_buffer(buf)
    assert full.cap_offset == ctypes.sizeof(v.vfio_iommu_type1_info)
    ids = []
    off = full.cap_offset
    while off:
        hdr = v.vfio_info_cap_header.from_buffer(buf, off)
        ids.append(hdr.id)
        off = hdr.next
    # DMA_AVAIL and IOVA_RANGE; no migration capability: no dirty tracking via compat
    assert ids == [v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE]


def test_compat_unmap_get_dirty_bitmap_is_obsolete() -> None:
    f = Iommufd()
    ioas = f.ioas_alloc()
    _compat(f, ioas)
    buf, _ = f.buf(K4)
    mp = v.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=buf, iova=BASE, size=K4)
    f.k.ioctl(f.fd, v.VFIO_IOMMU_MAP_DMA, mp)
    un = v.vfio_iommu_type1_dma_unmap(
        argsz=24, flags=v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, iova=BASE, size=K4
    )
    assert errno_of(f.k.ioctl, f.fd, v.VFIO_IOMMU_UNMAP_DMA, un) == errno.EINVAL
    assert errno_of(f.k.ioctl, f.fd, v.VFIO_IOMMU_DIRTY_PAGES, bytearray(16)) == errno.ENOTTY


# -- the recommended unmap-with-dirty sequence (§5.9) --------------------------------------


def test_no_clear_then_unmap_loses_nothing() -> None:
    f = Iommufd(vendor="vtd")
    ioas = f.ioas_alloc()
    f.huge_pages(ioas, False)
    buf, _ = f.buf(16 * K4)
    f.map(ioas, buf, 16 * K4, BASE)
    d = f.dev()
    hwpt = f.hwpt_alloc(d.devid, ioas, DIRTY)
    d.attach(hwpt)
    f.set_dirty(hwpt, True)
    d.hw.dma_write(BASE + 3 * K4, 1)
    bm, mem = f.buf(K4)
    assert mem is not None
    f.get_dirty(hwpt, BASE, 16 * K4, K4, bm, NO_CLEAR)
    f.unmap(ioas, BASE, 16 * K4)
    assert np.flatnonzero(np.unpackbits(mem[:2], bitorder="little")).tolist() == [3]


def test_iopt_internal_spans() -> None:
    """A direct check of the interval helper the IOVA allocator and IOVA_RANGES share."""
    from vfiomig.kernel.iommufd.io_pagetable import _spans

    got = list(_spans([(10, 19), (20, 29), (40, 49), (45, 60)], 0, 100))
    assert got == [(True, 0, 9), (False, 10, 29), (True, 30, 39), (False, 40, 60), (True, 61, 100)]
