"""The state of one guided forward, in one short-lived object.

Examples:
    >>> import torch
    >>> step = GuidedStep(None, capturing=True)
    >>> step.capture("fc", torch.ones(2, 3)); sorted(step.captured)
    ['fc']
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import extract
from .errors import ConfigError, GuidewrapWarning
from .inputs import Routed

__all__ = ["GuidedStep"]


@dataclass
class GuidedStep:
    """The state of one guided forward: created by ``begin``, consumed by ``end``, then dropped.

    ``prepared`` holds the guide's reduced layers, ``captured`` the target's layer outputs, a list
    per layer in call order (written by the taps while ``capturing``); ``noise`` marks a step whose
    alignment runs on noise after the task forward (``guide_inputs="noise"``).

    A layer's output is kept by reference, except for the layers in ``copy``: those whose output
    the network modifies in place after they return (``nn.ReLU(inplace=True)`` right after a
    ``Linear``), whose output is copied when it is captured. Every other capture records the
    tensor's version counter, so :meth:`modified_in_place` finds an in-place change made later.
    """

    routed: Routed | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    noise: bool = False
    capturing: bool = False
    prepared: dict[tuple[str, str], Any] = field(default_factory=dict)
    captured: dict[str, list[Any]] = field(default_factory=dict)
    copy: frozenset[str] = frozenset()
    versions: dict[str, list[tuple[Any, int]]] = field(default_factory=dict)
    grad_at_begin: bool = field(default_factory=torch.is_grad_enabled)
    # Layers that ran without gradients inside a forward that has them: True where that was reentrant
    # activation checkpointing (the term cannot reach them), False for a torch.no_grad() region.
    no_grad: dict[str, bool] = field(default_factory=dict)

    def capture(self, name: str, output: Any) -> None:
        # Only while the step's forward runs: recomputation under activation checkpointing
        # happens during backward, after capture has ended, and is not counted twice.
        if not self.capturing:
            return
        if self.grad_at_begin and not torch.is_grad_enabled() and name not in self.no_grad:
            self.no_grad[name] = _in_reentrant_checkpoint()
        tensor, lengths = extract(output)
        if tensor is not None and lengths is None:
            if name in self.copy:
                output = tensor.clone()  # its value now: the network changes the tensor in place later
            elif not torch.compiler.is_compiling():  # a version read is a host-side check
                self.versions.setdefault(name, []).append((tensor, tensor._version))
        self.captured.setdefault(name, []).append(output)  # a module run k times: its k calls

    def modified_in_place(self) -> list[str]:
        """Layers whose captured output was changed in place after it was captured."""
        return [name for name, seen in self.versions.items() if any(t._version != v for t, v in seen)]


def _in_reentrant_checkpoint() -> bool:
    """Whether the running code is inside ``torch.utils.checkpoint``'s reentrant forward (which runs
    its region without gradients and recomputes it in the backward). Only code objects are read."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename.replace("\\", "/").endswith("torch/utils/checkpoint.py"):
            return True
        frame = frame.f_back
    return False


def report_no_grad(layers: dict[str, bool], warned: bool) -> bool:
    """Raise if planned target layers ran inside reentrant activation checkpointing (the term cannot
    reach their parameters); warn once (``warned``: already said) about layers run under
    ``torch.no_grad()`` inside the forward. Returns whether it has now warned."""
    reentrant = [name for name, inside in layers.items() if inside]
    if reentrant:
        raise ConfigError(
            f"target layer{'s' if len(reentrant) > 1 else ''} {', '.join(map(repr, reentrant[:3]))} ran inside "
            "reentrant activation checkpointing, which runs its region without gradients and recomputes it in "
            "the backward for the task loss only, so the alignment term cannot reach their parameters. Use "
            "use_reentrant=False: torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False), or "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
            "(transformers' default); the term's gradients are then those of the run without checkpointing"
        )
    if warned:
        return True
    warnings.warn(
        f"target layers {', '.join(map(repr, list(layers)[:3]))} ran under torch.no_grad() inside the target's "
        "forward: the alignment term cannot train them (their term is a constant). Leave them out with layers=... "
        "or run them with gradients",
        GuidewrapWarning,
        stacklevel=6,
    )
    return True
