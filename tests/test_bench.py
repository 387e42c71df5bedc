"""The benchmark scripts run end to end at tiny sizes (timings are printed, never asserted)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

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
    medians = _load("step").main(
        batch=8, reps=2, depth=2, seq_shape=(4, 6), max_features=(64,), strength=0.3, tensor_cap=1.0
    )
    assert set(medians) == {"plain", "floor", "guided", "reference", "max_features=64", "strength", "tensor_cap"}
    out = capsys.readouterr().out
    assert "strength_guided_over_floor=" in out and "strength_over_fixed=" in out
    assert "tensor_cap_guided_over_floor=" in out and "tensor_cap_over_fixed=" in out
    assert "lstm_tokenwise_guided_over_floor=" in out and "lstm_flatten_reference_over_guided=" in out
    assert "max_features=64: guided_over_floor=" in out and "largest per-pair CKA change" in out
    assert out.strip().splitlines()[-1].startswith("guided_over_floor=")


def test_bench_memory_runs(capsys) -> None:
    ratio = _load("memory").main(reps=1, batch=8, depth=2, seq_shape=(4, 6), fresh=False)
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


def test_bench_real_runs(capsys) -> None:
    ratio = _load("real").main(reps=2, batch=8, length=16, vocab=200, width=32, tiny=True, strength=0.3, tensor_cap=1.0)
    assert ratio > 0
    out = capsys.readouterr().out
    assert "lm_strength_guided_over_floor=" in out and "lm_strength_over_fixed=" in out
    assert "lm_tensor_cap_guided_over_floor=" in out and "lm_tensor_cap_over_fixed=" in out
    assert "matching: layers=auto" in out and "per_pair_overhead_us=" in out and "bert_guided_over_floor=" in out
    assert out.strip().splitlines()[-1].startswith("lm_guided_over_floor=")


def test_bench_ddp_runs() -> None:
    """Two processes under torchrun at a tiny size; the figure's line is printed last."""
    out = _load("ddp").main(reps=1, batch=4, length=16, vocab=200, width=32)
    assert out.strip().splitlines()[-1].startswith("ddp_guided_over_floor=") and "matching: layers=auto" in out
    # one bucket per side (shapes, features), nothing in the backward: whatever the number of pairs
    assert "collectives in one guided step (rank 0): {'all_gather': 4}," in out, out


def test_bench_memory_fresh_processes_run(capsys) -> None:
    ratio = _load("memory").main(reps=1, batch=8, depth=2, seq_shape=(4, 6), fresh=True)
    assert ratio > 0 and "fresh processes" in capsys.readouterr().out


def test_bench_peers_runs(capsys) -> None:
    pytest.importorskip("cka")  # the bench extra (in dev): pytorch-cka and torch-cka
    pytest.importorskip("torch_cka")
    ratio = _load("peers").main(reps=1, ns=(16,), ds=(8,))
    out = capsys.readouterr().out
    assert ratio > 0 and out.strip().splitlines()[-1].startswith("fwd_over_fastest_peer=")
    errors = _load("peers").offset_errors(n=64, d=32)
    assert errors["guidewrap"] < 1e-3  # centred before the Gram: offset data keeps its signal


def test_bench_compile_tiny_mode_runs(capsys) -> None:
    """bench/compile.py with tiny models and dynamo's eager backend (no C++ build): it finds no
    graph break in guidewrap's code on either case and prints its headline last."""
    pytest.importorskip("transformers")
    ratio = _load("compile").main(reps=1, backend="eager", tiny=True)
    out = capsys.readouterr().out
    assert ratio > 0 and out.strip().splitlines()[-1].startswith("compiled_overhead_over_eager=")
    assert "fcn_guidewrap_graph_breaks=0" in out and "gpt2_guidewrap_graph_breaks=0" in out


def test_bench_gpu_tiny_cpu_mode_runs(capsys) -> None:
    ratio = _load("gpu").main(reps=1, tiny=True)
    out = capsys.readouterr().out
    assert ratio > 0 and "bf16 autocast" in out and out.strip().splitlines()[-1].startswith("gpu_guided_over_floor=")


def test_the_paper_recipe_backpropagates_through_its_terms() -> None:
    """bench/step.py's reference step is the published procedure: its gradient is the task loss's plus
    the CKA terms' (a recipe whose features were detached would time a cheaper step), so it equals the
    guided step's gradient at the same settings (weight 1 on the sum over the same pairs)."""
    import copy

    import torch

    step = _load("step")
    torch.manual_seed(0)
    target = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
    )  # fmt: skip
    guide = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
        torch.nn.Linear(24, 10),
    )  # fmt: skip
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 10, (16,))
    start = copy.deepcopy(target.state_dict())
    steps, pairs = step.make_steps(target, guide, x, lambda out: torch.nn.functional.cross_entropy(out, y))
    grads = {}
    for name in ("reference", "guided", "plain"):
        target.load_state_dict(start)
        steps[name]()
        grads[name] = [p.grad.clone() for p in target.parameters()]
    assert pairs >= 1
    for ref, guided in zip(grads["reference"], grads["guided"], strict=True):
        assert torch.allclose(ref, guided, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(ref, plain) for ref, plain in zip(grads["reference"], grads["plain"], strict=True))
