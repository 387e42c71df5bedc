"""Training and reporting helpers shared by every example (one place, not copied per script);
the training loop itself is the package's (:func:`guidewrap.tasks.fit`, which the demo runs on).

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

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from guidewrap.tasks import MODES, batch_stream, distillation_loss, fit, random_batches

__all__ = ["MODES", "fit", "distillation_loss", "summarize", "seeded", "random_batches", "batch_stream"]


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
