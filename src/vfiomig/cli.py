"""vfiomig: understand, test and drive live migration of virtual machines with VFIO
passthrough devices, on a model of Linux 7.2's VFIO and iommufd and QEMU 10.0's migration,
or (probe, conformance) on this host's real devices.

Each command is one module of vfiomig.tools, with its own options, examples and exit status.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from vfiomig.tools import helptext

# subcommand (its module is vfiomig.tools.<subcommand>) -> what a user can do with it, in
# one line (shown by `vfiomig` and `vfiomig --help`)
COMMANDS: dict[str, str] = {
    "migrate": "live-migrate a guest with passthrough devices as QEMU does, and verify it",
    "restore": "load a stream saved by `migrate --to file:PATH` and check it",
    "demo": "compare what each dirty-tracking design costs the same guest",
    "probe": "see what a host offers for migration: IOMMU dirty tracking, devices, flags",
    "conformance": "test a VFIO device's migration against the uAPI (real or modelled)",
    "run": "run an unmodified C program (a VMM, a test) against the model kernel",
}

DESCRIPTION = """\
Understand, test and drive live migration of virtual machines with VFIO passthrough devices:
on a model of Linux 7.2's VFIO and iommufd (two model hosts, QEMU 10.0's migration policy,
simulated time), or, for probe and conformance, on this host's real devices."""

EXAMPLES = (
    ("vfiomig migrate --memory 256M --device hisi_acc", "the main job"),
    ("vfiomig probe", "what this host offers"),
    ("vfiomig conformance --model reference", "the conformance suite on a model device"),
)

MORE = """\
Run 'vfiomig COMMAND --help' for what a command does, its options, examples and exit
status. Exit status 2 is a usage error in every command."""


def commands_text() -> str:
    """One line per command: its name and what a user can do with it."""
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items())


class Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2:
    ``vfiomig probe: error: argument --model: ... (see vfiomig probe --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options: next to --iommu (deprecated), --iommu-hw and --iommufd a prefix
    # is a guess, and a new option must not change what an old prefix means.
    parser = Parser(prog="vfiomig", usage="%(prog)s [-h] COMMAND ...", allow_abbrev=False)
    helptext.apply(
        parser,
        f"{DESCRIPTION}\n\nCommands:\n{commands_text()}",
        [helptext.examples(*EXAMPLES), MORE],
    )
    # The commands are listed in the description, one line each whatever their names' length.
    sub = parser.add_subparsers(
        prog="vfiomig", dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS
    )
    for name, help_text in COMMANDS.items():
        mod = importlib.import_module(f"vfiomig.tools.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run, subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        # `vfiomig` alone: what it can do, as a usage error
        parser.exit(
            2,
            f"{parser.format_usage()}vfiomig: error: no COMMAND given; one of:\n"
            f"{commands_text()}\n{MORE}\n",
        )
    args, extra = parser.parse_known_args(argv)
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
