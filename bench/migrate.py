"""`vfiomig migrate` at scale: wall time and peak memory of simulated migrations.

Each case runs in its own process (so its peak RSS is its own) through the same code as
`vfiomig migrate --json`, and reports, from that process:

  wall      seconds of wall time for the whole command (hosts built, migrated, verified)
  floor     one numpy pass over the guest's per-page state (a uint32 version per page read
            and compared), timed in the same process right after: the least any engine
            that looks at every page once must spend
  ratio     wall / floor
  sim/wall  simulated seconds per wall second
  rss       peak resident memory (ru_maxrss)

    .venv/bin/python bench/migrate.py [--quick]

Targets (issue 10): 1 TiB plain VM <= 20 s and <= 6 GiB; with --device reference
--hugepages off <= 30 s; 16 GiB <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

BIG = [
    "--workload", "random,wss=8G,rate=1G", "--link", "100Gbit",
    "--max-bandwidth", "12500000000", "--max-time", "600",
]  # fmt: skip
CASES = [
    ("16 GiB, plain VM", ["--memory", "16G", *BIG], 2.0),
    ("1 TiB, plain VM", ["--memory", "1T", *BIG], 20.0),
    ("1 TiB, reference, 4K IOPTEs", ["--memory", "1T", *BIG, "--device", "reference",
                                      "--hugepages", "off"], 30.0),
]  # fmt: skip

CHILD = r"""
import json, resource, sys, time
import numpy as np
from vfiomig.cli import build_parser
from vfiomig.tools.migrate import scenario_from_args
from vfiomig.sim.run import run

args = build_parser().parse_args(["migrate", *sys.argv[1:]])
t0 = time.perf_counter()
sc = scenario_from_args(args)
res = run(sc)
wall = time.perf_counter() - t0
npages = sc.memory // 4096
a = np.zeros(npages, dtype=np.uint32)
b = np.zeros(npages, dtype=np.uint32)
t1 = time.perf_counter()
same = bool(np.array_equal(a, b))
floor = time.perf_counter() - t1
print(json.dumps({
    "status": res.status, "verified": res.verified, "wall": wall, "floor": floor,
    "sim": res.mig.stats.total_time if res.mig else 0.0, "same": same,
    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 16 GiB case")
    args = ap.parse_args()
    cases = CASES[:1] if args.quick else CASES
    print(f"{'case':32} {'status':10} {'wall s':>7} {'target':>6} {'floor s':>8} {'ratio':>6} "
          f"{'sim/wall':>8} {'rss GiB':>7}")  # fmt: skip
    ok = True
    for name, argv, target in cases:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr}")
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        status = r["status"] + ("" if r["verified"] else " (NOT verified)")
        ok = ok and r["verified"] and r["status"] == "completed"
        print(
            f"{name:32} {status:10} {r['wall']:7.2f} {target:6.0f} {r['floor']:8.4f} "
            f"{r['wall'] / r['floor']:6.0f} {r['sim'] / r['wall']:8.2f} {r['rss'] / 2**30:7.2f}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
