"""Guest workloads: which pages the vCPUs write in a slice of simulated time.

A workload's RATE is bytes per second written in whole 4 KiB pages (RATE / 4096 page writes
per second; fractions carry over between slices). Working sets start at the bottom of guest
RAM. Specs (``--workload``): ``idle``; ``random,wss=SIZE,rate=RATE``;
``hotcold,wss=SIZE,hot=SIZE,rate=RATE[,hotfrac=0.9]``; ``sequential,wss=SIZE,rate=RATE``
(rewrites the working set in order, like a memory dirtier).

Auto-converge throttling takes vCPU time away: a throttle of P % scales the rate by
(1 - P/100).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vfiomig.vmm.bitmap import Pages

PAGE = 4096
KINDS = ("idle", "random", "hotcold", "sequential")
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class Workload:
    kind: str = "idle"
    wss: int = 0  # bytes
    rate: int = 0  # bytes per second
    hot: int = 0  # bytes of the hot set (hotcold)
    hotfrac: float = 0.9  # share of writes that go to the hot set
    _carry: float = 0.0
    pos: int = 0  # sequential: the next page to write

    def check(self, max_pages: int) -> None:
        """ValueError for a spec that cannot run on a guest with ``max_pages`` CPU pages."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload {self.kind!r} (one of: {', '.join(KINDS)})")
        if self.kind == "idle":
            return
        if self.wss < PAGE or self.rate <= 0:
            raise ValueError(f"workload {self.kind}: wss (>= 4K) and rate (> 0) are required")
        if self.wss // PAGE > max_pages:
            raise ValueError(
                f"workload wss {self.wss >> 20} MiB exceeds the guest's "
                f"{max_pages * PAGE >> 20} MiB of CPU-writable RAM"
            )
        if self.kind == "hotcold" and not 0 < self.hot < self.wss:
            raise ValueError("workload hotcold: hot must be > 0 and smaller than wss")
        if not 0.0 <= self.hotfrac <= 1.0:
            raise ValueError("workload hotfrac must be within [0, 1]")

    def pages(self, dt: float, rng: np.random.Generator, throttle: float = 0.0) -> Pages:
        """Pages written during ``dt`` seconds, sorted (a page written twice may appear twice),
        vCPUs throttled by ``throttle``, a fraction."""
        if self.kind == "idle" or dt <= 0:
            return _EMPTY
        want = self.rate * dt * (1.0 - throttle) / PAGE + self._carry
        n = int(want)
        self._carry = want - n
        if n == 0:
            return _EMPTY
        wss = self.wss // PAGE
        if self.kind == "random":
            p = rng.integers(0, wss, n)
        elif self.kind == "hotcold":
            hot = self.hot // PAGE
            nh = int(rng.binomial(n, self.hotfrac))
            p = np.concatenate((rng.integers(0, hot, nh), rng.integers(hot, wss, n - nh)))
        else:
            n = min(n, wss)
            p = (self.pos + np.arange(n, dtype=np.int64)) % wss
            self.pos = int((self.pos + n) % wss)
        return np.sort(p.astype(np.int64))

    def describe(self) -> str:
        if self.kind == "idle":
            return "idle"
        extra = f", hot {self.hot >> 20} MiB ({self.hotfrac:.0%})" if self.kind == "hotcold" else ""
        return f"{self.kind}: {self.wss >> 20} MiB working set at {self.rate >> 20} MiB/s{extra}"
