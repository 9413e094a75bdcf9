"""ABI check of vfiomig.uapi against the real Linux 7.2 uAPI headers.

The headers come from the ziglang wheel (a dev dependency), so the check does
not depend on the host's kernel headers. The test enumerates everything the
modules export, generates one C program that prints the C view of each item,
compiles it with a single gcc call and compares. Nothing can be exported
without being checked:

- every ctypes Structure/Union class defined in a module (C tag = class name;
  classes named ``_...`` are anonymous unions, checked through their parent),
- every module-level int or str whose name is C-macro style (optional leading
  underscores, then an upper-case letter),
- every IntEnum class (its tag must exist in C) and all of its members.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import pytest

from vfiomig.uapi import ioctl, iommufd, vfio

MODULES: tuple[types.ModuleType, ...] = (ioctl, vfio, iommufd)

LINUX_VERSION = (7, 2)

# Macro-style names: C constants, including reserved ones like __VFIO_... and _IOC_...
_C_NAME = re.compile(r"_*[A-Z][A-Za-z0-9_]*")

_SIGNED_CODES = frozenset("bhilq")
_UNSIGNED_CODES = frozenset("BHILQ")

# zig's per-arch asm/ directory for the host (x86-64 and arm64 are the supported hosts).
_ZIG_ARCH = {"x86_64": "x86", "amd64": "x86", "aarch64": "aarch64", "arm64": "aarch64"}


# ---------------------------------------------------------------- collection


@dataclass
class Exports:
    structs: list[type[ctypes.Structure | ctypes.Union]] = field(default_factory=list)
    anonymous: list[type[ctypes.Structure | ctypes.Union]] = field(default_factory=list)
    enums: list[type[enum.IntEnum]] = field(default_factory=list)
    ints: dict[str, int] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)


def _add(table: dict[str, Any], name: str, value: Any) -> None:
    if name in table and table[name] != value:
        raise AssertionError(f"{name} exported twice with different values")
    table[name] = value


def collect(modules: tuple[types.ModuleType, ...] = MODULES) -> Exports:
    exp = Exports()
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and getattr(obj, "__module__", None) == mod.__name__:
                if issubclass(obj, ctypes.Structure | ctypes.Union):
                    (exp.anonymous if name.startswith("_") else exp.structs).append(obj)
                elif issubclass(obj, enum.IntEnum):
                    exp.enums.append(obj)
                    for member_name, member in obj.__members__.items():  # includes aliases
                        _add(exp.ints, member_name, int(member))
            elif _C_NAME.fullmatch(name) and not isinstance(obj, bool):
                if isinstance(obj, int):
                    _add(exp.ints, name, int(obj))
                elif isinstance(obj, str):
                    _add(exp.strings, name, obj)
    return exp


# ---------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One fact compared between C and Python.

    kind "int": C prints an unsigned value, Python expects ``expected``.
    kind "const": C prints sizeof and the value; compared as a bit pattern of
    that width, so (1 << 31) in C equals 0x80000000 in Python and -1 equals
    -1, but 0x1_0000_0000 never equals a 32-bit 0.
    kind "text": C prints a string.
    """

    key: str
    c_expr: str
    expected: int | str
    kind: Literal["int", "const", "text"] = "int"


@dataclass(frozen=True)
class _Member:
    path: str  # C member designator, e.g. "group_id" for a member of an anonymous union
    offset: int
    ctype: Any  # the ctypes field type


def _members(cls: type[ctypes.Structure | ctypes.Union]) -> Iterator[_Member]:
    """Flatten fields, descending into ``_anonymous_`` members like C does."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype, *_ in cls._fields_:
        if name in anonymous:
            anon: Any = ctype
            for inner, inner_type, *_ in anon._fields_:
                if inner in getattr(anon, "_anonymous_", ()):
                    raise NotImplementedError("nested anonymous members")
                # The outer class exposes anonymous members with absolute offsets.
                yield _Member(inner, getattr(cls, inner).offset, inner_type)
        else:
            yield _Member(name, getattr(cls, name).offset, ctype)


def _int_signedness(ctype: Any) -> bool | None:
    code = getattr(ctype, "_type_", None)
    if not isinstance(code, str) or not issubclass(ctype, ctypes._SimpleCData):
        return None
    if code in _SIGNED_CODES:
        return True
    if code in _UNSIGNED_CODES:
        return False
    return None


def struct_probes(cls: type[ctypes.Structure | ctypes.Union]) -> list[Probe]:
    kw = "union" if issubclass(cls, ctypes.Union) else "struct"
    c_type = f"{kw} {cls.__name__}"
    name = cls.__name__
    probes = [
        Probe(f"{name}:sizeof", f"sizeof({c_type})", ctypes.sizeof(cls)),
        Probe(f"{name}:alignof", f"_Alignof({c_type})", ctypes.alignment(cls)),
    ]
    for m in _members(cls):
        lvalue = f"(({c_type} *)0)->{m.path}"
        key = f"{name}.{m.path}"
        probes.append(Probe(f"{key}:offset", f"offsetof({c_type}, {m.path})", m.offset))
        ctype = m.ctype
        if issubclass(ctype, ctypes.Array):
            # C has no sizeof for a flexible array member, but its element is fine.
            if ctype._length_ > 0:
                probes.append(Probe(f"{key}:size", f"sizeof({lvalue})", ctypes.sizeof(ctype)))
            elem = ctype._type_
            probes.append(Probe(f"{key}[0]:size", f"sizeof({lvalue}[0])", ctypes.sizeof(elem)))
            signed, lvalue = _int_signedness(elem), f"{lvalue}[0]"
        else:
            probes.append(Probe(f"{key}:size", f"sizeof({lvalue})", ctypes.sizeof(ctype)))
            signed = _int_signedness(ctype)
        if signed is not None:
            probes.append(Probe(f"{key}:signed", f"((__typeof__({lvalue}))-1 < 0)", int(signed)))
    return probes


def _ioctl_samples() -> list[Probe]:
    # The uAPI only uses _IO, so exercise the sized encoders and decoders here.
    region = vfio.vfio_region_info
    report = vfio.vfio_device_feature_dma_logging_report
    samples: list[tuple[str, int]] = [
        ("_IO(';', 100)", ioctl._IO(";", 100)),
        ("_IOR('b', 3, struct vfio_region_info)", ioctl._IOR("b", 3, region)),
        ("_IOW(0x3b, 255, __u32)", ioctl._IOW(0x3B, 255, ctypes.c_uint32)),
        (
            "_IOWR(';', 17, struct vfio_device_feature_dma_logging_report)",
            ioctl._IOWR(";", 17, report),
        ),
        ("_IOWR('x', 0, char[16383])", ioctl._IOWR("x", 0, 16383)),
        ("_IOC_DIR(_IOR('b', 3, __u64))", ioctl._IOC_DIR(ioctl._IOR("b", 3, 8))),
        ("_IOC_TYPE(_IOR('b', 3, __u64))", ioctl._IOC_TYPE(ioctl._IOR("b", 3, 8))),
        ("_IOC_NR(_IOR('b', 3, __u64))", ioctl._IOC_NR(ioctl._IOR("b", 3, 8))),
        ("_IOC_SIZE(_IOR('b', 3, __u64))", ioctl._IOC_SIZE(ioctl._IOR("b", 3, 8))),
    ]
    return [Probe(f"sample {c}", c, py) for c, py in samples]


def probes_for(exp: Exports) -> list[Probe]:
    probes = [
        Probe(
            "LINUX_VERSION_CODE",
            "LINUX_VERSION_CODE",
            (LINUX_VERSION[0] << 16) + (LINUX_VERSION[1] << 8),
        )
    ]
    for cls in exp.structs:
        probes += struct_probes(cls)
    for en in exp.enums:
        # Proves the tag exists; C enums with these values are int-sized.
        probes.append(Probe(f"enum {en.__name__}:sizeof", f"sizeof(enum {en.__name__})", 4))
    for name, value in exp.ints.items():
        probes.append(Probe(name, name, value, "const"))
    for name, text in exp.strings.items():
        probes.append(Probe(name, name, text, "text"))
    return probes + _ioctl_samples()


# ---------------------------------------------------------------- C side


def c_program(probes: list[Probe]) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/version.h>",
        "#include <linux/vfio.h>",
        "#include <linux/iommufd.h>",
        "",
        "int main(void)",
        "{",
    ]
    for p in probes:
        key = p.key.replace("\\", "\\\\").replace('"', '\\"')
        if p.kind == "const":
            lines.append(
                f'\tprintf("%s\\t%zu %llu\\n", "{key}", sizeof({p.c_expr}),'
                f" (unsigned long long)({p.c_expr}));"
            )
        elif p.kind == "text":
            lines.append(f'\tprintf("%s\\t%s\\n", "{key}", {p.c_expr});')
        else:
            lines.append(f'\tprintf("%s\\t%llu\\n", "{key}", (unsigned long long)({p.c_expr}));')
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


def parse_output(out: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("\t")
        result[key] = value
    return result


def compare(probes: list[Probe], c_values: dict[str, str]) -> list[str]:
    """Every disagreement between Python and C, one readable line each."""
    problems: list[str] = []
    for p in probes:
        if p.key not in c_values:
            problems.append(f"{p.key}: no C value")
            continue
        raw = c_values[p.key]
        if p.kind == "text":
            if raw != p.expected:
                problems.append(f"{p.key}: python {p.expected!r} != C {raw!r}")
        elif p.kind == "const":
            assert isinstance(p.expected, int)
            size_s, bits_s = raw.split()
            width = 8 * int(size_s)
            mask = (1 << width) - 1
            if not -(1 << (width - 1)) <= p.expected <= mask:
                problems.append(f"{p.key}: python {p.expected} does not fit C's {width}-bit type")
            elif p.expected & mask != int(bits_s) & mask:
                problems.append(
                    f"{p.key}: python {p.expected:#x} != C {int(bits_s) & mask:#x} ({width}-bit)"
                )
        elif int(raw) != p.expected:
            problems.append(f"{p.key}: python {p.expected} != C {raw}")
    return problems


# ---------------------------------------------------------------- fixtures


def _unavailable(reason: str) -> NoReturn:
    # CI must prove the ABI; a silent skip there would hide a broken mirror.
    if os.environ.get("CI"):
        pytest.fail(f"ABI check cannot run in CI: {reason}")
    pytest.skip(reason)


def _include_dirs() -> list[Path]:
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        _unavailable("the ziglang package (Linux uAPI headers) is not installed")
    arch = _ZIG_ARCH.get(platform.machine())
    if arch is None:
        _unavailable(f"no ziglang asm headers known for {platform.machine()}")
    base = Path(spec.origin).parent / "lib" / "libc" / "include"
    dirs = [base / "any-linux-any", base / f"{arch}-linux-any"]
    for header in ("vfio.h", "iommufd.h"):
        if not (dirs[0] / "linux" / header).is_file():
            _unavailable(f"{dirs[0] / 'linux' / header} is missing")
    return dirs


@pytest.fixture(scope="session")
def exports() -> Exports:
    return collect()


@pytest.fixture(scope="session")
def c_values(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> dict[str, str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("gcc is not installed")
    includes = _include_dirs()
    work = tmp_path_factory.mktemp("uapi_abi")
    src, exe = work / "abi.c", work / "abi"
    src.write_text(c_program(probes_for(exports)))
    cmd = [gcc, "-std=gnu11", "-Wall", "-Werror"]
    for d in includes:
        cmd += ["-I", str(d)]
    cmd += ["-o", str(exe), str(src)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"gcc failed (source kept at {src}):\n{built.stderr}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    return parse_output(ran.stdout)


# ---------------------------------------------------------------- tests


def test_layouts_constants_and_ioctls_match_headers(
    exports: Exports, c_values: dict[str, str]
) -> None:
    problems = compare(probes_for(exports), c_values)
    assert not problems, "uapi mirror differs from the C headers:\n" + "\n".join(problems)


def test_enumeration_covers_the_modules(exports: Exports) -> None:
    # Guards the enumeration itself: if it silently found nothing, the ABI test
    # above would pass vacuously.
    assert len(exports.structs) >= 80
    assert len(exports.enums) >= 20
    assert len(exports.ints) >= 300
    assert exports.strings
    struct_names = {c.__name__ for c in exports.structs}
    for required in (
        "vfio_device_feature_mig_state",
        "vfio_iommu_type1_dirty_bitmap_get",
        "iommu_hwpt_get_dirty_bitmap",
    ):
        assert required in struct_names
    for required in (
        "VFIO_DEVICE_FEATURE",
        "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2",
        "__VFIO_RESERVED_TYPE1_NESTING_IOMMU",
        "VFIO_DEVICE_STATE_NR",
        "IOMMU_HWPT_GET_DIRTY_BITMAP",
        "IOMMUFD_CMD_HW_QUEUE_ALLOC",
        "_IOC_SIZEBITS",
    ):
        assert required in exports.ints


def test_anonymous_classes_are_anonymous_members(exports: Exports) -> None:
    # "_"-named classes have no C tag; they are only checked through a parent.
    used = {
        ctype
        for cls in exports.structs
        for name, ctype, *_ in cls._fields_
        if name in getattr(cls, "_anonymous_", ())
    }
    assert set(exports.anonymous) == used


@pytest.mark.parametrize("mod", [vfio, iommufd], ids=lambda m: m.__name__)
def test_enum_members_are_module_level_names(mod: types.ModuleType) -> None:
    for obj in vars(mod).values():
        if isinstance(obj, type) and issubclass(obj, enum.IntEnum):
            for name, member in obj.__members__.items():
                assert getattr(mod, name) == member, name


# Object-like macros in the headers that are not part of the ABI.
_NOT_ABI = {"VFIO_H", "_IOMMUFD_H"}


def _header_names(text: str) -> set[str]:
    """Struct/enum tags, enum constants and object-like macros of a header."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    names = set(re.findall(r"^\s*#\s*define\s+(\w+)(?=\s|$)", text, re.M))
    names |= set(re.findall(r"^(?:struct|enum)\s+(\w+)\s*\{", text, re.M))
    for body in re.findall(r"^enum\b[^{]*\{(.*?)\};", text, re.M | re.S):
        names |= set(re.findall(r"^\s*(\w+)\s*(?:=[^,]*)?,?\s*$", body, re.M))
    return names - _NOT_ABI


@pytest.mark.parametrize("mod", [vfio, iommufd], ids=lambda m: m.__name__)
def test_every_header_name_is_mirrored(mod: types.ModuleType) -> None:
    # The C-side check only covers what Python exports; this covers the reverse.
    header = _include_dirs()[0] / "linux" / (mod.__name__.rsplit(".", 1)[1] + ".h")
    missing = sorted(n for n in _header_names(header.read_text()) if not hasattr(mod, n))
    assert not missing, f"{header.name} names not mirrored in {mod.__name__}: {missing}"


def _replace_struct(exp: Exports, name: str, fields: list[tuple[str, Any]]) -> Exports:
    # Same class name, so its probes hit the C facts of the real struct.
    bad = type(name, (ctypes.Structure,), {"_fields_": fields})
    structs = [bad if c.__name__ == name else c for c in exp.structs]
    return Exports(structs, exp.anonymous, exp.enums, dict(exp.ints), dict(exp.strings))


def test_wrong_mirror_is_reported(exports: Exports, c_values: dict[str, str]) -> None:
    bad = _replace_struct(
        exports,
        "vfio_device_feature_mig_state",
        [("device_state", ctypes.c_uint64), ("data_fd", ctypes.c_int32)],  # C: __u32
    )
    bad = _replace_struct(
        bad,
        "iommu_destroy",
        [("size", ctypes.c_uint32), ("id", ctypes.c_int32)],  # C: __u32 id
    )
    bad.ints["VFIO_DEVICE_FEATURE"] = vfio.VFIO_DEVICE_FEATURE + 1
    bad.ints["VFIO_PCI_DEVID_NOT_OWNED"] = 0xFFFF_FFFF_FFFF  # too wide for C's int
    problems = compare(probes_for(bad), c_values)
    reported = {line.split(": ", 1)[0] for line in problems}
    assert reported == {
        "vfio_device_feature_mig_state:sizeof",
        "vfio_device_feature_mig_state:alignof",
        "vfio_device_feature_mig_state.device_state:size",
        "vfio_device_feature_mig_state.data_fd:offset",
        "iommu_destroy.id:signed",
        "VFIO_DEVICE_FEATURE",
        "VFIO_PCI_DEVID_NOT_OWNED",
    }, "\n".join(problems)
    assert "VFIO_DEVICE_FEATURE: python 0x3b76 != C 0x3b75 (32-bit)" in problems
