"""Copy-paste: a stacked tanh RNN guided by a Transformer, untrained or trained on the task first.

Run: python examples/copy_paste.py [--seeds 0 1 2] [--steps 500] [--guide-steps 500]
     python examples/copy_paste.py --smoke      (a tiny task, 3 steps; used by the tests)
Prints held-out token accuracy on the positions to reproduce for the RNN alone, guided by an untrained
Transformer, guided by a trained one, and the trained Transformer itself.
"""

from __future__ import annotations

import argparse

from lab.common import fit, seeded, summarize
from lab.copy_paste import (
    CausalTransformer,
    CopyPasteTask,
    held_out_accuracy,
    task_batches,
    task_loss,
    train_copy_paste,
)

# Over the 20 pairs (see `examples/lab/copy_paste.py`'s `train_copy_paste`).
WEIGHT = 0.25


def main(seeds: tuple[int, ...] = (0,), steps: int = 500, guide_steps: int = 500, smoke: bool = False) -> list[dict]:
    task = CopyPasteTask(min_len=10, max_len=20, symbols=10)
    if smoke:
        steps, guide_steps, task = 3, 3, CopyPasteTask(min_len=3, max_len=5, symbols=5)
    rows = []
    for seed in seeds:
        trained_guide = seeded(seed + 1, lambda: CausalTransformer(task.vocab))
        fit(trained_guide, task_batches(task, 64, seed), task_loss, guide_steps, mode="none")
        rows.append(
            {
                "model": "Transformer (the trained guide itself)",
                "accuracy": held_out_accuracy(trained_guide, task, seed),
            }
        )
        # The same runs as tests/test_reproduction.py (untrained guide built under the RNN's seed).
        for name, guided, guide in (
            ("RNN alone", False, None),
            ("RNN guided by an untrained Transformer", True, None),
            ("RNN guided by the trained Transformer", True, trained_guide),
        ):
            acc = train_copy_paste(seed, guided, steps, batch=64, task=task, guide=guide, weight=WEIGHT)
            rows.append({"model": name, "accuracy": acc})
    print(
        f"copy-paste, lengths {task.min_len}-{task.max_len}, {steps} steps, batch 64, "
        f"guidance weight {WEIGHT}, seeds {list(seeds)}"
    )
    print(summarize(rows, "model", ["accuracy"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--guide-steps", type=int, default=500, help="training steps of the trained guide")
    parser.add_argument("--smoke", action="store_true", help="a tiny task, 3 steps (used by the tests)")
    a = parser.parse_args()
    main(tuple(a.seeds), a.steps, a.guide_steps, a.smoke)
