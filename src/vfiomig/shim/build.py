"""Building C with the system gcc: the preload library, and programs against the Linux uAPI.

The preload library is compiled at first use into a cache directory, never shipped as a
binary: $VFIOMIG_CACHE, else $XDG_CACHE_HOME/vfiomig, else ~/.cache/vfiomig. Its file name
carries a hash of the source and the flags, so an edited preload.c is rebuilt and two
versions never overwrite each other; the build writes a temporary file and renames it, so
concurrent first uses are safe.

Programs (tests, examples, bench) are compiled against the Linux 7.2 uAPI headers that ship
in the ziglang package (a dev dependency), as tests/test_uapi_abi.py does, so they do not
depend on the host's kernel headers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vfiomig.shim.protocol import c_defines

PRELOAD_SOURCE = Path(__file__).with_name("preload.c")
PRELOAD_FLAGS = (
    "-shared",
    "-fPIC",
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Werror",
    "-U_FORTIFY_SOURCE",  # the library defines the fortified entry points itself
    "-pthread",
)

# zig's per-arch asm/ include directory for the host.
_ZIG_ARCH = {"x86_64": "x86", "amd64": "x86", "aarch64": "aarch64", "arm64": "aarch64"}


class BuildError(RuntimeError):
    """gcc or the headers are missing, or a compile failed (the message says which)."""


def cache_dir() -> Path:
    base = os.environ.get("VFIOMIG_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vfiomig"


def find_gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is not installed (vfiomig run builds its preload library with it)")
    return gcc


def uapi_include_dirs() -> list[str]:
    """-I directories of the Linux uAPI headers in the ziglang package."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        raise BuildError("the ziglang package (Linux uAPI headers) is not installed")
    arch = _ZIG_ARCH.get(platform.machine().lower())
    if arch is None:
        raise BuildError(f"no ziglang asm headers known for {platform.machine()}")
    inc = Path(spec.origin).parent / "lib" / "libc" / "include"
    dirs = [inc / "any-linux-any", inc / f"{arch}-linux-any"]
    if not (dirs[0] / "linux" / "iommufd.h").is_file():
        raise BuildError(f"no linux/iommufd.h under {dirs[0]}")
    return [str(d) for d in dirs]


def _compile(cmd: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
    os.close(fd)
    try:
        built = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
        if built.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{built.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def preload_library() -> Path:
    """The preload library's path, built now if this source has not been built before."""
    gcc = find_gcc()
    source = PRELOAD_SOURCE.read_bytes()
    flags = [*PRELOAD_FLAGS, *c_defines()]
    digest = hashlib.sha256(source + "\0".join(flags).encode()).hexdigest()[:16]
    lib = cache_dir() / f"libvfiomig-preload-{platform.machine()}-{digest}.so"
    if not lib.is_file():
        _compile([gcc, *flags, str(PRELOAD_SOURCE), "-ldl"], lib)
    return lib


def compile_program(
    source: Path | str, out: Path | str, *, flags: Sequence[str] = (), uapi: bool = True
) -> Path:
    """Compile one C program with gcc (-pthread), against the ziglang uAPI headers unless
    uapi=False. BuildError with gcc's messages when it fails."""
    gcc = find_gcc()
    inc = [f"-I{d}" for d in uapi_include_dirs()] if uapi else []
    cmd = [gcc, "-std=gnu11", "-Wall", "-Werror", "-pthread", *inc, *flags, str(source)]
    _compile(cmd, Path(out))
    return Path(out)
