"""Accelerate: prepare(GuidedModel), accumulation, mixed precision, save_state/load_state, wrappers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

from guidewrap import GuidedModel, unwrap_model  # noqa: E402
from tests.conftest import mlp  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_loop.py"


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():  # noqa: ANN202
    # Accelerator state is a process-wide singleton; each test picks its own precision.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _example():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("accelerate_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bf16_lstm_runs_here() -> bool:
    """oneDNN has no bf16 LSTM kernel on some CPUs (seen on an AMD EPYC without AVX-512)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4, batch_first=True)(torch.randn(2, 3, 4))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accelerate_example_smoke(precision: str) -> None:
    if precision == "bf16" and not _bf16_lstm_runs_here():
        pytest.skip("this CPU's torch build has no bf16 LSTM kernel (oneDNN primitive missing); not guidewrap's")
    result = _example().main(smoke=True, mixed_precision=precision)
    assert math.isfinite(result["loss"]) and result["peak_guidance_loss"] > 0
    assert result["guidance_weight"] == 0.0  # the window (2 optimizer steps) is over
    assert result["guidance_steps"] == 4  # optimizer steps, not the 8 accumulated micro-batches


def _train(accelerator: Accelerator, model, guided: GuidedModel, optimizer, steps: int, log: bool = False) -> None:  # noqa: ANN001
    """A plain Accelerate loop on an 8-feature MLP; ``log``: the documented accelerator.log line."""
    for _ in range(steps):
        loss = model(torch.randn(16, 8)).sum() + guided.alignment_loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if log:
            accelerator.log(guided.guidance_metrics(), step=guided.step_count)


def test_save_state_load_state_restores_the_step_counter(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    target, guide = mlp(), mlp(width=12)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    guided = GuidedModel(target, guide, until_step=10, optimizer=optimizer)
    model, optimizer = accelerator.prepare(guided, optimizer)
    _train(accelerator, model, guided, optimizer, steps=3)
    assert guided.step_count == 3
    accelerator.save_state(str(tmp_path))
    fresh_accelerator = Accelerator(cpu=True)
    target2 = mlp()
    optimizer2 = torch.optim.SGD(target2.parameters(), lr=0.1)
    guided2 = GuidedModel(target2, mlp(width=12), until_step=10, optimizer=optimizer2)
    fresh_accelerator.prepare(guided2, optimizer2)
    fresh_accelerator.load_state(str(tmp_path))
    assert guided2.step_count == 3
    for a, b in zip(target.parameters(), target2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_strength_under_accumulation_logs_the_pull_and_survives_save_state(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    target, guide = mlp(), mlp(width=12)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    guided = GuidedModel(target, guide, strength=0.3, strength_every=3, optimizer=optimizer)
    model, optimizer = accelerator.prepare(guided, optimizer)
    for _ in range(4):  # 4 micro-batches, 2 optimizer steps; measured on micro-batches 0 and 3
        with accelerator.accumulate(model):
            loss = guided.total_loss(model(torch.randn(16, 8)).square().mean())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    assert guided.step_count == 2
    logged = guided.guidance_metrics()  # what the documented accelerator.log line carries
    assert logged["guidance_pull"] == pytest.approx(0.3) and logged["guidance_weight"] == guided.engine.strength.scale
    accelerator.save_state(str(tmp_path))
    fresh_accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    target2 = mlp()
    optimizer2 = torch.optim.SGD(target2.parameters(), lr=0.1)
    guided2 = GuidedModel(target2, mlp(width=12), strength=0.3, strength_every=3, optimizer=optimizer2)
    fresh_accelerator.prepare(guided2, optimizer2)
    fresh_accelerator.load_state(str(tmp_path))
    assert guided2.engine.strength.state_dict() == guided.engine.strength.state_dict()
    assert guided2.step_count == 2


def test_bf16_autocast_keeps_values_finite() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    target, guide = mlp(width=64, depth=4), mlp(width=48, depth=4)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    guided = GuidedModel(target, guide, optimizer=optimizer)
    model, optimizer = accelerator.prepare(guided, optimizer)
    for _ in range(3):
        out = model(torch.randn(32, 8))
        loss = nn.functional.cross_entropy(out.float(), torch.randint(0, 3, (32,))) + guided.alignment_loss
        assert torch.isfinite(loss)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert guided.last_alignment and all(math.isfinite(v) for v in guided.last_alignment.values())


def test_layer_names_resolve_through_compile_and_ddp_style_wrappers() -> None:
    target, guide = mlp(), mlp(width=12)
    compiled = torch.compile(target)
    wrapped = nn.DataParallel(compiled)  # DDP keeps the model under .module the same way
    assert unwrap_model(wrapped) is target
    plan = GuidedModel(wrapped, guide, layers=[("0", "0"), ("2", "2")]).plan(torch.randn(8, 8))
    assert [(p.target.name, p.guide.name) for p in plan] == [("0", "0"), ("2", "2")]


@pytest.mark.parametrize("pattern", ["plain", "accelerate_state_dict"])
def test_final_save_patterns_load_as_the_target_without_guidewrap(tmp_path: Path, pattern: str) -> None:
    # accelerate's examples save with unwrap_model(model).save_pretrained(dir, state_dict=
    # accelerator.get_state_dict(model)): the wrapper's keys must become the target's.
    import subprocess
    import sys

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    target = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    guide = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(GuidedModel(target, guide, optimizer=optimizer), optimizer)
    ids = torch.randint(0, 50, (4, 12))
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()  # the saved weights differ from any fresh initialisation
    out = tmp_path / "final"
    if pattern == "plain":
        unwrap_model(model).save_pretrained(out)
    else:
        unwrap_model(model).save_pretrained(out, state_dict=accelerator.get_state_dict(model))
    script = (
        "import sys; sys.modules['guidewrap'] = None\n"  # guidewrap cannot be imported
        "from transformers import GPT2LMHeadModel\n"
        f"m = GPT2LMHeadModel.from_pretrained({str(out)!r})\n"
        "print(sum(float(p.double().sum()) for p in m.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sum(float(p.detach().double().sum()) for p in target.parameters())
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-9)


def test_the_documented_log_line_reaches_the_trackers() -> None:
    """accelerator.log(guided.guidance_metrics(), step=...) hands every guidance value to the
    Accelerator's trackers (a recording tracker stands in for TensorBoard / W&B)."""
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False
        rows: list[tuple[dict, int]] = []

        def __init__(self) -> None:
            super().__init__()

        @property
        def tracker(self):  # noqa: ANN202
            return self

        def store_init_configuration(self, values: dict) -> None:
            pass

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:  # noqa: ANN003
            self.rows.append((dict(values), step))

    recorder = Recorder()
    accelerator = Accelerator(cpu=True, log_with=[recorder])
    accelerator.init_trackers("guidewrap-test")
    target, guide = mlp(), mlp(width=12)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    guided = GuidedModel(target, guide, optimizer=optimizer)
    model, optimizer = accelerator.prepare(guided, optimizer)
    _train(accelerator, model, guided, optimizer, steps=2, log=True)
    accelerator.end_training()
    assert [step for _, step in recorder.rows] == [1, 2]
    row = recorder.rows[-1][0]
    assert row["guidance_loss"] > 0 and row["guidance_weight"] == 1.0
    assert any(key.startswith("guidance_align/") for key in row)
