"""An existing Hugging Face Trainer script, guided: an RNN language model guided by an untrained
GPT-2-style Transformer (the paper's language-modelling setting, character level).

Run: python examples/trainer_rnn_guided_by_transformer.py [--text-file FILE] [--steps 300] [--smoke]
Without --text-file it trains on a small built-in text. The guidewrap lines are marked
with  # <- guidewrap ; delete them and this is a plain Trainer script.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from lab.language import BUILTIN_TEXT, CharCorpus, RNNLanguageModel, perplexity, tiny_gpt2
from transformers import Trainer, TrainingArguments

from guidewrap.integrations.transformers import guide_trainer  # <- guidewrap


def main(
    text_file: str | None = None,
    steps: int = 300,
    seq_len: int = 64,
    batch: int = 32,
    smoke: bool = False,
    guided: bool = True,
    output_dir: str | None = None,
) -> dict[str, float]:
    if smoke:
        steps, seq_len, batch = 4, 16, 8
    torch.manual_seed(0)
    text = Path(text_file).read_text(encoding="utf-8") if text_file else BUILTIN_TEXT * 4
    corpus = CharCorpus(text, seq_len=seq_len)
    size = {"emb": 16, "hidden": 32} if smoke else {"emb": 64, "hidden": 128}
    model = RNNLanguageModel(corpus.vocab_size, layers=4, **size)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="guidewrap-trainer-"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=smoke,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=corpus.dataset("train"), eval_dataset=corpus.dataset("test")
    )
    if guided:
        guide = tiny_gpt2(
            corpus.vocab_size, n_layer=1 if smoke else 4, n_embd=16 if smoke else 128, n_head=2
        )  # <- guidewrap
        guide_trainer(trainer, guide, layers="sublayers", weight=1.0)  # <- guidewrap: the one-line change
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    aligned = [row for row in trainer.state.log_history if "guidance_loss" in row]
    result = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}
    if aligned:
        result["last_guidance_loss"] = aligned[-1]["guidance_loss"]
    print(" | ".join(f"{key} {value:.4f}" for key, value in result.items()))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-file", help="a local UTF-8 text file (default: a small built-in text)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (used by the tests)")
    parser.add_argument("--no-guidance", action="store_true", help="train the RNN alone, for comparison")
    a = parser.parse_args()
    main(a.text_file, a.steps, a.seq_len, a.batch, a.smoke, guided=not a.no_guidance)
