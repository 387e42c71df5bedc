"""The benchmark scripts run end to end at tiny sizes (timings are printed, never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_metrics_runs(capsys) -> None:
    ratio = _load("metrics").main(n=16, widths=(8, 64), reps=1)
    assert ratio > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("speedup_vs_textbook_min=")


def test_bench_step_runs(capsys) -> None:
    medians = _load("step").main(batch=8, reps=1, depth=2)
    assert set(medians) == {"plain", "floor", "guided", "reference"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("guided_over_floor=")
