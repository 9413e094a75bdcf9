"""The parts of the commands' ``--help`` that list names, read from the code they name.

A command's help says what it is for, shows examples, lists its exit status and the values
its name-taking options accept. Those values are never written by hand here, so they cannot
drift from what the commands accept:

* the model kernel's device kinds: ``vfiomig.kernel.machine.DRIVERS`` (filled when
  ``vfiomig.kernel`` is imported);
* each kind's options: its driver constructor's keyword-only parameters, with their
  defaults, the same reading ``vfiomig.tools.options.check_model_options`` makes;
* the reference device's defects: ``vfiomig.kernel.vfio_reference.DEFECTS``, each described
  by its entry in that module's docstring (a defect without one shows as undocumented, and
  tests/test_help.py fails);
* the conformance checks: ``vfiomig.conformance.CHECKS``, names and one-line docs.

The sections are plain text for an ``argparse.RawDescriptionHelpFormatter`` epilog.
"""

from __future__ import annotations

import argparse
import inspect
import re
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

WIDTH = 92  # the help's text width (the widest lines of the module docstrings it sits by)
UNDOCUMENTED = "(undocumented)"


# ------------------------------------------------------------------------------------------
# the names, from the code


def model_kinds() -> list[str]:
    """The device kinds of the model kernel, sorted."""
    import vfiomig.kernel  # noqa: F401  (registers the device kinds)
    from vfiomig.kernel.machine import DRIVERS

    return sorted(DRIVERS)


def model_options(kind: str) -> dict[str, Any]:
    """A kind's options and their defaults: its driver's keyword-only parameters, in order.

    KeyError for an unknown kind."""
    import vfiomig.kernel  # noqa: F401
    from vfiomig.kernel.machine import DRIVERS

    return {
        name: p.default
        for name, p in inspect.signature(DRIVERS[kind]).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


_ITEM = re.compile(r'^\s*"(?P<name>\w+)"\s+(?P<text>\S.*)$')


def described_items(doc: str) -> dict[str, str]:
    """The ``"name"   text`` items of a docstring, each with its continuation lines (those
    indented at least as far as its text) joined into one line, in the docstring's order."""
    out: dict[str, str] = {}
    name, column = "", 0
    for line in doc.splitlines():
        m = _ITEM.match(line)
        if m:
            name, column = m["name"], m.start("text")
            out[name] = m["text"].strip()
        elif name and line.strip() and len(line) - len(line.lstrip()) >= column:
            out[name] += " " + line.strip()
        else:
            name = ""
    return out


def defects() -> dict[str, str]:
    """The reference device's defects and what each does (``UNDOCUMENTED`` when its module
    docstring does not say), in the docstring's order, then any undocumented ones sorted."""
    from vfiomig.kernel import vfio_reference

    described = described_items(vfio_reference.__doc__ or "")
    names = [n for n in described if n in vfio_reference.DEFECTS]
    names += sorted(vfio_reference.DEFECTS - set(names))
    return {n: described.get(n) or UNDOCUMENTED for n in names}


def checks() -> list[tuple[str, str]]:
    """The conformance suite's checks, in the order it runs them: (name, what it verifies)."""
    from vfiomig.conformance import CHECKS

    return [(name, " ".join(doc.split()) or UNDOCUMENTED) for name, doc, _ in CHECKS]


# ------------------------------------------------------------------------------------------
# sections


def rows(title: str, items: Iterable[tuple[str, str]], intro: str = "") -> str:
    """``Title:``, an optional wrapped intro, then one row per (name, text) with the text
    wrapped in a column after the names."""
    items = list(items)
    lines = [f"{title}:"]
    if intro:
        lines += textwrap.wrap(intro, WIDTH, initial_indent="  ", subsequent_indent="  ")
    name_width = max((len(n) for n, _ in items), default=0)
    indent = " " * (2 + min(name_width, 28) + 2)
    for name, text in items:
        head = f"  {name}".ljust(len(indent) - 1) + " "
        if len(head) > len(indent):  # a long name: its text starts on the next line
            lines.append(head.rstrip())
            head = indent
        lines += textwrap.wrap(
            text, WIDTH, initial_indent=head, subsequent_indent=indent, break_on_hyphens=False
        ) or [head.rstrip()]
    return "\n".join(lines)


def examples(*items: tuple[str, str]) -> str:
    """``Examples:`` with one command line per (command, comment): the comments aligned
    after their commands when all fit in the width, else each on the line above its own."""
    column = 2 + max((len(cmd) for cmd, comment in items if comment), default=0) + 2
    fits = all(column + 2 + len(comment) <= WIDTH for _, comment in items if comment)
    lines = ["Examples:"]
    for cmd, comment in items:
        if not comment:
            lines.append(f"  {cmd}")
        elif fits:
            lines.append(f"  {cmd}".ljust(column) + f"# {comment}")
        else:
            lines += [f"  # {comment}", f"  {cmd}"]
    return "\n".join(lines)


def exit_status(*codes: tuple[int, str]) -> str:
    return rows("Exit status", [(str(code), text) for code, text in codes])


def _default(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return "/".join(str(x) for x in value)
    if value is None or (isinstance(value, frozenset | set) and not value):
        return ""
    if isinstance(value, int) and key.endswith("_id") and value > 0xFF:
        return hex(value)  # a PCI id
    return str(value)


def model_devices(option: str = "--model") -> str:
    """Every model device kind with its options as ``key=default`` (a key alone has none)."""
    items = []
    for kind in model_kinds():
        opts = [f"{k}={d}" if (d := _default(k, v)) else k for k, v in model_options(kind).items()]
        items.append((kind, "  ".join(opts)))
    return rows(
        f"Model devices ({option} KIND,key=value,...)",
        items,
        "Each kind's options with their defaults (a key alone has none). Integers may be "
        "0x-prefixed, switches are 0 or 1, pairs MIN/MAX, defects NAME+NAME (below).",
    )


def defect_list(how: str) -> str:
    return rows(f"Defects of the reference device ({how})", defects().items())


def check_list() -> str:
    return rows("Checks (--check NAME, repeatable; --list prints them too)", checks())


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written; the options wrapped to the same width."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=WIDTH)


def apply(parser: argparse.ArgumentParser, description: str, sections: Sequence[str]) -> None:
    """Give ``parser`` its description and the sections as its epilog."""
    parser.description = description
    parser.epilog = "\n\n".join(sections)
    parser.formatter_class = Formatter
