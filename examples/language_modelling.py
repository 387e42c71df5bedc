"""Language modelling: a 4-layer tanh RNN guided by an untrained 4-layer Transformer, character level.

Run: python examples/language_modelling.py --text-file book.txt [--seeds 0 1 2] [--steps 1000]
     python examples/language_modelling.py --dataset-dir DIR --text-column text   (a datasets.save_to_disk folder)
     python examples/language_modelling.py --smoke      (a small built-in text; used by the tests)
Prints held-out perplexity of the RNN alone, the guided RNN, and the Transformer trained alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from guidewrap.experiments.common import fit, seeded, summarize
from guidewrap.experiments.copy_paste import CausalTransformer, StackedRNN
from guidewrap.experiments.language import BUILTIN_TEXT, CharCorpus, perplexity


def read_text(text_file: str | None, dataset_dir: str | None, column: str) -> str:
    if text_file:
        return Path(text_file).read_text(encoding="utf-8")
    if dataset_dir:
        from datasets import load_from_disk

        data = load_from_disk(dataset_dir)
        split = data["train"] if hasattr(data, "keys") and "train" in data else data
        return "\n".join(split[column])
    return BUILTIN_TEXT * 8


def main(
    text_file: str | None = None,
    dataset_dir: str | None = None,
    text_column: str = "text",
    seeds: tuple[int, ...] = (0,),
    steps: int = 1000,
    seq_len: int = 50,
    smoke: bool = False,
) -> list[dict]:
    hidden = 128
    if smoke:
        steps, seq_len, hidden = 3, 16, 16
    corpus = CharCorpus(read_text(text_file, dataset_dir, text_column), seq_len=seq_len)
    test = torch.stack([row["input_ids"] for row in corpus.dataset("test")])

    def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def held_out_ppl(model: nn.Module) -> float:
        with torch.no_grad():
            return perplexity(lm_loss(model(test), test).item())

    rows = []
    for seed in seeds:
        data = torch.Generator().manual_seed(seed)

        def batches(step: int, data: torch.Generator = data) -> tuple[torch.Tensor, torch.Tensor]:
            ids = corpus.batch(32, seed=int(torch.randint(0, 2**31, (1,), generator=data)))["input_ids"]
            return ids, ids

        def transformer() -> nn.Module:
            return CausalTransformer(corpus.vocab_size, d_model=hidden, layers=4, heads=4 if hidden % 4 == 0 else 2)

        for name, guide in (
            ("RNN alone", None),
            ("RNN guided by untrained Transformer", seeded(seed + 1, transformer)),
        ):
            rnn = seeded(seed, lambda: StackedRNN(corpus.vocab_size, emb=hidden, hidden=hidden, layers=4))
            fit(rnn, batches, lm_loss, steps, guide=guide, mode="none" if guide is None else "guided")
            rows.append({"model": name, "perplexity": held_out_ppl(rnn)})
        tf = seeded(seed, transformer)
        fit(tf, batches, lm_loss, steps, mode="none")
        rows.append({"model": "Transformer alone", "perplexity": held_out_ppl(tf)})
    print(f"character LM, {corpus.vocab_size} symbols, context {seq_len}, {steps} steps, seeds {list(seeds)}")
    print(summarize(rows, "model", ["perplexity"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-file", help="a local UTF-8 text file")
    parser.add_argument("--dataset-dir", help="a folder written by datasets' save_to_disk")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="a small built-in text, tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(a.text_file, a.dataset_dir, a.text_column, tuple(a.seeds), a.steps, a.seq_len, a.smoke)
