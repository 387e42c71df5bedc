"""The command line: demo (tiny), plan, similarity (valid PNG), and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guidewrap.analysis import similarity_matrix
from guidewrap.cli import build_parser, main
from guidewrap.tasks import DEMO_CLIP, DEMO_STEPS, DEMO_WEIGHT, cnn1d, deep_mlp, load_mnist1d, train_variant

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_tiny_run_writes_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--steps", "3", "--samples", "200", "--seeds", "0", "1", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    for variant in ("baseline", "guided", "pre_align", "distill"):
        assert f"| {variant} |" in out
    assert "+-" in out  # two seeds: mean +- std
    assert "| final test acc |" in out and "at the final step: " in out  # beside the selected evaluation
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "| guided |" in (tmp_path / "results.md").read_text()


def test_demo_table_reports_the_final_step_beside_the_selected_one() -> None:
    from guidewrap.cli import _demo_table
    from guidewrap.tasks import DESCRIPTIONS, RunResult

    def run(variant: str, seed: int, final_test: float) -> RunResult:  # selected at step 2, then a fall
        return RunResult.from_curve(variant, seed, [(1, 0.5, 0.4, 0.4), (2, 1.0, 0.6, 0.6), (3, 0.3, 0.2, final_test)])

    results = [run("baseline", 0, 0.5), run("baseline", 1, 0.52), run("guided", 0, 0.11), run("guided", 1, 0.2)]
    results[2] = RunResult.from_curve("guided", 0, [(1, 0.5, 0.4, 0.4), (2, 1.0, 0.7, 0.7), (3, 0.13, 0.1, 0.11)])
    results[3] = RunResult.from_curve("guided", 1, [(1, 0.5, 0.4, 0.4), (2, 1.0, 0.8, 0.75), (3, 0.2, 0.2, 0.2)])
    table = _demo_table(results, ["baseline", "guided"], DESCRIPTIONS)
    assert "| 0.110 / 0.200 |" in table and "| 0.500 / 0.520 |" in table  # final test acc per seed
    assert "at the final step: -0.355 (SE 0.035); per seed -0.390 / -0.320" in table
    assert "but not at the final step" in table  # the verdict does not hide the fall


def test_demo_defaults_are_the_tasks_constants() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.steps, args.weight, args.clip) == (DEMO_STEPS, DEMO_WEIGHT, DEMO_CLIP)


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--variants", "nonsense", "--quiet"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--quiet"]) == 2


def test_plan_prints_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "torchvision.models:resnet18", "torchvision.models:resnet18", "--input-shape", "4,3,32,32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "guidance plan: 21 pairs" in out and "layer1.0.conv1" in out  # the default level: sublayers
    argv = ["plan", "torchvision.models:resnet18", "torchvision.models:resnet18", "--input-shape", "4,3,32,32"]
    assert main([*argv, "--layers", "blocks"]) == 0
    out = capsys.readouterr().out
    assert "guidance plan: 8 pairs" in out and "layer1.0 (BasicBlock)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "resnet18", "torch.nn:Linear"], "module:callable"),
        (["plan", "no_such_module:x", "torch.nn:Linear"], "cannot import"),
        (["plan", "torch.nn:NoSuchLayer", "torch.nn:Linear"], "has no attribute"),
        (
            [
                "plan",
                "torch.nn:Linear",
                "torch.nn:Linear",
                "--target-args",
                "4,8",
                "--guide-args",
                "4,3",
                "--input-shape",
                "a,b",
            ],
            "comma-separated integers",
        ),  # fmt: skip
    ],
)
def test_bad_arguments_fail_clearly(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["demo", "--help"], ["plan", "--help"], ["similarity", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "similarity" in capsys.readouterr().out


def test_similarity_writes_png_and_prints_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "heat.png"
    argv = ["similarity", "guidewrap.tasks:deep_mlp", "guidewrap.tasks:cnn1d"]
    assert main([*argv, "--input-shape", "64,40", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "heatmap written" in printed and "0." in printed


def test_similarity_matrix_of_a_model_with_itself_has_unit_diagonal() -> None:
    net = deep_mlp(depth=3, width=32)
    m = similarity_matrix(net, net, torch.randn(64, 40))
    assert m.rows == m.cols
    torch.testing.assert_close(m.values.diagonal(), torch.ones(len(m.rows)), atol=1e-5, rtol=0)
    assert bool((m.values >= -1e-6).all()) and bool((m.values <= 1 + 1e-6).all())


def test_variants_train_and_distillation_uses_the_teacher() -> None:
    data = load_mnist1d(num_samples=300, val_samples=40)
    results = {v: train_variant(v, data, steps=5, batch=32, eval_every=5) for v in ("baseline", "distill")}
    assert all(0 <= r.test_acc <= 1 for r in results.values())
    assert results["baseline"].curve != results["distill"].curve  # the teacher's logits changed training
    assert cnn1d()(torch.randn(2, 40)).shape == (2, 10)
