"""The state of one guided forward, in one short-lived object.

Examples:
    >>> import torch
    >>> step = GuidedStep(None, capturing=True)
    >>> step.capture("fc", torch.ones(2, 3)); sorted(step.captured)
    ['fc']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .inputs import Routed

__all__ = ["GuidedStep"]


@dataclass
class GuidedStep:
    """The state of one guided forward: created by ``begin``, consumed by ``end``, then dropped.

    ``prepared`` holds the guide's reduced layers, ``captured`` the target's layer outputs, a list
    per layer in call order (written by the taps while ``capturing``); ``noise`` marks a step whose
    alignment runs on noise after the task forward (``guide_inputs="noise"``).
    """

    routed: Routed | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    noise: bool = False
    capturing: bool = False
    prepared: dict[tuple[str, str], Any] = field(default_factory=dict)
    captured: dict[str, list[Any]] = field(default_factory=dict)

    def capture(self, name: str, output: Any) -> None:
        # Only while the step's forward runs: recomputation under activation checkpointing
        # happens during backward, after capture has ended, and is not counted twice.
        if self.capturing:
            self.captured.setdefault(name, []).append(output)  # a module run k times: its k calls
