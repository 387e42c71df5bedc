"""Hugging Face Trainer integration: loss, logging, saving, resume, accumulation, bf16, hooks."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

transformers = pytest.importorskip("transformers")
from lab.language import CharCorpus, RNNLanguageModel, tiny_gpt2  # noqa: E402
from reference import run_clm_group_texts  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from guidewrap import ConfigError, GuidedModel  # noqa: E402
from guidewrap.integrations.transformers import GuidanceCallback, guide_trainer  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
CORPUS = CharCorpus(TEXT, seq_len=12)


class OrderedTrainer(Trainer):
    """Batches in dataset order, so runs can be compared step by step."""

    def _get_train_sampler(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return SequentialSampler(self.train_dataset)


def _args(tmp_path: Path, **overrides) -> TrainingArguments:  # noqa: ANN003
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _rnn() -> RNNLanguageModel:
    torch.manual_seed(0)
    return RNNLanguageModel(CORPUS.vocab_size, emb=8, hidden=16, layers=3)


def _gpt2(layers: int = 2):  # noqa: ANN202
    torch.manual_seed(1)
    return tiny_gpt2(CORPUS.vocab_size, n_layer=layers, n_embd=16, n_head=2, n_positions=32)


def _guide_forwards(guide: torch.nn.Module) -> list[int]:
    calls = [0]
    guide.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _losses(trainer: Trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_guided_trainer_trains_logs_and_leaves_no_hooks(tmp_path: Path) -> None:
    plain = OrderedTrainer(model=_rnn(), args=_args(tmp_path), train_dataset=CORPUS.dataset())
    plain.train()
    model, guide = _rnn(), _gpt2()
    trainer = OrderedTrainer(model=model, args=_args(tmp_path), train_dataset=CORPUS.dataset())
    callback = guide_trainer(trainer, guide)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert _losses(trainer) != pytest.approx(_losses(plain))  # the term is in the loss
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 4
    for row in rows:
        assert 0 < row["guidance_loss"] < len(callback.engine.plan())
        pair_keys = [k for k in row if k.startswith("guidance_align/")]
        assert len(pair_keys) == len(callback.engine.plan()) and all(0 <= row[k] <= 1 for k in pair_keys)
        assert row["guidance_skipped_pairs"] == 0
    assert callback.hook_count == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_evaluation_does_not_run_the_guide(tmp_path: Path) -> None:
    guide = _gpt2()
    calls = _guide_forwards(guide)
    trainer = Trainer(
        model=_rnn(), args=_args(tmp_path), train_dataset=CORPUS.dataset(), eval_dataset=CORPUS.dataset("test")
    )
    guide_trainer(trainer, guide)
    trainer.train()
    after_train = calls[0]
    metrics = trainer.evaluate()
    assert calls[0] == after_train and math.isfinite(metrics["eval_loss"])


def test_hooks_removed_when_training_raises(tmp_path: Path) -> None:
    model = _rnn()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=CORPUS.dataset())
    callback = guide_trainer(trainer, _gpt2())

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    callback.on_step_end = boom
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert callback.hook_count == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_window_counts_optimizer_steps_under_gradient_accumulation(tmp_path: Path) -> None:
    guide = _gpt2()
    calls = _guide_forwards(guide)
    args = _args(tmp_path, max_steps=5, gradient_accumulation_steps=4, per_device_train_batch_size=4)
    trainer = Trainer(model=_rnn(), args=args, train_dataset=CORPUS.dataset())
    callback = guide_trainer(trainer, guide, until_step=3)
    trainer.train()
    # 3 optimizer steps x 4 micro-batches, then never again (+1: the probe forward that planned the layers)
    assert callback.engine.counters["guide_forwards"] == 3 * 4
    assert calls[0] == 3 * 4 + 1
    assert callback.engine.step_count == 5


@pytest.mark.parametrize("target", ["custom", "gpt2"])
def test_accumulated_step_equals_one_big_step(tmp_path: Path, target: str) -> None:
    # Two identical micro-batches accumulated must give the same update as one of them: the
    # term is normalised like the task loss (GPT-2 takes **kwargs, so the Trainer normalises
    # by num_items_in_batch and does not divide by the accumulation steps; the custom module
    # does not, and the Trainer divides).
    data = CORPUS.dataset()[:4]

    def run(repeats: int, accumulation: int, guided: bool = True) -> dict[str, torch.Tensor]:
        model = _rnn() if target == "custom" else _gpt2(layers=1)
        args = _args(
            tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation, optim="sgd"
        )
        trainer = OrderedTrainer(model=model, args=args, train_dataset=data * repeats)
        if guided:
            guide = RNNLanguageModel(CORPUS.vocab_size, emb=8, hidden=12, layers=2)
            callback = guide_trainer(trainer, guide)
        trainer.train()
        if guided:  # every micro-batch was guided, with a term that is not zero
            assert callback.engine.counters["guided_forwards"] == accumulation
            assert callback.engine.last_alignment and all(v < 1 - 1e-4 for v in callback.engine.last_alignment.values())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    one, two, plain = run(1, 1), run(2, 2), run(1, 1, guided=False)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6)
    # ... and the term moved the update: the guided step differs from the plain one
    assert max((one[key] - plain[key]).abs().max().item() for key in one) > 1e-6


def test_save_model_writes_the_target_only_loadable_without_guidewrap(tmp_path: Path) -> None:
    model = _gpt2()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=CORPUS.dataset())
    guide_trainer(trainer, _rnn())
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    script = (
        "import sys; sys.modules['guidewrap'] = None\n"  # guidewrap cannot be imported
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(sum(float(p.double().sum()) for p in m.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    expected = sum(float(p.detach().double().sum()) for p in model.parameters())
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-6)


def test_resume_continues_the_window(tmp_path: Path) -> None:
    # N steps + checkpoint + resume for N more equals 2N straight: same losses, same weights.
    def trainer_for(folder: str, save: bool) -> tuple[Trainer, GuidanceCallback, list[int]]:
        guide = _gpt2()
        calls = _guide_forwards(guide)
        args = _args(
            tmp_path,
            output_dir=str(tmp_path / folder),
            max_steps=6,
            save_strategy="steps" if save else "no",
            save_steps=3,
            optim="adamw_torch",
        )
        trainer = OrderedTrainer(model=_rnn(), args=args, train_dataset=CORPUS.dataset())
        return trainer, guide_trainer(trainer, guide, until_step=4), calls

    straight, _, straight_calls = trainer_for("straight", save=True)
    straight.train()
    resumed, callback, resumed_calls = trainer_for("resumed", save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert callback.engine.step_count == 6
    # only step 4 is guided after resuming at 3 (+1: the probe forward that planned the layers)
    assert resumed_calls[0] == 1 + 1
    assert straight_calls[0] == 4 + 1
    # the resumed history starts with the checkpoint's first 3 rows; steps 4-6 are new
    assert len(_losses(resumed)) == 6
    assert _losses(resumed)[3:] == pytest.approx(_losses(straight)[3:], rel=1e-5)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_on_cpu_keeps_everything_finite(tmp_path: Path) -> None:
    trainer = Trainer(model=_rnn(), args=_args(tmp_path, bf16=True), train_dataset=CORPUS.dataset())
    callback = guide_trainer(trainer, _gpt2())
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    assert all(math.isfinite(v) for v in callback.engine.last_alignment.values())


def test_guided_model_in_trainer_is_refused_with_the_fix(tmp_path: Path) -> None:
    trainer = Trainer(model=GuidedModel(_rnn(), _gpt2()), args=_args(tmp_path), train_dataset=CORPUS.dataset())
    with pytest.raises(ConfigError, match="bare target"):
        guide_trainer(trainer, _gpt2())


def test_guided_model_handed_straight_to_a_trainer_is_refused_at_train(tmp_path: Path) -> None:
    # Without guide_trainer the Trainer would train with no guidance logs and fail to save (tied weights).
    trainer = Trainer(model=GuidedModel(_rnn(), _gpt2()), args=_args(tmp_path), train_dataset=CORPUS.dataset())
    with pytest.raises(ConfigError, match=r"guide_trainer\(trainer, guide"):
        trainer.train()


def test_trainer_example_smoke() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "trainer_rnn_guided_by_transformer.py"
    spec = importlib.util.spec_from_file_location("trainer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(smoke=True)
    assert math.isfinite(result["perplexity"]) and result["last_guidance_loss"] > 0


def _clm_blocks(text: str, block_size: int):  # noqa: ANN202
    """run_clm.py's data path: tokenize a text dataset, then group_texts into fixed-length blocks
    with labels = input_ids (a character tokenizer stands in for AutoTokenizer, offline)."""
    from datasets import Dataset

    vocab = {c: i for i, c in enumerate(sorted(set(text + "\n")))}

    def tokenize_function(examples):  # noqa: ANN001, ANN202
        return {"input_ids": [[vocab[c] for c in line] for line in examples["text"]]}

    raw = Dataset.from_dict({"text": [line + "\n" for line in text.split(". ") if line]})
    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    return tokenized.map(run_clm_group_texts(block_size), batched=True), len(vocab)


def test_run_clm_shape_eval_accumulation_resume_bit_identical_and_plain_loading(tmp_path: Path) -> None:
    """The official causal-LM script's shape: tokenized fixed-length blocks, evaluation during
    training, gradient accumulation 3, a checkpoint every 3 steps; resuming from the checkpoint gives
    bit-identical weights to the straight run, and the saved model loads with plain from_pretrained
    in a process where guidewrap cannot be imported."""
    blocks, vocab_size = _clm_blocks(TEXT * 2, block_size=16)
    split = blocks.train_test_split(test_size=0.2, seed=0)

    def run(folder: str, resume: str | None = None) -> Trainer:
        torch.manual_seed(0)
        model = tiny_gpt2(vocab_size, n_layer=2, n_embd=16, n_head=2, n_positions=32)
        args = _args(
            tmp_path, output_dir=str(tmp_path / folder), max_steps=6, gradient_accumulation_steps=3,
            per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
            save_steps=3, optim="adamw_torch",
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"])
        torch.manual_seed(1)
        guide_trainer(trainer, RNNLanguageModel(vocab_size, emb=8, hidden=16, layers=3), until_step=4)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("straight")
    evals = [row for row in straight.state.log_history if "eval_loss" in row]
    assert len(evals) == 3 and all(math.isfinite(row["eval_loss"]) for row in evals)
    assert any("guidance_loss" in row for row in straight.state.log_history)
    resumed = run("resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"
    out = tmp_path / "final"
    resumed.save_model(str(out))
    script = (
        "import sys; sys.modules['guidewrap'] = None\n"  # guidewrap cannot be imported
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"torch.save(m.state_dict(), {str(tmp_path / 'loaded.pt')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(loaded[name], value), f"{name} did not load as saved"


def test_checkpoints_record_the_plan_and_a_resume_with_another_plan_warns(tmp_path: Path) -> None:
    import json

    from guidewrap.errors import GuidewrapWarning

    def trainer_for(folder: str, **settings) -> Trainer:  # noqa: ANN003
        args = _args(tmp_path, output_dir=str(tmp_path / folder), save_strategy="steps", save_steps=2)
        trainer = OrderedTrainer(model=_rnn(), args=args, train_dataset=CORPUS.dataset())
        guide_trainer(trainer, _gpt2(), until_step=4, **settings)
        return trainer

    trainer_for("first").train()
    state = json.loads((tmp_path / "first" / "checkpoint-2" / "trainer_state.json").read_text())
    record = state["stateful_callbacks"]["guidewrap_plan"]
    assert record["settings"]["layers"] == "auto" and len(record["pairs"]) == 13 and record["fingerprint"]
    checkpoint = str(tmp_path / "first" / "checkpoint-2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        trainer_for("same").train(resume_from_checkpoint=checkpoint)  # the same plan: silent
    with pytest.warns(GuidewrapWarning, match=r"different guidance plan.*layers 'auto' -> 'blocks'.*pairs 13 -> 2"):
        trainer_for("other", layers="blocks").train(resume_from_checkpoint=checkpoint)
    later = json.loads((tmp_path / "other" / "checkpoint-4" / "trainer_state.json").read_text())
    assert later["stateful_callbacks"]["guidewrap_plan"]["settings"]["layers"] == "blocks"  # this run's plan


def test_a_hyperparameter_search_guides_each_trials_model_with_its_settings(tmp_path: Path) -> None:
    """model_init re-creates the model every trial: the callback follows it (else it would guide the first
    trial's stale model), trial parameters guidance_<setting> set that trial's settings, and
    guidance_enabled=False trains a trial unguided (the paired baseline)."""
    optuna = pytest.importorskip("optuna")
    guide = _gpt2()
    calls = _guide_forwards(guide)
    trainer = Trainer(model_init=lambda trial=None: _rnn(), args=_args(tmp_path, max_steps=2, logging_steps=1),
                      train_dataset=CORPUS.dataset(), eval_dataset=CORPUS.dataset())  # fmt: skip
    callback = guide_trainer(trainer, guide)
    seen = []

    def hp_space(trial: optuna.Trial) -> dict:
        if trial.number == 0:
            return {"guidance_enabled": trial.suggest_categorical("guidance_enabled", [False])}
        return {"guidance_weight": trial.suggest_categorical("guidance_weight", [2.5])}

    def objective(metrics: dict) -> float:
        seen.append((calls[0], callback.engine.config.weight, callback.engine.target is trainer.model))
        return metrics["eval_loss"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.hyperparameter_search(hp_space=hp_space, compute_objective=objective, backend="optuna", n_trials=2)
    assert seen[0][0] == 0  # the unguided trial never ran the guide
    assert seen[1][0] > 0 and seen[1][1] == 2.5 and seen[1][2]  # the trial's weight, on the trial's model
    assert callback.hook_count == 0
