"""Device DMA logging: argument validation and reports of DMA the suite causes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from errno import E2BIG, EINVAL, ENOTTY, EOVERFLOW
from typing import Any

from vfiomig.conformance.core import (
    CheckSpec,
    Ctx,
    Fail,
    ModelHooks,
    Skip,
    checker,
    expect_errno,
    failure,
    probe_errno,
)
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


DV_NO_LOG_START = failure(
    "dma-logging-validation/no-log-start", "DMA_LOGGING_START without DMA logging is not ENOTTY"
)
DV_NO_LOG_REPORT = failure(
    "dma-logging-validation/no-log-report",
    "DMA_LOGGING_REPORT without DMA logging is not ENOTTY",
)
DV_PROBE = failure(
    "dma-logging-validation/probe", "the DMA_LOGGING_START PROBE failed (but with ENOTTY)"
)
DV_NO_RANGES = failure("dma-logging-validation/no-ranges", "START with 0 ranges is not EINVAL")
DV_TOO_MANY = failure(
    "dma-logging-validation/too-many-ranges",
    "START with one range more than the kernel takes (PAGE_SIZE / 16) is not E2BIG",
)
DV_UNALIGNED_IOVA = failure(
    "dma-logging-validation/unaligned-iova", "START with an iova not page aligned is not EINVAL"
)
DV_UNALIGNED_LENGTH = failure(
    "dma-logging-validation/unaligned-length",
    "START with a length not page aligned is not EINVAL",
)
DV_OVERLAP = failure(
    "dma-logging-validation/overlap", "START with overlapping ranges is not EINVAL"
)
DV_START_OVERFLOW = failure(
    "dma-logging-validation/start-overflow", "START with iova + length past 2^64 is not EOVERFLOW"
)
DV_REPORT_SMALL_PAGE = failure(
    "dma-logging-validation/report-small-page", "REPORT with page_size 2048 is not EINVAL"
)
DV_REPORT_ODD_PAGE = failure(
    "dma-logging-validation/report-odd-page",
    "REPORT with page_size 12288 (not a power of two) is not EINVAL",
)
DV_REPORT_OVERFLOW = failure(
    "dma-logging-validation/report-overflow",
    "REPORT with iova + length past 2^64 is not EOVERFLOW",
)
DV_ORDER_COUNT = failure(
    "dma-logging-validation/order-count",
    "START checks the ranges before their number (too many ranges, the first unaligned: not E2BIG)",
)
DV_ORDER_ALIGN = failure(
    "dma-logging-validation/order-align",
    "START checks a range's end before its alignment (unaligned and past 2^64: not EINVAL)",
)
DV_ORDER_RANGES = failure(
    "dma-logging-validation/order-ranges",
    "START does not judge the ranges in array order (an overlap before a range past 2^64: "
    "not EINVAL)",
)
DV_ORDER_REPORT = failure(
    "dma-logging-validation/order-report",
    "REPORT checks the end before the page size (page_size 2048 and past 2^64: not EINVAL)",
)
DV_MAX_RANGES = failure(
    "dma-logging-validation/max-ranges",
    "START with exactly as many ranges as the kernel takes (PAGE_SIZE / 16) fails "
    "validation (E2BIG, EINVAL or EOVERFLOW)",
)


@check(
    "dma-logging-validation",
    "DMA_LOGGING_START / REPORT argument validation (EINVAL, E2BIG, EOVERFLOW) in the "
    "kernel's order; PAGE_SIZE / 16 ranges accepted, one more E2BIG",
)
def c_log_validation(ctx: Ctx) -> str:
    code = ctx.a.probe_feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET)
    if code == ENOTTY:
        expect_errno(
            lambda: ctx.a.dma_logging_start([(0, 4096)]),
            ENOTTY,
            "DMA_LOGGING_START on a device without DMA logging",
            DV_NO_LOG_START,
        )
        expect_errno(
            lambda: ctx.a.dma_logging_report(0, 4096),
            ENOTTY,
            "DMA_LOGGING_REPORT on a device without DMA logging",
            DV_NO_LOG_REPORT,
        )
        return "no DMA logging: START / REPORT ENOTTY"
    if code:
        raise Fail(f"DMA_LOGGING_START PROBE failed with {errno_name(code)}", at=DV_PROBE)
    pg = 4096
    top = 1 << 64
    # LOG_MAX_RANGES: the ranges must fit one kernel page (vfio_main.c)
    limit = ctx.target.host_page_size // 16

    def spread(n: int) -> list[tuple[int, int]]:
        """n one-page ranges with a page between them."""
        return [(i * 2 * pg, pg) for i in range(n)]

    a = ctx.a
    start = a.dma_logging_start
    cases: list[tuple[str, Callable[[], Any], int, str]] = [
        ("START with no ranges", lambda: start([], pg), EINVAL, DV_NO_RANGES),
        (
            f"START with {limit + 1} ranges",
            lambda: start(spread(limit + 1), pg),
            E2BIG,
            DV_TOO_MANY,
        ),
        (
            "START with an unaligned iova",
            lambda: start([(pg // 2, pg)], pg),
            EINVAL,
            DV_UNALIGNED_IOVA,
        ),
        (
            "START with an unaligned length",
            lambda: start([(0, pg + 512)], pg),
            EINVAL,
            DV_UNALIGNED_LENGTH,
        ),
        (
            "START with overlapping ranges",
            lambda: start([(0, 4 * pg), (2 * pg, 4 * pg)], pg),
            EINVAL,
            DV_OVERLAP,
        ),
        (
            "START with iova + length past 2^64",
            lambda: start([(top - pg, 2 * pg)], pg),
            EOVERFLOW,
            DV_START_OVERFLOW,
        ),
        (
            "REPORT with page_size 2048",
            lambda: a.dma_logging_report(0, 1 << 20, 2048),
            EINVAL,
            DV_REPORT_SMALL_PAGE,
        ),
        (
            "REPORT with page_size 12288",
            lambda: a.dma_logging_report(0, 3 << 20, 12288),
            EINVAL,
            DV_REPORT_ODD_PAGE,
        ),
        (
            "REPORT with iova + length past 2^64",
            lambda: a.dma_logging_report(top - pg, 2 * pg, pg),
            EOVERFLOW,
            DV_REPORT_OVERFLOW,
        ),
        # The kernel's order: the number of ranges, then each range in array order (its
        # alignment, then its end, then overlap with the ranges before it); REPORT: the page
        # size, then the end.
        (
            f"START with {limit + 1} ranges, the first unaligned",
            lambda: start([(pg // 2, pg)] + spread(limit + 1)[1:], pg),
            E2BIG,
            DV_ORDER_COUNT,
        ),
        (
            "START with an unaligned range that also ends past 2^64",
            lambda: start([(top - pg // 2, pg)], pg),
            EINVAL,
            DV_ORDER_ALIGN,
        ),
        (
            "START with overlapping ranges, then one past 2^64",
            lambda: start([(0, 4 * pg), (2 * pg, 4 * pg), (top - pg, 2 * pg)], pg),
            EINVAL,
            DV_ORDER_RANGES,
        ),
        (
            "REPORT with page_size 2048 and iova + length past 2^64",
            lambda: a.dma_logging_report(top - pg, 2 * pg, 2048),
            EINVAL,
            DV_ORDER_REPORT,
        ),
    ]
    for what, fn, want, at in cases:
        expect_errno(fn, want, what, at)
    # The boundary: exactly `limit` ranges pass the kernel's validation. The driver may
    # still refuse them for its own reasons (its tracker's limits), never as invalid.
    code = probe_errno(lambda: start(spread(limit), pg))
    if code in (E2BIG, EINVAL, EOVERFLOW):
        raise Fail(
            f"START with {limit} valid ranges (the kernel's limit, PAGE_SIZE / 16) failed "
            f"with {errno_name(code)}",
            at=DV_MAX_RANGES,
        )
    note = f"; {limit} ranges: " + (
        f"the driver refused ({errno_name(code)})" if code else "accepted"
    )
    try:
        a.dma_logging_stop()
    except VfioError:
        pass
    return f"{len(cases)} bad arguments rejected in the kernel's order{note}"


LR_PAGE = failure(
    "dma-logging-report/page-size", "DMA_LOGGING_START negotiated a page size not a power of two"
)
LR_MISSES = failure("dma-logging-report/misses-writes", "the report misses pages the device wrote")
LR_NOT_CLEARED = failure(
    "dma-logging-report/not-cleared", "a second report shows pages the first one reported"
)
LR_OFFSET = failure(
    "dma-logging-report/bit-offset",
    "a report from an iova inside the range does not count its bits from that iova",
)


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
        raise Fail(f"DMA_LOGGING_START negotiated page size {page}, not a power of two", at=LR_PAGE)
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
            f"are not reported (iova {shown})",
            at=LR_MISSES,
        )
    again = ctx.a.dma_logging_report(DMA_BASE, length, page)
    if again:
        raise Fail(
            f"the report did not clear the log: a second report shows {again.count()} pages",
            at=LR_NOT_CLEARED,
        )
    # bits are relative to the report's own iova
    hooks.dma_write(ctx.a.path, DMA_BASE + 40 * 4096, b"\xee" * 8)
    sub = ctx.a.dma_logging_report(DMA_BASE + 32 * 4096, 16 * 4096, page)
    if sub.pages().tolist() != [(8 * 4096) // page]:
        raise Fail(
            f"a report from iova {DMA_BASE + 32 * 4096:#x} set bits {sub.pages().tolist()}; "
            f"expected [{(8 * 4096) // page}] (bits count from the report's iova)",
            at=LR_OFFSET,
        )
    note = f"; {len(extra)} extra pages reported" if extra else ""
    return f"{len(want)} written pages reported at {page:#x}, then clear{note}"
