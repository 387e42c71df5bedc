"""Guidance vs logit distillation from the same untrained teacher (MNIST-1D, deep MLP, 1-D CNN).

Run: python examples/guidance_vs_distillation.py [--seeds 0 1 2] [--steps 2000]
     python examples/guidance_vs_distillation.py --smoke      (tiny; used by the tests)
The paper's point: an untrained network's logits carry no signal to distil, while its architecture
still guides. Prints test accuracy and the generalisation gap per variant.
"""

from __future__ import annotations

import argparse

from lab.common import summarize

from guidewrap.tasks import DEMO_STEPS, DEMO_TRAIN_SAMPLES, load_mnist1d, train_variant


def main(seeds: tuple[int, ...] = (0,), steps: int = DEMO_STEPS, smoke: bool = False) -> list[dict]:
    samples = 400 if smoke else 10_000
    if smoke:
        steps = 3
    data = load_mnist1d(num_samples=samples, val_samples=64 if smoke else 1000, train_samples=DEMO_TRAIN_SAMPLES)
    rows = []
    for seed in seeds:
        for variant in ("baseline", "guided", "distill"):
            r = train_variant(
                variant, data, seed=seed, steps=steps, batch=32 if smoke else 256, clip=None
            )  # as published
            rows.append({"variant": variant, "test acc": r.test_acc, "gap": r.gap})
    print(f"MNIST-1D, deep MLP; guide/teacher: the same untrained 1-D CNN; {steps} steps, seeds {list(seeds)}")
    print(summarize(rows, "variant", ["test acc", "gap"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--smoke", action="store_true", help="tiny (used by the tests)")
    a = parser.parse_args()
    main(tuple(a.seeds), a.steps, a.smoke)
