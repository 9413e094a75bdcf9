"""`vfiomig run`: an unmodified C program against the model kernel.

    vfiomig run --device reference,dma_logging=1 -- ./my_vmm --flag
    vfiomig run --device hisi_acc --device mtty --iommu-hw vtd -- ./probe_tool

The program runs with a preload library (built with gcc at first use, see
vfiomig.shim.build) that routes its calls on /dev/iommu, /dev/vfio/vfio, /dev/vfio/N and
/dev/vfio/devices/* to one ModelKernel served by this process (vfiomig.shim.server). It
learns its devices from VFIOMIG_DEVICES (the cdev paths, comma-separated, in --device order)
and VFIOMIG_GROUPS (their legacy groups). The exit status is the program's (128 + N when
signal N ended it); 2 for a usage error, 127 when the program cannot be started, 1 when the
preload library cannot be built. docs/run.md says what is and is not intercepted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from vfiomig.hw.process_memory import ProcessMemory
from vfiomig.kernel import ModelKernel
from vfiomig.kernel.fault_inject import populate_debugfs
from vfiomig.shim.build import BuildError, preload_library
from vfiomig.shim.protocol import ENV_DEBUGFS, ENV_DEVICES, ENV_GROUPS, ENV_SOCKET, ENV_TRACE
from vfiomig.shim.server import ShimServer
from vfiomig.tools import helptext
from vfiomig.tools.options import ModelSpec, add_iommu_hw_argument, model_spec_arg

EXAMPLES = (
    ("vfiomig run --device reference,dma_logging=1 -- ./vmm_walk", "examples/vmm_walk.c"),
    ("vfiomig run --device hisi_acc --device mtty --iommu-hw vtd -- ./probe_tool", ""),
    ("vfiomig run --device reference --dma-pages 4 --trace -- ./my_vmm --flag", ""),
)
EXIT_STATUS = (
    (0, "the program's own exit status (any N it exits with; 128 + N when signal N ends it)"),
    (1, "the preload library cannot be built (gcc or the headers missing)"),
    (2, "usage error: a bad option or --device spec (the message names it)"),
    (127, "the program cannot be started"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    helptext.apply(
        p,
        __doc__.split("\n\n    vfiomig run")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        [
            helptext.examples(*EXAMPLES),
            helptext.model_devices("--device"),
            helptext.defect_list("defects=NAME+NAME in --device reference,..."),
            helptext.exit_status(*EXIT_STATUS),
        ],
    )
    p.add_argument(
        "--device",
        metavar="KIND[,opts]",
        action="append",
        type=model_spec_arg,
        default=[],
        help="a model device (reference, hisi_acc, mtty) with its driver's options; repeat "
        "for more: /dev/vfio/devices/vfio0, vfio1, ... in this order",
    )
    add_iommu_hw_argument(p)
    p.add_argument(
        "--dma-pages",
        type=int,
        default=0,
        metavar="N",
        help="devices at work: after every call into the model, each running device that is "
        "attached to an IO page table writes N pages by DMA into what is mapped there "
        "(default 0: devices never DMA on their own)",
    )
    p.add_argument(
        "--trace", action="store_true", help="print every routed call on stderr (VFIOMIG_TRACE)"
    )
    p.add_argument(
        "--iommufd-test",
        action="store_true",
        help="a kernel with CONFIG_IOMMUFD_TEST: /dev/iommu takes IOMMU_TEST_CMD (the mock "
        "IOMMU and devices of the kernel's iommufd selftests), and fault injection is served: "
        "/proc/self/task/TID/fail-nth and the fault attributes under /sys/kernel/debug "
        "(docs/selftests.md)",
    )
    p.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM ARGS...",
        help="the program to run and its arguments",
    )


def build_kernel(
    iommu_hw: str, devices: Sequence[ModelSpec], *, iommufd_test: bool = False
) -> tuple[ModelKernel, list[str]]:
    """The model machine of one run: its memory is the program's (ProcessMemory)."""
    kernel = ModelKernel(iommu_hw, mm=ProcessMemory(), iommufd_test=iommufd_test)
    paths = [kernel.add_device(d.kind, **d.options) for d in devices]
    return kernel, paths


def program_env(
    base: dict[str, str],
    lib: str,
    sock_path: str,
    kernel: ModelKernel,
    paths: Sequence[str],
    *,
    trace: bool = False,
) -> dict[str, str]:
    env = dict(base)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib} {preload}".strip() if preload else lib
    env[ENV_SOCKET] = sock_path
    env[ENV_DEVICES] = ",".join(paths)
    env[ENV_GROUPS] = ",".join(kernel.group_of(p) for p in paths)
    env["VFIOMIG_SERVER_PID"] = str(os.getpid())
    if trace:
        env[ENV_TRACE] = "1"
    return env


def run(args: argparse.Namespace) -> int:
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        args.subparser.error("no program given: vfiomig run [options] -- PROGRAM ARGS...")
    if args.dma_pages < 0:
        args.subparser.error("argument --dma-pages: expected a count >= 0")
    try:
        lib = preload_library()
    except BuildError as e:
        print(f"vfiomig run: cannot build the preload library: {e}", file=sys.stderr)
        return 1
    try:
        kernel, paths = build_kernel(args.iommu_hw, args.device, iommufd_test=args.iommufd_test)
    except (ValueError, TypeError) as e:
        args.subparser.error(f"argument --device: {e}")
    return run_program(
        kernel, paths, argv, lib=str(lib), dma_pages=args.dma_pages, trace=args.trace
    )


def run_program(
    kernel: ModelKernel,
    paths: Sequence[str],
    argv: Sequence[str],
    *,
    lib: str | None = None,
    dma_pages: int = 0,
    trace: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Run argv against `kernel` (built with a ProcessMemory); the program's exit status."""
    lib = lib or str(preload_library())
    tmp = tempfile.mkdtemp(prefix="vfiomig-run-")  # 0700: only this user reaches the socket
    sock_path = os.path.join(tmp, "model.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(sock_path)
        listener.listen(64)
        server = ShimServer(kernel, listener, dma_pages=dma_pages)
        child_env = program_env(
            dict(os.environ if env is None else env), lib, sock_path, kernel, paths, trace=trace
        )
        fi = getattr(kernel, "fault_inject", None)
        if fi is not None:
            # Fault injection served: /sys/kernel/debug is a directory of this run, with the
            # fault attributes the model reads (kernel/fault_inject.py).
            debugfs = Path(tmp) / "debugfs"
            populate_debugfs(debugfs)
            fi.debugfs = debugfs
            child_env[ENV_DEBUGFS] = str(debugfs)
        try:
            proc = subprocess.Popen(list(argv), env=child_env)
        except OSError as e:
            print(f"vfiomig run: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
            return 127
        # ^C reaches the program (same process group); the server waits for its end.
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            server.serve(proc.pid)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
            code = proc.wait()
            server.close()
        return code if code >= 0 else 128 - code
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
