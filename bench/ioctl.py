"""Model ioctls per second: VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE) through ModelKernel.ioctl.

    python bench/ioctl.py [--seconds 2]

The call is what a VMM issues most (QEMU polls the device state); the figure bounds how
fast a simulated migration can drive a device. Target: >= 50k ioctls/s.
"""

from __future__ import annotations

import argparse
import ctypes
import time

from vfiomig.kernel import ModelKernel
from vfiomig.uapi import vfio as v


def setup() -> tuple[ModelKernel, int, bytearray]:
    k = ModelKernel()
    fd = k.open(k.add_device("reference"))
    bind = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
    bind.iommufd = k.open("/dev/iommu")
    k.ioctl(fd, v.VFIO_DEVICE_BIND_IOMMUFD, bind)
    flags = v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    return k, fd, v.feature_buffer(flags, 8)


def run(seconds: float) -> float:
    k, fd, buf = setup()
    ioctl, req = k.ioctl, v.VFIO_DEVICE_FEATURE
    n, batch = 0, 1000
    t0 = time.perf_counter()
    while True:
        for _ in range(batch):
            ioctl(fd, req, buf)
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    rate = run(ap.parse_args().seconds)
    print(f"MIG_DEVICE_STATE GET via ModelKernel.ioctl: {rate:,.0f} ioctls/s")


if __name__ == "__main__":
    main()
