"""vfiomig.hw at scale: map 1 TiB of 4 KiB leaves, dirty a few pages, read-and-clear it all.

Prints, per vendor, the time of map(), of read_and_clear_dirty(clear=True) + iotlb_sync over
the whole TiB, its ratio to the reference (numpy copy + zeroing of the 32 MiB bitmap, measured
in the same run), and the memory the domain's per-page state holds (bits per 4 KiB page).
Times are medians of a few runs; this machine is noisy, so read the ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from vfiomig.hw.iommu import VENDORS, Iommu
from vfiomig.hw.memory import Memory

TIB = 1 << 40
PAGES = TIB // 4096
BASE = 1 << 40  # an IOVA far from 0, as a FIXED map might use


def median_time(fn: Callable[[], object], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference() -> float:
    """What the brief measures against: copy a 32 MiB bitmap out and zero it."""
    src = np.full(PAGES // 8, 0x5A, np.uint8)

    def copy_and_zero() -> None:
        out = src.copy()
        src[:] = 0
        del out

    return median_time(copy_and_zero)


def one_vendor(vendor: str, mem: Memory, uva: int, ref: float) -> None:
    dom = Iommu(vendor).domain_alloc(dirty_tracking=True)
    dev = object()
    dom.attach(dev)
    t = time.perf_counter()
    dom.map(BASE, uva, TIB, read=True, write=True, huge=False)
    t_map = time.perf_counter() - t
    dom.set_dirty_tracking(True)

    def harvest() -> None:
        for i in range(16):  # a few DMA writes spread over the TiB
            dom.dma(dev, BASE + i * (TIB // 16) + 4096 * i, 4096, write=True)
        dom.read_and_clear_dirty(BASE, TIB, clear=True)
        dom.iotlb_sync(BASE, TIB)

    harvest()  # SMMUv3 starts with every writable page dirty: take the first full harvest out
    t_rc = median_time(harvest)
    bits = dom.nbytes * 8 / PAGES
    print(
        f"{vendor:7s} map {t_map * 1e3:7.1f} ms   read_and_clear+sync {t_rc * 1e3:6.1f} ms "
        f"({t_rc / ref:4.1f}x reference)   "
        f"state {dom.nbytes / 2**20:6.1f} MiB = {bits:.2f} bits/page"
    )


def main() -> None:
    mem = Memory()
    region = mem.mmap(TIB, backed=False)
    ref = reference()
    print(f"reference: copy + zero a 32 MiB bitmap: {ref * 1e3:.1f} ms")
    for vendor in VENDORS:
        one_vendor(vendor, mem, region.addr, ref)


if __name__ == "__main__":
    main()
