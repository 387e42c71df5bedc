"""Guided step over its floor under two processes (CPU, gloo, DistributedDataParallel), global-batch CKA.

Run: python bench/ddp.py [--reps 7]          (starts torchrun with 2 processes itself)
The GPT-2 <- GPT-2 LM case of bench/real.py (4 blocks, d 128, GPT-2's vocabulary, blocks of 128
tokens, batch 8 per process), the library's default matching (named below), inside the window:
  plain  - DDP(target) training step
  floor  - plain + one guide forward under inference mode
  guided - DDP(GuidedModel(target, guide)) step, CKA over the batch gathered from both processes
Steps are interleaved, median of ``reps``; each process times its own steps and rank 0 prints the
slower process's medians. Prints, last, ddp_guided_over_floor=<x>.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def worker(reps: int, batch: int, length: int, vocab: int, width: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real import MATCHING, gpt2

    from guidewrap import GuidedModel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    target, guide = gpt2(vocab, 4, width, length), gpt2(vocab, 4, width, length).eval()
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(rank))
    # Two copies of the target: a DDP wrapper all-reduces every backward through its parameters, so
    # the plain and the guided step must not share them.
    plain_target = copy.deepcopy(target)
    plain_model = DistributedDataParallel(plain_target)
    guided = GuidedModel(target, guide, **MATCHING)
    guided_model = DistributedDataParallel(guided)

    def train_step(model: torch.nn.Module, params: torch.nn.Module) -> Callable[[], None]:
        opt = torch.optim.AdamW(params.parameters(), lr=1e-4)

        def step() -> None:
            loss = model(input_ids=ids, labels=ids).loss  # the guided model's output.loss holds the term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    plain = train_step(plain_model, plain_target)

    def floor() -> None:
        with torch.inference_mode():
            guide(input_ids=ids)
        plain()

    steps = {"plain": plain, "floor": floor, "guided": train_step(guided_model, target)}
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            dist.barrier()  # both processes start each step together
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = torch.tensor([statistics.median(times[k]) for k in steps])
    dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the slower process sets the pace
    pairs = len(guided.plan())
    calls, seconds, sent = _collectives(steps["guided"])
    if rank == 0:
        print(f"torch {torch.__version__}, {world} processes x {torch.get_num_threads()} threads, gloo; matching: "
              + ", ".join(f"{k}={v}" for k, v in MATCHING.items()))  # fmt: skip
        print(f"GPT-2 LM (4 x {width}, vocab {vocab}) <- GPT-2, batch {batch} x {length} per process ({pairs} pairs)")
        print("  " + "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in zip(steps, med.tolist(), strict=True)))
        print(f"  guidewrap's collectives in one guided step (rank 0): {calls}, {sent / 2**20:.1f} MiB sent, "
              f"{seconds * 1e3:.1f} ms inside them")  # fmt: skip
        print(f"ddp_guided_over_floor={float(med[2] / med[1]):.2f}")
    guided.close()
    dist.destroy_process_group()


def _collectives(step: Callable[[], None]) -> tuple[dict[str, int], float, int]:
    """One step with torch.distributed's Python collectives counted and timed (DDP's gradient
    buckets go through its C++ reducer, so this counts guidewrap's): calls per kind, seconds, bytes sent."""
    import torch.distributed as dist

    calls: dict[str, int] = {}
    spent = [0.0, 0]

    def counted(name: str, original: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            sent = [t for t in args if isinstance(t, torch.Tensor)]
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                spent[1] += sum(t.numel() * t.element_size() for t in sent)
                calls[name] = calls.get(name, 0) + 1

        return call

    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "broadcast")}
    for name, original in originals.items():
        setattr(dist, name, counted(name, original))
    try:
        dist.barrier()
        step()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return calls, spent[0], int(spent[1])


def main(reps: int = 7, batch: int = 8, length: int = 128, vocab: int = 50257, width: int = 128) -> str:
    """Start two processes under torchrun; returns their output (rank 0 prints the figures)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", __file__,
           "--worker", "--reps", str(reps), "--batch", str(batch), "--length", str(length), "--vocab", str(vocab),
           "--width", str(width)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for attempt in (1, 2):  # a rendezvous port taken under load fails the start: retried once
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode == 0:
            break
        print(f"torchrun exited {run.returncode} (attempt {attempt}):\n{run.stdout}\n{run.stderr}", file=sys.stderr)
    else:
        raise RuntimeError(f"torchrun failed twice; last output:\n{run.stdout}\n{run.stderr}")
    out = "\n".join(line for line in run.stdout.splitlines() if not line.startswith("[transformers]"))
    print(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--worker", action="store_true")
    a = parser.parse_args()
    if a.worker:
        worker(a.reps, a.batch, a.length, a.vocab, a.width)
    else:
        main(a.reps, a.batch, a.length, a.vocab, a.width)
