"""The iommufd file, its object table and the size-first ioctl framing.

Follows drivers/iommu/iommufd/main.c: objects live in one table per open /dev/iommu with ids
from 1; lookup with the wrong id or type is ENOENT; an object something else still holds
cannot be destroyed (EBUSY); closing the file destroys everything, leaf-first.

The command handlers live in one module per object, as in the kernel (ioas.py,
hw_pagetable.py, device.py, eventq.py, viommu.py, vfio_compat.py); each registers its ops in
IOCTL_OPS with `@register(ioctl_num, struct, min_size)`, min_size being the kernel's
offsetofend(struct, last) of main.c's IOCTL_OP table. `load_ops()` imports them.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable
from dataclasses import dataclass
from errno import EBUSY, EFAULT, EINVAL, ENOENT, ENOMEM, ENOTTY, EOPNOTSUPP, EPERM
from typing import TYPE_CHECKING, Any, TypeVar

from vfiomig.kernel.errors import err
from vfiomig.kernel.fault_inject import fail_point
from vfiomig.kernel.fs import File
from vfiomig.kernel.uaccess import UserArg
from vfiomig.uapi import iommufd as u
from vfiomig.uapi.ioctl import _IOC_NR

if TYPE_CHECKING:
    from vfiomig.kernel.iommufd.ioas import IommufdIoas
    from vfiomig.kernel.machine import ModelKernel


class IommufdObjectType(enum.Enum):
    """enum iommufd_object_type (drivers/iommu/iommufd/iommufd_private.h)."""

    DEVICE = "device"
    HWPT_PAGING = "hwpt_paging"
    HWPT_NESTED = "hwpt_nested"
    IOAS = "ioas"
    ACCESS = "access"
    FAULT = "fault"
    SELFTEST = "selftest"  # CONFIG_IOMMUFD_TEST's mock devices (selftest.py)


class IommufdObject:
    type: IommufdObjectType

    def __init__(self) -> None:
        self.id = 0
        # Other objects (or attached devices, or the driver) holding this one: the kernel's
        # iommufd_object.users minus the table's own reference.
        self.users = 0

    def destroy(self) -> None:
        """Drop the references this object holds on others (its ->destroy op)."""


ObjT = TypeVar("ObjT", bound=IommufdObject)

# enum iopt_pages_account_mode (io_pagetable.h): how pinned pages are charged.
IOPT_PAGES_ACCOUNT_USER = 1  # RLIMIT_MEMLOCK of the user (iommufd's default)
IOPT_PAGES_ACCOUNT_MM = 2  # the mm's locked_vm, as VFIO type1 does


class IommufdCtx:
    """struct iommufd_ctx."""

    def __init__(self, kernel: ModelKernel, file: File | None = None) -> None:
        self.kernel = kernel
        self.file = file  # ictx->file: what iommufd_ctx_get references
        self.objects: dict[int, IommufdObject] = {}
        self.vfio_ioas: IommufdIoas | None = None  # the compat IOAS (IOMMU_VFIO_IOAS)
        self.account_mode = IOPT_PAGES_ACCOUNT_USER

    def alloc(self, obj: ObjT) -> ObjT:
        """iommufd_object_alloc + finalize: ids are the lowest free from 1 (xa_alloc).
        The kzalloc of the object can fail (ENOMEM, fail-nth: fault_inject.py)."""
        fail_point(self.kernel.mm, "failslab", ENOMEM)
        oid = 1
        while oid in self.objects:
            oid += 1
        obj.id = oid
        self.objects[oid] = obj
        return obj

    def get(self, oid: int, cls: type[ObjT]) -> ObjT:
        """iommufd_get_object: missing id or wrong type is ENOENT."""
        obj = self.objects.get(oid)
        if not isinstance(obj, cls):
            raise err(ENOENT)
        return obj

    def find(self, oid: int) -> IommufdObject | None:
        """iommufd_get_object(IOMMUFD_OBJ_ANY) without the errno."""
        return self.objects.get(oid)

    def destroy(self, oid: int) -> None:
        """iommufd_object_remove for IOMMU_DESTROY: ENOENT if unknown, EBUSY if still used.

        A DEVICE or ACCESS object is held by its VFIO driver until unbind (iommufd_device_bind
        and iommufd_access_create take a user reference), so destroying it is EBUSY.
        """
        obj = self.objects.get(oid)
        if obj is None:
            raise err(ENOENT)
        if obj.users:
            raise err(EBUSY)
        self.remove(obj)

    def remove(self, obj: IommufdObject) -> None:
        """Take the object out of the table and run its destroy op."""
        del self.objects[obj.id]
        if self.vfio_ioas is obj:  # iommufd_object_remove clears the compat IOAS pointer
            self.vfio_ioas = None
        obj.destroy()

    def put_and_try_destroy(self, obj: IommufdObject) -> None:
        """iommufd_object_put_and_try_destroy: drop a user; destroy the object if it was
        the last one (automatic HWPTs die with their last device)."""
        obj.users -= 1
        if obj.users == 0 and self.objects.get(obj.id) is obj:
            self.remove(obj)

    def release(self) -> None:
        """iommufd_fops_release: in id order, destroy every object nobody holds, and repeat
        until the table is empty (leaf objects drop the users of interior ones)."""
        while self.objects:
            destroyed = 0
            for oid in sorted(self.objects):
                obj = self.objects.get(oid)
                if obj is None or obj.users:
                    continue
                self.remove(obj)
                destroyed += 1
            if not destroyed:  # WARN_ON in the kernel; a cycle is a model bug
                raise RuntimeError("iommufd objects hold each other")


@dataclass
class Ucmd:
    """struct iommufd_ucmd: the copied-in command and how to answer."""

    ictx: IommufdCtx
    arg: UserArg
    user_size: int
    cmd: Any

    def respond(self) -> None:
        """iommufd_ucmd_respond: copy the whole command back, up to the user's size."""
        self.arg.put(self.cmd, 0, self.user_size)


Handler = Callable[[Ucmd], int]


@dataclass(frozen=True)
class IoctlOp:
    ioctl_num: int
    struct: type[ctypes.Structure]
    min_size: int  # offsetofend of the last mandatory field
    handler: Handler


# nr - IOMMUFD_CMD_BASE -> op. Each command module registers its ops (see register()).
IOCTL_OPS: dict[int, IoctlOp] = {}


def register(
    ioctl_num: int, struct: type[ctypes.Structure], min_size: int
) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        IOCTL_OPS[_IOC_NR(ioctl_num)] = IoctlOp(ioctl_num, struct, min_size, fn)
        return fn

    return deco


# The kernel's iommufd_ioctl_ops[] covers every IOMMUFD_CMD_* up to the last one.
IOCTL_TABLE_LEN = (
    max(int(val) for name, val in vars(u).items() if name.startswith("IOMMUFD_CMD_"))
    - u.IOMMUFD_CMD_BASE
    + 1
)
# CONFIG_IOMMUFD_TEST adds IOCTL_OP(IOMMU_TEST_CMD, ...) at IOMMUFD_CMD_BASE + 32 to
# iommufd_ioctl_ops[] (main.c), so the table reaches it; selftest.py registers the op.
IOCTL_TABLE_LEN_TEST = 32 + 1


def ioctl_table_len(ictx: IommufdCtx) -> int:
    """ARRAY_SIZE(iommufd_ioctl_ops) of the kernel the ictx belongs to."""
    if getattr(ictx.kernel, "iommufd_test", False):
        return max(IOCTL_TABLE_LEN, IOCTL_TABLE_LEN_TEST)
    return IOCTL_TABLE_LEN


_LOADED = False


def load_ops() -> None:
    """Import the command modules so that their @register decorators fill IOCTL_OPS."""
    global _LOADED
    if _LOADED:
        return
    from vfiomig.kernel.iommufd import (  # noqa: F401
        device,
        eventq,
        hw_pagetable,
        ioas,
        vfio_compat,
        viommu,
    )

    _LOADED = True


class IommufdFile(File):
    def __init__(self, kernel: ModelKernel) -> None:
        super().__init__()
        self.ictx = IommufdCtx(kernel, self)

    def ioctl(self, cmd: int, arg: UserArg | int) -> int:
        """iommufd_fops_ioctl."""
        nr = _IOC_NR(cmd)
        if not 0 <= nr - u.IOMMUFD_CMD_BASE < ioctl_table_len(self.ictx):
            from vfiomig.kernel.iommufd.vfio_compat import iommufd_vfio_ioctl

            return iommufd_vfio_ioctl(self.ictx, cmd, arg)
        if isinstance(arg, int):  # get_user(size) on a non-pointer
            raise err(EFAULT)
        user_size = arg.u32(0)  # before the ioctl_num match: a bad pointer is EFAULT first
        op = IOCTL_OPS.get(nr)
        if op is None or op.ioctl_num != cmd:
            raise err(ENOTTY)  # -ENOIOCTLCMD
        if user_size < op.min_size:
            raise err(EINVAL)
        ucmd = Ucmd(self.ictx, arg, user_size, arg.copy_struct(op.struct, user_size, op.min_size))
        return op.handler(ucmd)

    def release(self) -> None:
        self.ictx.release()


def iommufd_fops_open(kernel: ModelKernel) -> IommufdFile:
    load_ops()
    return IommufdFile(kernel)


@register(u.IOMMU_DESTROY, u.iommu_destroy, 8)
def iommufd_destroy(ucmd: Ucmd) -> int:
    ucmd.ictx.destroy(ucmd.cmd.id)
    return 0


# IOMMU_OPTION val64 lives at offset 16 (after size, option_id, op, __reserved, object_id).
_OPTION_VAL64 = u.iommu_option.val64.offset


def _capable_sys_resource(ictx: IommufdCtx) -> bool:
    """capable(CAP_SYS_RESOURCE): the modelled process runs as root unless the machine
    says otherwise (ModelKernel.cap_sys_resource = False)."""
    return bool(getattr(ictx.kernel, "cap_sys_resource", True))


def iommufd_option_rlimit_mode(cmd: Any, ictx: IommufdCtx) -> int:
    """ioas.c iommufd_option_rlimit_mode: a global option of the iommufd."""
    if cmd.object_id:
        raise err(EOPNOTSUPP)
    if cmd.op == u.IOMMU_OPTION_OP_GET:
        cmd.val64 = int(ictx.account_mode == IOPT_PAGES_ACCOUNT_MM)
        return 0
    if cmd.op == u.IOMMU_OPTION_OP_SET:
        if not _capable_sys_resource(ictx):
            raise err(EPERM)
        if ictx.objects:
            raise err(EBUSY)
        if cmd.val64 == 0:
            ictx.account_mode = IOPT_PAGES_ACCOUNT_USER
        elif cmd.val64 == 1:
            ictx.account_mode = IOPT_PAGES_ACCOUNT_MM
        else:
            raise err(EINVAL)
        return 0
    raise err(EOPNOTSUPP)


@register(u.IOMMU_OPTION, u.iommu_option, 24)
def iommufd_option(ucmd: Ucmd) -> int:
    """main.c iommufd_option: only val64 is copied back, and only on success."""
    from vfiomig.kernel.iommufd.ioas import iommufd_ioas_option

    cmd = ucmd.cmd
    if cmd.__reserved:
        raise err(EOPNOTSUPP)
    if cmd.option_id == u.IOMMU_OPTION_RLIMIT_MODE:
        iommufd_option_rlimit_mode(cmd, ucmd.ictx)
    elif cmd.option_id == u.IOMMU_OPTION_HUGE_PAGES:
        iommufd_ioas_option(ucmd)
    else:
        raise err(EOPNOTSUPP)
    ucmd.arg.write(_OPTION_VAL64, bytes(ctypes.c_uint64(cmd.val64)))
    return 0
