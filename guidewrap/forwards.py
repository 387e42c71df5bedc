"""Forwards the engine runs itself, outside the user's training loop: pre-alignment on noise and
the alignment of given inputs.

Examples:
    >>> import torch
    >>> from guidewrap.config import GuidanceConfig
    >>> from guidewrap.engine import GuidanceEngine
    >>> target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    >>> engine = GuidanceEngine(target, guide, GuidanceConfig(guide_inputs="noise"))
    >>> len(pre_align(engine, (torch.randn(16, 4),), {}, steps=3, lr=1e-2, optimizer=None))
    3
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .engine import GuidanceEngine
from .errors import ConfigError
from .inputs import noise_call

__all__ = ["evaluate", "pre_align"]


def pre_align(
    engine: GuidanceEngine,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    steps: int,
    lr: float,
    optimizer: torch.optim.Optimizer | None,
) -> list[float]:
    """Train the target on the alignment loss alone, on fresh noise shaped like the example."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    target = engine.target
    params = [p for p in target.parameters() if p.requires_grad]
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
    was_training = target.training
    target.train()
    history = []
    try:
        for _ in range(steps):
            loss = engine.aligned_forward(*noise_call(target, engine.guide, args, kwargs), weight=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    finally:
        target.train(was_training)
        engine.release()  # taps re-attached by the next guided forward, if any
    return history


def evaluate(engine: GuidanceEngine, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
    """Unweighted sum of pair distances on given inputs, without gradients."""
    try:
        with torch.no_grad():
            value = float(engine.aligned_forward(tuple(args), dict(kwargs), weight=1.0))
    finally:
        engine.release()  # taps re-attached by the next guided forward, if any
    return value
