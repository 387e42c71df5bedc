"""The docs cannot drift: every code block runs (and prints what the page says), every public symbol
is in the API reference with a runnable docstring example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import guidewrap

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```(?:\n\nprints\n\n```text\n(.*?)```)?", re.S)
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text(encoding="utf-8"))


# Runs one page's python blocks in order, in one namespace, in a fresh interpreter; writes each block's
# stdout to a JSON list. Started from a directory outside the repository with nothing of the checkout on
# sys.path, so a block passes only against the installed package, as a user copying it would run it.
RUNNER = """
import contextlib, io, json, re, sys
page, out_path = sys.argv[1], sys.argv[2]
blocks = re.compile(BLOCK_PATTERN, re.S).findall(open(page, encoding="utf-8").read())
namespace, outputs = {"__name__": "__main__"}, []
for code, _ in blocks:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{page} (block {len(outputs) + 1})", "exec"), namespace)
    outputs.append(out.getvalue())
json.dump(outputs, open(out_path, "w"))
"""


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_code_blocks_run_outside_the_repository_and_print_what_the_page_says(page: Path, tmp_path: Path) -> None:
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    assert blocks
    runner = tmp_path / "run_page.py"
    runner.write_text(RUNNER.replace("BLOCK_PATTERN", repr(BLOCK.pattern)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(runner), str(page), str(tmp_path / "out.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"{page.name}: a block failed outside the repository:\n{result.stderr[-4000:]}"
    outputs = json.loads((tmp_path / "out.json").read_text())
    for (_, expected), printed in zip(blocks, outputs, strict=True):
        if expected:
            got = [line.rstrip() for line in printed.strip().splitlines()]
            assert got == [line.rstrip() for line in expected.strip().splitlines()], f"{page}: output differs"


def test_every_public_symbol_is_in_the_reference_with_an_example() -> None:
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    for name in guidewrap.__all__:
        if name == "__version__":
            continue
        assert f"::: guidewrap.{name}\n" in reference, f"{name} missing from docs/reference.md"
        doc = getattr(guidewrap, name).__doc__ or ""
        assert "Example" in doc and ">>>" in doc, f"{name} has no runnable docstring example"


def test_reference_entries_resolve() -> None:
    import importlib

    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    for path in re.findall(r"^::: ([\w.]+)$", reference, re.M):
        module, _, attr = path.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), path


def test_nav_lists_every_page() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in nav, f"{page} not in mkdocs.yml nav"


def _docstrings(obj: object) -> list[object]:
    found = [obj] if getattr(obj, "docstring", None) is not None else []
    for member in getattr(obj, "members", {}).values():
        if not getattr(member, "is_alias", False):
            found += _docstrings(member)
    return found


def test_every_docstring_parses_as_the_reference_renders_it(caplog: pytest.LogCaptureFixture) -> None:
    """mkdocstrings parses each docstring with griffe (Google style); a section that names what the
    signature lacks (a config's fields under "Args:") is a warning, which the strict docs build fails on."""
    import logging

    griffe = pytest.importorskip("griffe")
    package = griffe.load("guidewrap", docstring_parser="google", resolve_aliases=False)
    with caplog.at_level(logging.WARNING):
        for obj in _docstrings(package):
            obj.docstring.parsed  # noqa: B018 - parsing is what warns
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not warnings, "griffe warns on these docstrings:\n" + "\n".join(warnings[:20])


def test_the_docs_build_shows_its_warnings_and_fails_on_them() -> None:
    makefile = (DOCS.parent / "Makefile").read_text(encoding="utf-8")
    command = next(line for line in makefile.splitlines() if "mkdocs build" in line)
    assert "--strict" in command and not re.search(r"\s(-q|--quiet)\b", command), command
