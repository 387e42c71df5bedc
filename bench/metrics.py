"""Linear CKA (forward + backward): guidewrap's form vs the textbook formula, side by side.

Run: python bench/metrics.py
The textbook form recomputes each Gram per HSIC and centres with n x n matrix products (as the
paper's published code does). Prints one ratio per width and, last,
speedup_vs_textbook_min=<x>.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # float64 references
from reference import linear_cka_textbook  # noqa: E402

from guidewrap.metrics import linear_cka


def _time(fn, x, y) -> float:
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(x, y).backward()
    return time.perf_counter() - start


def main(n: int = 256, widths: tuple[int, ...] = (64, 1024, 16384), reps: int = 7) -> float:
    torch.manual_seed(0)
    ratios = []
    for d in widths:
        x, y = torch.randn(n, d), torch.randn(n, d)
        for fn in (linear_cka, linear_cka_textbook):  # warm-up
            _time(fn, x, y)
        ours, textbook = [], []
        for _ in range(reps):  # interleaved, so machine noise hits both alike
            ours.append(_time(linear_cka, x, y))
            textbook.append(_time(linear_cka_textbook, x, y))
        o, t = statistics.median(ours), statistics.median(textbook)
        ratios.append(t / o)
        print(f"n={n} d={d:>6}: guidewrap {o * 1e3:8.2f} ms  textbook {t * 1e3:8.2f} ms  speedup {t / o:6.2f}x")
    print(f"speedup_vs_textbook_min={min(ratios):.2f}")
    return min(ratios)


if __name__ == "__main__":
    main()
