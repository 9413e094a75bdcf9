"""Model ioctls per second: VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE) through ModelKernel.ioctl.

    python bench/ioctl.py [--seconds 2]

The call is what a VMM issues most (QEMU polls the device state); the figure bounds how
fast a simulated migration can drive a device. Target: >= 50k ioctls/s. Side by side, in
alternating slices so machine load hits both alike, the least Python can do with the same
buffer (unpack the header, pack {state, -1} after it); the ratio is what the model's
dispatch and checks cost on top of that.
"""

from __future__ import annotations

import argparse
import ctypes
import struct
import time
from collections.abc import Callable

from vfiomig.kernel import ModelKernel
from vfiomig.uapi import vfio as v

_HDR = struct.Struct("<II")
_MIG_STATE = struct.Struct("<Ii")


def setup() -> tuple[ModelKernel, int, bytearray]:
    k = ModelKernel()
    fd = k.open(k.add_device("reference"))
    bind = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
    bind.iommufd = k.open("/dev/iommu")
    k.ioctl(fd, v.VFIO_DEVICE_BIND_IOMMUFD, bind)
    flags = v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    return k, fd, v.feature_buffer(flags, 8)


def bare(buf: bytearray) -> None:
    """The reference: read the feature header, write the answer, nothing else."""
    _HDR.unpack_from(buf, 0)
    _MIG_STATE.pack_into(buf, 8, v.VFIO_DEVICE_STATE_RUNNING, -1)


def timed(call: Callable[[], object], batch: int = 1000) -> float:
    t0 = time.perf_counter()
    for _ in range(batch):
        call()
    return time.perf_counter() - t0


def run(seconds: float, slices: int = 10) -> tuple[float, float]:
    """(model ioctls/s, reference calls/s), over `slices` alternating slices of each."""
    k, fd, buf = setup()
    ioctl, req = k.ioctl, v.VFIO_DEVICE_FEATURE
    model = lambda: ioctl(fd, req, buf)  # noqa: E731
    ref = lambda: bare(buf)  # noqa: E731
    n = {model: 0, ref: 0}
    t = {model: 0.0, ref: 0.0}
    for _ in range(slices):
        for call in (model, ref):
            end = time.perf_counter() + seconds / (2 * slices)
            while time.perf_counter() < end:
                t[call] += timed(call)
                n[call] += 1000
    return n[model] / t[model], n[ref] / t[ref]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    model, ref = run(ap.parse_args().seconds)
    print(f"MIG_DEVICE_STATE GET via ModelKernel.ioctl: {model:,.0f} ioctls/s (target >= 50,000)")
    print(f"reference: struct unpack + pack of the same buffer: {ref:,.0f} calls/s")
    print(f"ratio: the model ioctl takes {ref / model:.1f}x the reference's time")


if __name__ == "__main__":
    main()
