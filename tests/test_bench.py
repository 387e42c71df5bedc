"""The benchmark scripts run end to end at tiny sizes (timings are printed, never asserted)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):  # noqa: ANN202
    sys.path.insert(0, str(BENCH))  # memory.py reuses step.py's models, as when run from bench/
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_metrics_runs(capsys) -> None:
    ratio = _load("metrics").main(n=16, widths=(8, 64), reps=1)
    assert ratio > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("speedup_vs_textbook_min=")


def test_bench_step_runs(capsys) -> None:
    medians = _load("step").main(batch=8, reps=1, depth=2, seq_shape=(4, 6), max_features=(64,))
    assert set(medians) == {"plain", "floor", "guided", "reference", "max_features=64"}
    out = capsys.readouterr().out
    assert "lstm_tokenwise_guided_over_floor=" in out and "lstm_flatten_reference_over_guided=" in out
    assert "max_features=64: guided_over_floor=" in out and "largest per-pair CKA change" in out
    assert out.strip().splitlines()[-1].startswith("guided_over_floor=")


def test_bench_memory_runs(capsys) -> None:
    ratio = _load("memory").main(reps=1, batch=8, depth=2, seq_shape=(4, 6))
    assert ratio > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("guided_mem_over_floor=")


def test_bench_scaling_runs(capsys) -> None:
    exp_n, exp_d = _load("scaling").main(reps=1, ns=(16, 32), ds=(64, 128), d=64, n=16)
    assert math.isfinite(exp_n) and math.isfinite(exp_d)  # slopes were fitted
    assert "measured_exponent_d=" in capsys.readouterr().out


def test_bench_approximation_runs(capsys) -> None:
    worst = _load("approximation").main(batch=16, depth=2, limits=(512,))
    # A subset of 512 of up to 12,544 features moves each pair's CKA a little (0.023 measured at this
    # size), never by much: a wrong subset (different every step, or misaligned) moves it far more.
    assert 0 < worst[512] <= 0.1
    assert "largest per-pair CKA change" in capsys.readouterr().out
