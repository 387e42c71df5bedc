"""Deep ConvNet without residual connections guided by a ResNet-18 on images.

Run: python examples/deep_convnet_guided_by_resnet.py --data-dir ~/data/cifar10 [--depth 16]
     python examples/deep_convnet_guided_by_resnet.py --smoke   (generated images; used by the tests)
"""

from __future__ import annotations

import argparse

import torchvision
from lab.common import fit, random_batches, seeded, summarize
from lab.images import accuracy, load_images, plain_convnet
from torch import nn

# Pinned level, pair reduction and weight (the paper's sum with weight 1), whatever the library defaults.
PINNED = {"layers": "sublayers", "reduction": "sum", "weight": 1.0}


def main(
    data_dir: str | None = None, seeds: tuple[int, ...] = (0,), steps: int = 2000, depth: int = 16, smoke: bool = False
) -> list[dict]:
    if smoke:
        steps, depth = 3, 4
    x, y, x_test, y_test = load_images(data_dir, generated=smoke)
    channels, batch = (8, 32) if smoke else (64, 128)
    rows = []
    for seed in seeds:
        for mode in ("none", "guided"):
            target = seeded(seed, lambda: plain_convnet(depth, channels))
            guide = torchvision.models.resnet18(weights=None, num_classes=10)
            batches = random_batches(x, y, batch, seed)
            fit(target, batches, nn.functional.cross_entropy, steps, guide=guide, mode=mode, **PINNED)
            name = "plain ConvNet alone" if mode == "none" else "plain ConvNet guided by ResNet-18"
            rows.append(
                {"variant": name, "train acc": accuracy(target, x, y), "test acc": accuracy(target, x_test, y_test)}
            )
    print(f"plain ConvNet ({depth} conv layers, no residuals) vs untrained ResNet-18, {steps} steps")
    print(summarize(rows, "variant", ["train acc", "test acc"]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="folder holding CIFAR-10 in torchvision's format")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="generated images, tiny sizes (used by the tests)")
    a = parser.parse_args()
    main(a.data_dir, tuple(a.seeds), a.steps, a.depth, a.smoke)
