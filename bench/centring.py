"""Cost of centring features before the Gram (exact on offset data) against the previous kernels,
which centred the Gram afterwards (fast, but wrong when a common offset dwarfs the spread).

Run: python bench/centring.py
The deep-FCN <- ResNet-18 step of bench/step.py (batch 256, 21 pairs, default layers and weight 1),
timed with the current kernels and with the previous ones patched in, interleaved in one process;
medians of ``--reps`` repetitions. Last line: ``centred_over_uncentred=<x>`` (guided step time).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torchvision
from step import deep_fcn, make_steps
from torch import Tensor

from guidewrap.metrics import _numerics, linear


class _UncentredGrams(torch.autograd.Function):
    """The previous kernel: Grams of the raw features (double-centred afterwards by the caller)."""

    @staticmethod
    def forward(ctx: Any, inv_scale: Tensor, in_range: bool, *xs: Tensor) -> Tensor:
        n = xs[0].shape[-2]
        out = xs[0].new_empty((len(xs), *xs[0].shape[:-1], n))
        for i, x in enumerate(xs):
            inv = inv_scale[i][..., None, None]
            if in_range:
                torch.matmul(x, x.mT, out=out[i]).mul_(inv.square())
                continue
            scaled = torch.nan_to_num_(x * inv, nan=0.0, posinf=0.0, neginf=0.0)
            torch.matmul(scaled, scaled.mT, out=out[i])
        ctx.in_range = in_range
        ctx.save_for_backward(inv_scale, *xs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inv_scale, *xs = ctx.saved_tensors
        symmetric = grad + grad.mT
        grads: list[Tensor | None] = []
        for i, x in enumerate(xs):
            if not ctx.needs_input_grad[i + 2]:
                grads.append(None)
                continue
            inv = inv_scale[i][..., None, None]
            grads.append((symmetric[i] * inv.square()) @ x if ctx.in_range else ((symmetric[i] * inv) @ x).mul_(inv))
        return (None, None, *grads)


def _one_pass_center(x: Tensor, weights: Tensor | None = None) -> Tensor:
    if weights is None:
        return x - x.mean(-2, keepdim=True)
    w = weights.to(x.dtype).unsqueeze(-1)
    return (x - (x * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1.0)) * w


@contextlib.contextmanager
def previous_kernels() -> Iterator[None]:
    saved = linear._ScaledGrams, linear._center, _numerics._center
    linear._ScaledGrams, linear._center, _numerics._center = _UncentredGrams, _one_pass_center, _one_pass_center
    try:
        yield
    finally:
        linear._ScaledGrams, linear._center, _numerics._center = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    target, guide = deep_fcn(), torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))
    steps, n_pairs = make_steps(target, guide, x, lambda o: torch.nn.functional.cross_entropy(o, labels), False)
    guided = steps["guided"]
    times: dict[str, list[float]] = {"centred": [], "uncentred": []}
    guided()
    with previous_kernels():
        guided()
    for _ in range(args.reps):
        for name in times:  # interleaved
            with previous_kernels() if name == "uncentred" else contextlib.nullcontext():
                start = time.perf_counter()
                guided()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {n_pairs} pairs")
    for name, value in med.items():
        print(f"  guided step, {name:<10} {value * 1e3:8.1f} ms")
    print(f"centred_over_uncentred={med['centred'] / med['uncentred']:.3f}")


if __name__ == "__main__":
    main()
