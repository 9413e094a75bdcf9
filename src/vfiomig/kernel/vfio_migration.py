"""Migration data files and the driver's state-walking loop, common to every driver.

What a driver writes (see vfio_reference.py for a complete one):

    class MySaving(SavingFile):
        def produce(self, n: int) -> bytes: ...        # next <= n bytes of the stream; raise
                                                       # err(ENOMSG) at a temporary end (PRE_COPY)
                                                       # or return b"" at the end (STOP_COPY)
        def precopy_info(self, info) -> None: ...      # fill initial_bytes / dirty_bytes; may
                                                       # set VFIO_PRECOPY_INFO_REINIT if v2
    class MyResuming(ResumingFile):
        max_size = 176                                 # optional: pos + len > max_size: ENOMEM
        def consume(self, data: bytes) -> int: ...     # accept bytes; raise err(...) to refuse

    class MyDevice(VfioDevice):
        def step(self, cur, new) -> File | None: ...   # execute ONE arc; return a new data file
                                                       # on the fd-creating arcs of §1.6

The generic rules live here so no driver can get them wrong:
* stream files: pread/lseek are ESPIPE (File.llseek), writing a saving file or reading a
  resuming file is EBADF (File.readable / File.writable, checked by the VFS before the op);
* a disabled file (session ended, reset, close_device) answers read/write/precopy-info with
  ENODEV (hisi_acc_vf_save_read, mtty_save_read, mlx5vf_save_read);
* VFIO_MIG_GET_PRECOPY_INFO (SavingFile.ioctl) checks, in this order, the command (ENOTTY),
  the 24-byte copy-in (EFAULT), argsz (EINVAL) -- include/linux/vfio.h
  vfio_check_precopy_ioctl() -- then the device state (EINVAL outside PRE_COPY/PRE_COPY_P2P)
  and the disabled file (ENODEV), as mlx5vf_precopy_ioctl / mtty_precopy_ioctl do; v1 echoes
  the caller's flags, v2 (device.precopy_info_v2) zeroes them first; only the 24 bytes of
  struct vfio_precopy_info are written back;
* a resuming file has no ioctl (ENOTTY, File.ioctl).

mig_set_state() is the loop every in-tree driver open-codes (mlx5vf_pci_set_device_state,
hisi_acc_vfio_pci_set_device_state, mtty_set_state): walk vfio_mig_get_next_state() one arc at
a time; a failing arc leaves the state at the last one reached; a file from an interior arc
is a driver bug the kernel WARNs about and turns into EINVAL.

Who holds a data file: the user's fds (File.refs, counted by the fd table) and the device
(`device.saving_file` / `device.resuming_file`, as mlx5's get_file() / hisi's fput in
hisi_acc_vf_disable_fds). Closing the fd does not end the session; the arcs of §1.6, a reset
and close_device do (`device.disable_fds()`).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from errno import EFAULT, EINVAL, ENODEV, ENOMEM, ENOTTY
from typing import TYPE_CHECKING

from vfiomig.kernel.errors import err
from vfiomig.kernel.fs import File
from vfiomig.kernel.uaccess import UserArg
from vfiomig.kernel.vfio_fsm import PRECOPY_STATES, state_name, vfio_mig_get_next_state
from vfiomig.uapi import vfio as v

if TYPE_CHECKING:
    from vfiomig.kernel.vfio_main import VfioDevice

PRECOPY_INFO_SIZE = ctypes.sizeof(v.vfio_precopy_info)  # offsetofend(.., dirty_bytes) = 24


class MigrationFile(File):
    """The anon-inode file behind a data_fd (saving or resuming)."""

    def __init__(self, device: VfioDevice) -> None:
        super().__init__()
        self.device = device
        self.disabled = False  # set when the session ends; the file then answers ENODEV
        self.pos = 0  # f_pos: bytes read or written so far
        self.user_closed = False  # every fd to it was closed (the device may still hold it)

    def disable(self) -> None:
        """End the session (the drivers' *_disable_fd). Drivers extend to drop buffers."""
        self.disabled = True

    def release(self) -> None:
        self.user_closed = True

    @property
    def live(self) -> bool:
        return not self.disabled


class SavingFile(MigrationFile, ABC):
    """Read-only stream of device state (opened O_RDONLY)."""

    readable = True
    writable = False
    # Device states in which VFIO_MIG_GET_PRECOPY_INFO is allowed (hisi: PRE_COPY only,
    # which is the same thing for a device without P2P).
    precopy_states: tuple[int, ...] = PRECOPY_STATES

    def read(self, n: int) -> bytes:
        if self.disabled:
            raise err(ENODEV)
        data = self.produce(n)
        self.pos += len(data)
        return data

    @abstractmethod
    def produce(self, n: int) -> bytes:
        """Up to n next bytes of the stream (driver). b"" is end of stream."""

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        # vfio_check_precopy_ioctl (include/linux/vfio.h, 7.x)
        if cmd != v.VFIO_MIG_GET_PRECOPY_INFO:
            raise err(ENOTTY)
        if isinstance(arg, int):
            raise err(EFAULT)
        user = arg.get(v.vfio_precopy_info)  # copy_from_user of all 24 bytes: EFAULT
        if user.argsz < PRECOPY_INFO_SIZE:
            raise err(EINVAL)
        # v2: flags are output; v1 keeps the caller's (bug-compatible)
        flags = 0 if self.device.precopy_info_v2 else user.flags
        # driver part (mlx5vf_precopy_ioctl, mtty_precopy_ioctl, hisi_acc_vf_precopy_ioctl)
        if self.device.mig_state not in self.precopy_states:
            raise err(EINVAL)
        if self.disabled:
            raise err(ENODEV)
        info = v.vfio_precopy_info(argsz=user.argsz, flags=flags)
        self.precopy_info(info)
        arg.put(info)
        return 0

    @abstractmethod
    def precopy_info(self, info: v.vfio_precopy_info) -> None:
        """Fill initial_bytes / dirty_bytes (driver); may OR in VFIO_PRECOPY_INFO_REINIT
        when self.device.precopy_info_v2. Raise err(...) for driver-specific failures."""


class ResumingFile(MigrationFile, ABC):
    """Write-only stream into the device (opened O_WRONLY). No ioctl: ENOTTY."""

    readable = False
    writable = True
    max_size: int | None = None  # hisi/mtty: pos + len beyond the stream size is ENOMEM

    def write(self, data: bytes) -> int:
        # hisi_acc_vf_resume_write / mtty_resume_write: size checks come before the lock and
        # the disabled check.
        if self.max_size is not None and self.pos + len(data) > self.max_size:
            raise err(ENOMEM)
        if self.disabled:
            raise err(ENODEV)
        n = self.consume(data)
        self.pos += n
        return n

    @abstractmethod
    def consume(self, data: bytes) -> int:
        """Accept the bytes (driver); return how many. A driver that counts bytes it then
        refuses (hisi/mtty answer EFAULT after storing them) advances self.pos itself
        before raising."""


def mig_set_state(dev: VfioDevice, new: int) -> File | None:
    """Walk from dev.mig_state to `new` one arc at a time (driver set_state loop)."""
    res: File | None = None
    while dev.mig_state != new:
        nxt = vfio_mig_get_next_state(dev.migration_flags, dev.mig_state, new, dev.warn)
        res = dev.step(dev.mig_state, nxt)  # raises on failure: state stays where it was
        dev.mig_state = nxt
        if res is not None and nxt != new:
            # WARN_ON(res && new_state != mig_state): fput(res); -EINVAL
            dev.warn(f"data file from interior arc to {state_name(nxt)}")
            raise err(EINVAL)
    return res
