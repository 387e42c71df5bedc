"""How the cost of linear CKA (forward + backward) grows with batch size n and feature width d.

Run: python bench/scaling.py
Against the operation counts: a side kept as a Gram costs ~n^2 d, as centred features ~n d^2
(guidewrap picks the cheaper). For n in 64..1024 at d = 4096 (Gram form) the expected exponent in n
is 2; for d in 512..16384 at n = 256 the expected exponent in d is 1. Times are medians of
interleaved repetitions; the exponents are least-squares slopes in log-log.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from guidewrap.metrics import linear_cka


def _time(n: int, d: int, reps: int) -> float:
    x, y = torch.randn(n, d), torch.randn(n, d)
    times = []
    for i in range(reps + 1):
        xr = x.clone().requires_grad_(True)
        start = time.perf_counter()
        linear_cka(xr, y).backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main(
    reps: int = 5,
    ns: tuple[int, ...] = (64, 128, 256, 512, 1024),
    ds: tuple[int, ...] = (512, 1024, 4096, 16384),
    d: int = 4096,
    n: int = 256,
) -> tuple[float, float]:
    torch.manual_seed(0)
    t_n = [_time(n, d, reps) for n in ns]
    for size, t in zip(ns, t_n, strict=True):
        print(f"n={size:>5} d={d}: {t * 1e3:8.2f} ms   (n^2 d = {size * size * d / 1e9:.3f} G)")
    t_d = [_time(n, dd, reps) for dd in ds]
    for dd, t in zip(ds, t_d, strict=True):
        print(f"n={n} d={dd:>6}: {t * 1e3:8.2f} ms   (n^2 d = {n * n * dd / 1e9:.3f} G)")
    exp_n, exp_d = _slope([float(v) for v in ns], t_n), _slope([float(v) for v in ds], t_d)
    print(f"measured_exponent_n={exp_n:.2f} (expected 2 for the Gram form; small n is overhead-bound)")
    print(f"measured_exponent_d={exp_d:.2f} (expected 1)")
    return exp_n, exp_d


if __name__ == "__main__":
    main()
