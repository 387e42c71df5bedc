"""Guidance under torch.compile: graph breaks, recompiles and overhead against eager (CPU).

Run: python bench/compile.py [--reps 7] [--backend inductor] [--cases fcn gpt2] [--tiny]
Cases, one training step each (SGD), the loss computed in a function given to ``torch.compile``
(the optimizer step stays eager, as in a script that compiles its model or loss):
  - fcn: a deep fully connected net (8 x Linear 512 + BatchNorm + ReLU) <- an untrained ResNet-18,
    batch 128 of 32x32x3 images (the paper's image case, narrower so inductor compiles it in ~1 min);
  - gpt2: a GPT-2 LM (4 x 128, GPT-2's vocabulary) on tokenized blocks 8 x 128 <- an untrained GPT-2
    of the same size (bench/real.py's case).
For each case: graph breaks of the compiled guided step found by ``torch._dynamo.explain``, split into
those raised in guidewrap's code and those elsewhere (the model's own); graphs compiled over the timed
steps after warm-up; and four step times, interleaved, median of ``reps``: eager plain, eager guided,
compiled plain, compiled guided. Prints each case's overheads (guided / plain, eager and compiled) and,
last, compiled_overhead_over_eager=<x>: the largest over the cases of compiled overhead / eager overhead.
Every case states its level, pair reduction and weight (the library's defaults, named).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import guidewrap
from guidewrap import GuidedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real import gpt2  # noqa: E402
from step import deep_fcn  # noqa: E402

MATCHING: dict[str, Any] = {"layers": "auto", "reduction": "mean", "weight": 1.0}  # the defaults, named
PACKAGE = str(Path(guidewrap.__file__).resolve().parent)


def fcn_case(batch: int = 128, depth: int = 8, width: int = 512) -> tuple[nn.Module, nn.Module, Callable, Callable]:
    import torchvision

    torch.manual_seed(0)
    target = deep_fcn(depth, width)
    guide = torchvision.models.resnet18(weights=None, num_classes=10)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def loss_of(model: nn.Module) -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + model.alignment_loss if isinstance(model, GuidedModel) else loss

    return target, guide, loss_of, lambda model: model.plan(x)


def gpt2_case(
    batch: int = 8, length: int = 128, width: int = 128, vocab: int = 50257, blocks: int = 4
) -> tuple[nn.Module, nn.Module, Callable, Callable]:
    torch.manual_seed(0)
    target, guide = gpt2(vocab, blocks, width, length), gpt2(vocab, blocks, width, length)
    # GPT2LMHeadModel's class name gives transformers no loss type, so every loss computation logs a
    # warning, and the logging call breaks the graph (transformers' own break, in plain and guided
    # steps alike): name the loss its default picks.
    target.loss_type = "ForCausalLM"
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    # A GuidedModel's output.loss already holds the alignment term.
    return target, guide, lambda model: model(input_ids=ids, labels=ids).loss, lambda model: model.plan(input_ids=ids)


CASES = {"fcn": fcn_case, "gpt2": gpt2_case}
TINY = {
    "fcn": {"batch": 16, "depth": 2, "width": 32},
    "gpt2": {"batch": 4, "length": 16, "width": 32, "vocab": 100, "blocks": 2},
}


def graph_breaks(fn: Callable[[], torch.Tensor]) -> tuple[list[str], list[str]]:
    """Break reasons of ``fn`` under dynamo: (raised in guidewrap's code, raised elsewhere)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)()
    ours, theirs = [], []
    for reason in explained.break_reasons:
        frames = [f for f in reason.user_stack if f.filename.startswith(PACKAGE)]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "model code"
        text = f"{reason.reason.splitlines()[0]} ({where})"
        (ours if frames and reason.user_stack[-1].filename.startswith(PACKAGE) else theirs).append(text)
    return ours, theirs


def make_steps(target: nn.Module, guide: nn.Module, loss_of: Callable, backend: str) -> dict[str, Callable[[], None]]:
    """eager / compiled x plain / guided training steps sharing one optimizer."""
    guided = GuidedModel(target, guide, **MATCHING)
    guide.eval()
    opt = torch.optim.SGD(target.parameters(), lr=1e-4)

    def plain_loss() -> torch.Tensor:
        return loss_of(target)

    def guided_loss() -> torch.Tensor:
        return loss_of(guided)

    def train(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    return {
        "eager plain": train(plain_loss),
        "eager guided": train(guided_loss),
        "compiled plain": train(torch.compile(plain_loss, backend=backend)),
        "compiled guided": train(torch.compile(guided_loss, backend=backend)),
    }


def time_steps(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 3) -> tuple[dict[str, float], int]:
    """Median seconds per step, interleaved; and graphs compiled during the timed steps."""
    from torch._dynamo.utils import counters

    for fn in steps.values():
        for _ in range(warmup):  # compiles, plans, allocator
            fn()
    before = counters["stats"]["unique_graphs"]
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, counters["stats"]["unique_graphs"] - before


def main(
    reps: int = 7, backend: str = "inductor", cases: tuple[str, ...] = ("fcn", "gpt2"), tiny: bool = False
) -> float:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {backend}; matching: "
          + ", ".join(f"{k}={v}" for k, v in MATCHING.items()))  # fmt: skip
    worst = 0.0
    for name in cases:
        target, guide, loss_of, plan = CASES[name](**(TINY[name] if tiny else {}))
        guided = GuidedModel(target, guide, **MATCHING)
        pairs = len(plan(guided))
        loss_of(guided)  # plans and installs the taps eagerly, as a first step does
        ours, theirs = graph_breaks(functools.partial(loss_of, guided))
        guided.close()
        print(f"{name}: {pairs} pairs; graph breaks in guidewrap: {len(ours)}, elsewhere: {len(theirs)}")
        for reason in ours + theirs:
            print(f"  - {reason}")
        med, graphs = time_steps(make_steps(target, guide, loss_of, backend), reps)
        print("  " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
        eager = med["eager guided"] / med["eager plain"]
        compiled = med["compiled guided"] / med["compiled plain"]
        print(f"{name}_eager_overhead={eager:.2f} {name}_compiled_overhead={compiled:.2f} "
              f"{name}_guidewrap_graph_breaks={len(ours)} {name}_graphs_after_warmup={graphs}")  # fmt: skip
        worst = max(worst, compiled / eager)
    print(f"compiled_overhead_over_eager={worst:.2f}")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--tiny", action="store_true", help="tiny models (the test's mode; not a measurement)")
    a = parser.parse_args()
    main(a.reps, a.backend, tuple(a.cases), a.tiny)
