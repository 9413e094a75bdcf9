"""A migration conformance suite for one VFIO device, run through ``vfiomig.host``.

Every check drives the device with the same bytes a VMM would send and compares what the
kernel and the driver do with what the VFIO uAPI (linux/vfio.h) promises: the migration FSM
and its data fds, illegal and blocked transitions, PRECOPY_INFO, MIG_DATA_SIZE, the end of
the data stream, save/resume round trips, rejection of bad resume streams, recovery through
reset, DMA logging, and the P2P two-phase order.

    core.py       verdicts (Fail, Skip, CheckResult), the failure paths (FAILURES: every
                  place a check records a failure, by id), Target, ModelHooks, the run
                  context Ctx
    stream.py     saved streams (memory or temporary file) and their damaged copies
    checks/       fsm.py, data.py, resume.py, dma.py, p2p.py: the checks, by group
    runner.py     run_suite (one result per check), render (the table)

The command line is ``vfiomig conformance`` (vfiomig.tools.conformance).
"""

from vfiomig.conformance.checks import CHECKS
from vfiomig.conformance.core import (
    FAIL,
    FAILURES,
    FINDING,
    FINDINGS,
    PASS,
    SKIP,
    CheckResult,
    Ctx,
    Fail,
    ModelHooks,
    Skip,
    Target,
    kernel_release_at_least,
    verdict,
)
from vfiomig.conformance.runner import CHECK_NAMES, WITHOUT_MIGRATION, render, run_suite, summary
from vfiomig.conformance.stream import Stream, corrupted, first_difference, truncated

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "FAIL",
    "FAILURES",
    "FINDING",
    "FINDINGS",
    "PASS",
    "SKIP",
    "WITHOUT_MIGRATION",
    "CheckResult",
    "Ctx",
    "Fail",
    "ModelHooks",
    "Skip",
    "Stream",
    "Target",
    "corrupted",
    "first_difference",
    "kernel_release_at_least",
    "render",
    "run_suite",
    "summary",
    "truncated",
    "verdict",
]
