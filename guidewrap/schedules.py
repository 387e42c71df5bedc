"""When guidance is on, and how strongly: a window of optimizer steps and a weight decay.

Steps are *optimizer* steps (not micro-batches). Guidance is active for steps
``start_step <= step < until_step``; inside the window the weight is constant or decays
linearly / along a half cosine towards 0 at ``until_step``.

Examples:
    >>> s = GuidanceSchedule(weight=2.0, start_step=0, until_step=4, decay="linear")
    >>> [s.weight_at(i) for i in range(5)]
    [2.0, 1.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["GuidanceSchedule", "DECAYS"]

DECAYS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class GuidanceSchedule:
    """Weight of the alignment term as a function of the optimizer step.

    Examples:
        >>> GuidanceSchedule(weight=1.0, until_step=10).is_active(10)
        False
    """

    weight: float = 1.0
    start_step: int = 0
    until_step: int | None = None
    decay: str = "constant"

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not math.isfinite(self.weight):
            raise ConfigError(f"weight must be a finite number, got {self.weight!r}")
        if self.weight < 0:
            raise ConfigError(f"weight must be >= 0, got {self.weight}; a negative weight would push layers apart")
        if not isinstance(self.start_step, int) or isinstance(self.start_step, bool) or self.start_step < 0:
            raise ConfigError(f"start_step must be an integer >= 0, got {self.start_step!r}")
        if self.until_step is not None:
            if not isinstance(self.until_step, int) or isinstance(self.until_step, bool) or self.until_step < 0:
                raise ConfigError(f"until_step must be an integer >= 0 or None, got {self.until_step!r}")
            if self.until_step <= self.start_step:
                raise ConfigError(
                    f"until_step ({self.until_step}) must be greater than start_step ({self.start_step}): "
                    "the window would be empty"
                )
        if self.decay not in DECAYS:
            raise ConfigError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.decay != "constant" and self.until_step is None:
            raise ConfigError(f"decay={self.decay!r} needs until_step, the step at which the weight reaches 0")

    def is_active(self, step: int) -> bool:
        """Whether the guide runs at ``step``."""
        return step >= self.start_step and (self.until_step is None or step < self.until_step) and self.weight > 0

    def is_finished(self, step: int) -> bool:
        """Whether no later step can be active (hooks may be removed for good)."""
        return self.until_step is not None and step >= self.until_step

    def weight_at(self, step: int) -> float:
        """The weight at ``step`` (0 outside the window)."""
        if not self.is_active(step):
            return 0.0
        if self.decay == "constant" or self.until_step is None:
            return float(self.weight)
        progress = (step - self.start_step) / (self.until_step - self.start_step)
        if self.decay == "linear":
            return float(self.weight * (1.0 - progress))
        return float(self.weight * 0.5 * (1.0 + math.cos(math.pi * progress)))
