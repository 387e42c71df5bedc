"""The step counter that drives the window and the weight's decay, and what advances it.

An attached optimizer (its step post-hook), ``guided.step()`` or the Trainer's ``global_step``
advances the counter; the schedule reads it. Under ``torch.compile`` a traced step reads a flag that
flips at the window's edges and the weight as a tensor, never the counter itself (a Python int that
changes every step would be a guard, and a recompile, every step).

Examples:
    >>> from guidewrap.schedules import GuidanceSchedule
    >>> steps = StepCounter(GuidanceSchedule(weight=1.0, until_step=2))
    >>> steps.advance(); steps.count, steps.weight, steps.is_finished()
    (1, 1.0, False)
    >>> steps.advance(); steps.is_finished()
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError, GuidewrapWarning
from .hooks import HookSet
from .schedules import GuidanceSchedule

__all__ = ["StepCounter"]

# Guided forwards past ``until_step`` without any step before a window that cannot end is reported
# (gradient accumulation calls step() only every few forwards).
NO_STEP_GRACE = 100


class StepCounter:
    """Optimizer steps so far, the schedule at the current step, and the optimizer coupling.

    ``on_step(count)`` runs after each step (a wrapper mirrors the counter in its state dict).
    """

    def __init__(self, schedule: GuidanceSchedule) -> None:
        self.schedule = schedule
        self.count = 0
        self.in_window = schedule.is_active(0)
        self.step_weight = torch.tensor(schedule.weight_at(0))
        self.on_step: Callable[[int], None] | None = None
        self.hooks = HookSet()  # step post-hooks on optimizers
        self.optimizers: list[torch.optim.Optimizer] = []  # attached ones (a tensor cap clears their state)
        # Something advances the counter (an optimizer, step() calls, the Trainer's callback);
        # without it a finite window never ends, which check_window_can_end says once.
        self.has_source = False

    def __getstate__(self) -> dict[str, Any]:
        # A copy is not attached to the original's optimizer, nor reports to its wrapper.
        return dict(self.__dict__) | {"hooks": HookSet(), "on_step": None, "optimizers": []}

    def attach_optimizer(self, optimizer: Any, advance: Callable[[], None]) -> None:
        """Call ``advance()`` after each ``optimizer.step()`` (Accelerate's ``AcceleratedOptimizer``
        and similar wrappers are unwrapped, so steps skipped under gradient accumulation do not count)."""
        opt = self.remember_optimizer(optimizer)
        self.hooks.add(opt.register_step_post_hook(lambda *_: advance()))
        self.has_source = True

    def remember_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        """Keep the torch optimizer inside ``optimizer`` (a tensor cap clears the state of the tensors
        it caps; integrations whose trainer counts the steps pass theirs here); returns it."""
        opt = optimizer
        while not isinstance(opt, torch.optim.Optimizer):
            inner = getattr(opt, "optimizer", None)
            if inner is None or inner is opt:
                break
            opt = inner
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}"
            )
        if all(opt is not known for known in self.optimizers):
            self.optimizers.append(opt)
        return opt

    def advance(self) -> None:
        """One optimizer step."""
        self.has_source = True
        self.count += 1
        self._sync()
        if self.on_step is not None:
            self.on_step(self.count)

    def set(self, step: int) -> None:
        """Set the counter (resuming)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}")
        self.count = step
        self._sync()

    def _sync(self) -> None:
        self.in_window = self.schedule.is_active(self.count)
        self.step_weight.fill_(self.schedule.weight_at(self.count))

    @property
    def weight(self) -> float:
        """The schedule's weight at the current step (0 outside the window)."""
        return self.schedule.weight_at(self.count)

    def is_active(self) -> bool:
        """Whether the current step is inside the window (no guard on the counter while compiling)."""
        if torch.compiler.is_compiling():
            return self.in_window
        return self.schedule.is_active(self.count)

    def is_finished(self) -> bool:
        """Whether the window is over for good."""
        return self.schedule.is_finished(self.count)

    def check_window_can_end(self, guided_forwards: int) -> None:
        """Once: a finite window (or decay) with nothing advancing the counter never ends. Said after
        ``until_step + NO_STEP_GRACE`` guided forwards without a step."""
        until = self.schedule.until_step
        if self.has_source or until is None or guided_forwards != until + NO_STEP_GRACE:
            return
        warnings.warn(
            f"guidance has run {guided_forwards} guided forwards but its step counter is still {self.count}: "
            f"nothing advances it, so the window until_step={until} never ends (nor does the weight decay). Pass "
            "optimizer=your_optimizer (its step() counts), or call guided.step() after each optimizer step",
            GuidewrapWarning,
            stacklevel=4,
        )
