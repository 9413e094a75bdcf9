"""The model's memfd (kernel/memfd.py): memfd_create, ftruncate, mmap of it, read / write /
lseek, each failure with Linux's errno in Linux's order (mm/memfd.c memfd_create,
fs/open.c do_sys_ftruncate, arch sys_mmap + mm/mmap.c do_mmap, mm/shmem.c)."""

from __future__ import annotations

import errno as E
import os

import numpy as np
import pytest
from test_iommufd_util import K4, M2, errno_of

from vfiomig.hw.memory import KERNEL_BASE, TASK_SIZE_MAX
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.memfd import (
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_EXEC,
    MFD_HUGETLB,
    MFD_NOEXEC_SEAL,
)


@pytest.fixture
def k() -> ModelKernel:
    return ModelKernel()


# -- memfd_create: sanitize_flags, then alloc_name, then the file (mm/memfd.c) ---------------


@pytest.mark.parametrize(
    "name,flags,want",
    [
        ("ram", 0, 0),
        ("ram", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL, 0),
        ("ram", MFD_EXEC, 0),
        ("ram", 0x20, E.EINVAL),  # sanitize_flags: unknown flag
        ("ram", 1 << 26, E.EINVAL),  # a huge page size without MFD_HUGETLB
        ("ram", MFD_EXEC | MFD_NOEXEC_SEAL, E.EINVAL),  # sanitize_flags: both
        ("x" * 249, 0, 0),  # MFD_NAME_MAX_LEN = NAME_MAX - strlen("memfd:")
        ("x" * 250, 0, E.EINVAL),  # alloc_name: too long
        ("x" * 250, 0x20, E.EINVAL),
        (None, 0, E.EFAULT),  # alloc_name: strncpy_from_user of no string
        (None, 0x20, E.EINVAL),  # flags are checked before the name
        ("ram", MFD_HUGETLB, E.ENOSYS),  # hugetlb_file_setup stub: no CONFIG_HUGETLBFS
        ("ram", MFD_HUGETLB | (21 << 26), E.ENOSYS),  # MFD_HUGE_2MB encoding is allowed
        ("ram", "0", E.EINVAL),
    ],
)
def test_memfd_create_checks(k: ModelKernel, name: object, flags: object, want: int) -> None:
    assert errno_of(k.memfd_create, name, flags) == want


def test_memfd_read_write_lseek(k: ModelKernel) -> None:
    fd = k.memfd_create(b"ram\0ignored")
    assert k.read(fd, 10) == b""  # size 0
    assert k.write(fd, b"hello") == 5
    assert k.lseek(fd, 0, os.SEEK_CUR) == 5
    assert k.lseek(fd, 1, os.SEEK_SET) == 1
    assert k.read(fd, 100) == b"ello"
    assert k.lseek(fd, 10, os.SEEK_END) == 15
    assert k.write(fd, b"!") == 1
    assert k.pread(fd, 16, 0) == b"hello" + bytes(10) + b"!"
    assert errno_of(k.lseek, fd, -100, os.SEEK_CUR) == E.EINVAL
    assert errno_of(k.lseek, fd, 0, 99) == E.EINVAL


# -- ftruncate: the length before the fd (do_sys_ftruncate), a regular file (do_ftruncate) -----


def test_ftruncate_checks(k: ModelKernel) -> None:
    fd = k.memfd_create("ram")
    iommufd = k.open("/dev/iommu")
    assert errno_of(k.ftruncate, 999, -1) == E.EINVAL  # length first
    assert errno_of(k.ftruncate, 999, 0) == E.EBADF
    assert errno_of(k.ftruncate, iommufd, K4) == E.EINVAL  # not a regular file
    assert errno_of(k.ftruncate, fd, 1 << 63) == E.EINVAL  # a negative loff_t
    assert errno_of(k.ftruncate, fd, "1") == E.EINVAL
    k.ftruncate(fd, 3 * K4 + 5)
    assert k.lseek(fd, 0, os.SEEK_END) == 3 * K4 + 5
    k.ftruncate(fd, 1 << 40)  # sparse: costs nothing until written
    assert k.lseek(fd, 0, os.SEEK_END) == 1 << 40


# -- mmap of a memfd: shared bytes -----------------------------------------------------------


def test_mmap_checks(k: ModelKernel) -> None:
    fd = k.memfd_create("ram")
    iommufd = k.open("/dev/iommu")
    k.ftruncate(fd, 4 * K4)
    assert errno_of(k.mmap, K4, fd=999, offset=1) == E.EINVAL  # sys_mmap: offset first
    assert errno_of(k.mmap, K4, fd=999) == E.EBADF
    assert errno_of(k.mmap, 0, fd=fd) == E.EINVAL  # do_mmap: !len
    assert errno_of(k.mmap, K4, fd=iommufd) == E.ENODEV  # no ->mmap
    assert errno_of(k.mmap, K4, fd=fd, offset=(1 << 63) - K4) == E.EOVERFLOW
    assert errno_of(k.mmap, 1 << 49, fd=fd) == E.ENOMEM  # past TASK_SIZE_MAX


def test_mappings_and_fd_share_bytes(k: ModelKernel) -> None:
    fd = k.memfd_create("ram")
    k.ftruncate(fd, 2 * M2)
    a, va = k.mmap(2 * M2, fd=fd)
    b, vb = k.mmap(K4 + 1, fd=fd, offset=M2 + K4)
    assert va is not None and vb is not None
    assert a % M2 == 0 and b % M2 == K4  # the file offset's phase in a 2 MiB block
    assert a + 2 * M2 <= TASK_SIZE_MAX and len(vb) == 2 * K4
    va[M2 + K4 + 3] = 7
    assert vb[3] == 7
    assert k.mm.read(b + 3, 1) == b"\x07"
    k.mm.write(a + 10, b"xyz")
    assert k.pread(fd, 3, 10) == b"xyz"
    k.lseek(fd, M2 + K4 + 100, os.SEEK_SET)
    k.write(fd, b"Q")
    assert chr(vb[100]) == "Q"


def test_truncate_down_zeroes_and_close_keeps_mapping(k: ModelKernel) -> None:
    fd = k.memfd_create("ram")
    k.ftruncate(fd, 2 * K4)
    _, v = k.mmap(2 * K4, fd=fd)
    assert v is not None
    v[:] = 0xAB
    k.ftruncate(fd, K4 + 10)  # cut bytes are dropped ...
    k.ftruncate(fd, 2 * K4)  # ... and read back as zeros
    assert (v[: K4 + 10] == 0xAB).all() and not v[K4 + 10 :].any()
    k.close(fd)  # the mapping outlives the fd
    v[0] = 1
    assert v[0] == 1


def test_kernel_addresses_are_not_user_memory(k: ModelKernel) -> None:
    """A region at a kernel address (how pinned file pages are mapped) answers no user
    pointer: copy_from_user / copy_to_user of it is EFAULT (access_ok)."""
    from vfiomig.kernel.uaccess import user_read, user_write

    r = k.mm.map_data(np.zeros(K4, dtype=np.uint8), kernel=True)
    assert r.addr >= KERNEL_BASE
    assert errno_of(user_read, k.mm, r.addr, 8) == E.EFAULT
    assert errno_of(user_write, k.mm, r.addr, b"x") == E.EFAULT
