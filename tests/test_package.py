"""Packaging facts: lazy optional imports, public API surface."""

from __future__ import annotations

import subprocess
import sys

import guidewrap


def test_import_loads_no_optional_dependency() -> None:
    code = (
        "import sys, guidewrap, guidewrap.metrics, guidewrap.model, guidewrap.context;"
        "heavy = [m for m in ('transformers', 'accelerate', 'datasets', 'torchvision') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import guidewrap loaded {out}"


def test_all_is_explicit_and_documented() -> None:
    for name in guidewrap.__all__:
        obj = getattr(guidewrap, name)
        if name != "__version__":
            assert obj.__doc__ and ">>>" in obj.__doc__, f"{name} needs a docstring with an example"
