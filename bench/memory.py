"""Peak memory of a guided step over the floor (plain step + one guide forward), side by side.

Run: python bench/memory.py [--reps 5]      (Linux: reads the resident-set high-water mark)
Each measurement is one step in a fresh process: the process builds the models, runs two warm-up
steps of its variant, frees what can be freed (gc, malloc_trim), resets the high-water mark
(/proc/self/clear_refs) and reports VmHWM - VmRSS-before for one more step. Variants alternate, and
the median of ``reps`` processes per variant is kept (the same code in one long process drifted:
1.13, 1.21 and 1.38 in three runs, as the allocator's history differed). Two cases, as in
bench/step.py (its matching settings): the deep FCN guided by an untrained ResNet-18 (batch 256)
and a 4-layer LSTM guided by a 4-layer Transformer encoder (batch 64, length 128, flatten
features). Prints, last, guided_mem_over_floor=<x> for the FCN case.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
import torchvision
from step import MATCHING, deep_fcn, lstm_case, make_steps  # bench/step.py: the same models, steps, settings
from torch import nn

_LIBC = ctypes.CDLL("libc.so.6")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_of(step: Callable[[], None]) -> int:
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status("VmRSS:")
    step()
    return _status("VmHWM:") - before


def _case(
    case: str, batch: int, depth: int, seq_shape: tuple[int, int]
) -> tuple[nn.Module, nn.Module, torch.Tensor, Callable]:
    torch.manual_seed(0)
    if case == "lstm":
        target, guide, x = lstm_case(*seq_shape)
        return target, guide, x, lambda out: out.pow(2).mean()
    y = torch.randint(0, 10, (batch,))
    guide = torchvision.models.resnet18(weights=None, num_classes=10)
    return deep_fcn(depth), guide, torch.randn(batch, 3, 32, 32), lambda out: nn.functional.cross_entropy(out, y)


def measure(target: nn.Module, guide: nn.Module, x: torch.Tensor, loss_fn: Callable, reps: int) -> dict[str, float]:
    """In one process (what the tiny test mode uses): interleaved variants, median per variant."""
    steps, _ = make_steps(target, guide, x, loss_fn, reference=False)
    for fn in steps.values():
        fn()  # warm-up
    peaks: dict[str, list[int]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():  # interleaved
            peaks[name].append(_peak_of(fn))
    return {k: statistics.median(v) / 2**20 for k, v in peaks.items()}


def one(case: str, variant: str, batch: int, depth: int, seq_shape: tuple[int, int]) -> int:
    """One variant's step peak in this (fresh) process, after two warm-up steps."""
    steps, _ = make_steps(*_case(case, batch, depth, seq_shape), reference=False)
    step = steps[variant]
    step()
    step()
    return _peak_of(step)


def measure_fresh(case: str, reps: int, batch: int, depth: int, seq_shape: tuple[int, int]) -> dict[str, float]:
    """Median over ``reps`` fresh processes per variant, variants alternating."""
    peaks: dict[str, list[int]] = {k: [] for k in ("plain", "floor", "guided")}
    for _ in range(reps):
        for variant in peaks:
            cmd = [sys.executable, __file__, "--one", case, variant, "--batch", str(batch), "--depth", str(depth),
                   "--seq-shape", str(seq_shape[0]), str(seq_shape[1])]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
            peaks[variant].append(int(out.strip().splitlines()[-1]))
    return {k: statistics.median(v) / 2**20 for k, v in peaks.items()}


def main(
    reps: int = 5, batch: int = 256, depth: int = 24, seq_shape: tuple[int, int] = (64, 128), fresh: bool = True
) -> float:
    print("matching: " + ", ".join(f"{k}={v}" for k, v in MATCHING.items()))
    results = {}
    for case in ("lstm", "fcn"):
        if fresh:
            results[case] = measure_fresh(case, reps, batch, depth, seq_shape)
        else:
            results[case] = measure(*_case(case, batch, depth, seq_shape), reps)
    seq, fcn = results["lstm"], results["fcn"]
    how = f"median of {reps} fresh processes per variant" if fresh else f"median of {reps}, one process"
    print(f"4-layer LSTM <- 4-layer Transformer encoder, batch x length {seq_shape} (flatten), MiB over start ({how}):")
    print("  " + "  ".join(f"{k} {v:7.1f}" for k, v in seq.items()))
    print(f"lstm_guided_mem_over_floor={seq['guided'] / seq['floor']:.2f}")
    print(f"deep FCN ({depth} x Linear 1024 + BN) <- untrained ResNet-18, batch {batch}, MiB over the start ({how}):")
    print("  " + "  ".join(f"{k} {v:7.1f}" for k, v in fcn.items()))
    ratio = fcn["guided"] / fcn["floor"]
    print(f"guided_mem_over_floor={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--seq-shape", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help="internal: one measurement")
    a = parser.parse_args()
    if a.one:
        print(one(a.one[0], a.one[1], a.batch, a.depth, tuple(a.seq_shape)))
    else:
        main(a.reps, a.batch, a.depth, tuple(a.seq_shape))
