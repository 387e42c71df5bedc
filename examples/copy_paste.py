"""Copy-paste: a stacked tanh RNN guided by a Transformer, untrained or trained on the task first.

Run: python examples/copy_paste.py [--seeds 0 1 2] [--steps 500] [--guide-steps 500]
     python examples/copy_paste.py --smoke      (tiny sizes; used by the tests)
Prints held-out token accuracy on the positions to reproduce for the RNN alone, guided by an untrained
Transformer, guided by a trained one, and the trained Transformer itself.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from guidewrap.experiments.common import fit, seeded, summarize
from guidewrap.experiments.copy_paste import IGNORE, CausalTransformer, CopyPasteTask, StackedRNN, accuracy


def main(seeds: tuple[int, ...] = (0,), steps: int = 500, guide_steps: int = 500, smoke: bool = False) -> list[dict]:
    task = CopyPasteTask(min_len=10, max_len=20, symbols=10)
    sizes = {"rnn": {"emb": 64, "hidden": 128}, "tf": {"d_model": 128}}
    if smoke:
        steps, guide_steps, task = 3, 3, CopyPasteTask(min_len=3, max_len=5, symbols=5)
        sizes = {"rnn": {"emb": 8, "hidden": 16}, "tf": {"d_model": 16, "heads": 2}}
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits.flatten(0, 1), labels.flatten())

    rows = []
    for seed in seeds:
        data = torch.Generator().manual_seed(seed)

        def batches(step: int, data: torch.Generator = data) -> tuple[torch.Tensor, torch.Tensor]:
            b = task.sample(64, generator=data)
            return b["input_ids"], b["labels"]

        held_out = [task.sample(256, seed=10_000 + seed + i) for i in range(4)]

        def score(model: nn.Module, held_out: list = held_out) -> float:
            with torch.no_grad():
                return sum(accuracy(model(b["input_ids"]), b["labels"]) for b in held_out) / len(held_out)

        trained_guide = seeded(seed + 1, lambda: CausalTransformer(task.vocab, **sizes["tf"]))
        fit(trained_guide, batches, task_loss, guide_steps, mode="none")
        rows.append({"model": "Transformer (trained guide itself)", "accuracy": score(trained_guide)})
        for name, guide in (
            ("RNN alone", None),
            (
                "RNN guided by untrained Transformer",
                seeded(seed + 1, lambda: CausalTransformer(task.vocab, **sizes["tf"])),
            ),
            ("RNN guided by trained Transformer", trained_guide),
        ):
            rnn = seeded(seed, lambda: StackedRNN(task.vocab, **sizes["rnn"]))
            # weight 0.25 over the 24 pairs (see guidewrap.experiments.copy_paste.train_copy_paste)
            fit(rnn, batches, task_loss, steps, guide=guide, mode="none" if guide is None else "guided", weight=0.25)
            rows.append({"model": name, "accuracy": score(rnn)})
    print(f"copy-paste, lengths {task.min_len}-{task.max_len}, {steps} steps, batch 64, seeds {list(seeds)}")
    print(summarize(rows, "model", ["accuracy"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--guide-steps", type=int, default=500, help="training steps of the trained guide")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(tuple(a.seeds), a.steps, a.guide_steps, a.smoke)
