"""Error of the max_features approximation against exact CKA, on bench/step.py's FCN / ResNet-18 case.

Run: python bench/approximation.py
White-noise images (the worst case: no spatial redundancy). For each max_features, prints the largest
per-pair change of CKA and the alignment loss next to the exact one, on the same batch.
"""

from __future__ import annotations

import torch
import torchvision
from step import MATCHING, deep_fcn  # bench/step.py: the same models and matching settings

from guidewrap import GuidedModel


def main(batch: int = 256, depth: int = 24, limits: tuple[int, ...] = (4096, 2048, 1024, 512)) -> dict[int, float]:
    torch.manual_seed(0)
    target, guide = deep_fcn(depth), torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    exact = GuidedModel(target, guide, **MATCHING)
    exact(x)
    print(f"deep FCN ({depth} x Linear 1024 + BN) <- untrained ResNet-18, batch {batch}, white-noise images")
    print(f"exact alignment loss {exact.alignment_loss.item():.3f}")
    worst = {}
    for k in limits:
        approx = GuidedModel(target, guide, max_features=k, **MATCHING)
        approx(x)
        worst[k] = max(abs(exact.last_alignment[p] - approx.last_alignment[p]) for p in exact.last_alignment)
        print(
            f"max_features={k:>5}: largest per-pair CKA change {worst[k]:.3f}, loss {approx.alignment_loss.item():.3f}"
        )
    return worst


if __name__ == "__main__":
    main()
