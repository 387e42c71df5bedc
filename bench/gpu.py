"""Guided step over its floor on a GPU: CUDA events, bf16 autocast, the guide's forward on a side stream.

Run: python bench/gpu.py [--reps 20]            (on a machine with CUDA; bench/RESULTS.md has figures)
     python bench/gpu.py --tiny                 (CPU, tiny sizes: what the tests run, so it cannot rot)
The GPT-2 <- GPT-2 LM case of bench/real.py (4 blocks, d 256, GPT-2's vocabulary, blocks of 256
tokens, batch 16) under ``torch.autocast(bfloat16)``, default matching (named below):
  plain         - the target's training step
  floor         - plain + one guide forward, one after the other on the default stream
  floor_overlap - plain + one guide forward on a side stream, overlapping the target's forward
  guided        - GuidedModel's step
Timed with CUDA events (``time.perf_counter`` on the CPU), interleaved, median of ``reps``.
Prints, last, gpu_guided_over_floor=<x>.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real import MATCHING, gpt2  # noqa: E402

from guidewrap import GuidedModel  # noqa: E402


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cpu_time


def main(reps: int = 20, tiny: bool = False) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    vocab, width, length, batch = (200, 32, 16, 8) if tiny else (50257, 256, 256, 16)
    torch.manual_seed(0)
    target, guide = gpt2(vocab, 4, width, length).to(device), gpt2(vocab, 4, width, length).to(device).eval()
    ids = torch.randint(0, vocab, (batch, length), device=device)
    opt = torch.optim.AdamW(target.parameters(), lr=1e-4)
    guided = GuidedModel(target, guide, **MATCHING)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    side = torch.cuda.Stream() if device.type == "cuda" else None

    def train_step(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss  # a GuidedModel's loss holds the term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    plain = train_step(target)

    def guide_forward() -> None:
        with torch.inference_mode(), autocast:
            guide(input_ids=ids)

    def floor() -> None:
        guide_forward()
        plain()

    def floor_overlap() -> None:
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else nullcontext():
            guide_forward()
        plain()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)

    steps = {"plain": plain, "floor": floor, "floor_overlap": floor_overlap, "guided": train_step(guided)}
    timer = _timer(device)
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            times[name].append(timer(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny mode)"
    print(
        f"{name}, torch {torch.__version__}, bf16 autocast; matching: "
        + ", ".join(f"{k}={v}" for k, v in MATCHING.items())
    )
    print(f"GPT-2 LM (4 x {width}, vocab {vocab}) <- GPT-2, batch {batch} x {length} ({len(guided.plan())} pairs)")
    print("  " + "  ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in med.items()))
    print(f"gpu_guided_over_floor_overlap={med['guided'] / med['floor_overlap']:.2f}")
    ratio = med["guided"] / med["floor"]
    print(f"gpu_guided_over_floor={ratio:.2f}")
    guided.close()
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    a = parser.parse_args()
    main(2 if a.tiny else a.reps, a.tiny)
