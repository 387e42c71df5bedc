"""Language modelling: a 4-layer tanh RNN guided by a 4-layer Transformer (trained or untrained), character level.

Run: python examples/language_modelling.py --text-file book.txt [--seeds 0 1 2] [--steps 1000] [--weight W]
     python examples/language_modelling.py --dataset-dir DIR --text-column text   (a datasets.save_to_disk folder)
     python examples/language_modelling.py --python-docs   (offline: CPython's own reference docs as the text)
     python examples/language_modelling.py --smoke      (a small built-in text; used by the tests)
Prints held-out perplexity of the Transformer trained alone (then used as the trained guide), the RNN
alone, the RNN guided by that trained Transformer, and the RNN guided by an untrained one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lab.common import batch_stream, fit, seeded, summarize
from lab.copy_paste import CausalTransformer, StackedRNN
from lab.language import BUILTIN_TEXT, CharCorpus, perplexity, python_docs_text
from torch import nn

# Over the 20 pairs (4 RNN layers x every hooked Transformer sub-layer, pinned below).
WEIGHT = 0.05


def read_text(text_file: str | None, dataset_dir: str | None, column: str, python_docs: bool = False) -> str:
    if python_docs:
        return python_docs_text()
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
    weight: float = WEIGHT,
    python_docs: bool = False,
) -> list[dict]:
    hidden = 128
    if smoke:
        steps, seq_len, hidden = 3, 16, 16
    corpus = CharCorpus(read_text(text_file, dataset_dir, text_column, python_docs), seq_len=seq_len)
    test = torch.stack([row["input_ids"] for row in corpus.dataset("test")])

    def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def held_out_ppl(model: nn.Module) -> float:
        with torch.no_grad():
            return perplexity(lm_loss(model(test), test).item())

    rows = []
    for seed in seeds:

        def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            ids = corpus.batch(32, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))["input_ids"]
            return ids, ids

        def transformer() -> nn.Module:
            return CausalTransformer(corpus.vocab_size, d_model=hidden, layers=4, heads=4 if hidden % 4 == 0 else 2)

        tf = seeded(seed, transformer)
        fit(tf, batch_stream(seed, draw), lm_loss, steps, mode="none")
        rows.append({"model": "Transformer alone (the trained guide)", "perplexity": held_out_ppl(tf)})
        for name, guide in (
            ("RNN alone", None),
            ("RNN guided by the trained Transformer", tf),
            ("RNN guided by an untrained Transformer", seeded(seed + 1, transformer)),
        ):
            rnn = seeded(seed, lambda: StackedRNN(corpus.vocab_size, emb=hidden, hidden=hidden, layers=4))
            mode = "none" if guide is None else "guided"
            pinned = {"weight": weight, "layers": "sublayers", "reduction": "sum"}  # what docs/results.md measured
            fit(rnn, batch_stream(seed, draw), lm_loss, steps, guide=guide, mode=mode, **pinned)
            rows.append({"model": name, "perplexity": held_out_ppl(rnn)})
    print(
        f"character LM, {corpus.vocab_size} symbols, context {seq_len}, {steps} steps, "
        f"guidance weight {weight}, seeds {list(seeds)}"
    )
    print(summarize(rows, "model", ["perplexity"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-file", help="a local UTF-8 text file")
    parser.add_argument("--dataset-dir", help="a folder written by datasets' save_to_disk")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--python-docs", action="store_true", help="use CPython's reference docs (offline) as the text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--weight", type=float, default=WEIGHT, help=f"guidance weight (default {WEIGHT})")
    parser.add_argument("--smoke", action="store_true", help="a small built-in text, tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(
        a.text_file, a.dataset_dir, a.text_column, tuple(a.seeds), a.steps, a.seq_len, a.smoke, a.weight, a.python_docs
    )
