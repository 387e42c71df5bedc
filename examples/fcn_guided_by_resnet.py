"""Deep fully connected net guided by ResNet-18 (untrained, or trained from a local checkpoint) on images.

Run: python examples/fcn_guided_by_resnet.py --data-dir ~/data/cifar10 [--guide-checkpoint resnet18.pt]
     python examples/fcn_guided_by_resnet.py --smoke        (generated images, tiny sizes; used by the tests)
CIFAR-10 is read with torchvision from --data-dir (download=False: nothing is fetched). Prints train/test
accuracy for the FCN alone and guided.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from lab.common import fit, random_batches, seeded, summarize
from lab.images import accuracy, deep_fcn, load_images
from torch import nn

# Pinned level, pair reduction and weight (the paper's sum with weight 1), whatever the library defaults.
PINNED = {"layers": "sublayers", "reduction": "sum", "weight": 1.0}


def main(
    data_dir: str | None = None,
    guide_checkpoint: str | None = None,
    seeds: tuple[int, ...] = (0,),
    steps: int = 2000,
    depth: int = 12,
    smoke: bool = False,
) -> list[dict]:
    if smoke:
        steps, depth = 3, 3
    x, y, x_test, y_test = load_images(data_dir, generated=smoke)
    width, batch = (64, 32) if smoke else (1024, 256)
    rows = []
    for seed in seeds:
        for mode in ("none", "guided"):
            target = seeded(seed, lambda: deep_fcn(depth, width))
            guide = torchvision.models.resnet18(weights=None, num_classes=10)
            if guide_checkpoint:
                guide.load_state_dict(torch.load(guide_checkpoint, map_location="cpu"))
            batches = random_batches(x, y, batch, seed)
            fit(target, batches, nn.functional.cross_entropy, steps, guide=guide, mode=mode, **PINNED)
            rows.append(
                {
                    "variant": "FCN alone" if mode == "none" else "FCN guided by ResNet-18",
                    "train acc": accuracy(target, x, y),
                    "test acc": accuracy(target, x_test, y_test),
                }
            )
    guide_kind = "trained" if guide_checkpoint else "untrained"
    print(f"deep FCN ({depth} x Linear {width}) vs {guide_kind} ResNet-18, {steps} steps, seeds {list(seeds)}")
    print(summarize(rows, "variant", ["train acc", "test acc"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="folder holding CIFAR-10 in torchvision's format")
    parser.add_argument("--guide-checkpoint", help="state_dict of a trained ResNet-18 (default: untrained)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--smoke", action="store_true", help="generated images, tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(a.data_dir, a.guide_checkpoint, tuple(a.seeds), a.steps, a.depth, a.smoke)
