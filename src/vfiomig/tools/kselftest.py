"""The kernel's own iommufd selftests against the model (docs/selftests.md).

    python -m vfiomig.tools.kselftest [--only iommufd|iommufd_fail_nth] [-- HARNESS ARGS]

Fetches tools/testing/selftests/iommu/{iommufd.c, iommufd_fail_nth.c, iommufd_utils.h},
drivers/iommu/iommufd/iommufd_test.h and the kselftest harness from Debian's
linux-source-6.12 package (installed with apt-get when its tarball is missing, then only
those files extracted into the cache directory; the kernel source is never part of the
project), compiles them unmodified with the system gcc against the Linux 7.2 uAPI headers
the project uses (ziglang's), runs each under `vfiomig run --iommufd-test`, and reads the
harness's TAP output. The list of cases comes from the binary (`-l`).

`make selftest` runs this through tests/test_kselftest_iommufd.py, which also holds the
bar: the cases that fail must be the ones listed in KNOWN_FAILURES (where Linux 7.2 changed
what the 6.12 test expects), and no case may crash the program or the model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vfiomig.shim.build import BuildError, cache_dir, find_gcc, uapi_include_dirs

PACKAGE = "linux-source-6.12"
TARBALL = Path("/usr/src") / f"{PACKAGE}.tar.xz"
SELFTESTS = ("iommufd", "iommufd_fail_nth")
# The files the build needs, as paths inside the kernel tree (the tarball's top directory
# is linux-source-6.12/). iommufd_utils.h includes "../kselftest_harness.h" and
# "../../../../drivers/iommu/iommufd/iommufd_test.h": the tree's layout is kept.
SOURCES = (
    "tools/testing/selftests/iommu/iommufd.c",
    "tools/testing/selftests/iommu/iommufd_fail_nth.c",
    "tools/testing/selftests/iommu/iommufd_utils.h",
    "tools/testing/selftests/kselftest_harness.h",
    "tools/testing/selftests/kselftest.h",
    "drivers/iommu/iommufd/iommufd_test.h",
)
# tools/testing/selftests/iommu/Makefile's CFLAGS, then what the build needs here: the
# glibc feature macro the harness relies on (lib.mk passes it through the environment), and
# the two mock constants Debian's backported tests use but its iommufd_test.h lacks,
# defined as upstream's iommufd_test.h defines them.
CFLAGS = (
    "-Wall",
    "-O2",
    "-Wno-unused-function",
    "-D_GNU_SOURCE",
    "-DMOCK_FLAGS_DEVICE_PASID=(1 << 2)",
    "-DMOCK_PASID_WIDTH=20",
)


@dataclass(frozen=True)
class KnownFailure:
    """A 6.12 test case whose expectation Linux 7.2 changed: the model stays 7.2."""

    commit: str  # the upstream commit that changed the rule
    subject: str
    rule: str  # what 7.2 does, where, and what the 6.12 test expected


_INVALIDATE_PAGING = KnownFailure(
    "54ce69e36c71",
    "iommufd: Allow hwpt_id to carry viommu_id for IOMMU_HWPT_INVALIDATE (v6.13)",
    "IOMMU_HWPT_INVALIDATE on a paging HWPT is EINVAL since vIOMMUs take invalidations too "
    "(hw_pagetable.c iommufd_hwpt_invalidate: neither HWPT_NESTED nor VIOMMU); the 6.12 "
    "test expects ENOENT (iommufd.c:378, iommufd_get_hwpt_nested)",
)
KNOWN_FAILURES: dict[str, KnownFailure] = {
    f"iommufd_ioas.{variant}.alloc_hwpt_nested": _INVALIDATE_PAGING
    for variant in ("mock_domain", "two_mock_domain", "mock_domain_limit")
}


class Unavailable(RuntimeError):
    """The selftests cannot be had here (no apt-get, no package, no gcc): the reason."""


# -- fetch --------------------------------------------------------------------------------


def source_dir() -> Path:
    return cache_dir() / "kselftest" / PACKAGE


def _apt_install() -> None:
    """apt-get install -y linux-source-6.12, with an apt-get update first if the package
    is not known yet."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise Unavailable(f"apt-get is not installed (needed for {PACKAGE})")
    if os.geteuid() != 0:
        raise Unavailable(f"apt-get install {PACKAGE} needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [apt, "install", "-y", "-q", "--no-install-recommends", PACKAGE]
    got = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if got.returncode != 0:
        subprocess.run([apt, "update", "-q"], capture_output=True, text=True, env=env)
        got = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if got.returncode != 0 or not TARBALL.is_file():
        tail = (got.stderr or got.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"apt-get install {PACKAGE} failed: {' | '.join(tail)}")


def fetch_sources(dest: Path | None = None) -> Path:
    """The kernel tree's selftest files under `dest` (the cache), extracted from the
    package's tarball (installed first if need be). Returns the tree's root."""
    dest = source_dir() if dest is None else dest
    if all((dest / f).is_file() for f in SOURCES):
        return dest
    if not TARBALL.is_file():
        _apt_install()
    tar = shutil.which("tar")
    if tar is None:
        raise Unavailable("tar is not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}.", dir=dest.parent))
    try:
        members = [f"{PACKAGE}/{f}" for f in SOURCES]
        got = subprocess.run(
            [tar, "-xJf", str(TARBALL), "-C", str(tmp), "--strip-components=1", *members],
            capture_output=True,
            text=True,
        )
        if got.returncode != 0:
            raise Unavailable(f"cannot extract the selftests from {TARBALL}: {got.stderr}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- build --------------------------------------------------------------------------------


def build(tree: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Compile both selftests unmodified; cached by the hash of sources and flags."""
    try:
        gcc = find_gcc()
        inc = [f"-I{d}" for d in uapi_include_dirs()]
    except BuildError as e:
        raise Unavailable(str(e)) from None
    out_dir = source_dir().parent / "bin" if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\0".join([*CFLAGS, *inc]).encode())
    for f in SOURCES:
        digest.update((tree / f).read_bytes())
    tag = f"{platform.machine()}-{digest.hexdigest()[:12]}"
    bins: dict[str, Path] = {}
    for name in SELFTESTS:
        exe = out_dir / f"{name}-{tag}"
        if not exe.is_file():
            src = tree / "tools/testing/selftests/iommu" / f"{name}.c"
            tmp = exe.with_name(exe.name + f".{os.getpid()}.tmp")
            got = subprocess.run(
                [gcc, *CFLAGS, *inc, str(src), "-o", str(tmp)], capture_output=True, text=True
            )
            if got.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise BuildError(f"gcc {src.name} failed:\n{got.stderr}")
            os.replace(tmp, exe)
        bins[name] = exe
    return bins


# -- the harness: its case list and its TAP ---------------------------------------------


@dataclass(frozen=True)
class Case:
    fixture: str
    variant: str
    test: str

    @property
    def name(self) -> str:
        """The harness's name for the case: fixture[.variant].test."""
        mid = f".{self.variant}" if self.variant else ""
        return f"{self.fixture}{mid}.{self.test}"

    @property
    def group(self) -> str:
        """fixture[.variant]: one row of the table."""
        return f"{self.fixture}.{self.variant}" if self.variant else self.fixture


def parse_list(text: str) -> list[Case]:
    """The cases of `BINARY -l` (kselftest_harness.h test_harness_list_tests): per
    fixture, rows of "%-20s %-25s %s" (fixture on the first row only, then a variant and
    a test per row, either empty); the cases are every variant with every test (a fixture
    without variants has one, unnamed)."""
    fixtures: list[tuple[str, list[str], list[str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or set(line.strip()) == {"-"}:
            continue
        if not line[0].isspace():  # a fixture's first row
            name, rest = line.split(None, 1) if " " in line.strip() else (line.strip(), "")
            # the variant column starts at 21, or right after a longer fixture name
            col = max(len(name), 20) + 1
            tail = line[col:]
            fixtures.append((name, [], []))
        else:
            tail = line[21:]
        variant, test = tail[:25].strip(), tail[25:].strip()
        if not fixtures:
            continue
        if variant:
            fixtures[-1][1].append(variant)
        if test:
            fixtures[-1][2].append(test)
    cases: list[Case] = []
    for name, variants, tests in fixtures:
        for v in variants or [""]:
            cases.extend(Case(name, v, t) for t in tests)
    return cases


@dataclass(frozen=True)
class Result:
    number: int
    name: str
    status: str  # "pass", "fail", "skip", "xfail", "xpass"
    diag: tuple[str, ...] = ()  # the "#" lines the harness printed for the case


_TAP = re.compile(r"^(ok|not ok) (\d+) (\S+)(?:\s+#\s*(SKIP|XFAIL|XPASS)\b.*)?$")


def parse_tap(text: str) -> tuple[int | None, list[Result]]:
    """(the plan's count, the results) of the harness's TAP 13 output."""
    plan = None
    results: list[Result] = []
    diag: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^1\.\.(\d+)$", line)
        if m:
            plan = int(m.group(1))
            continue
        if line.startswith("#"):
            if line.startswith("#  RUN "):
                diag = []
            diag.append(line)
            continue
        m = _TAP.match(line)
        if not m:
            continue
        ok, num, name, directive = m.groups()
        if directive == "SKIP":
            status = "skip"
        elif directive == "XFAIL":
            status = "xfail"
        elif directive == "XPASS":
            status = "xpass"
        else:
            status = "pass" if ok == "ok" else "fail"
        results.append(Result(int(num), name, status, tuple(diag)))
        diag = []
    return plan, results


@dataclass
class Run:
    """One selftest binary under `vfiomig run --iommufd-test`."""

    name: str
    cases: list[Case]
    results: list[Result]
    plan: int | None
    returncode: int
    output: str  # the program's and the model server's, as one stream
    seconds: float
    by_name: dict[str, Result] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {r.name: r for r in self.results}

    def status(self, case: Case) -> str:
        r = self.by_name.get(case.name)
        return r.status if r is not None else "missing"

    @property
    def model_errors(self) -> list[str]:
        """What the model server said went wrong inside it (a bug, never the program's)."""
        return [ln for ln in self.output.splitlines() if ln.startswith("vfiomig run: ")]

    @property
    def crashed(self) -> bool:
        """The program died of a signal, or a case has no result (its process died)."""
        return self.returncode >= 128 or any(self.status(c) == "missing" for c in self.cases)

    def table(self) -> list[tuple[str, int, int, int]]:
        """(fixture[.variant], passed, failed or missing, skipped) in the harness's order."""
        rows: dict[str, list[int]] = {}
        for c in self.cases:
            row = rows.setdefault(c.group, [0, 0, 0])
            st = self.status(c)
            row[0 if st in ("pass", "xfail") else 2 if st == "skip" else 1] += 1
        return [(g, p, f, s) for g, (p, f, s) in rows.items()]

    @property
    def passed(self) -> int:
        return sum(1 for c in self.cases if self.status(c) in ("pass", "xfail"))

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if self.status(c) not in ("pass", "xfail", "skip")]

    @property
    def skipped(self) -> list[Case]:
        return [c for c in self.cases if self.status(c) == "skip"]


def list_cases(binary: Path) -> list[Case]:
    """The binary's own list of cases (-l prints it on stderr)."""
    got = subprocess.run([str(binary), "-l"], capture_output=True, text=True, timeout=60)
    return parse_list(got.stderr + got.stdout)


def run_selftest(binary: Path, harness_args: Sequence[str] = (), *, timeout: float = 900) -> Run:
    """Run one selftest binary under `vfiomig run --iommufd-test`."""
    import time

    cases = list_cases(binary)
    cmd = [sys.executable, "-m", "vfiomig.cli", "run", "--iommufd-test", "--"]
    # The harness logs expectations on stderr, results on stdout: one stream, line-buffered
    # (stdbuf) so that each case's messages come before its result.
    stdbuf = shutil.which("stdbuf")
    if stdbuf is not None:
        cmd += [stdbuf, "-oL"]
    start = time.monotonic()
    got = subprocess.run(
        [*cmd, str(binary), *harness_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        cwd=binary.parent,
    )
    seconds = time.monotonic() - start
    plan, results = parse_tap(got.stdout)
    if harness_args:  # a filtered run: only the cases it ran
        ran = {r.name for r in results}
        cases = [c for c in cases if c.name in ran]
    name = binary.name.split("-")[0]
    return Run(name, cases, results, plan, got.returncode, got.stdout, seconds)


def format_table(run: Run) -> str:
    lines = [f"{run.name}: {run.passed}/{len(run.cases)} passed in {run.seconds:.0f} s"]
    width = max([len(g) for g, *_ in run.table()] + [20])
    lines.append(f"  {'fixture.variant':<{width}}  passed  failed  skipped")
    for group, p, f, s in run.table():
        lines.append(f"  {group:<{width}}  {p:>3}/{p + f + s:<3} {f:>6}  {s:>7}")
    for c in run.failed:
        known = KNOWN_FAILURES.get(c.name)
        why = f"  [7.2: {known.commit} {known.subject}]" if known else "  [NOT KNOWN]"
        lines.append(f"  FAIL {c.name}{why}")
        r = run.by_name.get(c.name)
        for d in (r.diag if r else ())[1:][-4:]:
            lines.append(f"       {d}")
    for err_line in run.model_errors[:10]:
        lines.append(f"  MODEL {err_line}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfiomig.tools.kselftest", description=__doc__)
    p.add_argument("--only", choices=SELFTESTS, help="run one of the two selftests")
    p.add_argument("harness_args", nargs="*", help="passed to the harness (-f, -v, -t ...)")
    args = p.parse_args(argv)
    try:
        bins = build(fetch_sources())
    except (Unavailable, BuildError) as e:
        print(f"kselftest: unavailable: {e}", file=sys.stderr)
        return 2
    total_pass = total_fail = 0
    for name in SELFTESTS:
        if args.only and name != args.only:
            continue
        run = run_selftest(bins[name], args.harness_args)
        print(format_table(run))
        total_pass += run.passed
        total_fail += len(run.failed)
    print(f"kselftest: {total_pass} passed, {total_fail} failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
