"""`vfiomig restore PATH`: load a stream saved by `vfiomig migrate --to file:PATH` into a
fresh destination host, start it, and check the restored guest (its RAM, vCPU state and
each device's state) against the digests the source recorded at switchover.

Examples:
  vfiomig restore /tmp/guest.vmig          # written by: vfiomig migrate ... --to file:/tmp/guest.vmig
  vfiomig restore file:/tmp/guest.vmig     # the same, spelt as --to takes it

A file that is not a save file, comes from another format version, is damaged, truncated
or incomplete (its migration did not finish), or restores into a guest that differs from
the source (CORRUPTION) is one line on stderr and exit status 1.

Exit status: 0 restored and verified; 1 not restored or not the same guest; 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from vfiomig.sim.savefile import restore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "path", metavar="PATH", help="a file written by migrate --to file:PATH (file: optional)"
    )


def run(args: argparse.Namespace) -> int:
    path = args.path
    if path.startswith("file:") and not os.path.exists(path):
        path = path[len("file:") :]  # the spelling --to took
    result = restore(path)
    if result.ok:
        print(f"vfiomig restore: {path}: {result.message}")
        return 0
    print(f"vfiomig restore: {path}: {result.message}", file=sys.stderr)
    return 1
