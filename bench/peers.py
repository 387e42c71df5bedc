"""guidewrap's CKA against the independent CKA packages, like with like, interleaved in one process (CPU).

Run: pip install -e ".[bench]" && python bench/peers.py [--reps 5] [--threads 1]
(each size runs at least ``reps`` interleaved rounds, and as many as fill half a second)
Peers: pytorch-cka (``cka.cka_from_features``) and torch-cka (``torch_cka.CKA``'s ``_HSIC``, its
comparison loop reproduced: Grams with a zeroed diagonal). Both compute CKA on the unbiased HSIC
estimator, so they are compared with ``guidewrap.metrics.debiased_cka``; neither offers the biased
linear CKA. Same float32 inputs for every method, n in {64, 256, 1024}, d in {64, 1024, 65536},
forward and forward+backward (torch-cka reads its HSIC values with ``.item()``: no backward).
Also prints each method's error on offset data (features + 1e4, against float64): a method that
takes the Gram of uncentred features first loses the signal in float32 rounding.
With d = 65536 it also times ReLU features (offset data, guidewrap's centred path; not in the headline).
Prints fwd_bwd_min_speedup=<x> (the smallest over all sizes of pytorch-cka's forward+backward time over
guidewrap's) and, last, fwd_over_fastest_peer=<x>: the largest over all sizes of guidewrap's forward
time over the fastest peer's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from guidewrap.metrics import debiased_cka


def _pytorch_cka(x: Tensor, y: Tensor) -> Tensor:
    from cka import cka_from_features

    return cka_from_features(x, y)[0, 0]


class _TorchCKAHost:
    device = "cpu"


def _torch_cka(x: Tensor, y: Tensor) -> float:
    from torch_cka.cka import CKA

    hsic = CKA._HSIC
    host = _TorchCKAHost()
    k, l_ = x.flatten(1) @ x.flatten(1).t(), y.flatten(1) @ y.flatten(1).t()
    k.fill_diagonal_(0.0)
    l_.fill_diagonal_(0.0)
    return hsic(host, k, l_) / (hsic(host, k, k) ** 0.5 * hsic(host, l_, l_) ** 0.5)


def _guidewrap(x: Tensor, y: Tensor) -> Tensor:
    return debiased_cka(x, y)


METHODS: dict[str, Callable[[Tensor, Tensor], object]] = {
    "guidewrap": _guidewrap,
    "pytorch-cka": _pytorch_cka,
    "torch-cka": _torch_cka,
}
DIFFERENTIABLE = {"guidewrap", "pytorch-cka"}


def _time(reps: int, calls: dict[str, Callable[[], object]], budget: float = 0.5) -> dict[str, float]:
    """Median seconds per call, the calls interleaved (drift hits every method alike); at least
    ``reps`` rounds and enough rounds to fill ``budget`` seconds (small sizes are noisy)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():
        f()  # warm-up (the first calls of a size allocate)
    start = time.perf_counter()
    for f in calls.values():
        f()
    rounds = max(reps, int(budget / max(time.perf_counter() - start, 1e-9)))
    for _ in range(rounds):
        for name, f in calls.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _forward(f: Callable[[Tensor, Tensor], object], x: Tensor, y: Tensor) -> Callable[[], object]:
    return lambda: f(x, y)


def _backward(f: Callable[[Tensor, Tensor], object], x: Tensor, y: Tensor) -> Callable[[], None]:
    def run() -> None:
        value = f(x.clone().requires_grad_(True), y)
        value.backward()  # type: ignore[union-attr]

    return run


def offset_errors(n: int = 256, d: int = 1024, offset: float = 1e4) -> dict[str, float]:
    """|CKA(float32 of offset data) - CKA(float64)| per method, for correlated features."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5 + 0.5 * torch.randn(
        n, d, generator=gen, dtype=torch.float64
    )
    exact = float(_guidewrap(x, y))
    xo, yo = (x + offset).float(), (y + offset).float()
    return {name: abs(float(fn(xo, yo)) - exact) for name, fn in METHODS.items()}


def main(reps: int = 5, ns: tuple[int, ...] = (64, 256, 1024), ds: tuple[int, ...] = (64, 1024, 65536)) -> float:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; debiased (unbiased-HSIC) CKA, float32")
    print("| n | d | guidewrap fwd ms | pytorch-cka fwd | torch-cka fwd | gw / fastest peer | "
          "guidewrap fwd+bwd ms | pytorch-cka fwd+bwd | peer / gw (fwd+bwd) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    worst, min_speedup = 0.0, float("inf")
    for n in ns:
        for d in ds:
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
            fwd = _time(reps, {k: _forward(f, x, y) for k, f in METHODS.items()})
            bwd = _time(reps, {k: _backward(METHODS[k], x, y) for k in sorted(DIFFERENTIABLE)})
            fastest = min(fwd["pytorch-cka"], fwd["torch-cka"])
            ratio = fwd["guidewrap"] / fastest
            worst = max(worst, ratio)
            min_speedup = min(min_speedup, bwd["pytorch-cka"] / bwd["guidewrap"])
            print(
                f"| {n} | {d} | {fwd['guidewrap'] * 1e3:.2f} | {fwd['pytorch-cka'] * 1e3:.2f} | "
                f"{fwd['torch-cka'] * 1e3:.2f} | {ratio:.2f} | {bwd['guidewrap'] * 1e3:.2f} | "
                f"{bwd['pytorch-cka'] * 1e3:.2f} | {bwd['pytorch-cka'] / bwd['guidewrap']:.2f} |",
                flush=True,
            )
    if max(ds) >= 4096:  # real activations carry offsets: guidewrap then centres first (one more pass)
        print("ReLU features (a mean of 0.4 per feature: guidewrap centres before its Gram), forward ms:")
        for n in (64, 256):
            gen = torch.Generator().manual_seed(0)
            x, y = (torch.randn(n, max(ds), generator=gen).relu() for _ in range(2))
            fwd = _time(reps, {k: _forward(f, x, y) for k, f in METHODS.items()})
            fastest = min(fwd["pytorch-cka"], fwd["torch-cka"])
            print(f"  n {n}, d {max(ds)}: guidewrap {fwd['guidewrap'] * 1e3:.2f}, pytorch-cka "
                  f"{fwd['pytorch-cka'] * 1e3:.2f}, torch-cka {fwd['torch-cka'] * 1e3:.2f}, "
                  f"gw / fastest {fwd['guidewrap'] / fastest:.2f}")  # fmt: skip
    errors = offset_errors()
    print("offset data (features + 1e4), |CKA float32 - CKA float64|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))  # fmt: skip
    print(f"fwd_bwd_min_speedup={min_speedup:.2f}")
    print(f"fwd_over_fastest_peer={worst:.2f}")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.reps)
