"""Peak memory of a guided step over the floor (plain step + one guide forward), side by side.

Run: python bench/memory.py          (Linux: reads the process's resident-set high-water mark)
For each step variant: free what can be freed (gc, malloc_trim), reset the high-water mark
(/proc/self/clear_refs), run one step and read VmHWM - VmRSS-before. Variants are interleaved and the
median of several repetitions is kept. Two cases, as in bench/step.py: the deep FCN guided by an
untrained ResNet-18 (batch 256) and a 4-layer LSTM guided by a 4-layer Transformer encoder (batch 64,
length 128, flatten features). Prints, last, guided_mem_over_floor=<x> for the FCN case.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
from collections.abc import Callable

import torch
import torchvision
from step import deep_fcn, lstm_case, make_steps  # bench/step.py: the same models and steps
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


def measure(target: nn.Module, guide: nn.Module, x: torch.Tensor, loss_fn: Callable, reps: int) -> dict[str, float]:
    steps, _ = make_steps(target, guide, x, loss_fn, reference=False)
    for fn in steps.values():
        fn()  # warm-up
    peaks: dict[str, list[int]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():  # interleaved
            peaks[name].append(_peak_of(fn))
    return {k: statistics.median(v) / 2**20 for k, v in peaks.items()}


def main(reps: int = 5, batch: int = 256, depth: int = 24, seq_shape: tuple[int, int] = (64, 128)) -> float:
    torch.manual_seed(0)
    target, guide, x = lstm_case(*seq_shape)
    seq = measure(target, guide, x, lambda out: out.pow(2).mean(), reps)
    print(f"4-layer LSTM <- 4-layer Transformer encoder, batch x length {seq_shape} (flatten), CPU, MiB over start:")
    print("  " + "  ".join(f"{k} {v:7.1f}" for k, v in seq.items()))
    print(f"lstm_guided_mem_over_floor={seq['guided'] / seq['floor']:.2f}")
    y = torch.randint(0, 10, (batch,))
    fcn = measure(
        deep_fcn(depth),
        torchvision.models.resnet18(weights=None, num_classes=10),
        torch.randn(batch, 3, 32, 32),
        lambda out: nn.functional.cross_entropy(out, y),
        reps,
    )
    print(f"deep FCN ({depth} x Linear 1024 + BN) <- untrained ResNet-18, batch {batch}, CPU, MiB over the start:")
    print("  " + "  ".join(f"{k} {v:7.1f}" for k, v in fcn.items()))
    ratio = fcn["guided"] / fcn["floor"]
    print(f"guided_mem_over_floor={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
