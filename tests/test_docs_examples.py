"""The Python examples of README.md and docs/*.md run, one script per page, on the model.

Each page's ```python blocks are joined in order into one script (a later block uses what
an earlier one made, as a reader would type them into one interpreter) and run in a fresh
interpreter. Every block keeps its line numbers: the script is the page with everything
that is not runnable code blanked out, compiled under the page's path, so a traceback
names the page and the line of the example that failed.

A block that needs real hardware is marked by an HTML comment on the line just before its
fence, which the rendered page does not show, and is skipped with that reason:

    <!-- no-run: needs /dev/vfio -->
    ```python
    ...

The examples run with the model kernel only: the script's process cannot open /dev/iommu
or anything under /dev/vfio, so an example that reaches for hardware fails here even on a
machine that has some.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfiomig.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where its code starts (1-based line), its lines (the fence's
    indentation removed), why it must not run (None: it runs) and its info string."""

    page: Path
    line: int
    lines: tuple[str, ...]
    skip: str | None
    info: str = ""

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The page's ```python blocks, in order."""
    return [b for b in fenced_blocks(page, text) if b.info.split()[:1] in (["python"], ["py"])]


def fenced_blocks(page: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of the page, in order."""
    lines = (page.read_text() if text is None else text).splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        skip = None
        before = next((s for s in reversed(lines[:i]) if s.strip()), "")
        if (n := _NO_RUN.match(before)) is not None:
            skip = n["reason"] or "marked no-run"
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and close["fence"].startswith(fence) and not close["info"].strip():
                break
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        out.append(Block(page, i + 2, tuple(body), skip, m["info"].strip()))
        i = j + 1
    return out


def script(page: Path, blocks: list[Block]) -> str:
    """The runnable blocks at their own line numbers, every other line of the page blank."""
    n = len(page.read_text().splitlines())
    out = [""] * n
    for b in blocks:
        if b.skip is None:
            out[b.line - 1 : b.line - 1 + len(b.lines)] = b.lines
    return "\n".join(out) + "\n"


# Run in the child: no hardware node opens, then the page's script under the page's name.
RUNNER = textwrap.dedent(
    """
    import errno, os, sys

    _open = os.open

    def _model_only(path, *args, **kwargs):
        name = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if name == "/dev/iommu" or name == "/dev/vfio" or name.startswith("/dev/vfio/"):
            raise PermissionError(errno.EACCES, "docs examples run on the model only", name)
        return _open(path, *args, **kwargs)

    os.open = _model_only
    code = compile(sys.stdin.read(), sys.argv[1], "exec")
    exec(code, {"__name__": "__main__"})
    """
)


def _runnable_pages() -> list[Path]:
    return [p for p in pages() if any(b.skip is None for b in python_blocks(p))]


def _skipped_blocks() -> list[Block]:
    return [b for p in pages() for b in python_blocks(p) if b.skip is not None]


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_a_page_run(page: Path, tmp_path: Path) -> None:
    src = script(page, python_blocks(page))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(page)],
        input=src,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, f"{page.relative_to(ROOT)}'s examples failed:\n{proc.stderr}"


@pytest.mark.parametrize("block", _skipped_blocks(), ids=lambda b: b.id)
def test_a_block_marked_no_run_is_skipped_with_its_reason(block: Block) -> None:
    pytest.skip(f"{block.id}: {block.skip}")


def test_the_pages_have_examples_to_run() -> None:
    # The extractor finds them: a page with several examples is tested block by block.
    assert len(python_blocks(ROOT / "docs" / "library.md")) >= 5
    assert ROOT / "docs" / "library.md" in _runnable_pages()
    # and few need hardware
    assert len(_skipped_blocks()) <= 2


def test_the_extractor_keeps_line_numbers_and_reads_the_marker(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "text\n"
        "```\n"
        "not python\n"
        "```\n"
        "<!-- no-run: needs /dev/vfio -->\n"
        "\n"
        "```python\n"
        "open('/dev/vfio/vfio')\n"
        "```\n"
        "* item\n"
        "  ```python\n"
        "  if x:\n"
        "      y = x\n"
        "  ```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.lines, b.skip) for b in blocks] == [
        (3, ("x = 1",), None),
        (12, ("open('/dev/vfio/vfio')",), "needs /dev/vfio"),
        (16, ("if x:", "    y = x"), None),
    ]
    lines = script(page, blocks).splitlines()
    assert lines[2] == "x = 1" and lines[11] == "" and lines[15:17] == ["if x:", "    y = x"]
    assert "not python" not in lines


def test_the_examples_cannot_reach_hardware(tmp_path: Path) -> None:
    page = tmp_path / "hw.md"
    page.write_text("```python\nimport os\nos.open('/dev/iommu', os.O_RDWR)\n```\n")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(page)],
        input=script(page, python_blocks(page)),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "docs examples run on the model only" in proc.stderr
    assert f'File "{page}", line 3' in proc.stderr  # the page and the line of the example


# -- the command lines shown in the pages ----------------------------------------------------

_SHELL = {">", ">>", "|", "&&", ";", "2>&1", "||"}


def command_lines() -> list[object]:
    """Every ``vfiomig ...`` line of a fenced block (a ``$ `` prompt allowed), as argv up to
    the first shell operator, with the page and line it is on."""
    out: list[object] = []
    for page in pages():
        for b in fenced_blocks(page):
            for n, line in enumerate(b.lines):
                text = line.strip().removeprefix("$ ")
                if not text.startswith("vfiomig "):
                    continue
                argv = shlex.split(text, comments=True)
                cut = next((i for i, a in enumerate(argv) if a in _SHELL), len(argv))
                where = f"{page.relative_to(ROOT)}:{b.line + n}"
                out.append(pytest.param(argv[:cut], id=where))
    return out


@pytest.mark.parametrize("argv", command_lines())
def test_a_command_line_in_the_docs_parses(argv: list[str]) -> None:
    # The options and their values as argparse checks them (a run would need hardware or
    # take long): an option renamed or removed shows here. SystemExit is a usage error.
    _, extra = build_parser().parse_known_args(argv[1:])
    assert extra == []


def test_the_pages_show_command_lines() -> None:
    assert len(command_lines()) >= 10
