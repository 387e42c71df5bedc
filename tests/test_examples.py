"""Examples run end to end at small size."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plain_loop_example_runs() -> None:
    spec = importlib.util.spec_from_file_location("plain_loop", EXAMPLES / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert math.isfinite(module.main(steps=6, batch=16))
