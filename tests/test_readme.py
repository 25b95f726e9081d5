"""The README and every docs/ page hold the rule a reader relies on: every ```python block runs as written.

A reader pastes a page's blocks in order into fresh interpreters in an empty folder, offline; files they write
persist between blocks, and a ```yaml block whose first line is ``# NAME.yaml`` is saved to NAME first. A block that
cannot run (it needs the Hub, a GPU or a file only the user has) carries ``<!-- not-run: REASON -->`` on the line
right above it. A block with ``<!-- output -->`` on the line above it is the exact output of the python block before
it. The README stays a front door (at most 300 lines, at most 3 blocks not run), docs/README.md indexes every page,
and no example declares a variant name that a shipped config registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not-run: (\S.*?) -->$")
OUTPUT = "<!-- output -->"
SAVED_AS = re.compile(r"^# ([\w.-]+\.ya?ml)\s*$")
VARIANT_KEY = re.compile(r"^  ([a-z][a-z0-9_]*):(\s|$)")  # a key at the variants level (two spaces in)


@dataclass
class Block:
    """One fenced block of a page: its language, its text, the line of its opening fence and the marker above."""

    lang: str
    code: str
    line: int
    marker: str  # the line right above the fence, stripped


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            marker = lines[start - 1].strip() if start else ""
            found.append(Block(lang, "\n".join(lines[start + 1 : i]) + "\n", start + 1, marker))
        i += 1
    return found


def skipped(block: Block) -> bool:
    return bool(NOT_RUN.match(block.marker))


def reader_env(home: Path) -> dict[str, str]:
    """This interpreter's environment, offline, with empty caches of its own and no variants from the environment."""
    outside = {"TIMM_ANYSIZE_CONFIGS", "TIMM_ANYSIZE_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"}
    env = {k: v for k, v in os.environ.items() if k not in outside}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"), TORCH_HOME=str(home / "torch"), MPLBACKEND="Agg")
    return env


def run_page(page: Path, tmp_path: Path) -> list[str]:
    """Paste ``page``'s blocks in order into fresh interpreters in an empty folder; one line per failure."""
    folder = tmp_path / "reader"
    folder.mkdir()
    env = reader_env(tmp_path / "home")
    failures: list[str] = []
    page_blocks = blocks(page)
    stdout: dict[int, str] = {}
    for n, block in enumerate(page_blocks):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        saved = SAVED_AS.match(block.code.splitlines()[0]) if block.lang == "yaml" and block.code.strip() else None
        if saved:
            (folder / saved.group(1)).write_text(block.code)
        if block.lang == "python" and not skipped(block):
            proc = subprocess.run(
                [sys.executable, "-c", block.code], cwd=folder, env=env, capture_output=True, text=True, timeout=300
            )
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                failures.append(f"{where}: exit {proc.returncode}: {last}")
            stdout[n] = proc.stdout
        if block.marker == OUTPUT:
            # The output a reader sees, with the reader's folder written as the README writes it (relative).
            printed = stdout.get(n - 1, "").replace(f"{folder}/", "")
            if printed.strip() != block.code.strip():
                failures.append(f"{where}: the block above prints\n{printed}\nnot what this page shows")
    return failures


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_python_block_runs_as_written(page: Path, tmp_path: Path) -> None:
    assert run_page(page, tmp_path) == []


def test_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert sum(skipped(b) for b in blocks(README) if b.lang == "python") <= 3
    first_screen = "\n".join(text.splitlines()[:60])
    assert "pip install timm-anysize" in first_screen and "pip install -e ." in first_screen
    assert "```python" in first_screen


def test_markers_sit_right_above_a_block() -> None:
    """A not-run or output marker that does not sit on the line right above a fence silently does nothing."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.match(line.strip()) or line.strip() == OUTPUT:
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{page.name}:{i + 1}"


def test_docs_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", index))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= linked
    assert linked <= pages | {"cli.md"}  # docs/cli.md is written by the command-line work; every other link resolves


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve() -> None:
    """Every relative link of the README and docs/ names a file that exists and, for a page, a heading it has."""
    broken = []
    for page in [*PAGES, ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            if resolved == DOCS / "cli.md":  # written by the command-line work
                continue
            if not resolved.exists() or (anchor and resolved.is_file() and anchor not in anchors(resolved)):
                broken.append(f"{page.name}: {target}")
    assert broken == []


def shipped_variant_names() -> set[str]:
    """Every variant name a config shipped with the package declares (configs/**/*.yaml, the demo's included)."""
    names = set()
    for path in (ROOT / "configs").rglob("*.yaml"):
        names |= {m.group(1) for m in map(VARIANT_KEY.match, path.read_text().splitlines()) if m}
    return names


def test_examples_never_declare_a_shipped_name() -> None:
    shipped = shipped_variant_names()
    assert {"vit_tiny_patch4_64", "resnet18_gray", "vit_digits_patch4_32"} <= shipped
    declared = {
        (page.name, m.group(1))
        for page in PAGES
        for block in blocks(page)
        if block.lang == "yaml"
        for m in map(VARIANT_KEY.match, block.code.splitlines())
        if m
    }
    assert declared, "no example declares a variant"
    assert {(page, name) for page, name in declared if name in shipped} == set()
