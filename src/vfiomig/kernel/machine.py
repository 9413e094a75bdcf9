"""ModelKernel: one modelled Linux 7.2 machine seen from one process.

The syscall surface (open, ioctl, read, write, pread, pwrite, close, mmap, memfd_create,
ftruncate, eventfd) is the
only way in, and every failure leaves it as OSError with the errno the real syscall gives,
whatever is passed: what stands for a pointer but is no contiguous buffer (None, a str, a
strided view) is EFAULT, a number of the wrong type EINVAL, an fd that is not open EBADF,
an mmap past the top of user space (hw.memory.TASK_SIZE_MAX) or beyond the host's memory
ENOMEM (tests/test_kernel_hostile.py). The set-up calls (add_device, device, group_of) are the
machine's wiring, not syscalls: their mistakes are ValueError / TypeError. Device nodes:

    /dev/iommu                  iommufd (drivers/iommu/iommufd/main.c)
    /dev/vfio/devices/vfioN     VFIO device cdev (drivers/vfio/device_cdev.c)
    /dev/vfio/vfio, /dev/vfio/N legacy container and groups (drivers/vfio/container.c, group.c)

Beneath it, `vfiomig.hw` models the IOMMU and memory. `device(path)` gives the hardware side
of a device (its DMA engine) for workloads and tests.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from errno import EBADF, EFAULT, EINVAL, ENOENT, EOVERFLOW
from typing import Any

import numpy as np
import numpy.typing as npt

from vfiomig.hw.memory import PAGE_SIZE, Memory
from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import FdTable, File
from vfiomig.kernel.uaccess import UserArg, user_buffer

DEVICES_DIR = "/dev/vfio/devices/"

# kind -> constructor(kernel, index, **options) of a VfioDevice; filled by the driver modules
# when vfiomig.kernel is imported (see vfiomig/kernel/__init__.py).
DRIVERS: dict[str, Callable[..., Any]] = {}


class ModelKernel:
    def __init__(
        self,
        iommu: str = "smmuv3",
        *,
        bbml2: bool = False,
        mm: Memory | None = None,
        iommufd_test: bool = False,
        debugfs: str | None = None,
    ) -> None:
        """`mm`: the process's user memory; by default a fresh in-process Memory (what
        ModelKernel.mmap hands out). `vfiomig run` passes a ProcessMemory: a real program's
        memory, which its ioctls' pointers point into (hw/process_memory.py).

        iommufd_test=True is a kernel built with CONFIG_IOMMUFD_TEST (and the fault
        injection it depends on): /dev/iommu takes IOMMU_TEST_CMD with its mock IOMMU and
        devices (kernel/iommufd/selftest.py), and /proc/.../fail-nth works
        (kernel/fault_inject.py). `debugfs`: the directory served as /sys/kernel/debug,
        whose fault attribute files the model then reads."""
        from vfiomig.hw.iommu import Iommu  # hw.iommu is the IOMMU model beneath everything

        self.iommu = Iommu(iommu, bbml2=bbml2)
        self.mm = Memory() if mm is None else mm
        self.fdt = FdTable()
        self.devices: dict[str, Any] = {}  # cdev path -> VfioDevice
        self.groups: dict[str, Any] = {}  # "/dev/vfio/N" -> VfioGroup
        # Character devices other than the per-device cdevs: path -> opener returning a File.
        self.chrdevs: dict[str, Callable[[int], File]] = {}
        from vfiomig.kernel.iommufd.main import iommufd_fops_open

        self.chrdevs["/dev/iommu"] = lambda flags: iommufd_fops_open(self)
        from vfiomig.kernel.group import vfio_group_init

        vfio_group_init(self)  # /dev/vfio/vfio, the legacy container (container.c)
        # Files found by pattern rather than by name (/proc/<pid>/task/<tid>/fail-nth):
        # each opener returns the File for a path, or None if the path is not its.
        self.path_openers: list[Callable[[str, int], File | None]] = []
        self.iommufd_test = bool(iommufd_test)
        if self.iommufd_test:
            from vfiomig.kernel.iommufd.selftest import iommufd_test_init

            iommufd_test_init(self, debugfs)

    # -- machine set-up ------------------------------------------------------------------

    def add_device(self, kind: str, *, iommu_dirty: bool = True, **options: Any) -> str:
        """Plug in a device of `kind` ("mtty", "hisi_acc", "reference"); returns its cdev path.

        iommu_dirty=False: the IOMMU instance in front of this device cannot track dirty
        IOVAs (no IOMMU_CAP_DIRTY_TRACKING, like the selftest's NO_DIRTY mock device).
        Set-up mistakes (unknown kind or option) are ValueError / TypeError: this is the
        machine's wiring, not a syscall.
        """
        ctor = DRIVERS.get(kind)
        if ctor is None:
            known = ", ".join(sorted(DRIVERS))
            raise ValueError(f"unknown device kind {kind!r} (known: {known})")
        path = f"{DEVICES_DIR}vfio{len(self.devices)}"
        self.devices[path] = ctor(self, len(self.devices), iommu_dirty=iommu_dirty, **options)
        from vfiomig.kernel.group import vfio_device_set_group

        vfio_device_set_group(self, self.devices[path])  # its /dev/vfio/N group (group.c)
        return path

    def _vfio_device(self, path: str) -> Any:
        try:
            return self.devices[path]
        except (KeyError, TypeError):  # TypeError: not even a hashable path
            raise ValueError(f"no device at {path!r}") from None

    def device(self, path: str) -> Any:
        """The hardware side of the device at `path` (DMA engine, faults, internal state)."""
        return self._vfio_device(path).hw

    def group_of(self, path: str) -> str:
        """The legacy group node ("/dev/vfio/N") of the device at `path`."""
        return str(self._vfio_device(path).group_path)

    # -- syscalls ------------------------------------------------------------------------

    def open(self, path: str | bytes, flags: int = os.O_RDWR) -> int:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            raise err(EFAULT)  # not a pointer to a string
        path = path.split("\0", 1)[0]  # the kernel reads up to the NUL
        if not isinstance(flags, int):
            raise err(EINVAL)
        dev = self.devices.get(path)
        if dev is not None:
            return self.fdt.install(dev.cdev_open(flags))
        opener = self.chrdevs.get(path)
        if opener is None:
            for by_pattern in self.path_openers:
                f = by_pattern(path, flags)
                if f is not None:
                    return self.fdt.install(f)
            raise err(ENOENT)
        return self.fdt.install(opener(flags))

    def ioctl(self, fd: int, request: int, arg: object = 0) -> int:
        f = self.fdt.get(fd)
        if not isinstance(request, int) or not 0 <= request < 1 << 32:
            raise err(EINVAL)
        # An int is passed by value; a UserArg (a UserPtr: a C program's pointer under
        # `vfiomig run`) as it is; anything else is the caller's buffer.
        uarg: UserArg | int = arg if isinstance(arg, int | UserArg) else UserArg(arg)
        return f.ioctl(request, uarg)

    def read(self, fd: int, n: int) -> bytes:
        f = self.fdt.get(fd)
        if not f.readable:
            raise err(EBADF)
        if not isinstance(n, int) or n < 0:
            raise err(EINVAL)
        return f.read(n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        f = self.fdt.get(fd)
        if not f.writable:
            raise err(EBADF)
        return f.write(user_buffer(data))

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.fdt.get(fd).llseek(offset, whence)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """ksys_pread64: a negative offset EINVAL before the fd (EBADF); files without
        FMODE_PREAD (stream files) ESPIPE (File.pread)."""
        if not isinstance(offset, int) or offset < 0:
            raise err(EINVAL)
        f = self.fdt.get(fd)
        if not f.readable:
            raise err(EBADF)
        if not isinstance(n, int) or n < 0:
            raise err(EINVAL)  # a size_t: no negative count reaches the kernel
        return f.pread(n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """ksys_pwrite64, as pread."""
        if not isinstance(offset, int) or offset < 0:
            raise err(EINVAL)
        f = self.fdt.get(fd)
        if not f.writable:
            raise err(EBADF)
        return f.pwrite(user_buffer(data), offset)

    def close(self, fd: int) -> None:
        self.fdt.close(fd)

    def mmap(
        self, length: int, backed: bool = True, *, fd: int | None = None, offset: int = 0
    ) -> tuple[int, npt.NDArray[np.uint8] | None]:
        """Anonymous user memory: (address, writable numpy view of its bytes or None).

        A length the address space (TASK_SIZE_MAX) or the host cannot hold is ENOMEM, as
        mmap(2) answers. With `fd` (a memfd), a shared mapping of the file from `offset`:
        its bytes are the file's, as every other mapping and iommufd's pinned pages see them
        (`backed` does not apply)."""
        if fd is not None:
            return self._mmap_file(length, fd, offset)
        if not isinstance(length, int):
            raise err(EINVAL)
        r = self.mm.mmap(length, bool(backed))
        return r.addr, r.data

    def memfd_create(self, name: str | bytes, flags: int = 0) -> int:
        """memfd_create(2): an anonymous shmem file of size 0, open O_RDWR (kernel/memfd.py).
        Bad flags or a name longer than 249 bytes are EINVAL, a name that is no string
        EFAULT, MFD_HUGETLB ENOSYS (no hugetlbfs in the model), no free fd EMFILE."""
        from vfiomig.kernel.memfd import memfd_create

        f = memfd_create(name, flags)
        try:
            return self.fdt.install(f)
        except OSError:
            f.release()
            raise

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        """eventfd2(2): a new eventfd (kernel/eventfd.py). Flags other than EFD_SEMAPHORE,
        EFD_CLOEXEC, EFD_NONBLOCK are EINVAL, no free fd EMFILE."""
        from vfiomig.kernel.eventfd import eventfd_create

        return self.fdt.install(eventfd_create(initval, flags))

    def ftruncate(self, fd: int, length: int) -> None:
        """ftruncate(2) (fs/open.c do_sys_ftruncate): a negative length is EINVAL before the
        fd is looked up (EBADF); anything but a memfd is not a regular file here: EINVAL."""
        from vfiomig.kernel.memfd import MAX_LFS_FILESIZE, MemfdFile

        if not isinstance(length, int) or not 0 <= length <= MAX_LFS_FILESIZE:
            raise err(EINVAL)  # a loff_t: past 2^63 - 1 it is negative
        f = self.fdt.get(fd)
        if not isinstance(f, MemfdFile):
            raise err(EINVAL)
        f.truncate(length)

    def _mmap_file(
        self, length: int, fd: int, offset: int
    ) -> tuple[int, npt.NDArray[np.uint8] | None]:
        """mmap(MAP_SHARED) of a file: the region shares the file's bytes (sys_mmap's offset
        check EINVAL, then the fd EBADF, then do_mmap: no length EINVAL, no ->mmap ENODEV,
        the page offset overflowing EOVERFLOW). A memfd maps its pages; other files answer
        through File.mmap (a VFIO device fd: its regions, ENODEV for files without ->mmap)."""
        from vfiomig.kernel.memfd import MAX_LFS_FILESIZE, MemfdFile, page_align

        if not isinstance(offset, int) or offset < 0 or offset % PAGE_SIZE:
            raise err(EINVAL)
        f = self.fdt.get(fd)
        if not isinstance(length, int) or length <= 0:
            raise err(EINVAL)
        size = page_align(length)
        if not isinstance(f, MemfdFile):
            r = f.mmap(self.mm, size, offset)  # ENODEV: no ->mmap (File.mmap)
            return r.addr, r.data
        if offset + size > MAX_LFS_FILESIZE:
            raise err(EOVERFLOW)
        r = self.mm.map_data(f.pages(offset, size), offset)  # ENOMEM
        return r.addr, r.data

    def munmap(self, addr: int) -> None:
        """Unmap a whole region returned by mmap (EINVAL for any other address).

        Linux keeps pages pinned by iommufd or type1 alive after munmap; the model does not,
        so a DMA into them fails. Unmap guest memory from the IOMMU first, as a VMM does.
        """
        if not isinstance(addr, int):
            raise err(EINVAL)
        self.mm.munmap(addr)

    def poll(self, fd: int, events: int = select.POLLIN | select.POLLOUT) -> int:
        """Ready events of an fd; files without a ->poll op are always ready (DEFAULT_POLLMASK)."""
        f = self.fdt.get(fd)
        if not isinstance(events, int):
            raise err(EINVAL)
        return f.poll(events & 0xFFFF)  # struct pollfd.events is a short
