"""The README and the docs site stay true: the site builds in strict mode (broken links, missing
pages and API references that no longer resolve fail), every ```python block is executed, every
command shown parses with the real argument parsers, and the README stays short.

Each page's ```python blocks run in order in one namespace, in a scratch folder whose
``../shared/data`` is the shared data (as from the repository root), offline. A block that
cannot run here says so where a reader sees it, in its title: ```python title="not run: <why>"
(the docs site shows the title above the block); the count and the reasons are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
MAX_README_LINES = 250
MAX_NOT_RUN = 8  # blocks marked "not run" across README and docs: keep them few

FENCE = re.compile(r"^```(\w*)(.*)$")
NOT_RUN = re.compile(r'title="not run: ([^"]+)"')
COMMANDS = ("lens-safety", "pruning-bridge")
MODULES = {"lens_safety": "lens-safety", "pruning_bridge": "pruning-bridge"}


@dataclass
class Block:
    """One fenced code block: its language, info string, first line number and text."""

    page: Path
    language: str
    info: str
    line: int
    text: str

    @property
    def not_run(self) -> str | None:
        """Why the block is not run (its ``title="not run: ..."``), or None."""
        found = NOT_RUN.search(self.info)
        return found.group(1) if found else None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (fences start at column 0)."""
    found, current = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = Block(page, fence.group(1), fence.group(2).strip(), number + 1, "")
        elif current is not None and line.startswith("```"):
            found.append(current)
            current = None
        elif current is not None:
            current.text += line + "\n"
    assert current is None, f"{page}: a code block is never closed"
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language == "python"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, data_dir) -> Path:
    """A folder to run the pages in: ``../shared/data`` there is the shared data."""
    root = tmp_path_factory.mktemp("docs")
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(data_dir)
    (root / "work").mkdir()
    return root / "work"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move reference material "
        f"into docs/")


def test_docs_build_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a page missing from the site or an API
    reference to a name that no longer exists fails."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
         "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, (
        "mkdocs build --strict failed (install the docs extra: pip install -e '.[docs]'):\n"
        + done.stdout[-4000:] + done.stderr[-4000:])
    for page in PAGES[1:]:
        name = page.relative_to(DOCS).with_suffix("")
        built = tmp_path / "site" / ("index.html" if str(name) == "index" else f"{name}/index.html")
        assert built.is_file(), f"{page} is not in the built site (add it to mkdocs.yml's nav)"


def test_not_run_blocks_are_few_and_say_why(capsys):
    skipped = [(b.where(), b.not_run) for page in PAGES for b in python_blocks(page)
               if b.not_run]
    with capsys.disabled():
        print(f"\n{len(skipped)} python block(s) in README/docs are not run:")
        for where, why in skipped:
            print(f"  {where}: {why}")
    assert len(skipped) <= MAX_NOT_RUN, (
        f"{len(skipped)} blocks are marked 'not run' (at most {MAX_NOT_RUN}): make them run on "
        f"the embedded or tiny models instead")


@pytest.mark.parametrize("page", [p for p in PAGES if any(not b.not_run
                                                            for b in python_blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, scratch: Path, monkeypatch):
    """Every ```python block of the page, in order, in one namespace, as a reader would."""
    monkeypatch.chdir(scratch)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if block.not_run:
            continue
        code = compile(block.text, block.where(), "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(code, namespace)
            except Exception as error:  # say which block of which page
                raise AssertionError(f"the python block at {block.where()} fails: "
                                     f"{type(error).__name__}: {error}") from error


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """Every ``lens-safety ...`` / ``pruning-bridge ...`` command in the page's shell blocks
    (also ``python -m lens_safety ...``), continuation lines joined, as (where, argv)."""
    found = []
    for block in blocks(page):
        if block.language not in ("bash", "sh", "shell", "console"):
            continue
        text = block.text.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            words = shlex.split(line) if line else []
            if words and words[0] in COMMANDS:
                found.append((block.where(), [words[0], *words[1:]]))
            elif len(words) > 2 and words[0].endswith("python") and words[1] == "-m" \
                    and words[2] in MODULES:
                found.append((block.where(), [MODULES[words[2]], *words[3:]]))
    return found


def parsers() -> dict[str, argparse.ArgumentParser]:
    from lens_safety.cli import build_parser as safety_parser
    from pruning_bridge.cli import build_parser as bridge_parser

    return {"lens-safety": safety_parser(), "pruning-bridge": bridge_parser()}


def _folders_to_read(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The values of the subcommand's options that must name an existing folder."""
    from pruning_bridge.common.cli import input_folder

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparser = sub.choices.get(argv[0])
    if subparser is None:
        return []
    wanted = {option for action in subparser._actions if action.type is input_folder
              for option in action.option_strings}
    return [value for option, value in zip(argv, argv[1:]) if option in wanted]


def test_shown_commands_parse(scratch: Path, monkeypatch):
    """Each command shown parses with the real parser (the folders it reads, such as a saved
    edit, are made empty first: what is in them is checked when the command runs)."""
    monkeypatch.chdir(scratch)
    shown = [item for page in PAGES for item in commands(page)]
    assert len(shown) >= 10, "the docs show fewer commands than expected: is the parser right?"
    by_name = parsers()
    for where, (name, *argv) in shown:
        parser = by_name[name]
        for folder in _folders_to_read(parser, argv):
            Path(folder).expanduser().mkdir(parents=True, exist_ok=True)
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as stop:
            if stop.code == 0:  # --help
                continue
            raise AssertionError(f"{where}: `{name} {shlex.join(argv)}` does not parse: "
                                 f"{errors.getvalue().strip()}") from None
