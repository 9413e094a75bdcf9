"""The kernel's own iommufd selftests, unmodified, against the model (docs/selftests.md).

`make selftest` runs the tests marked `kselftest` (and `make test` runs it first): they
take the selftests from Debian's linux-source-6.12 (vfiomig.tools.kselftest fetches and
builds them), run them under `vfiomig run --iommufd-test`, print the per-fixture table and
hold the bar:

* iommufd: every case the binary lists (`-l`) has a result, at least 95 % pass, and each
  failure is one of KNOWN_FAILURES (a rule Linux 7.2 changed since the 6.12 test);
* iommufd_fail_nth: every case runs (fault injection served, none skipped) and passes;
* neither crashes: the program ends normally and the model reports no internal error.

Where apt-get, the package or gcc is missing they skip with the reason, except under
CI=true, where that is a failure. The parsers of the harness's `-l` list and TAP output
are tested on their own, without the kernel source.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfiomig.shim.build import BuildError
from vfiomig.tools.kselftest import (
    KNOWN_FAILURES,
    Run,
    Unavailable,
    build,
    fetch_sources,
    format_table,
    parse_list,
    parse_tap,
    run_selftest,
)


@pytest.fixture(scope="module")
def selftests() -> dict[str, Path]:
    try:
        return build(fetch_sources())
    except (Unavailable, BuildError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the iommufd selftests cannot be built here: {e}")
        pytest.skip(f"the iommufd selftests cannot be built here: {e}")


def _report(run: Run) -> None:
    print()
    print(format_table(run))


def _no_crash(run: Run) -> None:
    assert not run.model_errors, run.model_errors
    assert run.returncode < 128, f"{run.name} died of signal {run.returncode - 128}"
    missing = [c.name for c in run.cases if run.status(c) == "missing"]
    assert not missing, f"cases without a result (their process died): {missing}"


@pytest.mark.kselftest
def test_iommufd(selftests: dict[str, Path]) -> None:
    run = run_selftest(selftests["iommufd"])
    _report(run)
    _no_crash(run)
    assert run.plan == len(run.cases), (run.plan, len(run.cases))
    unknown = [c.name for c in run.failed if c.name not in KNOWN_FAILURES]
    assert not unknown, f"failures that are no known 7.2 change: {unknown}"
    assert not run.skipped, [c.name for c in run.skipped]
    assert run.passed * 100 >= 95 * len(run.cases), (run.passed, len(run.cases))


@pytest.mark.kselftest
def test_iommufd_fail_nth(selftests: dict[str, Path]) -> None:
    run = run_selftest(selftests["iommufd_fail_nth"])
    _report(run)
    _no_crash(run)
    assert run.cases and run.plan == len(run.cases)
    assert not run.skipped, f"fault injection not served: {[c.name for c in run.skipped]}"
    assert not run.failed, [c.name for c in run.failed]


# -- the parsers, on the harness's own formats -----------------------------------------

LISTING = """\
# FIXTURE            VARIANT                   TEST
global
--------------------------------------------------------------------------------
iommufd                                        simple_close
                                               cmd_fail
--------------------------------------------------------------------------------
iommufd_ioas         no_domain                 ioas_auto_destroy
                     mock_domain               ioas_destroy
                     two_mock_domain
--------------------------------------------------------------------------------
iommufd_dirty_tracking domain_dirty8k            enforce_dirty
                     domain_dirty16k
"""


def test_parse_list() -> None:
    cases = parse_list(LISTING)
    assert [c.name for c in cases] == [
        "iommufd.simple_close",
        "iommufd.cmd_fail",
        "iommufd_ioas.no_domain.ioas_auto_destroy",
        "iommufd_ioas.no_domain.ioas_destroy",
        "iommufd_ioas.mock_domain.ioas_auto_destroy",
        "iommufd_ioas.mock_domain.ioas_destroy",
        "iommufd_ioas.two_mock_domain.ioas_auto_destroy",
        "iommufd_ioas.two_mock_domain.ioas_destroy",
        "iommufd_dirty_tracking.domain_dirty8k.enforce_dirty",
        "iommufd_dirty_tracking.domain_dirty16k.enforce_dirty",
    ]


TAP = """\
TAP version 13
1..3
# Starting 3 tests from 2 test cases.
#  RUN           iommufd.simple_close ...
#            OK  iommufd.simple_close
ok 1 iommufd.simple_close
#  RUN           iommufd_ioas.no_domain.area ...
# iommufd.c:378:area:Expected 2 (2) == errno (22)
#          FAIL  iommufd_ioas.no_domain.area
not ok 2 iommufd_ioas.no_domain.area
#  RUN           basic_fail_nth.basic ...
#      SKIP      fault injection is not enabled in the kernel
ok 3 basic_fail_nth.basic # SKIP fault injection is not enabled in the kernel
# FAILED: 1 / 3 tests passed.
"""


def test_parse_tap() -> None:
    plan, results = parse_tap(TAP)
    assert plan == 3
    assert [(r.number, r.name, r.status) for r in results] == [
        (1, "iommufd.simple_close", "pass"),
        (2, "iommufd_ioas.no_domain.area", "fail"),
        (3, "basic_fail_nth.basic", "skip"),
    ]
    assert "iommufd.c:378:area:Expected 2 (2) == errno (22)" in results[1].diag[1]


def test_table_counts_missing_as_failed() -> None:
    cases = parse_list(LISTING)
    _, results = parse_tap(TAP)
    run = Run("iommufd", cases, results, 3, 0, "", 0.0)
    table = dict((g, (p, f, s)) for g, p, f, s in run.table())
    assert table["iommufd"] == (1, 1, 0)  # cmd_fail has no result: missing
    assert run.crashed
    assert "iommufd_ioas.no_domain" in format_table(run)
