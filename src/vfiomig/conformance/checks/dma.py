"""Device DMA logging: argument validation and reports of DMA the suite causes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from errno import E2BIG, EINVAL, ENOTTY, EOVERFLOW
from typing import Any

from vfiomig.conformance.core import CheckSpec, Ctx, Fail, ModelHooks, Skip, checker, expect_errno
from vfiomig.host import VfioError
from vfiomig.host.device import SET
from vfiomig.host.errors import errno_name
from vfiomig.uapi import vfio as v

# Where the checks that make the device DMA map a buffer for it, and how big it is.
DMA_BASE = 1 << 32
DMA_PAGES = 64
DMA_LENGTH = DMA_PAGES * 4096

CHECKS: list[CheckSpec] = []
check = checker(CHECKS)


@contextmanager
def dma_window(ctx: Ctx) -> Iterator[None]:
    """DMA_LENGTH bytes of user memory mapped at DMA_BASE in the suite's IOAS while the
    block runs, for the model's device to DMA into."""
    with ctx.t.mmap(DMA_LENGTH) as buf:
        ctx.ioas.map(buf, iova=DMA_BASE)
        try:
            yield
        finally:
            ctx.ioas.unmap(DMA_BASE, DMA_LENGTH)


@check(
    "dma-logging-validation",
    "DMA_LOGGING_START / REPORT argument validation (EINVAL, E2BIG, EOVERFLOW)",
)
def c_log_validation(ctx: Ctx) -> str:
    code = ctx.a.probe_feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET)
    if code == ENOTTY:
        for fn, what in (
            (lambda: ctx.a.dma_logging_start([(0, 4096)]), "DMA_LOGGING_START"),
            (lambda: ctx.a.dma_logging_report(0, 4096), "DMA_LOGGING_REPORT"),
        ):
            expect_errno(fn, ENOTTY, f"{what} on a device without DMA logging")
        return "no DMA logging: START / REPORT ENOTTY"
    if code:
        raise Fail(f"DMA_LOGGING_START PROBE failed with {errno_name(code)}")
    pg = 4096
    limit = ctx.target.host_page_size // 16
    a = ctx.a
    cases: list[tuple[str, Callable[[], Any], int]] = [
        ("START with no ranges", lambda: a.dma_logging_start([], pg), EINVAL),
        (
            f"START with {limit + 1} ranges",
            lambda: a.dma_logging_start([(i * 2 * pg, pg) for i in range(limit + 1)], pg),
            E2BIG,
        ),
        ("START with an unaligned iova", lambda: a.dma_logging_start([(pg // 2, pg)], pg), EINVAL),
        (
            "START with an unaligned length",
            lambda: a.dma_logging_start([(0, pg + 512)], pg),
            EINVAL,
        ),
        (
            "START with overlapping ranges",
            lambda: a.dma_logging_start([(0, 4 * pg), (2 * pg, 4 * pg)], pg),
            EINVAL,
        ),
        (
            "START with iova + length past 2^64",
            lambda: a.dma_logging_start([((1 << 64) - pg, 2 * pg)], pg),
            EOVERFLOW,
        ),
        ("REPORT with page_size 2048", lambda: a.dma_logging_report(0, 1 << 20, 2048), EINVAL),
        ("REPORT with page_size 12288", lambda: a.dma_logging_report(0, 3 << 20, 12288), EINVAL),
        (
            "REPORT with iova + length past 2^64",
            lambda: a.dma_logging_report((1 << 64) - pg, 2 * pg, pg),
            EOVERFLOW,
        ),
    ]
    for what, fn, want in cases:
        expect_errno(fn, want, what)
    try:
        a.dma_logging_stop()
    except VfioError:
        pass
    return f"{len(cases)} bad arguments rejected"


@check(
    "dma-logging-report",
    "the device's dirty log reports exactly the pages the suite made it write, then clears",
)
def c_log_report(ctx: Ctx) -> str:
    hooks = ctx.target.model
    if hooks is None:
        raise Skip("needs a way to make the device DMA (only the model has one)")
    if ctx.a.probe_feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET):
        raise Skip("the device has no DMA logging")
    if ctx.attach_error:
        raise Skip(f"the device is not attached to an IOAS ({ctx.attach_error})")
    with dma_window(ctx):
        try:
            return _log_report(ctx, hooks)
        finally:
            try:
                ctx.a.dma_logging_stop()
            except VfioError:
                pass


def _log_report(ctx: Ctx, hooks: ModelHooks) -> str:
    length = DMA_LENGTH
    page = ctx.a.dma_logging_start([(DMA_BASE, length)], 4096)
    if page <= 0 or page & (page - 1):
        raise Fail(f"DMA_LOGGING_START negotiated page size {page}, not a power of two")
    if page > length // 4:
        raise Skip(f"the device logs at {page:#x} bytes, too coarse for a {length:#x}-byte test")
    offsets = [0, 4096, 5 * 4096, 17 * 4096 + 100, 31 * 4096, 32 * 4096, 33 * 4096, 63 * 4096 + 8]
    offsets = [o for o in offsets if o + 8 <= length]
    for i, off in enumerate(offsets):
        try:
            hooks.dma_write(ctx.a.path, DMA_BASE + off, bytes([i + 1]) * 8)
        except Exception as e:  # the model's own fault type: the device cannot DMA here
            raise Skip(f"the device cannot DMA: {e}") from e
    want = sorted({off // page for off in offsets})
    rep = ctx.a.dma_logging_report(DMA_BASE, length, page)
    got = rep.pages().tolist()
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    if missing:
        shown = ", ".join(f"{DMA_BASE + p * page:#x}" for p in missing[:4])
        raise Fail(
            f"dirty log misses writes: {len(missing)} of {len(want)} pages the device wrote "
            f"are not reported (iova {shown})"
        )
    again = ctx.a.dma_logging_report(DMA_BASE, length, page)
    if again:
        raise Fail(f"the report did not clear the log: a second report shows {again.count()} pages")
    # bits are relative to the report's own iova
    hooks.dma_write(ctx.a.path, DMA_BASE + 40 * 4096, b"\xee" * 8)
    sub = ctx.a.dma_logging_report(DMA_BASE + 32 * 4096, 16 * 4096, page)
    if sub.pages().tolist() != [(8 * 4096) // page]:
        raise Fail(
            f"a report from iova {DMA_BASE + 32 * 4096:#x} set bits {sub.pages().tolist()}; "
            f"expected [{(8 * 4096) // page}] (bits count from the report's iova)"
        )
    note = f"; {len(extra)} extra pages reported" if extra else ""
    return f"{len(want)} written pages reported at {page:#x}, then clear{note}"
