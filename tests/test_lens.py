"""The architecture lens: gains are paired differences, ablations differ in one component, the
JSON matches the printed table, bad factories fail clearly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from guidewrap import lens
from guidewrap.errors import ConfigError
from guidewrap.tasks import Transformer1d, _Block1d


def _target() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def _guide() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def test_the_gain_is_the_paired_difference_of_two_runs_on_identical_batches() -> None:
    task = lens.Task.random(classes=3, features=6, train=128, seed=1)
    result = lens.guidability([_target], [_guide], task, steps=12, seeds=[0, 1], align_steps=3, eval_every=4,
                              progress=False)  # fmt: skip
    for row in result["cells"][0]["seeds"]:
        seed = row["seed"]
        alone, _ = lens._train(task, lens._build(_target, "t", seed), None, seed, 12, 4)
        guide = lens._build(_guide, "g", 10_000 + seed).eval()
        full, _ = lens._train(task, lens._build(_target, "t", seed), guide, seed, 12, 4, weight=1.0 / row["pairs"],
                              **lens.MATCHING)  # fmt: skip
        assert row["acc_alone"] == alone.test_acc and row["acc_full"] == full.test_acc
        assert row["gain_full"] == full.test_acc - alone.test_acc
    summary = result["cells"][0]["summary"]["gain_full"]
    assert summary[0] == pytest.approx(sum(r["gain_full"] for r in result["cells"][0]["seeds"]) / 2)


def _signature(model: nn.Module) -> list[tuple[str, str, tuple]]:
    modules = model.named_modules()
    return [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for n, m in modules]


def test_each_resnet_ablation_lacks_exactly_its_component() -> None:
    variants = {name: factory() for name, factory in lens.ablations("resnet1d").items()}
    full = _signature(variants["resnet1d"])
    blocks = lambda m: [b for b in m.modules() if isinstance(b, _Block1d)]  # noqa: E731
    assert all(b.skip for b in blocks(variants["resnet1d"]))
    # no skip connections: the same modules and shapes, every block's shortcut off
    assert _signature(variants["resnet1d-no_skip"]) == full
    assert not any(b.skip for b in blocks(variants["resnet1d-no_skip"]))
    # no BatchNorm: each BatchNorm1d became an Identity, nothing else changed
    no_norm = _signature(variants["resnet1d-no_norm"])
    assert [(n, t) for n, t, _ in no_norm if t != "Identity"] == [(n, t) for n, t, _ in full if t != "BatchNorm1d"]
    # 1-wide kernels: only the convolutions' kernel size changed
    k1 = _signature(variants["resnet1d-kernel1"])
    diff = [(a, b) for a, b in zip(full, k1, strict=True) if a != b]
    assert diff and all(a[1] == "Conv1d" and b[2][0][-1] == 1 for a, b in diff)
    # no pooling: the pool is gone and the classifier reads every position
    no_pool = _signature(variants["resnet1d-no_pool"])
    assert "AdaptiveAvgPool1d" not in {t for _, t, _ in no_pool}
    assert [x for x in full if x[1] not in ("AdaptiveAvgPool1d", "Linear", "Flatten")] == [
        x for x in no_pool if x[1] not in ("Linear", "Flatten")]  # fmt: skip


def test_each_transformer_ablation_lacks_exactly_its_component() -> None:
    variants = {name: factory() for name, factory in lens.ablations("transformer1d").items()}
    full = variants["transformer1d"]
    assert isinstance(full, Transformer1d) and full.position is not None
    no_pos = variants["transformer1d-no_positional"]
    assert no_pos.position is None and _signature(no_pos)[1:] == _signature(full)[1:]  # root: only the embedding
    assert [n for n, _ in full.named_parameters(recurse=False)] == ["position"]
    no_attn = variants["transformer1d-no_attention"]
    kept = [x for x in _signature(full) if ".attn" not in x[0]]
    assert _signature(no_attn) == kept and not any(isinstance(m, nn.MultiheadAttention) for m in no_attn.modules())


def test_the_json_matches_the_printed_table(tmp_path: Path) -> None:
    task = lens.Task.random(classes=3, features=6, train=96, seed=0)
    result = lens.guidability([_target], [_guide, _target], task, steps=6, seeds=[0, 1], align_steps=2,
                              eval_every=3, out=tmp_path, progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "guidability.json").read_text())
    rows = lens.format_table(saved).splitlines()[2:]
    assert len(rows) == len(saved["cells"]) == 2
    for row, cell in zip(rows, saved["cells"], strict=True):
        numbers = [float(v) for v in re.findall(r"[+-]?\d+\.\d+", row)]
        expected = [v for key in lens.COLUMNS for v in cell["summary"][key]]
        assert numbers == pytest.approx(expected, abs=5e-4)
    assert saved["cells"] == json.loads(json.dumps(result["cells"]))
    # resumes: a second call reads the saved cells instead of training
    again = lens.guidability([_target], [_guide, _target], task, steps=6, seeds=[0, 1], align_steps=2, eval_every=3,
                             out=tmp_path, progress=False)  # fmt: skip
    assert again["cells"] == saved["cells"] and again["resumed_cells"] == 2 and result["resumed_cells"] == 0


def test_bad_factories_fail_clearly(tmp_path: Path) -> None:
    task = lens.Task.random()
    with pytest.raises(ConfigError, match="cannot load factory 'nope.module:thing'"):
        lens.guidability(["nope.module:thing"], [_guide], task, steps=2, seeds=[0], progress=False)
    with pytest.raises(ConfigError, match="must be a callable or 'module:callable'"):
        lens.guidability(["deep_mlp"], [_guide], task, steps=2, seeds=[0], progress=False)
    with pytest.raises(ConfigError, match="returned int, not a torch.nn.Module"):
        lens.guidability([lambda: 3], [_guide], task, steps=2, seeds=[0], progress=False)
    run = subprocess.run(
        [sys.executable, "-m", "guidewrap.cli", "guidability", "--targets", "torch.nn:NoSuchNet", "--guides",
         "guidewrap.tasks:cnn1d", "--steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode != 0 and "cannot load factory 'torch.nn:NoSuchNet'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_ablations_of_an_unknown_base_are_refused() -> None:
    with pytest.raises(ConfigError, match="ablations exist for"):
        lens.ablations("vgg")
    assert torch.get_num_threads() >= 1


def test_a_task_with_its_own_batches_and_loss() -> None:
    """Any batch iterator plus loss: the same stream and loss as the built-in ones give the same
    numbers; a different loss gives different ones."""
    from guidewrap.tasks import random_batches

    base = lens.Task.random(classes=3, features=6, train=96, seed=2)
    own = lens.Task(**{**base.__dict__, "batches": lambda seed: random_batches(base.x, base.y, base.batch, seed)})

    def run(task: lens.Task, steps: int = 6) -> list[dict]:
        result = lens.guidability([_target], [_guide], task, steps=steps, seeds=[0], align_steps=2, eval_every=3,
                                  progress=False)  # fmt: skip
        return result["cells"][0]["seeds"]

    assert run(own) == run(base)

    def wrong_labels(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, (y + 1) % 3)  # trains toward the wrong class

    wrong = lens.Task(**{**base.__dict__, "loss": wrong_labels, "lr": 1e-2})
    right = lens.Task(**{**base.__dict__, "lr": 1e-2})
    assert run(wrong, 30)[0]["acc_alone"] < run(right, 30)[0]["acc_alone"]
