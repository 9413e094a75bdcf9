"""vfiomig.tools.options: the sizes, rates, fractions and device specs every command shares."""

from __future__ import annotations

import argparse
from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiomig.tools import options as o
from vfiomig.tools.options import ModelSpec

U64_MAX = (1 << 64) - 1

# Every spelling of every binary unit, and what it multiplies by.
BINARY_SUFFIXES = [
    (pre + i + b, mult)
    for letter, mult in [("", 1), ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40)]
    for pre in ({letter, letter.upper()} if letter else {""})
    for i in (["", "i", "I"] if letter else [""])
    for b in ("", "B", "b")
]
DECIMAL_PREFIXES = [("", 1), ("k", 10**3), ("K", 10**3), ("M", 10**6), ("m", 10**6)]
DECIMAL_PREFIXES += [("G", 10**9), ("g", 10**9), ("T", 10**12)]
BIT_UNITS = ["bit", "bits", "bit/s", "bits/s", "Bit", "BIT/S"]


def _decimal(num: int, den: int) -> str:
    """num/den written out exactly (den is a power of 2 or of 10, so it terminates)."""
    with localcontext() as ctx:
        ctx.prec = 200
        return format(Decimal(num) / Decimal(den), "f")


# ------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0", 0),
        ("4096", 4096),
        ("0x1000", 4096),
        ("64K", 65536),
        ("64k", 65536),
        ("64KiB", 65536),
        ("64KB", 65536),
        ("64kb", 65536),
        ("64MB", 64 << 20),
        ("1.5M", 3 << 19),
        ("512B", 512),
        (" 2 GiB ", 2 << 30),
        (".5K", 512),
        ("1T", 1 << 40),
        ("16777215T", 16777215 << 40),
        (str(U64_MAX), U64_MAX),
    ],
)
def test_sizes(text: str, want: int) -> None:
    assert o.parse_size(text) == want


@given(
    st.sampled_from(BINARY_SUFFIXES).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(0, U64_MAX // s[1]))
    )
)
def test_size_round_trip_whole(case: tuple[tuple[str, int], int]) -> None:
    (suffix, mult), n = case
    assert o.parse_size(f"{n}{suffix}") == n * mult


@given(
    st.sampled_from([s for s in BINARY_SUFFIXES if s[1] > 1]).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(0, U64_MAX))
    )
)
def test_size_round_trip_fractional(case: tuple[tuple[str, int], int]) -> None:
    # Any number of bytes, written as a decimal fraction of a K/M/G/T.
    (suffix, mult), nbytes = case
    assert o.parse_size(f"{_decimal(nbytes, mult)}{suffix}") == nbytes


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1", "negative"),
        ("-4K", "negative"),
        ("abc", "not a number with a known unit"),
        ("12X", "not a number with a known unit"),
        ("1.5", "not a whole number of bytes (1.5)"),
        ("0.1K", "not a whole number of bytes (102.4)"),
        ("1e3", "not a number with a known unit"),
        ("1..5K", "not a number with a known unit"),
        ("0x10K", "not a number with a known unit"),
        ("K", "not a number with a known unit"),
        ("4 K B", "not a number with a known unit"),
        ("64iB", "not a number with a known unit"),
        ("1P", "not a number with a known unit"),
        ("\u0664K", "not a number with a known unit"),  # ASCII digits only
        ("16777216T", "more than 2**64 - 1 bytes"),
        (str(1 << 64), "more than 2**64 - 1 bytes"),
        ("9" * 5000, "more than 2**64 - 1 bytes"),
    ],
)
def test_bad_sizes_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as e:
        o.parse_size(text)
    msg = str(e.value)
    assert f"invalid size {text!r}: {problem}; expected bytes" in msg
    assert "64K" in msg and "\n" not in msg


def test_zero_size_can_be_refused() -> None:
    with pytest.raises(ValueError, match="'0': must not be 0"):
        o.parse_size("0", allow_zero=False)
    assert o.parse_size("1", allow_zero=False) == 1


# ------------------------------------------------------------------------------------------
# rates


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10Gbit", 1_250_000_000),
        ("100Gbit", 12_500_000_000),
        ("25gbit/s", 3_125_000_000),
        ("800Mbit", 100_000_000),
        ("8bit", 1),
        ("1.5Gbits/s", 187_500_000),
        ("10 Gbit", 1_250_000_000),
        ("64M", 64 << 20),
        ("1GiB/s", 1 << 30),
        ("1G/s", 1 << 30),
        ("10GB/s", 10 << 30),
        ("4096", 4096),
        ("4096/s", 4096),
        ("4096B/s", 4096),
        ("0x1000", 4096),
    ],
)
def test_rates(text: str, want: int) -> None:
    assert o.parse_rate(text) == want


@given(
    st.sampled_from(BINARY_SUFFIXES).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(1, U64_MAX // s[1]), st.booleans())
    )
)
def test_byte_rate_round_trip(case: tuple[tuple[str, int], int, bool]) -> None:
    (suffix, mult), n, per_second = case
    assert o.parse_rate(f"{n}{suffix}{'/s' if per_second else ''}") == n * mult


@given(
    st.sampled_from(DECIMAL_PREFIXES),
    st.sampled_from(BIT_UNITS),
    st.integers(1, U64_MAX),
)
def test_bit_rate_round_trip(prefix: tuple[str, int], unit: str, nbytes: int) -> None:
    # Any whole number of bytes per second, written as (a fraction of) k/M/G/T bits.
    letter, mult = prefix
    assert o.parse_rate(f"{_decimal(nbytes * 8, mult)}{letter}{unit}") == nbytes


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0", "must not be 0"),
        ("0Gbit", "must not be 0"),
        ("", "empty"),
        ("-10Gbit", "negative"),
        ("1bit", "not a whole number of bytes (0.125)"),
        ("12bit", "not a whole number of bytes (1.5)"),
        ("10Gbyte", "not a number with a known unit"),
        ("10Gibit", "not a number with a known unit"),
        ("10Gbit/min", "not a number with a known unit"),
        ("fast", "not a number with a known unit"),
        ("16777216T/s", "more than 2**64 - 1 bytes"),
        ("200000000Tbit", "more than 2**64 - 1 bytes"),
    ],
)
def test_bad_rates_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as e:
        o.parse_rate(text)
    msg = str(e.value)
    assert f"invalid rate {text!r}: {problem}; expected bytes per second" in msg
    assert "Gbit" in msg


def test_zero_rate_when_allowed() -> None:
    assert o.parse_rate("0", allow_zero=True) == 0
    assert o.parse_rate("0Gbit/s", allow_zero=True) == 0


# ------------------------------------------------------------------------------------------
# fractions


@pytest.mark.parametrize(
    ("text", "want"),
    [("0", 0.0), ("1", 1.0), ("0.25", 0.25), (".5", 0.5), ("1.", 1.0), ("25%", 0.25)]
    + [("100%", 1.0), ("0%", 0.0), ("12.5 %", 0.125)],
)
def test_fractions(text: str, want: float) -> None:
    assert o.parse_fraction(text) == want


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("-0.1", "negative"),
        ("1.01", "more than 1 (100%)"),
        ("101%", "more than 1 (100%)"),
        ("nan", "not a number"),
        ("inf", "not a number"),
        ("1e-3", "not a number"),
        ("half", "not a number"),
    ],
)
def test_bad_fractions_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as e:
        o.parse_fraction(text)
    assert f"invalid fraction {text!r}: {problem}; expected" in str(e.value)
    assert "25%" in str(e.value)


@given(st.integers(0, 10**6))
def test_fraction_round_trip(n: int) -> None:
    assert o.parse_fraction(_decimal(n, 10**6)) == n / 10**6
    assert o.parse_fraction(f"{_decimal(n, 10**4)}%") == n / 10**6


# ------------------------------------------------------------------------------------------
# KIND,key=value specs


@pytest.mark.parametrize(
    ("text", "kind", "opts"),
    [
        ("reference", "reference", {}),
        ("reference,", "reference", {}),
        ("reference:", "reference", {}),
        ("reference,a=1,b=x/y", "reference", {"a": "1", "b": "x/y"}),
        ("reference:a=1,b=x/y", "reference", {"a": "1", "b": "x/y"}),
        ("vfio-pci,host=0000:3b:00.1", "vfio-pci", {"host": "0000:3b:00.1"}),
        ("mtty,x-device-dirty-page-tracking=off", "mtty", {"x-device-dirty-page-tracking": "off"}),
        ("k,a=", "k", {"a": ""}),
        ("k,a=b=c", "k", {"a": "b=c"}),
    ],
)
def test_kv_specs(text: str, kind: str, opts: dict[str, str]) -> None:
    assert o.parse_kv_spec(text) == (kind, opts)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty; expected KIND,key=value"),
        (",a=1", "no KIND before ','; expected KIND,key=value"),
        (":a=1", "no KIND before ':'; expected KIND,key=value"),
        ("a=1,b=2", "starts with an option ('a=1'), not a KIND"),
        ("reference,nokey", "option 'nokey' is not key=value"),
        ("reference:nokey", "option 'nokey' is not key=value"),
        ("reference,=1", "option '=1' has an empty key"),
        ("reference,a=1,a=2", "option 'a' given twice"),
        ("reference:a=1,a=1", "option 'a' given twice"),
    ],
)
def test_bad_kv_specs_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as e:
        o.parse_kv_spec(text)
    assert f"invalid spec {text!r}: {problem}" in str(e.value)


@given(
    st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=12),
        st.text(st.characters(blacklist_characters=","), max_size=12),
        max_size=6,
    ),
    st.sampled_from([",", ":"]),
)
def test_kv_spec_round_trip(opts: dict[str, str], sep: str) -> None:
    items = ",".join(f"{k}={v}" for k, v in opts.items())
    assert o.parse_kv_spec(f"kind{sep}{items}") == ("kind", opts)


# ------------------------------------------------------------------------------------------
# model device specs

FULL = (
    "migration_flags=5,dma_logging=0,defects=lossy_resume+wrong_data_size,"
    "fail_arc=stop/stop_copy/error,state_size=0x1000,log_page_shift=13/20,iommu_dirty=off"
)
FULL_OPTIONS = {
    "migration_flags": 5,
    "dma_logging": False,
    "defects": frozenset({"lossy_resume", "wrong_data_size"}),
    "fail_arc": ("STOP", "STOP_COPY", "error"),
    "state_size": 4096,
    "log_page_shift": (13, 20),
    "iommu_dirty": False,
}


@pytest.mark.parametrize("sep", [",", ":"])
def test_device_spec_in_either_syntax(sep: str) -> None:
    spec = o.parse_device_spec(f"reference{sep}{FULL}")
    assert spec == ModelSpec("reference", FULL_OPTIONS)
    # the label is the canonical syntax, and it parses back to the same spec
    assert spec.label().startswith("reference,migration_flags=5,dma_logging=0,")
    assert o.parse_device_spec(spec.label()) == spec
    assert o.parse_device_spec("hisi_acc") == ModelSpec("hisi_acc", {})


def test_device_spec_values_convert_as_probe_always_did() -> None:
    # unchecked: the values by their spelling alone (probe's parse_model_spec)
    s = o.parse_model_spec("reference:fail_arc=STOP/RUNNING/5,seed=yes,x=hello,dma_logging=1")
    assert s.options == {
        "fail_arc": ("STOP", "RUNNING", 5),
        "seed": True,
        "x": "hello",
        "dma_logging": True,
    }
    from vfiomig.tools import probe

    assert probe.parse_model_spec is o.parse_model_spec
    assert probe.check_model_options is o.check_model_options
    assert probe.ModelSpec is o.ModelSpec


WORKLOAD = frozenset({"rate", "jobs", "x-device-dirty-page-tracking"})


@pytest.mark.parametrize("sep", [",", ":"])
def test_device_spec_with_a_commands_own_keys(sep: str) -> None:
    spec, extra = o.parse_device_spec(
        f"reference{sep}migration_flags=3,rate=10Gbit,x-device-dirty-page-tracking=off",
        extra_keys=WORKLOAD,
    )
    assert spec == ModelSpec("reference", {"migration_flags": 3})
    assert extra == {"rate": "10Gbit", "x-device-dirty-page-tracking": "off"}
    assert o.parse_rate(extra["rate"]) == 1_250_000_000
    assert o.parse_device_spec("mtty", extra_keys=WORKLOAD) == (ModelSpec("mtty", {}), {})


@pytest.mark.parametrize(
    ("text", "extra", "phrase"),
    [
        ("reference,bogus=1", None, "reference has no option 'bogus' (its options: migration_"),
        ("reference:bogus=1", None, "reference has no option 'bogus'"),
        ("reference,jobs=4", None, "reference has no option 'jobs'"),
        ("reference,bogus=1", WORKLOAD, "iommu_dirty; besides them: jobs, rate, x-device-"),
        ("mtty,defects=lossy_resume", None, "mtty has no option 'defects'"),
        ("reference,state_size=abc", None, "reference option state_size=abc: expected an integer"),
        ("reference,dma_logging=2", None, "dma_logging=2: expected 0 or 1"),
        ("reference,log_page_shift=5", None, "log_page_shift=5: expected 2 integers like 12/21"),
        ("reference,fail_arc=STOP", None, "reference option fail_arc=STOP: expected FROM/TO/MODE"),
        ("hisi_acc:qp_num=x", None, "qp_num=x: expected an integer"),
        ("bogus", None, "unknown device kind 'bogus' (known: hisi_acc, mtty, reference)"),
        ("reference,rate=1,rate=2", WORKLOAD, "option 'rate' given twice"),
        ("reference,nokey", WORKLOAD, "option 'nokey' is not key=value"),
    ],
)
def test_bad_device_specs_name_the_problem(
    text: str, extra: frozenset[str] | None, phrase: str
) -> None:
    with pytest.raises(ValueError) as e:
        if extra is None:
            o.parse_device_spec(text)
        else:
            o.parse_device_spec(text, extra_keys=extra)
    assert phrase in str(e.value)


# ------------------------------------------------------------------------------------------
# argparse


def test_arg_type_turns_value_errors_into_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    size = o.arg_type(o.parse_size)
    assert size("4K") == 4096 and size.__name__ == "parse_size"
    with pytest.raises(argparse.ArgumentTypeError) as e:
        size("4X")
    with pytest.raises(ValueError) as want:
        o.parse_size("4X")
    assert str(e.value) == str(want.value)

    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--rate", type=o.arg_type(o.parse_rate))
    p.add_argument("--model", type=o.model_spec_arg)
    assert p.parse_args(["--rate", "10Gbit"]).rate == 1_250_000_000
    assert p.parse_args(["--model", "reference,seed=3"]).model == ModelSpec(
        "reference", {"seed": 3}
    )
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--rate", "0"])
    assert exit_.value.code == 2
    assert "argument --rate: invalid rate '0': must not be 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--iommu-hw", "--iommu", "--iommu=", "--iommu-hw="])
def test_iommu_hw_and_its_deprecated_alias(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser(prog="t", allow_abbrev=False)
    o.add_iommu_hw_argument(p)
    p.add_argument("--iommufd")
    assert p.parse_args([]).iommu_hw == "smmuv3"
    argv = [flag + "vtd"] if flag.endswith("=") else [flag, "vtd"]
    args = p.parse_args(argv)
    assert args.iommu_hw == "vtd" and args.iommufd is None and "iommu" not in vars(args)
    err = capsys.readouterr().err
    if flag.startswith("--iommu-hw"):
        assert err == ""
    else:
        assert err == "t: warning: --iommu is deprecated, use --iommu-hw\n"
    help_text = p.format_help()
    assert "--iommu-hw {smmuv3,vtd,amd}" in help_text and "deprecated alias" in help_text
    assert "--iommu {" not in help_text  # the alias is not advertised
