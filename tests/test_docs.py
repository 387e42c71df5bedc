"""The docs cannot drift: every code block runs (and prints what the page says), every public symbol
is in the API reference with a runnable docstring example."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import guidewrap

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```(?:\n\nprints\n\n```text\n(.*?)```)?", re.S)
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_code_blocks_run_and_print_what_the_page_says(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    assert blocks
    for code, expected in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - the docs' own examples
        if expected:
            got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
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
