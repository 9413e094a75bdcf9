"""`vfiomig restore PATH`: load a stream saved by `vfiomig migrate --to file:PATH` into a
fresh destination host and check it against the digest the source recorded at switchover.

Example:
  vfiomig migrate --memory 256M --device reference --to file:/tmp/guest.vmig
  vfiomig restore /tmp/guest.vmig

Exit status: 0 restored and verified; 1 damaged, incomplete or different; 2 bad usage.
"""

from __future__ import annotations

import argparse

from vfiomig.sim.savefile import restore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("path", metavar="PATH", help="a file written by migrate --to file:PATH")


def run(args: argparse.Namespace) -> int:
    ok, msg = restore(args.path)
    print(f"vfiomig restore: {msg}")
    return 0 if ok else 1
