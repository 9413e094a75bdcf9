"""Model ioctls per second from C through `vfiomig run`, against the same ioctl from Python.

    python bench/shim.py [--calls 20000] [--rounds 3]

A C program (compiled here with gcc against the ziglang uAPI headers) binds the model's
`reference` device and issues VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE) `--calls` times in a
loop, timing the loop itself; it runs under the preload shim, so every call is a request to
the model server in this process, which reads and writes the program's struct with
process_vm_readv / writev. Side by side, in alternating rounds, the same ioctl on a
ModelKernel called directly from Python with a bytearray (bench/ioctl.py's figure). The ratio
is what the shim costs per call: two socket messages, a context switch each way, and the
remote memory copies.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from vfiomig.kernel import ModelKernel
from vfiomig.shim.build import compile_program, preload_library
from vfiomig.tools.options import parse_device_spec
from vfiomig.tools.run import build_kernel, run_program
from vfiomig.uapi import vfio as v

LOOP_C = r"""
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long calls = atol(argv[1]);
    char dev_path[256];
    snprintf(dev_path, sizeof(dev_path), "%s", getenv("VFIOMIG_DEVICES"));
    dev_path[strcspn(dev_path, ",")] = 0;
    int iommufd = open("/dev/iommu", O_RDWR), dev = open(dev_path, O_RDWR);
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof(bind), .iommufd = iommufd};
    if (iommufd < 0 || dev < 0 || ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind))
        return 1;
    unsigned long long buf[2] = {0};
    struct vfio_device_feature *f = (void *)buf;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < calls; i++) {
        f->argsz = sizeof(buf);
        f->flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        if (ioctl(dev, VFIO_DEVICE_FEATURE, f))
            return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    FILE *out = fopen(argv[2], "w");
    fprintf(out, "%.9f\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    fclose(out);
    return 0;
}
"""


def c_rate(exe: Path, calls: int, lib: str, work: Path) -> float:
    """ioctls/s of the C loop under the shim (one fresh model and server per round)."""
    kernel, paths = build_kernel("smmuv3", [parse_device_spec("reference")])
    result = work / "seconds"
    code = run_program(kernel, paths, [str(exe), str(calls), str(result)], lib=lib)
    if code != 0:
        raise SystemExit(f"the C loop failed with exit status {code}")
    return calls / float(result.read_text())


def python_rate(calls: int) -> float:
    """ioctls/s of the same ioctl on a ModelKernel from Python."""
    k = ModelKernel()
    fd = k.open(k.add_device("reference"))
    bind = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd))
    bind.iommufd = k.open("/dev/iommu")
    k.ioctl(fd, v.VFIO_DEVICE_BIND_IOMMUFD, bind)
    buf = v.feature_buffer(v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 8)
    ioctl, req = k.ioctl, v.VFIO_DEVICE_FEATURE
    t0 = time.perf_counter()
    for _ in range(calls):
        ioctl(fd, req, buf)
    return calls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    lib = str(preload_library())
    with tempfile.TemporaryDirectory(prefix="vfiomig-bench-") as tmp:
        work = Path(tmp)
        src = work / "loop.c"
        src.write_text(LOOP_C)
        exe = compile_program(src, work / "loop", flags=["-O2"])
        c, py = [], []
        for _ in range(args.rounds):  # alternating, so machine load hits both alike
            c.append(c_rate(exe, args.calls, lib, work))
            py.append(python_rate(args.calls))
    c_med, py_med = statistics.median(c), statistics.median(py)
    print(f"MIG_DEVICE_STATE GET from C through vfiomig run: {c_med:,.0f} ioctls/s")
    print(f"the same ioctl from Python on ModelKernel:       {py_med:,.0f} ioctls/s")
    print(f"ratio: a call through the shim takes {py_med / c_med:.1f}x the direct call's time")


if __name__ == "__main__":
    main()
