"""The checks, one module per group, in the order they run."""

from vfiomig.conformance.checks import data, dma, fsm, p2p, resume
from vfiomig.conformance.core import CheckSpec

CHECKS: list[CheckSpec] = [*fsm.CHECKS, *data.CHECKS, *resume.CHECKS, *dma.CHECKS, *p2p.CHECKS]

__all__ = ["CHECKS"]
