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

import torch

from .capture import extract
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

    def capture(self, name: str, output: Any) -> None:
        # Only while the step's forward runs: recomputation under activation checkpointing
        # happens during backward, after capture has ended, and is not counted twice.
        if not self.capturing:
            return
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
