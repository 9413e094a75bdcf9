"""The vfio-pci device ioctls, features and region access of the reference and hisi_acc
devices (kernel/vfio_pci_core.py, vfio_pci_intrs.py, vfio_device_fops.py), each table in
the order the kernel function checks, named in each test."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from errno import (
    EAGAIN,
    EBADF,
    EBUSY,
    EEXIST,
    EFAULT,
    EINVAL,
    EIO,
    ENODEV,
    ENOSPC,
    ENOTTY,
    EOPNOTSUPP,
    ERANGE,
)
from typing import Any

import pytest
from conftest import GET, PROBE, SET, Dev, errno_of

from vfiomig.kernel import ModelKernel
from vfiomig.kernel.machine import DRIVERS
from vfiomig.kernel.vfio_fsm import RUNNING, STOP
from vfiomig.kernel.vfio_main import VfioDevice
from vfiomig.kernel.vfio_pci_core import VFIO_PCI_INDEX_TO_OFFSET as OFF
from vfiomig.uapi import vfio as v

R = v.VFIO_REGION_INFO_FLAG_READ
W = v.VFIO_REGION_INFO_FLAG_WRITE
MMAP = v.VFIO_REGION_INFO_FLAG_MMAP
CAPS = v.VFIO_REGION_INFO_FLAG_CAPS
EVENTFD = v.VFIO_IRQ_INFO_EVENTFD
MASKABLE = v.VFIO_IRQ_INFO_MASKABLE
AUTOMASKED = v.VFIO_IRQ_INFO_AUTOMASKED
NORESIZE = v.VFIO_IRQ_INFO_NORESIZE
NONE_ = v.VFIO_IRQ_SET_DATA_NONE
BOOL_ = v.VFIO_IRQ_SET_DATA_BOOL
EFD = v.VFIO_IRQ_SET_DATA_EVENTFD
MASK = v.VFIO_IRQ_SET_ACTION_MASK
UNMASK = v.VFIO_IRQ_SET_ACTION_UNMASK
TRIGGER = v.VFIO_IRQ_SET_ACTION_TRIGGER
INTX, MSI, MSIX, ERR, REQ = range(5)
CONFIG = v.VFIO_PCI_CONFIG_REGION_INDEX
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


@pytest.fixture
def kernel() -> ModelKernel:
    return ModelKernel()


@pytest.fixture
def plain_ref(make_dev: Callable[..., Dev]) -> Dev:
    return make_dev(migration_flags=1, dma_logging=False, state_size=4096, chunk_size=4096)


@pytest.fixture
def hisi(make_dev: Callable[..., Dev]) -> Dev:
    return make_dev("hisi_acc")


def region(d: Dev, index: int, argsz: int = 32, size: int | None = None, **kw: int) -> Any:
    """GET_REGION_INFO on a buffer of `size` bytes: (errno, struct, raw buffer)."""
    buf = bytearray(argsz if size is None else size)
    info = v.vfio_region_info(argsz=argsz, index=index, **kw)
    raw = bytes(info)
    buf[: min(len(buf), 32)] = raw[: min(len(buf), 32)]
    e = errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_GET_REGION_INFO, buf)
    out = v.vfio_region_info.from_buffer_copy(bytes(buf[:32]).ljust(32, b"\0"))
    return e, out, bytes(buf)


def irq_info(d: Dev, index: int, argsz: int = 16) -> tuple[int, int, int]:
    info = v.vfio_irq_info(argsz=argsz, index=index)
    e = errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_GET_IRQ_INFO, info)
    return e, int(info.flags), int(info.count)


def set_irqs(
    d: Dev, flags: int, index: int, start: int, count: int, data: bytes = b"", argsz: int = 0
) -> int:
    hdr = struct.pack("<IIIII", argsz or 20 + len(data), flags, index, start, count)
    return errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_SET_IRQS, bytearray(hdr + data))


def fds(*fd: int) -> bytes:
    return struct.pack(f"<{len(fd)}i", *fd)


def count_of(k: ModelKernel, efd: int) -> int:
    """Read an eventfd's count (0 when nothing was signalled)."""
    try:
        return int(U64.unpack(k.read(efd, 8))[0])
    except OSError as e:
        assert e.errno == EAGAIN
        return 0


# ---------------------------------------------------------- GET_REGION_INFO (vfio_main.c)


class _NoRegionOp(VfioDevice):
    kind = "no-region-op"


def test_region_info_framing(
    make_dev: Callable[..., Dev], plain_ref: Dev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfio_get_region_info: no op EINVAL (before reading anything), EFAULT when the 32-byte
    struct cannot be copied, argsz < 32 EINVAL, then the driver's op."""
    monkeypatch.setitem(DRIVERS, "no-region-op", _NoRegionOp)
    assert region(make_dev("no-region-op"), 0, size=0)[0] == EINVAL
    assert region(plain_ref, 0, size=31)[0] == EFAULT
    assert region(plain_ref, 0, argsz=31, size=32)[0] == EINVAL
    assert errno_of(plain_ref.k.ioctl, plain_ref.fd, v.VFIO_DEVICE_GET_REGION_INFO, 0) == EFAULT


# (index, size, flags) of vfio_pci_ioctl_get_region_info for the reference function
REF_REGIONS = [
    (0, 1 << 20, R | W | MMAP | CAPS),  # BAR0: the MSI-X BAR carries MSIX_MAPPABLE
    (1, 0, 0),  # the upper half of 64-bit BAR0: absent
    (2, 16 << 10, R | W | MMAP),
    (3, 0, 0),
    (4, 256, R | W),  # an I/O BAR: no mmap
    (5, 0, 0),
    (6, 0, 0),  # ROM: offset only
    (7, 4096, R | W),  # PCIe config space
]
HISI_REGIONS = [
    (0, 0, 0),
    (1, 0, 0),
    (2, 0x8000, R | W | MMAP),  # hisi_acc_vfio_ioctl_get_region: half of the 64 KiB BAR2
    (3, 0, 0),
    (4, 0, 0),
    (5, 0, 0),
    (6, 0, 0),
    (7, 4096, R | W),
]


@pytest.mark.parametrize("kind,table", [("reference", REF_REGIONS), ("hisi_acc", HISI_REGIONS)])
def test_region_info_per_index(make_dev: Callable[..., Dev], kind: str, table: list[Any]) -> None:
    d = make_dev(kind)
    for index, size, flags in table:
        e, info, _ = region(d, index, cap_offset=0x77)
        assert e == 0, index
        assert (info.size, info.flags, info.offset) == (size, flags, OFF(index)), index
        if not flags & CAPS:
            assert info.cap_offset == 0x77  # copied in, never written: echoed back
            assert info.argsz == 32
    # VGA: !vdev->has_vga; past VFIO_PCI_NUM_REGIONS: no device-specific regions
    for index in (8, 9, 0xFFFFFFFF):
        assert region(d, index)[0] == EINVAL


def test_region_info_hisi_without_pf_driver_shows_all_of_bar2(
    make_dev: Callable[..., Dev],
) -> None:
    d = make_dev("hisi_acc", pf_driver=False)  # plain vfio-pci ops
    assert region(d, 2)[1].size == 0x10000


def test_region_info_capability_chain_and_argsz_growth(plain_ref: Dev) -> None:
    """vfio_get_region_info: with caps, CAPS is set; argsz too small -> argsz = 32 + caps,
    cap_offset 0, nothing after the struct written; enough -> chain at offset 32."""
    e, info, raw = region(plain_ref, 0, argsz=32, size=48)
    assert e == 0 and info.flags & CAPS and info.argsz == 40 and info.cap_offset == 0
    assert raw[32:] == bytes(16)
    e, info, raw = region(plain_ref, 0, argsz=40)
    assert e == 0 and info.argsz == 40 and info.cap_offset == 32
    cap_id, version, nxt = struct.unpack_from("<HHI", raw, 32)
    assert (cap_id, version, nxt) == (v.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
    # argsz claims room the buffer does not have: the chain's copy faults
    assert region(plain_ref, 0, argsz=40, size=32)[0] == EFAULT


# ------------------------------------------------------ GET_IRQ_INFO (vfio_pci_core.c)


@pytest.mark.parametrize(
    "kind,iommu,want",
    [
        # reference: INTx pin A, 1 MSI, 64 MSI-X; arm64 ITS has no dynamic MSI-X
        ("reference", "smmuv3", [(1, EVENTFD | MASKABLE | AUTOMASKED)]
         + [(1, EVENTFD | NORESIZE), (64, EVENTFD | NORESIZE), (1, EVENTFD | NORESIZE),
            (1, EVENTFD | NORESIZE)]),
        # x86: pci_msix_can_alloc_dyn, so MSI-X is resizable
        ("reference", "vtd", [(1, EVENTFD | MASKABLE | AUTOMASKED), (1, EVENTFD | NORESIZE),
                              (64, EVENTFD), (1, EVENTFD | NORESIZE), (1, EVENTFD | NORESIZE)]),
        # hisi VF: no INTx (count 0), 4 MSI, no MSI-X (count 0)
        ("hisi_acc", "smmuv3", [(0, EVENTFD | MASKABLE | AUTOMASKED), (4, EVENTFD | NORESIZE),
                                (0, EVENTFD | NORESIZE), (1, EVENTFD | NORESIZE),
                                (1, EVENTFD | NORESIZE)]),
    ],
)  # fmt: skip
def test_irq_info(kind: str, iommu: str, want: list[tuple[int, int]]) -> None:
    """vfio_pci_ioctl_get_irq_info + vfio_pci_get_irq_count."""
    d = Dev(ModelKernel(iommu=iommu), kind)
    for index, (count, flags) in enumerate(want):
        assert irq_info(d, index) == (0, flags, count), index


def test_irq_info_errors(plain_ref: Dev) -> None:
    assert errno_of(plain_ref.k.ioctl, plain_ref.fd, v.VFIO_DEVICE_GET_IRQ_INFO,
                    bytearray(15)) == EFAULT  # fmt: skip
    assert irq_info(plain_ref, 0, argsz=15)[0] == EINVAL
    assert irq_info(plain_ref, 5)[0] == EINVAL  # index >= VFIO_PCI_NUM_IRQS


# ------------------------------------- SET_IRQS validation (vfio_set_irqs_validate_and_prepare)


@pytest.mark.parametrize(
    "flags,index,start,count,data,argsz,want",
    [
        (NONE_ | TRIGGER, INTX, 0, 1, b"", 19, EINVAL),  # argsz < minsz
        (NONE_ | TRIGGER, 5, 0, 0, b"", 0, EINVAL),  # index >= max_irq_type
        (NONE_ | TRIGGER, MSIX, 1, 0xFFFFFFFE, b"", 0, EINVAL),  # count >= U32_MAX - start
        (NONE_ | TRIGGER | 1 << 6, MSIX, 0, 1, b"", 0, EINVAL),  # unknown flag bit
        (NONE_ | TRIGGER, MSIX, 64, 0, b"", 0, EINVAL),  # start >= num_irqs (64)
        (NONE_ | TRIGGER, MSIX, 60, 5, b"", 0, EINVAL),  # start + count > num_irqs
        (TRIGGER, MSIX, 0, 1, b"", 0, EINVAL),  # no data type
        (NONE_ | BOOL_ | TRIGGER, MSIX, 0, 1, b"\1", 0, EINVAL),  # two data types
        (BOOL_ | TRIGGER, MSIX, 0, 2, b"\1", 0, EINVAL),  # argsz - minsz < count * 1
        (EFD | TRIGGER, MSIX, 0, 2, fds(-1), 0, EINVAL),  # argsz - minsz < count * 4
        # validation passed: vfio_pci_set_irqs_ioctl's switch
        (NONE_, MSIX, 0, 1, b"", 0, ENOTTY),  # no action
        (NONE_ | MASK | UNMASK, INTX, 0, 1, b"", 0, ENOTTY),  # two actions
        (NONE_ | MASK, MSI, 0, 1, b"", 0, ENOTTY),  # "Need masking support exported"
        (NONE_ | UNMASK, MSIX, 0, 1, b"", 0, ENOTTY),
        (NONE_ | MASK, ERR, 0, 1, b"", 0, ENOTTY),
        (NONE_ | UNMASK, REQ, 0, 1, b"", 0, ENOTTY),
    ],
)
def test_set_irqs_validation(
    plain_ref: Dev, flags: int, index: int, start: int, count: int, data: bytes, argsz: int,
    want: int,
) -> None:  # fmt: skip
    assert set_irqs(plain_ref, flags, index, start, count, data, argsz) == want


def test_set_irqs_copies(plain_ref: Dev) -> None:
    """The 20-byte header copy (EFAULT), then memdup_user of the data (EFAULT)."""
    k = plain_ref.k
    assert errno_of(k.ioctl, plain_ref.fd, v.VFIO_DEVICE_SET_IRQS, bytearray(19)) == EFAULT
    hdr = struct.pack("<IIIII", 28, EFD | TRIGGER, MSIX, 0, 2)
    assert errno_of(k.ioctl, plain_ref.fd, v.VFIO_DEVICE_SET_IRQS, bytearray(hdr + b"\0" * 7)) \
        == EFAULT  # fmt: skip


def test_set_irqs_hisi_vf_has_no_intx(hisi: Dev) -> None:
    # vfio_pci_get_irq_count(INTX) = 0 for a VF: start >= num_irqs
    assert set_irqs(hisi, NONE_ | TRIGGER, INTX, 0, 0) == EINVAL
    assert set_irqs(hisi, NONE_ | TRIGGER, MSIX, 0, 0) == EINVAL  # no MSI-X either


# --------------------------------------------------------- INTx (vfio_pci_intrs.c)


def test_intx_trigger_loopback_mask_unmask(plain_ref: Dev) -> None:
    d, k = plain_ref, plain_ref.k
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 1) == EINVAL  # not enabled: !is_intx
    assert set_irqs(d, NONE_ | MASK, INTX, 0, 1) == EINVAL  # vfio_pci_set_intx_mask: !is_intx
    efd = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, INTX, 0, 1, fds(efd)) == 0  # vfio_intx_enable
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 1) == 0  # loopback
    assert set_irqs(d, BOOL_ | TRIGGER, INTX, 0, 1, b"\0") == 0  # false: nothing
    assert count_of(k, efd) == 1
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, fds(efd)) == EINVAL  # INTx in use
    assert set_irqs(d, EFD | MASK, INTX, 0, 1, fds(efd)) == ENOTTY  # "XXX implement me"
    assert set_irqs(d, NONE_ | MASK, INTX, 0, 2) == EINVAL  # start + count > 1 (validate)
    # the device asserts INTx: signalled and auto-masked; while masked it stays pending
    vdev = d.vdev
    from vfiomig.kernel.vfio_pci_intrs import vfio_pci_raise_intx

    vfio_pci_raise_intx(vdev)
    vfio_pci_raise_intx(vdev)
    assert count_of(k, efd) == 1 and vdev.irqs.intx.masked
    assert set_irqs(d, NONE_ | UNMASK, INTX, 0, 1) == 0  # pending: re-sent, stays masked
    assert count_of(k, efd) == 1 and vdev.irqs.intx.masked
    assert set_irqs(d, BOOL_ | UNMASK, INTX, 0, 1, b"\1") == 0
    assert not vdev.irqs.intx.masked
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 0) == 0  # count 0: vfio_intx_disable
    assert vdev.irqs.irq_type == 5


def test_intx_unmask_eventfd_is_a_virqfd(plain_ref: Dev) -> None:
    """vfio_pci_set_intx_unmask with DATA_EVENTFD: vfio_virqfd_enable (EBADF, EINVAL for a
    non-eventfd, EBUSY for a second one); a write to it unmasks; closing it drops it."""
    d, k = plain_ref, plain_ref.k
    trig, unmask = k.eventfd(0), k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, INTX, 0, 1, fds(trig)) == 0
    assert set_irqs(d, EFD | UNMASK, INTX, 0, 1, fds(99)) == EBADF
    assert set_irqs(d, EFD | UNMASK, INTX, 0, 1, fds(d.fd)) == EINVAL  # not an eventfd
    assert set_irqs(d, EFD | UNMASK, INTX, 0, 1, fds(unmask)) == 0
    assert set_irqs(d, EFD | UNMASK, INTX, 0, 1, fds(unmask)) == EBUSY
    assert set_irqs(d, NONE_ | MASK, INTX, 0, 1) == 0
    k.write(unmask, U64.pack(1))  # virqfd_wakeup: reads the count, runs the unmask handler
    assert not d.vdev.irqs.intx.masked and count_of(k, unmask) == 0
    k.close(unmask)  # EPOLLHUP: the slot is free again
    assert d.vdev.irqs.intx.unmask.virqfd is None
    assert set_irqs(d, EFD | UNMASK, INTX, 0, 1, fds(trig)) == 0
    assert set_irqs(d, EFD | UNMASK, INTX, 0, 1, fds(-1)) == 0  # fd < 0: disable


def test_intx_disable_via_config_command(plain_ref: Dev) -> None:
    """vfio_basic_config_write: the virtual INTx disable bit masks INTx and suppresses the
    eventfd (virq_disabled)."""
    d, k = plain_ref, plain_ref.k
    efd = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, INTX, 0, 1, fds(efd)) == 0
    cmd = struct.unpack("<H", k.pread(d.fd, 2, OFF(CONFIG) + 4))[0]
    k.pwrite(d.fd, struct.pack("<H", cmd | 0x400), OFF(CONFIG) + 4)
    assert d.vdev.irqs.virq_disabled and d.vdev.irqs.intx.masked
    assert set_irqs(d, NONE_ | TRIGGER, INTX, 0, 1) == 0
    assert count_of(k, efd) == 0
    k.pwrite(d.fd, struct.pack("<H", cmd), OFF(CONFIG) + 4)
    assert not d.vdev.irqs.virq_disabled and not d.vdev.irqs.intx.masked


# ---------------------------------------------------------- MSI / MSI-X


def test_msix_enable_loopback_disable(plain_ref: Dev) -> None:
    d, k = plain_ref, plain_ref.k
    a, b = k.eventfd(0), k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, MSIX, 0, 3, fds(a, -1, b)) == 0  # 3 vectors, 2 fds
    assert set_irqs(d, BOOL_ | TRIGGER, MSIX, 0, 3, b"\1\1\0") == 0
    assert (count_of(k, a), count_of(k, b)) == (1, 0)
    assert set_irqs(d, NONE_ | TRIGGER, MSIX, 2, 1) == 0
    assert count_of(k, b) == 1
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, fds(a)) == EINVAL  # MSI-X in use
    assert set_irqs(d, EFD | TRIGGER, INTX, 0, 1, fds(a)) == EINVAL
    from vfiomig.kernel.vfio_pci_intrs import vfio_pci_raise_msi

    vfio_pci_raise_msi(d.vdev, 0)  # vfio_msihandler
    assert count_of(k, a) == 1
    # a vector past the 3 allocated: no dynamic MSI-X on arm64 (pci_irq_vector -EINVAL)
    assert set_irqs(d, EFD | TRIGGER, MSIX, 5, 1, fds(a)) == EINVAL
    assert set_irqs(d, NONE_ | TRIGGER, MSIX, 0, 0) == 0  # vfio_msi_disable
    assert set_irqs(d, NONE_ | TRIGGER, MSIX, 0, 1) == EINVAL  # !irq_is(vdev, index)


def test_msix_dynamic_allocation_on_x86() -> None:
    d = Dev(ModelKernel(iommu="vtd"), "reference")
    a = d.k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, MSIX, 0, 1, fds(a)) == 0
    assert set_irqs(d, EFD | TRIGGER, MSIX, 40, 1, fds(a)) == 0  # pci_msix_alloc_irq_at
    assert 40 in d.vdev.irqs.dyn


def test_msi_enable_quirks(plain_ref: Dev) -> None:
    d, k = plain_ref, plain_ref.k
    # start + count = 0 vectors: pci_alloc_irq_vectors(pdev, 1, 0) is -ERANGE
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 0) == ERANGE
    # a bad fd undoes the enable (vfio_msi_set_block unwinds, vfio_msi_disable)
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, fds(77)) == EBADF
    assert d.vdev.irqs.irq_type == 5
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, fds(d.fd)) == EINVAL
    a = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, fds(a)) == 0
    assert set_irqs(d, EFD | TRIGGER, MSI, 0, 1, fds(-1)) == 0  # de-assign, MSI stays
    assert d.vdev.irqs.irq_type == MSI and not d.vdev.irqs.msi


@pytest.mark.parametrize("index", [ERR, REQ])
def test_err_req_single_trigger(plain_ref: Dev, index: int) -> None:
    """vfio_pci_set_{err,req}_trigger -> vfio_pci_set_ctx_trigger_single."""
    d, k = plain_ref, plain_ref.k
    a = k.eventfd(0)
    assert set_irqs(d, NONE_ | TRIGGER, index, 0, 1) == EINVAL  # DATA_NONE, no trigger yet
    assert set_irqs(d, BOOL_ | TRIGGER, index, 0, 1, b"\1") == 0  # no trigger: nothing
    assert set_irqs(d, EFD | TRIGGER, index, 0, 1, fds(-2)) == EINVAL  # fd < -1
    assert set_irqs(d, EFD | TRIGGER, index, 0, 1, fds(a)) == 0
    assert set_irqs(d, NONE_ | TRIGGER, index, 0, 1) == 0  # loopback
    assert set_irqs(d, BOOL_ | TRIGGER, index, 0, 1, b"\1") == 0
    assert count_of(k, a) == 2
    assert set_irqs(d, EFD | TRIGGER, index, 0, 0) == EINVAL  # EVENTFD with count 0
    assert set_irqs(d, NONE_ | TRIGGER, index, 0, 0) == 0  # count 0 removes it
    assert set_irqs(d, NONE_ | TRIGGER, index, 0, 1) == EINVAL


def test_close_tears_interrupts_down(plain_ref: Dev) -> None:
    """vfio_pci_core_close_device: irqs, ioeventfds, err/req triggers released."""
    d, k = plain_ref, plain_ref.k
    a = k.eventfd(0)
    assert set_irqs(d, EFD | TRIGGER, MSIX, 0, 1, fds(a)) == 0
    assert set_irqs(d, EFD | TRIGGER, ERR, 0, 1, fds(a)) == 0
    d.close()
    d.reopen()
    s = d.vdev.irqs
    assert s.irq_type == 5 and not s.msi and s.err_trigger is None


# ------------------------------------------ hot reset (vfio_pci_ioctl_*_pci_hot_reset*)


def hot_reset_info(d: Dev, argsz: int, size: int | None = None) -> tuple[int, bytes]:
    buf = bytearray(argsz if size is None else size)
    if len(buf) >= 4:
        U32.pack_into(buf, 0, argsz)
    e = errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
    return e, bytes(buf)


def test_hot_reset_info_cdev(plain_ref: Dev) -> None:
    d = plain_ref
    assert hot_reset_info(d, 12, size=11)[0] == EFAULT
    assert hot_reset_info(d, 11, size=12)[0] == EINVAL
    e, raw = hot_reset_info(d, 12)  # no room for the one device: count written, ENOSPC
    flags = v.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | v.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    assert e == ENOSPC and struct.unpack("<III", raw) == (12, flags, 1)
    e, raw = hot_reset_info(d, 20)
    assert e == 0 and struct.unpack_from("<III", raw) == (20, flags, 1)
    dep = v.vfio_pci_dependent_device.from_buffer_copy(raw[12:])
    assert (dep.devid, dep.segment, dep.bus, dep.devfn) == (d.devid, 0, d.vdev.pci.bus, 0)


def test_hot_reset_info_group_path(kernel: ModelKernel) -> None:
    k = kernel
    path = k.add_device("reference")
    container = k.open("/dev/vfio/vfio")
    group = k.open(k.group_of(path))
    k.ioctl(group, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container))
    k.ioctl(container, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    dfd = k.ioctl(group, v.VFIO_GROUP_GET_DEVICE_FD, bytearray(b"vfio0\0"))
    buf = bytearray(20)
    U32.pack_into(buf, 0, 20)
    assert k.ioctl(dfd, v.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf) == 0
    assert struct.unpack("<IIIIHBB", buf)[1:4] == (0, 1, 0)  # flags 0, group_id 0
    reset = bytearray(struct.pack("<IIIi", 16, 0, 1, group))
    assert k.ioctl(dfd, v.VFIO_DEVICE_PCI_HOT_RESET, reset) == 0
    zero = bytearray(struct.pack("<III", 12, 0, 0))
    assert errno_of(k.ioctl, dfd, v.VFIO_DEVICE_PCI_HOT_RESET, zero) == EINVAL  # group: count > 0
    for fd, want in ((99, EBADF), (container, EINVAL)):
        bad = bytearray(struct.pack("<IIIi", 16, 0, 1, fd))
        assert errno_of(k.ioctl, dfd, v.VFIO_DEVICE_PCI_HOT_RESET, bad) == want
    two = bytearray(struct.pack("<IIIii", 20, 0, 2, group, group))
    assert errno_of(k.ioctl, dfd, v.VFIO_DEVICE_PCI_HOT_RESET, two) == EINVAL  # > 1 device
    short = bytearray(struct.pack("<III", 16, 0, 1))
    assert errno_of(k.ioctl, dfd, v.VFIO_DEVICE_PCI_HOT_RESET, short) == EFAULT  # group_fds
    # a group that does not own the device: vfio_pci_dev_set_hot_reset EINVAL
    other = k.open(k.group_of(k.add_device("reference")))
    foreign = bytearray(struct.pack("<IIIi", 16, 0, 1, other))
    assert errno_of(k.ioctl, dfd, v.VFIO_DEVICE_PCI_HOT_RESET, foreign) == EINVAL


@pytest.mark.parametrize(
    "hdr,want",
    [
        (struct.pack("<II", 12, 0), EFAULT),  # 12 bytes cannot be copied
        (struct.pack("<III", 11, 0, 0), EINVAL),  # argsz < minsz
        (struct.pack("<III", 12, 1, 0), EINVAL),  # flags
        (struct.pack("<IIIi", 16, 0, 1, 3), EINVAL),  # a cdev-opened device takes count 0
        (struct.pack("<III", 12, 0, 0), 0),  # owned through the iommufd: reset
    ],
)
def test_hot_reset_cdev(plain_ref: Dev, hdr: bytes, want: int) -> None:
    d = plain_ref
    assert errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_PCI_HOT_RESET, bytearray(hdr)) == want


def test_hot_reset_resets_the_function(ref: Dev) -> None:
    """pci_reset_bus reaches the function and its driver's reset_done: RUNNING, fds off."""
    ref.set_state(STOP)
    assert ref.k.ioctl(ref.fd, v.VFIO_DEVICE_PCI_HOT_RESET, bytearray(struct.pack("<III", 12, 0, 0))) == 0  # fmt: skip
    assert ref.get_state() == RUNNING


def test_hot_reset_hisi_integrated_endpoint_is_enodev(hisi: Dev) -> None:
    """A root-bus integrated endpoint: pci_probe_reset_slot and _bus fail -> ENODEV, after
    the header checks and before anything is written back."""
    assert hot_reset_info(hisi, 11, size=12)[0] == EINVAL
    e, raw = hot_reset_info(hisi, 20)
    assert e == ENODEV and raw == U32.pack(20) + bytes(16)
    reset = bytearray(struct.pack("<III", 12, 0, 0))
    assert errno_of(hisi.k.ioctl, hisi.fd, v.VFIO_DEVICE_PCI_HOT_RESET, reset) == ENODEV
    reset = bytearray(struct.pack("<III", 12, 0, 1))
    assert errno_of(hisi.k.ioctl, hisi.fd, v.VFIO_DEVICE_PCI_HOT_RESET, reset) == EINVAL


# ---------------------------------------------------- IOEVENTFD (vfio_pci_ioeventfd)


def ioeventfd(d: Dev, offset: int, data: int, size: int, fd: int, argsz: int = 32,
              flags: int | None = None) -> int:  # fmt: skip
    arg = v.vfio_device_ioeventfd(
        argsz=argsz, flags=size if flags is None else flags, offset=offset, data=data, fd=fd
    )
    return errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_IOEVENTFD, arg)


@pytest.mark.parametrize(
    "offset,size,fd,argsz,flags,want",
    [
        (OFF(2), 4, -1, 27, None, EINVAL),  # argsz < offsetofend(fd)
        (OFF(2), 4, -1, 32, 0x14, EINVAL),  # flags outside the size mask
        (OFF(2), 4, -1, 32, 3, EINVAL),  # two sizes (hweight8 != 1)
        (OFF(2), 4, -1, 32, 0, EINVAL),  # no size
        (OFF(2), 4, -2, 32, None, EINVAL),  # fd < -1
        (OFF(6), 4, -1, 32, None, EINVAL),  # not a BAR
        (OFF(1), 4, -1, 32, None, EINVAL),  # an absent BAR (length 0)
        (OFF(2) + (16 << 10) - 2, 4, -1, 32, None, EINVAL),  # past the BAR's end
        (OFF(0) + 0x2000, 4, -1, 32, None, EINVAL),  # inside the MSI-X table
        (OFF(0) + 0x1FFE, 4, -1, 32, None, EINVAL),  # overlapping it
        (1 << 63, 4, -1, 32, None, EINVAL),  # negative loff_t (see the model's WARN)
        (OFF(2), 4, -1, 32, None, ENODEV),  # fd -1 and no such ioeventfd
        (OFF(2), 4, 99, 32, None, EBADF),  # vfio_virqfd_enable
    ],
)
def test_ioeventfd_checks(
    plain_ref: Dev, offset: int, size: int, fd: int, argsz: int, flags: int | None, want: int
) -> None:
    assert ioeventfd(plain_ref, offset, 0, size, fd, argsz, flags) == want


def test_ioeventfd_writes_the_bar_on_signal(plain_ref: Dev) -> None:
    d, k = plain_ref, plain_ref.k
    efd = k.eventfd(0)
    assert ioeventfd(d, OFF(2) + 0x10, 0x1122334455667788, 8, efd) == 0
    assert ioeventfd(d, OFF(2) + 0x10, 0x1122334455667788, 8, efd) == EEXIST
    assert ioeventfd(d, OFF(2) + 0x10, 0xAB, 1, efd) == 0  # another count: another entry
    k.write(efd, U64.pack(1))  # both virqfds see it; the second entry wins the byte
    assert k.pread(d.fd, 8, OFF(2) + 0x10) == bytes.fromhex("ab77665544332211")
    assert ioeventfd(d, OFF(2) + 0x10, 0x1122334455667788, 8, -1) == 0  # removed
    assert ioeventfd(d, OFF(2) + 0x10, 0x1122334455667788, 8, -1) == ENODEV


def test_ioeventfd_limit(plain_ref: Dev) -> None:
    d = plain_ref
    efd = d.k.eventfd(0)
    for i in range(1000):
        assert ioeventfd(d, OFF(2) + (i % 4096) * 4, i, 4, efd) == 0
    assert ioeventfd(d, OFF(2), 5000, 4, efd) == ENOSPC  # VFIO_PCI_IOEVENTFD_MAX


def test_ioeventfd_reaches_hisi_hidden_half(hisi: Dev) -> None:
    """hisi_acc overrides region info, read, write and mmap but not IOEVENTFD, whose check
    is against the whole BAR: an ioeventfd writes the hidden migration half (EQC)."""
    k = hisi.k
    efd = k.eventfd(0)
    assert errno_of(k.pread, hisi.fd, 4, OFF(2) + 0x8000) == EINVAL
    assert ioeventfd(hisi, OFF(2) + 0x8000, 0xDEAD, 4, efd) == 0
    k.write(efd, U64.pack(1))
    assert hisi.hw.readl(0x8000) == 0xDEAD


# -------------------------------------------- features (vfio_pci_core_ioctl_feature)

LP_ENTRY = v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY
LP_WAKEUP = v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
LP_EXIT = v.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT


def feat(d: Dev, flags: int, payload: Any = b"") -> int:
    return errno_of(d.k.ioctl, d.fd, v.VFIO_DEVICE_FEATURE, v.feature_buffer(flags, payload))


@pytest.mark.parametrize("kind", ["reference", "hisi_acc"])
def test_feature_low_power(make_dev: Callable[..., Dev], kind: str) -> None:
    """vfio_pci_core_pm_entry / _exit: SET only, minsz 0; a second entry EINVAL."""
    d = make_dev(kind)
    assert feat(d, GET | LP_ENTRY) == EINVAL  # vfio_check_feature: GET unsupported
    assert feat(d, SET | PROBE | LP_ENTRY) == 0
    assert feat(d, SET | LP_ENTRY) == 0
    assert d.vdev.pm_runtime_engaged
    assert feat(d, SET | LP_ENTRY) == EINVAL  # already engaged
    assert feat(d, SET | LP_EXIT) == 0
    assert feat(d, SET | LP_EXIT) == 0  # exit when not engaged: fine
    assert not d.vdev.pm_runtime_engaged


def test_feature_low_power_with_wakeup(plain_ref: Dev) -> None:
    """vfio_pci_core_pm_entry_with_wakeup: minsz 8, wakeup_eventfd < 0 EINVAL, the fd
    EBADF / EINVAL; the next ioctl resumes the device: the eventfd is signalled and low
    power is left (vfio_pci_core_runtime_resume)."""
    d, k = plain_ref, plain_ref.k
    assert feat(d, SET | LP_WAKEUP, 4) == EINVAL
    assert feat(d, SET | LP_WAKEUP, struct.pack("<iI", -1, 0)) == EINVAL
    assert feat(d, SET | LP_WAKEUP, struct.pack("<iI", 99, 0)) == EBADF
    assert feat(d, SET | LP_WAKEUP, struct.pack("<iI", d.fd, 0)) == EINVAL
    efd = k.eventfd(0)
    assert feat(d, SET | LP_WAKEUP, struct.pack("<iI", efd, 0)) == 0
    assert d.vdev.pm_runtime_engaged and count_of(k, efd) == 0
    assert irq_info(d, 0)[0] == 0  # any ioctl resumes: woken
    assert count_of(k, efd) == 1 and not d.vdev.pm_runtime_engaged


@pytest.mark.parametrize("kind", ["reference", "hisi_acc"])
def test_feature_vf_token_and_dma_buf(make_dev: Callable[..., Dev], kind: str) -> None:
    d = make_dev(kind)
    tok = v.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
    # vfio_pci_core_feature_token: no vf_token (no SR-IOV PF): ENOTTY even for PROBE
    assert feat(d, SET | tok, bytes(16)) == ENOTTY
    assert feat(d, SET | PROBE | tok) == ENOTTY
    dmabuf = v.VFIO_DEVICE_FEATURE_DMA_BUF
    # vfio_pci_core_feature_dma_buf: variant drivers have no pci_ops: EOPNOTSUPP first
    assert feat(d, GET | PROBE | dmabuf) == EOPNOTSUPP
    assert feat(d, SET | dmabuf, 16) == EOPNOTSUPP


# ------------------------------------------------- read / write (vfio_pci_rw and below)


def test_rw_offsets(plain_ref: Dev) -> None:
    d, k = plain_ref, plain_ref.k
    assert k.pread(d.fd, 0, OFF(99)) == b""  # vfio_pci_core_read: count 0 first
    assert errno_of(k.pread, d.fd, 4, OFF(9)) == EINVAL  # index >= NUM_REGIONS
    assert errno_of(k.pread, d.fd, 4, OFF(8)) == EINVAL  # VGA
    assert errno_of(k.pread, d.fd, 4, OFF(6)) == EINVAL  # ROM: none
    assert errno_of(k.pwrite, d.fd, b"x", OFF(6)) == EINVAL  # ROM write
    assert errno_of(k.pread, d.fd, 4, OFF(1)) == EINVAL  # absent BAR
    assert errno_of(k.pread, d.fd, 4, OFF(2) + (16 << 10)) == EINVAL  # pos >= end
    assert len(k.pread(d.fd, 64, OFF(2) + (16 << 10) - 8)) == 8  # clamped to the end
    assert errno_of(k.pread, d.fd, 4, -1) == EINVAL  # ksys_pread64


def test_rw_config_space(plain_ref: Dev) -> None:
    """vfio_pci_config_rw: the whole access must fit cfg_size (EFAULT); the model's
    writable fields only."""
    d, k = plain_ref, plain_ref.k
    cfg = OFF(CONFIG)
    head = k.pread(d.fd, 64, cfg)
    assert struct.unpack_from("<HH", head) == (0x1B36, 0x11FF)
    assert errno_of(k.pread, d.fd, 8, cfg + 4092) == EFAULT
    assert errno_of(k.pread, d.fd, 1, cfg + 4096) == EFAULT
    assert len(k.pread(d.fd, 4, cfg + 4092)) == 4
    k.pwrite(d.fd, b"\xff\xff\xff\xff", cfg + 0x10)  # BAR0 sizing
    assert U32.unpack(k.pread(d.fd, 4, cfg + 0x10))[0] == 0xFFF00004  # 1 MiB, 64-bit
    k.pwrite(d.fd, b"\x12\x34", cfg + 0)  # vendor id: read-only
    assert k.pread(d.fd, 2, cfg) == head[:2]
    k.pwrite(d.fd, b"\x0b", cfg + 0x3C)  # interrupt line
    assert k.pread(d.fd, 1, cfg + 0x3C) == b"\x0b"


def test_rw_bar_msix_table_and_memory_enable(plain_ref: Dev) -> None:
    d, k = plain_ref, plain_ref.k
    k.pwrite(d.fd, b"abcdefgh", OFF(0) + 0x1FFC)  # the last 4 bytes land in the table
    assert k.pread(d.fd, 8, OFF(0) + 0x1FFC) == b"abcd" + b"\xff" * 4
    cfg = OFF(CONFIG)
    cmd = struct.unpack("<H", k.pread(d.fd, 2, cfg + 4))[0]
    k.pwrite(d.fd, struct.pack("<H", cmd & ~0x2), cfg + 4)  # memory decode off
    assert errno_of(k.pread, d.fd, 4, OFF(0)) == EIO
    assert k.pread(d.fd, 4, OFF(4)) == bytes(4)  # an I/O BAR is not memory: no EIO


def test_rw_file_position(plain_ref: Dev) -> None:
    """read()/write() use and advance f_pos (on success only); lseek is ESPIPE."""
    d, k = plain_ref, plain_ref.k
    k.write(d.fd, b"0123")
    assert k.read(d.fd, 4) == bytes(4)  # f_pos moved to 4
    assert k.pread(d.fd, 4, OFF(0)) == b"0123"
    assert errno_of(k.lseek, d.fd, 0, 0) == 29  # ESPIPE


def test_rw_hisi_bar2(hisi: Dev) -> None:
    """hisi_acc_pci_rw_access_check: EINVAL at or past the half, counts clamped to it; the
    functional half reaches the QM registers."""
    k, fd = hisi.k, hisi.fd
    assert errno_of(k.pread, fd, 4, OFF(2) + 0x8000) == EINVAL
    assert errno_of(k.pread, fd, 0, OFF(2) + 0x8000) == EINVAL  # before count 0
    assert len(k.pread(fd, 64, OFF(2) + 0x7FF8)) == 8
    k.pwrite(fd, U32.pack(0x5A), OFF(2) + 0x34)  # QM_PAGE_SIZE
    assert hisi.hw.readl(0x34) == 0x5A
    assert U32.unpack(k.pread(fd, 4, OFF(2) + 0x34))[0] == 0x5A
    # a VF has no memory enable bit: clearing it changes nothing
    k.pwrite(fd, b"\0\0", OFF(CONFIG) + 4)
    assert len(k.pread(fd, 4, OFF(2))) == 4


# ------------------------------------------------------------ mmap (vfio_pci_core_mmap)


def test_mmap(plain_ref: Dev, hisi: Dev) -> None:
    k = plain_ref.k
    d = plain_ref
    assert errno_of(lambda: k.mmap(4096, fd=d.fd, offset=OFF(9))) == EINVAL
    assert errno_of(lambda: k.mmap(4096, fd=d.fd, offset=OFF(CONFIG))) == EINVAL
    assert errno_of(lambda: k.mmap(4096, fd=d.fd, offset=OFF(4))) == EINVAL  # I/O BAR
    assert errno_of(lambda: k.mmap(4096, fd=d.fd, offset=OFF(1))) == EINVAL  # absent
    assert errno_of(lambda: k.mmap(8192, fd=d.fd, offset=OFF(2) + 0x3000)) == EINVAL
    addr, mem = k.mmap(4096, fd=d.fd, offset=OFF(2) + 0x3000)
    assert mem is not None
    mem[:4] = list(b"wxyz")  # a plain-memory BAR maps its bytes
    assert k.pread(d.fd, 4, OFF(2) + 0x3000) == b"wxyz"
    # hisi_acc_vfio_pci_mmap: only the functional half of BAR2; a register BAR maps no
    # bytes the model can reach
    assert errno_of(lambda: k.mmap(0x9000, fd=hisi.fd, offset=OFF(2))) == EINVAL
    _, regs = k.mmap(0x8000, fd=hisi.fd, offset=OFF(2))
    assert regs is None
    unbound = k.open(d.path)
    assert errno_of(lambda: k.mmap(4096, fd=unbound, offset=OFF(2))) == EINVAL  # no access
