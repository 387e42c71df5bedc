"""The small training loop the built-in task and the examples run on: Adam on a task loss plus the
alignment term (or logit distillation), on reproducible batch streams.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> target = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> batches = random_batches(torch.randn(64, 4), torch.randint(0, 2, (64,)), batch=16, seed=0)
    >>> len(fit(target, batches, nn.functional.cross_entropy, steps=2, guide=guide))
    2
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .model import GuidedModel

__all__ = ["MODES", "accuracy", "batch_stream", "distillation_loss", "fit", "random_batches"]

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

    ``batches(step)`` gives ``(inputs, labels)`` (inputs a tensor or a dict of keyword arguments);
    ``loss_fn(output, labels)`` the task loss. ``mode``: ``"none"`` (the target alone), ``"guided"``
    (plus the alignment term; ``guidance`` keywords go to :class:`~guidewrap.GuidedModel`) or
    ``"distill"`` (plus logit distillation from ``guide``, logits read with ``logits``). ``clip``:
    gradient-norm limit or ``None``; ``progress(1)`` and ``callback(steps_done)`` run after each step.

    Examples:
        >>> target = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> batch = lambda step: (torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> len(fit(target, batch, nn.functional.cross_entropy, steps=3, guide=guide))
        3
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
    losses: list[float] = []
    try:
        for step in range(steps):
            inputs, labels = batches(step)
            out = _call(model, inputs)
            task = loss_fn(out, labels)
            if guided is not None:
                loss = guided.total_loss(task)  # the term (with strength=, weighted against this task loss)
            else:
                loss = task + _extra_loss(out, inputs, guide if mode == "distill" else None, logits)
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
    finally:
        if guided is not None:
            guided.close()  # no hook stays on the target or on a guide shared with later runs
    target.eval()
    return losses


def _extra_loss(out: Any, inputs: Any, teacher: nn.Module | None, logits: Callable[[Any], Tensor]) -> Tensor | float:
    """The term added to the task loss without guidance: logit distillation from ``teacher``, or none."""
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = logits(_call(teacher, inputs))
        return distillation_loss(logits(out), teacher_logits)
    return 0.0


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


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode.

    Examples:
        >>> accuracy(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), torch.zeros(4, 3, 32, 32),
        ...          torch.zeros(4, dtype=torch.long)) in (0.0, 1.0)
        True
    """
    was_training = model.training
    model.eval()
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was_training)
    return hits / len(x)
