"""The vocabulary every `vfiomig` command shares: sizes, rates, fractions, device specs.

Every parser takes the text of one option value and returns it converted, or raises
ValueError with a one-line message that quotes the text and says what was expected;
``arg_type`` makes any of them an argparse ``type=`` (a usage error, exit status 2).

Sizes (``parse_size``) are bytes: an integer (``4096``, ``0x1000``) or a decimal number with
a K, M, G or T suffix, which are powers of 1024 whichever way they are spelt (``64K``,
``64k``, ``64KiB`` and ``64KB`` are all 65536; ``1.5M`` is 1572864). A bare ``B`` is allowed
(``512B``), so is a space before the unit. The result must be a whole number of bytes and
at most 2**64 - 1 (it fits a u64).

Rates (``parse_rate``) are bytes per second, written as a size with an optional ``/s``
(``64M``, ``1GiB/s``), or bits per second with the decimal prefixes of network links
(``800Mbit``, ``25Gbit/s``, ``10gbit``: 10 Gbit/s is 1_250_000_000 bytes per second).

Device specs (``parse_kv_spec``, ``parse_device_spec``) follow QEMU's ``-device``:
``KIND,key=value,...``; the older ``KIND:key=value,...`` is still accepted. Values cannot
contain commas.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar, overload

from vfiomig.hw.iommu import VENDORS

T = TypeVar("T")

U64_MAX = (1 << 64) - 1

# ------------------------------------------------------------------------------------------
# sizes and rates

_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

_NUM = r"(?P<num>\d+(?:\.\d+)?|\.\d+)"
_HEX = re.compile(r"0x[0-9a-f]+", re.IGNORECASE | re.ASCII)
# a size: 64, 64K, 64k, 64KiB, 64KB, 64B (the i and the B change nothing)
_SIZE = re.compile(_NUM + r"\s*(?:(?P<prefix>[kmgt])i?)?b?", re.IGNORECASE | re.ASCII)
# a byte rate: a size, then an optional /s
_BYTE_RATE = re.compile(_NUM + r"\s*(?:(?P<prefix>[kmgt])i?)?b?(?:/s)?", re.IGNORECASE | re.ASCII)
# a bit rate: decimal prefixes only (10Gbit, 25gbit/s, 800Mbits/s)
_BIT_RATE = re.compile(_NUM + r"\s*(?P<prefix>[kmgt])?bits?(?:/s)?", re.IGNORECASE | re.ASCII)

SIZE_FORM = (
    "bytes as an integer or a number with a K, M, G or T suffix (powers of 1024; "
    "K, KiB and KB alike), e.g. 4096, 0x1000, 64K, 1.5MiB"
)
RATE_FORM = (
    "bytes per second written as a size with an optional /s (64M, 1GiB/s), or bits per "
    "second with a decimal prefix (800Mbit, 25Gbit/s)"
)
FRACTION_FORM = "a number from 0 to 1 or a percentage, e.g. 0.25 or 25%"
SPEC_FORM = "KIND,key=value,... (or KIND:key=value,...)"


def _bad(what: str, text: str, problem: str, form: str) -> ValueError:
    return ValueError(f"invalid {what} {text!r}: {problem}; expected {form}")


def _amount(
    what: str, text: str, form: str, patterns: Sequence[tuple[re.Pattern[str], dict[str, int]]]
) -> int:
    """The whole, non-negative number of units ``text`` names (shared by sizes and rates)."""
    s = text.strip()
    if not s:
        raise _bad(what, text, "empty", form)
    if s.startswith("-"):
        raise _bad(what, text, "negative", form)
    if _HEX.fullmatch(s):
        value = Fraction(int(s, 16))
    else:
        found = [(m, scale) for pattern, scale in patterns if (m := pattern.fullmatch(s))]
        if not found:
            raise _bad(what, text, "not a number with a known unit", form)
        m, scale = found[0]
        whole = m["num"].partition(".")[0].lstrip("0")
        if len(whole) > 30:  # far above 2**64 whatever the unit (and int() has a digit cap)
            raise _bad(what, text, "more than 2**64 - 1 bytes", form)
        value = Fraction(m["num"]) * scale[(m["prefix"] or "").lower()]
        if m.re is _BIT_RATE:
            value /= 8
    if value.denominator != 1:
        shown = f" ({float(value):g})" if value < 10**6 else ""
        raise _bad(what, text, f"not a whole number of bytes{shown}", form)
    if value > U64_MAX:
        raise _bad(what, text, "more than 2**64 - 1 bytes", form)
    return int(value)


def parse_size(text: str, *, allow_zero: bool = True) -> int:
    """Bytes: ``4096``, ``0x1000``, ``64K`` = ``64KiB`` = ``64KB`` = 65536, ``1.5G``.

    K/M/G/T are powers of 1024 with or without ``i`` and ``B``; ValueError (naming the text
    and the expected form) for an empty, negative, unparsable or fractional number of bytes,
    one above 2**64 - 1, or 0 when ``allow_zero`` is false.
    """
    n = _amount("size", text, SIZE_FORM, [(_SIZE, _BINARY)])
    if n == 0 and not allow_zero:
        raise _bad("size", text, "must not be 0", SIZE_FORM)
    return n


def parse_rate(text: str, *, allow_zero: bool = False) -> int:
    """Bytes per second: a size with an optional ``/s`` (``64M``, ``1GiB/s``: powers of 1024)
    or a bit rate with decimal prefixes (``10Gbit`` = ``10gbit/s`` = 1_250_000_000).

    ValueError as for ``parse_size``, and for 0 unless ``allow_zero``.
    """
    n = _amount("rate", text, RATE_FORM, [(_BYTE_RATE, _BINARY), (_BIT_RATE, _DECIMAL)])
    if n == 0 and not allow_zero:
        raise _bad("rate", text, "must not be 0", RATE_FORM)
    return n


_FRACTION = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<pct>%)?", re.ASCII)


def parse_fraction(text: str) -> float:
    """A number in [0, 1]: ``0.25``, ``1``, ``.5`` or a percentage ``25%``."""
    s = text.strip()
    if not s:
        raise _bad("fraction", text, "empty", FRACTION_FORM)
    if s.startswith("-"):
        raise _bad("fraction", text, "negative", FRACTION_FORM)
    m = _FRACTION.fullmatch(s)
    if not m:
        raise _bad("fraction", text, "not a number", FRACTION_FORM)
    value = Fraction(m["num"]) / (100 if m["pct"] else 1)
    if value > 1:
        raise _bad("fraction", text, "more than 1 (100%)", FRACTION_FORM)
    return float(value)


# ------------------------------------------------------------------------------------------
# KIND,key=value specs


def parse_kv_spec(text: str) -> tuple[str, dict[str, str]]:
    """``KIND,key=value,...`` (QEMU's -device syntax) or ``KIND:key=value,...``: the kind and
    the options as raw strings, in the order given.

    The kind ends at the first ``,`` or ``:`` (so a value may contain ``:`` in the QEMU form:
    ``vfio-pci,host=0000:3b:00.1``). Empty items are skipped. ValueError for an empty kind,
    an item without ``=``, an empty key or a key given twice.
    """
    cut = min((i for i in (text.find(","), text.find(":")) if i >= 0), default=len(text))
    kind, rest = text[:cut], text[cut + 1 :]
    if not kind:
        problem = "empty" if not text else f"no KIND before {text[cut]!r}"
        raise ValueError(f"invalid spec {text!r}: {problem}; expected {SPEC_FORM}")
    if "=" in kind:
        raise ValueError(
            f"invalid spec {text!r}: starts with an option ({kind!r}), not a KIND; "
            f"expected {SPEC_FORM}"
        )
    options: dict[str, str] = {}
    for item in rest.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"invalid spec {text!r}: option {item!r} is not key=value")
        if not key:
            raise ValueError(f"invalid spec {text!r}: option {item!r} has an empty key")
        if key in options:
            raise ValueError(f"invalid spec {text!r}: option {key!r} given twice")
        options[key] = value
    return kind, options


# ------------------------------------------------------------------------------------------
# model device specs: a kind of the model kernel and its driver's keyword options


@dataclass(frozen=True)
class ModelSpec:
    """One device of the model kernel: its kind and its driver's keyword options."""

    kind: str
    options: dict[str, Any]

    def label(self) -> str:
        """The spec in the canonical syntax (``reference,migration_flags=5``): it parses back."""
        if not self.options:
            return self.kind
        opts = ",".join(f"{k}={_fmt_opt(val)}" for k, val in self.options.items())
        return f"{self.kind},{opts}"


def _fmt_opt(val: Any) -> str:
    if isinstance(val, bool):
        return "1" if val else "0"
    if isinstance(val, frozenset | set):
        return "+".join(sorted(val))
    if isinstance(val, tuple):
        return "/".join(str(x) for x in val)
    return str(val)


def _parse_value(key: str, raw: str) -> Any:
    """A model option's value by its spelling: ``a+b`` defects, ``FROM/TO/MODE`` fail_arc,
    true/false/yes/no/on/off, integers (``0x`` allowed), else the string itself."""
    if key == "defects":
        return frozenset(x for x in raw.split("+") if x)
    if key == "fail_arc":
        parts = raw.split("/")
        if len(parts) != 3:
            raise ValueError(
                f"fail_arc={raw}: expected FROM/TO/MODE, e.g. STOP/STOP_COPY/error "
                "or STOP/STOP_COPY/5"
            )
        mode: str | int = int(parts[2]) if parts[2].isdigit() else parts[2]
        return (parts[0].upper(), parts[1].upper(), mode)
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(raw, 0)
    except ValueError:
        return raw


def _convert(kind: str, raw: dict[str, str]) -> ModelSpec:
    options: dict[str, Any] = {}
    for key, val in raw.items():
        try:
            options[key] = _parse_value(key, val)
        except ValueError as e:
            raise ValueError(f"{kind} option {e}") from e
    if options.get("dma_logging") in (0, 1):
        options["dma_logging"] = bool(options["dma_logging"])
    return ModelSpec(kind, options)


def parse_model_spec(spec: str) -> ModelSpec:
    """``reference,migration_flags=5,defects=lossy_resume+wrong_data_size`` (or with ``:``
    after the kind) with its values converted, but not checked against the device: see
    ``parse_device_spec`` for that."""
    return _convert(*parse_kv_spec(spec))


@overload
def parse_device_spec(text: str) -> ModelSpec: ...


@overload
def parse_device_spec(
    text: str, extra_keys: AbstractSet[str]
) -> tuple[ModelSpec, dict[str, str]]: ...


def parse_device_spec(
    text: str, extra_keys: AbstractSet[str] | None = None
) -> ModelSpec | tuple[ModelSpec, dict[str, str]]:
    """A model device spec, its options converted and checked against the device's keyword
    parameters (``check_model_options``): a typo is a ValueError listing the valid keys.

    Without ``extra_keys`` the result is the ModelSpec. With them (the keys a command adds
    for itself, such as a workload's ``rate``), those keys are taken out before the device
    check and returned as raw strings: ``(ModelSpec, {key: value})``. A key in
    ``extra_keys`` is the command's even if the device has an option of that name.
    """
    kind, raw = parse_kv_spec(text)
    extras = extra_keys or frozenset()
    device = _convert(kind, {k: v for k, v in raw.items() if k not in extras})
    spec = ModelSpec(kind, check_model_options(kind, device.options, also=sorted(extras)))
    if extra_keys is None:
        return spec
    return spec, {k: v for k, v in raw.items() if k in extras}


def check_model_options(
    kind: str, options: dict[str, Any], also: Iterable[str] = ()
) -> dict[str, Any]:
    """The options of a model device checked against the device's keyword parameters,
    converted to the types of their defaults (``0``/``1`` for a bool, ``MIN/MAX`` for a pair).

    ValueError naming the option otherwise, so that a typo is a usage error rather than a
    Python exception from inside the model (the model checks values, not types). ``also``
    are keys the caller accepts besides the device's, listed in that message.
    """
    import vfiomig.kernel  # noqa: F401  (registers the device kinds)
    from vfiomig.kernel.machine import DRIVERS

    ctor = DRIVERS.get(kind)
    if ctor is None:
        raise ValueError(f"unknown device kind {kind!r} (known: {', '.join(sorted(DRIVERS))})")
    sig = inspect.signature(ctor).parameters.items()
    params = {n: p.default for n, p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # a keyword without a default (None) but annotated ``int | None`` still takes integers
    ints = {n for n, p in sig if p.default is None and str(p.annotation) == "int | None"}
    out: dict[str, Any] = {}
    for key, val in options.items():
        if key not in params:
            known = ", ".join(params) or "none"
            others = ", ".join(also)
            more = f"; besides them: {others}" if others else ""
            raise ValueError(f"{kind} has no option {key!r} (its options: {known}{more})")
        typed = key in ints and val is not None  # None: the device picks (its default)
        out[key] = _option_value(kind, key, val, 0 if typed else params[key])
    return out


def _option_value(kind: str, key: str, val: Any, default: Any) -> Any:
    bad = f"{kind} option {key}={_fmt_opt(val)}"
    if isinstance(default, bool):
        if isinstance(val, bool):
            return val
        if isinstance(val, int) and val in (0, 1):
            return bool(val)
        raise ValueError(f"{bad}: expected 0 or 1")
    if isinstance(default, int):
        if isinstance(val, int) and not isinstance(val, bool):
            return val
        raise ValueError(f"{bad}: expected an integer")
    if isinstance(default, tuple):
        parts = str(val).split("/") if not isinstance(val, tuple) else list(val)
        try:
            pair = tuple(p if isinstance(p, int) else int(str(p), 0) for p in parts)
        except ValueError:
            pair = ()
        if len(pair) != len(default):
            shown = "/".join(str(x) for x in default)
            raise ValueError(f"{bad}: expected {len(default)} integers like {shown}")
        return pair
    if isinstance(default, frozenset | set):
        return frozenset(val) if isinstance(val, frozenset | set) else frozenset({str(val)})
    return val  # no typed default (None): the device checks it


# ------------------------------------------------------------------------------------------
# argparse


def arg_type(fn: Callable[[str], T]) -> Callable[[str], T]:
    """``fn`` as an argparse ``type=``: its ValueError becomes an ArgumentTypeError with the
    same message, which argparse prints as a usage error (exit status 2)."""

    @functools.wraps(fn)
    def convert(text: str) -> T:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return convert


# The argparse type of --model: a checked ModelSpec.
model_spec_arg = arg_type(parse_device_spec)


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and, each time it is
    used, says in one line on stderr that ``replacement`` is the name to use."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, *, replacement: str, **kwargs: Any
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: warning: {option_string} is deprecated, use {self.replacement}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_iommu_hw_argument(parser: argparse.ArgumentParser, default: str = "smmuv3") -> None:
    """``--iommu-hw {smmuv3,vtd,amd}`` (dest ``iommu_hw``): the model's IOMMU hardware, with
    ``--iommu`` as a deprecated alias. argparse matches ``--iommu`` exactly, never as a
    prefix of ``--iommufd`` or ``--iommu-hw``; vfiomig's parsers allow no abbreviations at
    all (``allow_abbrev=False``), so that ``--iommu-h`` is an error too."""
    parser.add_argument(
        "--iommu-hw",
        choices=VENDORS,
        default=default,
        help="the model's IOMMU hardware (default %(default)s; --iommu is a deprecated alias)",
    )
    parser.add_argument(
        "--iommu",
        dest="iommu_hw",
        choices=VENDORS,
        default=argparse.SUPPRESS,
        action=DeprecatedAlias,
        replacement="--iommu-hw",
        help=argparse.SUPPRESS,
    )
