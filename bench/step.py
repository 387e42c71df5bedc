"""Cost of one guided training step, side by side in one process (CPU).

Run: python bench/step.py
Target: a deep fully connected net (24 Linear 1024-wide layers with BatchNorm + ReLU) on 32x32x3
inputs; guide: an untrained torchvision ResNet-18; batch 256. Four steps are timed interleaved,
median of several repetitions:
  (a) plain   - a plain target training step
  (b) floor   - plain step + one guide forward under inference mode
  (c) guided  - guidewrap's guided step (GuidedModel)
  (d) reference - the paper's published recipe, written here: a second, hooked target forward and
      CKA through n x n centring-matrix products with each Gram recomputed per HSIC.
Prints reference_over_guided=<x> and, last, guided_over_floor=<x>.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from guidewrap import GuidedModel
from guidewrap._reference import linear_cka_textbook


def deep_fcn(depth: int = 24, width: int = 1024, d_in: int = 3 * 32 * 32, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _capture(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def main(batch: int = 256, reps: int = 9, depth: int = 24) -> dict[str, float]:
    torch.manual_seed(0)
    target = deep_fcn(depth)
    guide = torchvision.models.resnet18(weights=None, num_classes=10)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    guided = GuidedModel(target, guide)
    plan = guided.plan(x)
    pairs = [(p.target.name, p.guide.name) for p in plan]
    opt = torch.optim.SGD(target.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def plain() -> None:
        loss = loss_fn(target(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def floor() -> None:
        with torch.inference_mode():
            guide(x)
        plain()

    def ours() -> None:
        loss = loss_fn(guided(x), y) + guided.alignment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    def reference() -> None:
        loss = loss_fn(target(x), y)
        feats = _capture(target, sorted({t for t, _ in pairs}), x)  # second, hooked target forward
        with torch.no_grad():
            g_feats = _capture(guide, sorted({g for _, g in pairs}), x)
        for t_name, g_name in pairs:
            loss = loss + 1 - linear_cka_textbook(feats[t_name].flatten(1), g_feats[g_name].flatten(1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    steps = {"plain": plain, "floor": floor, "guided": ours, "reference": reference}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in steps.items():  # interleaved
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"deep FCN ({depth} x Linear 1024 + BN) <- untrained ResNet-18, batch {batch}, {len(pairs)} pairs, CPU")
    for name, value in med.items():
        print(f"  {name:<9} {value * 1e3:9.1f} ms")
    print(f"reference_over_guided={med['reference'] / med['guided']:.2f}")
    print(f"guided_over_floor={med['guided'] / med['floor']:.2f}")
    return med


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    main(args.batch, args.reps)
