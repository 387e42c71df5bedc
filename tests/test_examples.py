"""Every example runs end to end in its smoke setting and prints its results table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_plain_loop_example_runs() -> None:
    assert math.isfinite(_load("plain_loop").main(steps=6, batch=16))


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("fcn_guided_by_resnet", "test acc"),
        ("deep_convnet_guided_by_resnet", "test acc"),
        ("copy_paste", "accuracy"),
        ("parity", "accuracy"),
        ("language_modelling", "perplexity"),
        ("guidance_vs_distillation", "test acc"),
        ("lstm_guided_by_minilm", "perplexity"),
    ],
)
def test_experiment_example_smoke(name: str, column: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _load(name).main(smoke=True)
    assert len(rows) >= 2 and all(math.isfinite(row[column]) for row in rows)
    table = capsys.readouterr().out
    assert f" {column} |" in table and "|---|" in table  # the results table was printed


def test_parity_example_aligns_the_read_out_vectors(capsys: pytest.CaptureFixture[str]) -> None:
    # --features last: one pair, the Transformer's pooled vector <- the RNN's last real position
    rows = _load("parity").main(smoke=True, features="last")
    assert len(rows) == 4 and all(math.isfinite(row["accuracy"]) for row in rows)
    assert "features last" in capsys.readouterr().out
    from lab.parity import ParityRNN, ParityTask, ParityTransformer

    from guidewrap import GuidedModel

    b = ParityTask(max_len=6).sample(8, seed=0)
    guided = GuidedModel(ParityTransformer(d_model=8, heads=2), ParityRNN(hidden=8), layers=[("pool", "readout")])
    plan = guided.plan(b["input_ids"], b["attention_mask"])
    assert [(p.key, p.target.features, p.guide.features) for p in plan] == [("pool<-readout", 8, 8)]


def test_demo_study_resumes_and_reports_paired_differences(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    import torch

    study = _load("demo_study")
    threads = torch.get_num_threads()
    try:
        study.run_study([0, 1], ["baseline", "guided"], 1, tmp_path, steps=3)
        saved = sorted(p.name for p in (tmp_path / "threads1").iterdir())
        assert saved == ["seed0_baseline.json", "seed0_guided.json", "seed1_baseline.json", "seed1_guided.json"]
        before = (tmp_path / "threads1" / "seed0_guided.json").stat().st_mtime_ns
        study.run_study([0, 1], ["baseline", "guided"], 1, tmp_path, steps=3)  # resumes: nothing re-run
        assert (tmp_path / "threads1" / "seed0_guided.json").stat().st_mtime_ns == before
    finally:
        torch.set_num_threads(threads)
    text = study.report(tmp_path, tmp_path / "paired.png")
    runs = study.load_runs(tmp_path)[1]
    diffs = [runs["guided"][s]["test_acc"] - runs["baseline"][s]["test_acc"] for s in (0, 1)]
    assert f"per seed {diffs[0]:+.3f} / {diffs[1]:+.3f}" in text  # the report's numbers are the runs'
    assert (tmp_path / "paired.png").read_bytes()[:4] == b"\x89PNG"


def test_matching_study_runs_resumes_and_reports(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    study = _load("matching_study")
    rows = study.main(["copy", "demo"], ["alone", "blocks/mean", "paper"], [0], tmp_path, smoke=True)
    assert len(rows) == 6 and len(list(tmp_path.glob("*.json"))) == 6
    by = {(r["task"], r["setting"]): r for r in rows}
    assert by[("copy", "paper")]["pairs"] == 4 and by[("copy", "blocks/mean")]["pairs"] == 4
    assert by[("demo", "paper")]["score"] is None  # the paper's types have no Conv1d: reported, not hidden
    again = study.main(["copy", "demo"], ["alone", "blocks/mean", "paper"], [0], tmp_path, smoke=True)
    assert again == rows  # resumed from the saved runs, nothing retrained
    table = study.report(tmp_path)
    assert "| copy | blocks/mean | 4 |" in table and "not applicable: no layer of the paper's types" in table


def test_strength_study_settings_report_and_collapse_rule(tmp_path: Path) -> None:
    study = _load("strength_study")
    assert study.setting_of("alone") is None and study.setting_of("paper") == {"reduction": "sum", "weight": 1.0}
    assert study.setting_of("strength=0.3") == {"strength": 0.3, "reduction": "mean"}
    falls = {"curve": [(50, 0.5), (100, 1.0), (150, 0.9), (200, 0.75)], "curve_kind": "train_acc"}
    assert study.collapse(falls) == "train acc 0.75 at step 200 (best so far 1.00)"
    assert study.collapse({"curve": [(50, 0.5), (100, 1.0), (150, 0.85)], "curve_kind": "train_acc"}) is None
    assert study.collapse({"curve": [(10, 3.0), (20, 1.0), (30, 1.25)], "curve_kind": "train_loss"}) == (
        "train loss 1.250 at step 30 (running min 1.000)"
    )
    rows = [("alone", 0, 0.50), ("alone", 1, 0.40), ("default", 0, 0.60), ("default", 1, 0.45)]
    for setting, seed, score in rows:
        record = {"task": "copy", "setting": setting, "seed": seed, "score": score} | falls
        (tmp_path / f"copy__{setting}__{seed}.json").write_text(json.dumps(record))
    table = study.report(tmp_path, ["default"])
    assert "| copy | default | 0.525 +- 0.106 | 0.600 / 0.450 | +0.075 | 0.025 | 2 / 2 |" in table
    assert "| copy |" not in study.report(tmp_path, ["default"], tasks=["demo"])  # a post-hoc table's tasks only
    assert study.setting_of("cap=1@100") == {"reduction": "mean", "weight": 1.0, "tensor_cap": 1.0,
                                             "tensor_cap_after": 100}  # fmt: skip
    newer = tmp_path / "newer"  # another study's folder: its runs join the table, a run of its own replaces
    newer.mkdir()
    for seed, score in ((0, 0.70), (1, 0.55)):
        record = {"task": "copy", "setting": "cap=1@100", "seed": seed, "score": score} | falls
        (newer / f"copy__cap=1@100__{seed}.json").write_text(json.dumps(record))
    both = study.report(newer, ["default", "cap=1@100"], also=[tmp_path])
    assert "| copy | cap=1@100 | 0.625 +- 0.106 | 0.700 / 0.550 | +0.175 | 0.025 | 2 / 2 |" in both
    assert "| copy | default | 0.525" in both


def test_collapse_trace_records_every_step() -> None:
    from guidewrap.tasks import load_mnist1d

    small = load_mnist1d(num_samples=400, val_samples=50)
    rows = _load("collapse_trace").trace({"strength": 0.3, "reduction": "mean"}, seed=0, steps=3, data=small)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["pull"] == pytest.approx(0.3, rel=1e-3)  # measured on the first step, then held
    assert all(len(r["cka"]) == 6 and len(r["conditioning"]) == 6 for r in rows)


def test_tensor_trace_records_each_tensors_two_gradients() -> None:
    trace = _load("tensor_trace")
    record = trace.trace(
        "demo", "demo/tensor_cap=1.0/tensor_cap_after=1", seed=0, steps=3, stats_every=2
    )  # stats at 1, 2, 3
    names, rows = record["tensors"], record["rows"]
    assert len(rows) == 3 and all(len(r["grad_task"]) == len(r["grad_term"]) == len(names) for r in rows)
    assert rows[0]["grad_applied"] is not None and "layers" in rows[0] and "layers" in rows[1] and "layers" in rows[2]
    capped = rows[1]  # from the second step on: the applied term is at most the task's, tensor by tensor
    assert all(a <= 1.0001 * k for a, k in zip(capped["grad_applied"], capped["grad_task"], strict=True))
    assert "| step | task loss |" in trace.report(record, at=(1, 3))
