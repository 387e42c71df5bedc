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
The sequence case runs first: a 4-layer LSTM target guided by a 4-layer Transformer encoder, batch 64,
length 128, with flatten and token-wise CKA (lstm_<mode>_... ratios). Then the FCN case prints
reference_over_guided=<x> and, last, guided_over_floor=<x>.
`--max-features K [K ...]` adds guided steps with the max_features approximation to the same interleaved
loop and prints each one's guided_over_floor and largest per-pair CKA change against exact.
`--tensor-cap C` adds a guided step with ``tensor_cap=C`` capped from the first step
(``tensor_cap_after=0``: both gradients taken apart on every timed step, the cap's cost where it is in
force): tensor_cap_guided_over_floor and tensor_cap_over_fixed (against the fixed weight's guided step).
`--strength R` adds a guided step with ``strength=R`` (the weight set from the gradients) to the FCN case:
its last timed repetition re-measures the pull (two extra backward passes), and the cost at
`--strength-every K` (default 25, the library's) is that measurement spread over K steps:
strength_guided_over_floor and strength_over_fixed (against the fixed weight's guided step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from guidewrap import GuidedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # float64 references
from reference import capture_outputs, linear_cka_textbook  # noqa: E402

# The level, pair reduction and weight every figure of this bench uses (bench/RESULTS.md): pinned,
# so a change of library defaults does not move them.
MATCHING: dict[str, object] = {"layers": "sublayers", "reduction": "sum", "weight": 1.0}


def deep_fcn(depth: int = 24, width: int = 1024, d_in: int = 3 * 32 * 32, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class LSTMStack(nn.Module):
    """4 separate LSTM layers (each one hookable layer) over (n, T, 64) features."""

    def __init__(self, d_in: int = 64, hidden: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.lstms = nn.ModuleList(nn.LSTM(d_in if i == 0 else hidden, hidden, batch_first=True) for i in range(layers))
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lstm in self.lstms:
            x = lstm(x)[0]
        return self.head(x)


def lstm_case(batch: int = 64, length: int = 128) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The sequence case: 4-layer LSTM target, 4-layer Transformer encoder guide, (64, 128, 64) inputs."""
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    guide = nn.Sequential(nn.Linear(64, 256), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False))
    return LSTMStack(), guide, torch.randn(batch, length, 64)


def make_steps(
    target: nn.Module,
    guide: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    reference: bool = True,
    alternatives: dict[str, dict[str, object]] | None = None,
    **guidance: object,
) -> tuple[dict[str, Callable[[], None]], int]:
    """The step variants (plain, floor, guided, ``alternatives`` = other guidance settings by name
    and, optionally, the paper's recipe) and the pair count."""
    guidance = {**MATCHING, **guidance}
    guided = GuidedModel(target, guide, **guidance)
    plan = guided.plan(x)
    pairs = [(p.target.name, p.guide.name) for p in plan]
    opt = torch.optim.SGD(target.parameters(), lr=1e-3)

    def guided_step(model: GuidedModel) -> Callable[[], None]:
        def step() -> None:
            loss = model.total_loss(loss_fn(model(x)))  # with strength=, the weight is set here
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def plain() -> None:
        loss = loss_fn(target(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def floor() -> None:
        with torch.inference_mode():
            guide(x)
        plain()

    def paper_recipe() -> None:
        loss = loss_fn(target(x))
        # the second, hooked target forward; its features stay in the graph: the terms train the target
        feats = capture_outputs(target, {t for t, _ in pairs}, lambda: target(x), keep_graph=True)
        with torch.no_grad():
            g_feats = capture_outputs(guide, {g for _, g in pairs}, lambda: guide(x))
        for t_name, g_name in pairs:
            t_out, g_out = feats[t_name], g_feats[g_name]
            loss = loss + 1 - linear_cka_textbook(t_out.flatten(1), g_out.flatten(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = {"plain": plain, "floor": floor, "guided": guided_step(guided)}
    for name, settings in (alternatives or {}).items():
        steps[name] = guided_step(GuidedModel(target, guide, **{**MATCHING, **settings}, optimizer=opt))
    if reference:
        steps["reference"] = paper_recipe
    return steps, len(pairs)


def time_case(
    target: nn.Module,
    guide: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    reps: int,
    reference: bool = True,
    alternatives: dict[str, dict[str, object]] | None = None,
    **guidance: object,
) -> tuple[dict[str, float], int]:
    """Median times of the step variants, interleaved; and the pair count."""
    steps, n_pairs = make_steps(target, guide, x, loss_fn, reference, alternatives, **guidance)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in steps.items():  # interleaved
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    RAW_TIMES.clear()
    RAW_TIMES.update(times)
    return {k: statistics.median(v) for k, v in times.items()}, n_pairs


RAW_TIMES: dict[str, list[float]] = {}  # the last time_case's every repetition, by step variant


def strength_cost(times: list[float], measured_rep: int, every: int) -> float:
    """A strength step's mean time when the pull is re-measured every ``every`` steps, from timed
    repetitions of which the ``measured_rep``-th (0-based) measured it: the other repetitions' median
    plus the measurement's extra time spread over ``every`` steps."""
    normal = statistics.median(t for i, t in enumerate(times) if i != measured_rep)
    return normal + (times[measured_rep] - normal) / every


def _report(title: str, med: dict[str, float]) -> None:
    print(title)
    for name, value in med.items():
        print(f"  {name:<18} {value * 1e3:9.1f} ms")


def main(
    batch: int = 256,
    reps: int = 9,
    depth: int = 24,
    sequence: bool = True,
    seq_shape: tuple[int, int] = (64, 128),
    max_features: tuple[int, ...] = (),
    strength: float | None = None,
    strength_every: int = 25,
    tensor_cap: float | None = None,
) -> dict[str, float]:
    print("matching: " + ", ".join(f"{k}={v}" for k, v in MATCHING.items()))
    if sequence:
        torch.manual_seed(0)
        target, guide, x = lstm_case(*seq_shape)
        for mode in ("flatten", "tokenwise"):
            med, n_pairs = time_case(
                target, guide, x, lambda out: out.pow(2).mean(), max(3, reps // 3), mode == "flatten", sequence=mode
            )
            shape = f"batch {seq_shape[0]}, length {seq_shape[1]}"
            _report(f"4-layer LSTM <- 4-layer Transformer encoder, {shape}, {mode}, {n_pairs} pairs", med)
            if "reference" in med:
                print(f"lstm_{mode}_reference_over_guided={med['reference'] / med['guided']:.2f}")
            print(f"lstm_{mode}_guided_over_floor={med['guided'] / med['floor']:.2f}")
    torch.manual_seed(0)
    y = torch.randint(0, 10, (batch,))
    target, guide = deep_fcn(depth), torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    alternatives = {f"max_features={k}": {"max_features": k} for k in max_features}
    if strength:  # re-measured on the last timed repetition (strength_every=reps), amortised below
        alternatives["strength"] = {"strength": strength, "strength_every": reps}
    if tensor_cap:  # capped from the first step: every timed step takes the gradients apart
        alternatives["tensor_cap"] = {"tensor_cap": tensor_cap, "tensor_cap_after": 0}
    med, n_pairs = time_case(
        target, guide, x, lambda out: nn.functional.cross_entropy(out, y), reps, alternatives=alternatives
    )
    _report(f"deep FCN ({depth} x Linear 1024 + BN) <- untrained ResNet-18, batch {batch}, {n_pairs} pairs", med)
    if strength:
        cost = strength_cost(RAW_TIMES["strength"], reps - 1, strength_every)
        print(f"strength={strength}: one re-measurement {RAW_TIMES['strength'][-1] * 1e3:.1f} ms, other steps "
              f"{statistics.median(RAW_TIMES['strength'][:-1]) * 1e3:.1f} ms")  # fmt: skip
        print(f"strength_guided_over_floor={cost / med['floor']:.2f} (re-measured every {strength_every} steps)")
        print(f"strength_over_fixed={cost / med['guided']:.3f}")
    if tensor_cap:
        print(f"tensor_cap_guided_over_floor={med['tensor_cap'] / med['floor']:.2f}")
        print(f"tensor_cap_over_fixed={med['tensor_cap'] / med['guided']:.3f}")
    if max_features:  # the approximation's error on this batch, beside its cost
        # BatchNorm in train mode normalises by the batch's statistics: both runs see the same features.
        exact = GuidedModel(target, guide, **MATCHING)
        exact(x)
        for name, settings in alternatives.items():
            approx = GuidedModel(target, guide, **{**MATCHING, **settings})
            approx(x)
            worst = max(abs(exact.last_alignment[p] - approx.last_alignment[p]) for p in exact.last_alignment)
            print(f"{name}: guided_over_floor={med[name] / med['floor']:.2f}, largest per-pair CKA change {worst:.3f}")
    print(f"reference_over_guided={med['reference'] / med['guided']:.2f}")
    print(f"guided_over_floor={med['guided'] / med['floor']:.2f}")
    return med


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--no-sequence", action="store_true", help="only the FCN / ResNet-18 case")
    parser.add_argument(
        "--max-features",
        type=int,
        nargs="+",
        default=[],
        help="also time the max_features approximation at these limits, side by side (default: exact only)",
    )
    parser.add_argument("--strength", type=float, help="also time strength= (its re-measurement amortised)")
    parser.add_argument("--strength-every", type=int, default=25, help="the re-measurement interval amortised over")
    parser.add_argument("--tensor-cap", type=float, help="also time tensor_cap= in force on every step")
    args = parser.parse_args()
    main(
        args.batch,
        args.reps,
        sequence=not args.no_sequence,
        max_features=tuple(args.max_features),
        strength=args.strength,
        strength_every=args.strength_every,
        tensor_cap=args.tensor_cap,
    )
