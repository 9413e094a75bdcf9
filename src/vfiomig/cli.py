"""The `vfiomig` command: one entry point, one module per subcommand under vfiomig.tools."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# subcommand (its module is vfiomig.tools.<subcommand>) -> one-line help
COMMANDS: dict[str, str] = {
    "migrate": "live-migrate a guest with passthrough devices as QEMU does (simulated time)",
    "restore": "load a stream saved by migrate --to file:PATH and check it",
    "demo": "walk a VFIO migration with IOMMU dirty tracking on the model kernel",
    "probe": "what a host offers: IOMMU dirty tracking, devices, migration flags",
    "conformance": "migration conformance suite for one VFIO device",
    "run": "run an unmodified C program against the model kernel (LD_PRELOAD)",
}


class Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2:
    ``vfiomig probe: error: argument --model: ... (see vfiomig probe --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options: next to --iommu (deprecated), --iommu-hw and --iommufd a prefix
    # is a guess, and a new option must not change what an old prefix means.
    parser = Parser(prog="vfiomig", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        mod = importlib.import_module(f"vfiomig.tools.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run, subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # said by the subcommand's parser, which knows the options
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print("vfiomig: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `vfiomig probe --json | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again, and exit as SIGPIPE would.
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured output): nothing will be flushed to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
