"""Training and reporting helpers shared by every example (one place, not copied per script).

Example:
    >>> import torch
    >>> from torch import nn
    >>> target = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> batch = lambda step: (torch.randn(32, 4), torch.randint(0, 2, (32,)))
    >>> losses = fit(target, batch, nn.functional.cross_entropy, steps=3, guide=guide)
    >>> len(losses)
    3
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..model import GuidedModel

__all__ = ["MODES", "fit", "distillation_loss", "summarize", "seeded", "random_batches", "batch_stream"]

MODES = ("none", "guided", "distill")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al.'s logit distillation: ``T^2 KL(softmax(t / T) || softmax(s / T))`` (last dim = classes).

    Examples:
        >>> z = torch.randn(4, 10)
        >>> float(distillation_loss(z, z)) == 0.0
        True
    """
    log_p = nn.functional.log_softmax(student_logits.flatten(0, -2) / temperature, dim=-1)
    log_q = nn.functional.log_softmax(teacher_logits.flatten(0, -2) / temperature, dim=-1)
    return nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def fit(
    target: nn.Module,
    batches: Callable[[int], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    steps: int,
    guide: nn.Module | None = None,
    mode: str = "guided",
    lr: float = 1e-3,
    clip: float | None = 1.0,
    logits: Callable[[Any], Tensor] = lambda out: out,
    progress: Callable[[int], Any] | None = None,
    callback: Callable[[int], Any] | None = None,
    **guidance: Any,
) -> list[float]:
    """Train ``target`` with Adam for ``steps`` steps; returns the task loss per step.

    ``batches(step)`` gives ``(inputs, labels)`` (inputs a tensor or a dict of keyword
    arguments); ``loss_fn(output, labels)`` the task loss. ``mode`` is ``"none"`` (the target
    alone, ``guide`` ignored), ``"guided"`` (plus the alignment term; ``guidance`` keywords go to
    :class:`~guidewrap.GuidedModel`) or ``"distill"`` (plus logit distillation from ``guide``,
    reading logits from outputs with ``logits``). ``clip`` is the gradient-norm limit (``None``:
    no clipping); ``progress(1)`` is called after every step (a tqdm bar's ``update``) and
    ``callback(steps_done)`` too (evaluation curves).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "none" and guide is None:
        raise ValueError(f"mode={mode!r} needs a guide")
    opt = torch.optim.Adam(target.parameters(), lr=lr)
    model: nn.Module = target
    guided: GuidedModel | None = None
    if mode == "guided":
        guided = GuidedModel(target, guide, optimizer=opt, **guidance)
        model = guided
    elif mode == "distill":
        guide.eval().requires_grad_(False)  # type: ignore[union-attr]
    target.train()
    losses = []
    for step in range(steps):
        inputs, labels = batches(step)
        out = _call(model, inputs)
        task = loss_fn(out, labels)
        loss = task
        if guided is not None:
            loss = loss + guided.alignment_loss
        if mode == "distill":
            with torch.no_grad():
                teacher = logits(_call(guide, inputs))  # type: ignore[arg-type]
            loss = loss + distillation_loss(logits(out), teacher)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss at step {step} ({mode})")
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(target.parameters(), clip)
        opt.step()
        losses.append(task.item())
        if progress is not None:
            progress(1)
        if callback is not None:
            callback(step + 1)
    target.eval()
    return losses


def batch_stream(seed: int, draw: Callable[[torch.Generator], tuple[Any, Any]]) -> Callable[[int], tuple[Any, Any]]:
    """A ``batches(step)`` function calling ``draw(generator)`` with its own generator seeded ``seed``.

    Build a fresh stream for every variant: streams with the same seed give the same batches,
    so variants are compared on identical data.

    Examples:
        >>> a = batch_stream(0, lambda g: (torch.rand(2, generator=g), None))
        >>> b = batch_stream(0, lambda g: (torch.rand(2, generator=g), None))
        >>> torch.equal(a(0)[0], b(0)[0])
        True
    """
    gen = torch.Generator().manual_seed(seed)
    return lambda step: draw(gen)


def random_batches(x: Tensor, y: Tensor, batch: int, seed: int) -> Callable[[int], tuple[Tensor, Tensor]]:
    """A ``batches(step)`` function drawing ``batch`` random rows of ``(x, y)`` (see :func:`batch_stream`).

    Examples:
        >>> draw = random_batches(torch.arange(10.0), torch.arange(10), batch=3, seed=0)
        >>> draw(0)[0].shape
        torch.Size([3])
    """

    def draw(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        return x[idx], y[idx]

    return batch_stream(seed, draw)


def seeded(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under a fixed seed (so each variant starts from the same weights).

    Examples:
        >>> a, b = seeded(0, lambda: nn.Linear(2, 2)), seeded(0, lambda: nn.Linear(2, 2))
        >>> torch.equal(a.weight, b.weight)
        True
    """
    torch.manual_seed(seed)
    return factory()


def summarize(rows: Sequence[dict[str, Any]], by: str, metrics: Sequence[str]) -> str:
    """A markdown table: one line per value of ``by``, mean +- std of each metric over the rows,
    then each run's value of the first metric in order (seed by seed, for paired comparisons).

    Examples:
        >>> rows = [{"variant": "a", "acc": 0.5}, {"variant": "a", "acc": 0.7}, {"variant": "b", "acc": 0.9}]
        >>> print(summarize(rows, "variant", ["acc"]))
        | variant | acc | runs | acc per run |
        |---|---|---|---|
        | a | 0.600 +- 0.141 | 2 | 0.500 / 0.700 |
        | b | 0.900 | 1 | 0.900 |
    """
    header = f"| {by} | " + " | ".join(metrics) + f" | runs | {metrics[0]} per run |"
    lines = [header, "|---|" + "---|" * (len(metrics) + 2)]
    for key in dict.fromkeys(row[by] for row in rows):
        group = [row for row in rows if row[by] == key]
        cells = []
        for metric in metrics:
            values = [float(row[metric]) for row in group]
            mean = statistics.fmean(values)
            cells.append(f"{mean:.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}")
        runs = " / ".join(f"{float(row[metrics[0]]):.3f}" for row in group)
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {len(group)} | {runs} |")
    return "\n".join(lines)
