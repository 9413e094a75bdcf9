"""Running the checks against a target, one result each, and the table they print as."""

from __future__ import annotations

import time
from contextlib import ExitStack
from errno import EACCES, EBUSY, ENOENT, ENOTTY, EPERM

from vfiomig.conformance.checks import CHECKS
from vfiomig.conformance.core import (
    FAIL,
    FINDING,
    PASS,
    SETUP_INTERNAL,
    SKIP,
    Check,
    CheckResult,
    Ctx,
    Fail,
    Skip,
    Target,
    failure,
    internal_error,
    verdict,
)
from vfiomig.host import VfioError
from vfiomig.host.errors import OpenError

CHECK_NAMES = [name for name, _, _ in CHECKS]
# Checks that apply to a device without migration; every other one skips on such a device.
WITHOUT_MIGRATION = frozenset({"migration-flags", "dma-logging-validation", "dma-logging-report"})

SETUP = failure("runner/setup", "the device(s) or the iommufd cannot be opened for the first check")
REOPEN = failure("runner/reopen", "the device(s) cannot be opened again for a later check")
TEARDOWN = failure("runner/teardown", "closing the devices, IOAS or iommufd after a check failed")
UNEXPECTED = failure(
    "runner/unexpected-error",
    "an operation a check needs failed with an errno the check does not judge",
)


# ------------------------------------------------------------------------------------------
# running


def run_suite(target: Target, only: list[str] | None = None) -> list[CheckResult]:
    """Run the checks (all, or those named) against the target; one result each.

    Every check runs on devices opened for it alone: the iommufd, the IOAS and the devices
    are opened before it and closed after it (each device first brought back to RUNNING), so
    no verdict depends on which checks ran before. When the devices cannot be opened for the
    first check nothing runs: the one result is a "setup" failure that says why; when they
    cannot be opened again later, that check fails saying so. A failure to close the test
    objects is a "teardown" failure after the check's result."""
    selected = [c for c in CHECKS if only is None or c[0] in only]
    results: list[CheckResult] = []
    for i, (name, _doc, fn) in enumerate(selected):
        if not _run_fresh(target, name, fn, results, first=i == 0) and i == 0:
            break
    return results


def _run_fresh(
    target: Target, name: str, fn: Check, results: list[CheckResult], first: bool
) -> bool:
    """Open the device(s), run one check, settle and close everything; False when the
    devices could not be opened."""
    opened = False
    try:
        with ExitStack() as stack:
            ctx = _setup(target, stack, results, None if first else name)
            if ctx is not None:
                opened = True
                results.append(_run_one(ctx, name, fn))
                try:
                    ctx.settle()
                except (Fail, VfioError):
                    pass
    except Exception as e:
        after = f" after {name}" if opened else ""
        why = f"closing the test objects{after} failed: {e}"
        results.append(CheckResult("teardown", FAIL, why, failures=[TEARDOWN]))
    return opened


def _setup(
    target: Target, stack: ExitStack, results: list[CheckResult], check: str | None
) -> Ctx | None:
    """The run context, or None with a failure appended to ``results``: "setup" before the
    first check, else the check's own result."""
    try:
        return Ctx(target, stack)
    except VfioError as e:
        if check is None:
            why = f"cannot open the device: {e}{_hint(e, target)}"
            results.append(CheckResult("setup", FAIL, why, failures=[SETUP]))
        else:
            why = f"cannot open the device again for this check: {e}{_hint(e, target)}"
            results.append(CheckResult(check, FAIL, why, failures=[REOPEN]))
    except Exception as e:  # a kernel that raises something other than OSError
        what = "setup failed: internal error"
        results.append(internal_error(check or "setup", e, what, at=SETUP_INTERNAL))
    return None


def _hint(e: VfioError, target: Target) -> str:
    """What to do about a device or iommufd that cannot be opened or bound."""
    if isinstance(e, OpenError) and e.errno == ENOENT:
        if e.op == f"open({target.iommufd_path})":
            return " (this host has no iommufd; docs/real-hardware.md says what it needs)"
        return " (no such device node)"
    if e.errno == ENOTTY and e.op.startswith("IOMMU_"):
        return f" ({target.iommufd_path} does not answer as an iommufd)"
    if e.errno in (EACCES, EPERM):
        return " (run as root or give your user access: docs/real-hardware.md)"
    if e.errno == EBUSY:
        return " (in use: a VM or another process has it open)"
    return ""


def _run_one(ctx: Ctx, name: str, fn: Check) -> CheckResult:
    t0 = time.perf_counter()
    try:
        if name not in WITHOUT_MIGRATION:
            _ = ctx.flags  # Skip (with the reason) on a device that cannot migrate
        ctx.settle()
        reason = fn(ctx)
        res = CheckResult(name, PASS, reason)
    except Fail as e:
        details = [str(a) for a in e.args[1:]]
        res = CheckResult(name, verdict(e.paths), str(e.args[0]), details, failures=e.paths)
    except Skip as e:
        res = CheckResult(name, SKIP, str(e))
    except VfioError as e:
        res = CheckResult(name, FAIL, f"unexpected error: {e}", failures=[UNEXPECTED])
    except Exception as e:  # a bug in the suite or the kernel: report, keep going
        res = internal_error(name, e)
    res.seconds = time.perf_counter() - t0
    return res


def summary(results: list[CheckResult]) -> dict[str, int]:
    out = {PASS: 0, FAIL: 0, SKIP: 0, FINDING: 0}
    for r in results:
        out[r.status] += 1
    return out


def render(results: list[CheckResult], label: str) -> str:
    lines = [f"conformance: {label}"]
    width = max((len(r.name) for r in results), default=10)
    for r in results:
        lines.append(f"{r.status.upper()[:4]:4}  {r.name:<{width}}  {r.reason}")
        for d in r.details[:10]:
            lines.append(f"{'':4}  {'':<{width}}    {d}")
    s = summary(results)
    lines.append(
        f"{len(results)} checks: {s[PASS]} pass, {s[FAIL]} fail, {s[SKIP]} skip, "
        f"{s[FINDING]} finding"
    )
    return "\n".join(lines)
