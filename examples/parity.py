"""Parity: a one-layer Transformer guided by a one-layer RNN (untrained, or trained on the task first).

Run: python examples/parity.py [--seeds 0 1 2] [--steps 1000] [--features mean|last]
     python examples/parity.py --smoke      (tiny sizes; used by the tests)
--features mean (default): every layer pair, sequences mean-pooled over real positions;
--features last: the paper's choice, one pair: the vector the Transformer's head reads (its pooled
output) aligned to the RNN's state at the last real position (what the RNN's head reads).
Prints held-out accuracy of the Transformer alone, guided by an untrained RNN, guided by a trained RNN,
and of the trained RNN itself.
"""

from __future__ import annotations

import argparse

import torch
from lab.common import batch_stream, fit, seeded, summarize
from lab.parity import ParityRNN, ParityTask, ParityTransformer
from torch import nn


def main(
    seeds: tuple[int, ...] = (0,),
    steps: int = 1000,
    guide_steps: int = 1000,
    smoke: bool = False,
    features: str = "mean",
) -> list[dict]:
    task = ParityTask(min_len=2, max_len=50)
    d = 64
    if smoke:
        steps, guide_steps, task, d = 3, 3, ParityTask(min_len=2, max_len=8), 8

    rows = []
    for seed in seeds:

        def draw(gen: torch.Generator) -> tuple[dict, torch.Tensor]:
            b = task.sample(128, generator=gen)
            return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]

        held_out = [task.sample(512, seed=10_000 + seed + i) for i in range(2)]

        def score(model: nn.Module, held_out: list = held_out) -> float:
            with torch.no_grad():
                hits = [
                    float((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).float().mean())
                    for b in held_out
                ]
            return sum(hits) / len(hits)

        trained_rnn = seeded(seed + 1, lambda: ParityRNN(hidden=d))
        fit(trained_rnn, batch_stream(seed, draw), nn.functional.cross_entropy, guide_steps, mode="none")
        rows.append({"model": "RNN (trained guide itself)", "accuracy": score(trained_rnn)})
        for name, guide in (
            ("Transformer alone", None),
            ("Transformer guided by untrained RNN", seeded(seed + 1, lambda: ParityRNN(hidden=d))),
            ("Transformer guided by trained RNN", trained_rnn),
        ):
            model = seeded(seed, lambda: ParityTransformer(d_model=d, heads=2 if smoke else 4))
            mode = "none" if guide is None else "guided"
            # "mean": the RNN reads positions one by one, the Transformer mixes them; per-sample means
            # over real positions (padding masked) compare the two. "last": the paper's read-out pair.
            pairing = (
                {"sequence": "mean", "layers": "sublayers"} if features == "mean" else {"layers": [("pool", "readout")]}
            )
            pairing["reduction"] = "sum"  # pinned: the level and sum docs/results.md measured
            fit(model, batch_stream(seed, draw), nn.functional.cross_entropy, steps, guide=guide, mode=mode, **pairing)
            rows.append({"model": name, "accuracy": score(model)})
    print(
        f"parity, lengths {task.min_len}-{task.max_len}, {steps} steps, batch 128, features {features}, "
        f"seeds {list(seeds)}, {torch.get_num_threads()} thread(s)"
    )
    print(summarize(rows, "model", ["accuracy"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--guide-steps", type=int, default=1000)
    parser.add_argument("--features", choices=["mean", "last"], default="mean", help="which features are aligned")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(tuple(a.seeds), a.steps, a.guide_steps, a.smoke, a.features)
