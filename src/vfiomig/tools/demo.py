"""`vfiomig demo`: the most real thing vfiomig can show today.

Walks the byte-level VFIO migration uAPI of Linux 7.2 as vfiomig mirrors it: the structs a
VMM hands to ioctl() to drive a device's migration FSM and read dirty pages, with their
request numbers decoded and their layouts (checked against the real headers by the ABI test).
"""

from __future__ import annotations

import argparse
import ctypes

from vfiomig.uapi import iommufd as u
from vfiomig.uapi import vfio as v
from vfiomig.uapi.ioctl import _IOC_NR, _IOC_TYPE

# (ioctl name, module, struct it carries) in the order a VMM uses them to migrate a device.
FLOW: list[tuple[str, object, type[ctypes.Structure]]] = [
    ("VFIO_DEVICE_BIND_IOMMUFD", v, v.vfio_device_bind_iommufd),
    ("IOMMU_HWPT_ALLOC", u, u.iommu_hwpt_alloc),
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", v, v.vfio_device_attach_iommufd_pt),
    ("IOMMU_IOAS_MAP", u, u.iommu_ioas_map),
    ("IOMMU_HWPT_SET_DIRTY_TRACKING", u, u.iommu_hwpt_set_dirty_tracking),
    ("VFIO_DEVICE_FEATURE", v, v.vfio_device_feature_mig_state),
    ("VFIO_MIG_GET_PRECOPY_INFO", v, v.vfio_precopy_info),
    ("IOMMU_HWPT_GET_DIRTY_BITMAP", u, u.iommu_hwpt_get_dirty_bitmap),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", action="store_true", help="print every field's offset too")


def layout(cls: type[ctypes.Structure]) -> str:
    fields = [f[0] for f in cls._fields_]
    return ", ".join(f"{name}@{getattr(cls, name).offset}" for name in fields)


def run(args: argparse.Namespace) -> int:
    print("VFIO live migration with IOMMU dirty tracking: the uAPI calls, in order (Linux 7.2)")
    print(f"{'ioctl':32} {'request':>8} {'type':>4} {'nr':>4}  struct (bytes)")
    for name, mod, cls in FLOW:
        req = int(getattr(mod, name))
        print(
            f"{name:32} {req:#8x} {chr(_IOC_TYPE(req)):>4} {_IOC_NR(req):#4x}  "
            f"{cls.__name__} ({ctypes.sizeof(cls)})"
        )
        if args.layouts:
            print(f"{'':32} {layout(cls)}")
    states = ", ".join(f"{s.name.removeprefix('VFIO_DEVICE_STATE_')}={int(s)}" for s in v.vfio_device_mig_state)
    print(f"migration states: {states}")
    return 0
