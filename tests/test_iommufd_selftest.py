"""CONFIG_IOMMUFD_TEST in the model: IOMMU_TEST_CMD, the mock IOMMU, fail-nth, and what
`vfiomig run --iommufd-test` serves a C program (docs/selftests.md).

The kernel's own selftests cover the ops in depth (tests/test_kselftest_iommufd.py); these
tests pin the model's side of it on a bare ModelKernel, and the preload's side with a
small C program.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import errno_of
from vfiomig.kernel import ModelKernel
from vfiomig.shim.build import BuildError, compile_program, preload_library
from vfiomig.uapi import iommufd as u
from vfiomig.uapi import iommufd_test as t

PAGE = 4096


def _cmd(op: int, oid: int = 0) -> t.iommu_test_cmd:
    return t.iommu_test_cmd(size=ctypes.sizeof(t.iommu_test_cmd), op=op, id=oid)


def _ioas(k: ModelKernel, fd: int) -> int:
    a = u.iommu_ioas_alloc(size=ctypes.sizeof(u.iommu_ioas_alloc))
    k.ioctl(fd, u.IOMMU_IOAS_ALLOC, a)
    return int(a.out_ioas_id)


def _map(k: ModelKernel, fd: int, ioas: int, addr: int, length: int) -> int:
    m = u.iommu_ioas_map(
        size=ctypes.sizeof(u.iommu_ioas_map),
        flags=u.IOMMU_IOAS_MAP_READABLE | u.IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id=ioas,
        user_va=addr,
        length=length,
    )
    k.ioctl(fd, u.IOMMU_IOAS_MAP, m)
    return int(m.iova)


def _refs(k: ModelKernel, fd: int, addr: int, length: int, refs: int) -> int:
    c = _cmd(t.IOMMU_TEST_OP_MD_CHECK_REFS)
    c.check_refs.uptr, c.check_refs.length, c.check_refs.refs = addr, length, refs
    return errno_of(k.ioctl, fd, t.IOMMU_TEST_CMD, c)


def test_the_test_command_exists_only_in_a_test_kernel() -> None:
    plain = ModelKernel()
    fd = plain.open("/dev/iommu")
    assert errno_of(plain.ioctl, fd, t.IOMMU_TEST_CMD, _cmd(t.IOMMU_TEST_OP_MOCK_DOMAIN)) == (
        errno.ENOTTY
    )
    assert errno_of(plain.open, "/proc/self/task/1/fail-nth") == errno.ENOENT
    k = ModelKernel(iommufd_test=True)
    fd = k.open("/dev/iommu")
    assert errno_of(k.ioctl, fd, t.IOMMU_TEST_CMD, _cmd(99)) == errno.EOPNOTSUPP


def test_mock_domain_maps_the_users_pages_and_pins_them_once() -> None:
    k = ModelKernel(iommufd_test=True)
    fd = k.open("/dev/iommu")
    ioas = _ioas(k, fd)
    mock = _cmd(t.IOMMU_TEST_OP_MOCK_DOMAIN, ioas)
    k.ioctl(fd, t.IOMMU_TEST_CMD, mock)
    # ids as the kernel hands them out: the selftest object, then the device, then the HWPT
    assert (mock.mock_domain.out_stdev_id, mock.mock_domain.out_idev_id) == (2, 3)
    assert mock.mock_domain.out_hwpt_id == 4
    addr, _ = k.mmap(16 * PAGE)
    iova = _map(k, fd, ioas, addr, 16 * PAGE)
    assert iova >= t.MOCK_APERTURE_START
    check = _cmd(t.IOMMU_TEST_OP_MD_CHECK_MAP, mock.mock_domain.out_hwpt_id)
    check.check_map.iova, check.check_map.length, check.check_map.uptr = iova, 16 * PAGE, addr
    assert errno_of(k.ioctl, fd, t.IOMMU_TEST_CMD, check) == 0
    check.check_map.uptr = addr + 2048  # the pages are not where it says: EINVAL
    assert errno_of(k.ioctl, fd, t.IOMMU_TEST_CMD, check) == errno.EINVAL
    assert _refs(k, fd, addr, 16 * PAGE, 1) == 0
    _map(k, fd, ioas, addr, 4 * PAGE)  # a second IOAS_MAP is a second iopt_pages
    assert _refs(k, fd, addr, 4 * PAGE, 2) == 0
    assert _refs(k, fd, addr, 4 * PAGE, 1) == errno.EIO
    # the mock device is busy while its selftest object owns it; destroying that unbinds
    destroy = u.iommu_destroy(size=8, id=mock.mock_domain.out_idev_id)
    assert errno_of(k.ioctl, fd, u.IOMMU_DESTROY, destroy) == errno.EBUSY
    destroy.id = mock.mock_domain.out_stdev_id
    k.ioctl(fd, u.IOMMU_DESTROY, destroy)
    assert _refs(k, fd, addr, 16 * PAGE, 0) == 0  # no domain: nothing pinned
    k.close(fd)


def test_fail_nth_fails_the_nth_step_with_the_kernels_errno() -> None:
    k = ModelKernel(iommufd_test=True)
    fd = k.open("/dev/iommu")
    nth = k.open("/proc/self/task/1/fail-nth")
    fi = k.fault_inject  # type: ignore[attr-defined]
    fi.attrs["failslab"]["ignore-gfp-wait"] = "N"
    k.write(nth, b"1")
    a = u.iommu_ioas_alloc(size=ctypes.sizeof(u.iommu_ioas_alloc))
    assert errno_of(k.ioctl, fd, u.IOMMU_IOAS_ALLOC, a) == errno.ENOMEM  # iommufd_object_alloc
    assert k.pread(nth, 16, 0) == b"0\n"  # it happened
    k.write(nth, b"5\n")
    _ioas(k, fd)  # one allocation: four steps to go
    assert k.pread(nth, 16, 0) == b"4\n"
    k.write(nth, b"0")
    fi.attrs["failslab"]["ignore-gfp-wait"] = "Y"  # the default: GFP_KERNEL never fails
    k.write(nth, b"1")
    _ioas(k, fd)
    assert k.pread(nth, 16, 0) == b"1\n"
    assert errno_of(k.write, nth, b"x") == errno.EINVAL


# -- the preload's side, from C --------------------------------------------------------

PROGRAM = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void)
{
	char path[64], buf[16] = {0};
	struct dirent *d;
	int fails = 0, fd;
	DIR *dir;
	char *p;

	/* MAP_HUGETLB with no huge pages reserved: 2 MiB aligned, length rounded up */
	p = mmap(NULL, 3 << 20, PROT_READ | PROT_WRITE,
		MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED || (uintptr_t)p % (2 << 20))
		return 10;
	p[(4 << 20) - 1] = 1; /* the rounded-up length is there */
	/* /sys/kernel/debug as the run serves it */
	dir = opendir("/sys/kernel/debug/");
	if (!dir)
		return 11;
	while ((d = readdir(dir)))
		fails += !strncmp(d->d_name, "fail", 4);
	fd = openat(dirfd(dir), "failslab/ignore-gfp-wait", O_WRONLY);
	if (fd < 0 || write(fd, "N", 1) != 1)
		return 12;
	close(fd);
	closedir(dir);
	/* fail-nth: the model's, for this task */
	snprintf(path, sizeof(path), "/proc/self/task/%d/fail-nth", getpid());
	fd = open(path, O_RDWR);
	if (fd < 0 || pwrite(fd, "1", 1, 0) != 1)
		return 13;
	if (open("/dev/iommu", O_RDWR) != -1 || errno != ENOMEM)
		return 14;
	if (pread(fd, buf, sizeof(buf), 0) != 2 || strcmp(buf, "0\n"))
		return 15;
	printf("fail dirs %d\n", fails);
	return 0;
}
"""


@pytest.fixture(scope="module")
def preload() -> str:
    try:
        return str(preload_library())
    except BuildError as e:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(str(e))
        pytest.skip(str(e))


def test_run_serves_hugetlb_debugfs_and_fail_nth(preload: str, tmp_path: Path) -> None:
    src = tmp_path / "served.c"
    src.write_text(PROGRAM)
    exe = compile_program(src, tmp_path / "served", uapi=False)
    got = subprocess.run(
        [sys.executable, "-m", "vfiomig.cli", "run", "--iommufd-test", "--", str(exe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, (got.returncode, got.stderr)
    assert got.stdout == "fail dirs 4\n"


def test_page_faults_reach_the_fault_fd_and_die_with_the_attachment() -> None:
    """IOMMU_FAULT_QUEUE_ALLOC, a nested HWPT taking faults, IOMMU_TEST_OP_TRIGGER_IOPF:
    read() gives the fault under a cookie, write() answers it; a fault still pending when
    the device leaves the HWPT is answered for it (iommufd_auto_response_faults)."""
    k = ModelKernel(iommufd_test=True)
    fd = k.open("/dev/iommu")
    ioas = _ioas(k, fd)
    mock = _cmd(t.IOMMU_TEST_OP_MOCK_DOMAIN, ioas)
    k.ioctl(fd, t.IOMMU_TEST_CMD, mock)
    dev, stdev = mock.mock_domain.out_idev_id, mock.mock_domain.out_stdev_id
    fa = u.iommu_fault_alloc(size=ctypes.sizeof(u.iommu_fault_alloc))
    k.ioctl(fd, u.IOMMU_FAULT_QUEUE_ALLOC, fa)
    parent = u.iommu_hwpt_alloc(
        size=ctypes.sizeof(u.iommu_hwpt_alloc),
        flags=u.IOMMU_HWPT_ALLOC_NEST_PARENT,
        dev_id=dev,
        pt_id=ioas,
    )
    k.ioctl(fd, u.IOMMU_HWPT_ALLOC, parent)
    addr, data = k.mmap(PAGE)
    assert data is not None
    data[:4] = memoryview(bytes(t.iommu_hwpt_selftest(iotlb=t.IOMMU_TEST_IOTLB_DEFAULT)))
    nested = u.iommu_hwpt_alloc(
        size=ctypes.sizeof(u.iommu_hwpt_alloc),
        flags=u.IOMMU_HWPT_FAULT_ID_VALID,
        dev_id=dev,
        pt_id=parent.out_hwpt_id,
        data_type=t.IOMMU_HWPT_DATA_SELFTEST,
        data_len=4,
        data_uptr=addr,
        fault_id=fa.out_fault_id,
    )
    k.ioctl(fd, u.IOMMU_HWPT_ALLOC, nested)
    replace = _cmd(t.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev)
    replace.mock_domain_replace.pt_id = nested.out_hwpt_id
    k.ioctl(fd, t.IOMMU_TEST_CMD, replace)
    trigger = _cmd(t.IOMMU_TEST_OP_TRIGGER_IOPF)
    trigger.trigger_iopf.dev_id, trigger.trigger_iopf.addr = dev, 0xDEAD000
    k.ioctl(fd, t.IOMMU_TEST_CMD, trigger)
    size = ctypes.sizeof(u.iommu_hwpt_pgfault)
    assert errno_of(k.read, fa.out_fault_fd, size - 1) == errno.ESPIPE
    fault = u.iommu_hwpt_pgfault.from_buffer_copy(k.read(fa.out_fault_fd, 2 * size))
    assert (fault.dev_id, fault.addr, fault.cookie) == (dev, 0xDEAD000, 1)
    assert fault.flags == u.IOMMU_PGFAULT_FLAGS_LAST_PAGE
    resp = u.iommu_hwpt_page_response(cookie=fault.cookie, code=u.IOMMUFD_PAGE_RESP_SUCCESS)
    assert k.write(fa.out_fault_fd, bytes(resp)) == ctypes.sizeof(resp)
    assert errno_of(k.write, fa.out_fault_fd, bytes(resp)) == errno.EINVAL  # answered
    k.ioctl(fd, t.IOMMU_TEST_CMD, trigger)
    queue = k.fdt.get(fa.out_fault_fd).fault  # type: ignore[attr-defined]
    assert len(queue.deliver) == 1
    replace.mock_domain_replace.pt_id = ioas
    k.ioctl(fd, t.IOMMU_TEST_CMD, replace)
    assert not queue.deliver and not queue.response  # answered INVALID for the device
    destroy = u.iommu_destroy(size=8, id=fa.out_fault_id)
    assert errno_of(k.ioctl, fd, u.IOMMU_DESTROY, destroy) == errno.EBUSY  # HWPT and fd
    k.close(fa.out_fault_fd)
    k.close(fd)  # the last reference: everything goes
