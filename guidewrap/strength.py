"""The alignment term's pull, measured against the task's: a strength that needs no tuning.

The pull is the norm of the term's gradient over the target's trainable parameters divided by the
norm of the task loss's gradient. CKA is scale-invariant, so its gradient grows as activations
shrink: at weight 1 the measured pull ranges from under 0.1 (normalised networks) to thousands
(a plain ConvNet without normalisation), so no fixed weight suits every network.

With ``strength=r`` the controller sets the weight so that the pull is ``r``: ``weight = r * |g_task|
/ |g_term|`` (the term measured at weight 1), re-measured every ``strength_every`` guided steps on
which the task loss is known (two extra backward passes through the target each time, none in
between). Every process of a data-parallel run averages its squared norms first, so all use the same
weight. With a fixed ``weight`` the pull is measured once, on the first guided step whose task loss is
known, and a pull under 0.01 warns (a strong one is judged tensor by tensor, after the first steps:
:mod:`guidewrap.tensor_cap`).

Examples:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> task, term = (w * 2.0).sum(), (w * 8.0).sum()  # gradients of norm 2 sqrt(3) and 8 sqrt(3)
    >>> control = StrengthController(strength=0.5, every=10)
    >>> control.measure(task, term, [w])
    >>> round(control.scale, 4), round(control.pull, 4)  # the term weighted to half the task's pull
    (0.125, 0.5)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import GuidewrapWarning
from .tensor_cap import TensorCap, applied_gradient

__all__ = ["StrengthController"]

# A fixed weight whose pull is under this warns (the term barely registers).
PULL_TOO_WEAK = 0.01


class StrengthController:
    """The weight that holds the term's pull at ``strength`` (``None``: a fixed weight, measured once).

    The weight in force is ``scale`` times the schedule's weight (with a strength the schedule's
    weight is its window and decay profile, 1 inside a constant window; a fixed weight has scale 1);
    ``pull`` is the last measured ratio of the gradients' norms at the weight then in force; ``since``
    counts the guided steps with a known task loss since that measurement (measured at steps 0,
    ``every``, ``2 every``, ...).
    """

    def __init__(self, strength: float | None, every: int, tensor_cap: float | None = None, after: int = 100) -> None:
        self.strength = strength
        self.every = every
        self.scale = 1.0
        self.scale_tensor = torch.tensor(1.0)  # what a compiled step reads (no guard on a Python float)
        self.pull: float | None = None
        self.since = 0
        self.measured = False
        # The last guided forward's term at the schedule's weight, and that term in force once weighed.
        self.term: Tensor | None = None
        self.term_weight: float | Tensor = 1.0
        self.loss: Tensor | None = None
        self._weighed = False
        self.task_loss: Tensor | None = None  # the task loss it was weighed against (detached), to log
        self.tensors = TensorCap(tensor_cap, after)  # the pull tensor by tensor: the cap, or the warning
        self._total: Tensor | None = None  # the last forward's total loss (task loss plus the term in force)

    def __getstate__(self) -> dict[str, Any]:
        # never a step's graph or tensors
        return dict(self.__dict__) | {"term": None, "loss": None, "_weighed": False, "task_loss": None, "_total": None}

    def hold(self, term: Tensor | None, schedule_weight: float | Tensor = 1.0) -> None:
        """Keep the last guided forward's term (``None``: forget it) until it is weighed."""
        self.term, self.term_weight, self.loss, self._weighed = term, schedule_weight, None, False
        self.task_loss, self._total = None, None

    def in_force(self, task_loss: Tensor | None, params: Callable[[], Sequence[Tensor]]) -> Tensor | None:
        """The held term in force against ``task_loss`` (weighed once per forward against a task loss:
        the scale's measurement when due, or the fixed weight's one-time check); None if none is held."""
        if self.term is None:
            return None
        if self.loss is None or (task_loss is not None and not self._weighed):
            self.loss = self.weigh(self.term, self.term_weight, task_loss, params)
            self._weighed = task_loss is not None
            if task_loss is not None:
                self.task_loss = task_loss.detach()
        return self.loss

    @property
    def needs_task_loss(self) -> bool:
        """Whether the term is weighed against the task loss (a strength, or a per-tensor cap)."""
        return self.strength is not None or self.tensors.cap is not None

    def described(self) -> str:
        """The setting that weighs the term against the task loss, as a user wrote it."""
        return f"strength={self.strength}" if self.tensors.cap is None else f"tensor_cap={self.tensors.cap}"

    def total(
        self, task_loss: Tensor, params: Callable[[], Sequence[Tensor]], target: Any, optimizers: Sequence[Any]
    ) -> Tensor:
        """``task_loss`` plus the held term in force against it, the term's gradient capped tensor by
        tensor when ``tensor_cap`` is in force (once per forward); ``task_loss`` itself if none is held."""
        term = self.in_force(task_loss, params)
        if term is None:
            return task_loss
        if self._total is None:
            self._total = self.tensors.total(task_loss, term.to(task_loss.device, task_loss.dtype), target, optimizers)
        return self._total

    def due(self) -> bool:
        """Whether the pull is to be measured: on the first step, then every ``every`` steps."""
        if not self.measured:
            return True
        return self.strength is not None and self.since >= self.every

    def weigh(
        self,
        term: Tensor,
        schedule_weight: float | Tensor,
        task_loss: Tensor | None,
        params: Callable[[], Sequence[Tensor]],
    ) -> Tensor:
        """The term in force from ``term`` at the schedule's weight (with a strength: times the scale),
        measuring first when due and the task loss is known (eagerly only: under ``torch.compile`` the
        scale is read as a tensor). With a fixed weight ``term`` itself is returned."""
        if torch.compiler.is_compiling():
            return term if self.strength is None else term * self.scale_tensor.to(term.device)
        if task_loss is not None:
            self.since += 1
            if self.due():
                self.measure(task_loss, term, params(), float(schedule_weight))
        return term if self.strength is None else term * self.scale

    def measure(self, task_loss: Tensor, term: Tensor, params: Sequence[Tensor], schedule_weight: float = 1.0) -> None:
        """Measure both gradients' norms (``term`` at the schedule's weight) and set the scale (with a
        strength: the pull becomes ``strength`` times the schedule's weight, so a decay still decays)
        or warn about the pull (a fixed weight). The graphs are kept for the caller's backward."""
        if not (task_loss.requires_grad and term.requires_grad):
            return  # a forward without gradients (no_grad, a frozen target): nothing to measure yet
        task_norm, term_norm = _norms(task_loss, term, params)
        self.measured, self.since = True, 0
        if self.strength is not None and term_norm > 0 and task_norm > 0:
            self.scale = self.strength * schedule_weight * task_norm / term_norm
            self.scale_tensor.fill_(self.scale)
        self.pull = self.scale * term_norm / task_norm if task_norm > 0 else math.inf
        if self.strength is None and self.pull < PULL_TOO_WEAK:
            # A strong pull is not warned about here: the first steps may be dominated (the demo's are);
            # a domination that persists, tensor by tensor, is (tensor_cap.TensorCap).
            warnings.warn(
                f"the alignment term's gradient is {self.pull:.3g} times the task loss's at weight "
                f"{schedule_weight:g}: it barely registers against the task's, so guidance will change little. "
                "Raise the weight, or pass strength=r to hold the term's pull at r times the task's",
                GuidewrapWarning,
                stacklevel=6,  # the caller of total_loss (plain loops)
            )

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (a resumed run continues it exactly)."""
        state = {"scale": self.scale, "pull": self.pull, "since": self.since, "measured": self.measured}
        return state | {"tensors": self.tensors.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.scale, self.pull = float(state["scale"]), state.get("pull")
        self.since, self.measured = int(state["since"]), bool(state["measured"])
        self.scale_tensor.fill_(self.scale)
        if state.get("tensors") is not None:
            self.tensors.load_state_dict(state["tensors"])


def _norms(task_loss: Tensor, term: Tensor, params: Sequence[Tensor]) -> tuple[float, float]:
    """The two gradients' norms over ``params``; in a data-parallel run, of the gradients as applied
    (averaged over processes), so the pull is one process's on the global batch, the same everywhere."""
    params = [p for p in params if p.requires_grad]
    squares = []
    for loss in (task_loss, term):
        zero = torch.zeros((), device=task_loss.device)
        if not loss.requires_grad:
            squares.append(zero)
            continue
        grads = applied_gradient(loss, params)
        squares.append(sum((g.detach().float().pow(2).sum() for g in grads if g is not None), zero))
    task_sq, term_sq = torch.stack([s.to(task_loss.device) for s in squares]).tolist()
    return math.sqrt(task_sq), math.sqrt(term_sq)
