"""What :class:`~guidewrap.GuidedModel` and :class:`~guidewrap.Guidance` share: the term, the
per-pair values, the step counter, the plan, pre-alignment and the values to log, all read from
their engine. :class:`~guidewrap.Guidance` refuses them after its block has exited.

Examples:
    >>> import torch
    >>> from guidewrap import GuidedModel
    >>> t = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    >>> g = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    >>> isinstance(GuidedModel(t, g), GuidanceInterface)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .engine import GuidanceEngine
from .errors import ConfigError
from .forwards import pre_align
from .matching import LayerPlan

__all__ = ["GuidanceInterface"]


class GuidanceInterface:
    """The guidance API of an entry point that holds a :class:`~guidewrap.engine.GuidanceEngine`."""

    _engine: GuidanceEngine

    def _usable_engine(self) -> GuidanceEngine:
        """The engine, for calls that guide (an entry point may refuse them once closed)."""
        return self._engine

    @property
    def engine(self) -> GuidanceEngine:
        """The underlying :class:`~guidewrap.engine.GuidanceEngine` (plan, counters, for integrations)."""
        return self._engine

    @property
    def alignment_loss(self) -> Tensor:
        """Weighted alignment term of the last forward (a 0-dim tensor; 0 when not guided)."""
        return self._usable_engine().alignment_loss

    def total_loss(self, task_loss: Tensor) -> Tensor:
        """``task_loss`` plus the last forward's weighted alignment term (``task_loss`` itself when it
        was not guided). With ``strength=`` this is where the weight is set: every ``strength_every``
        guided steps it is re-measured from the two gradients so that the term's pull is ``strength``
        times the task's. With a fixed ``weight`` the first call measures the pull once and warns when it
        is under 0.01 (the term barely registers); with ``tensor_cap`` the term's gradient is capped tensor by
        tensor here (and without one, after ``tensor_cap_after`` guided steps a term still over 100 times
        the task's in some tensor warns).

        Examples:
            >>> import torch
            >>> from guidewrap import GuidedModel
            >>> t = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
            >>> g = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
            >>> guided = GuidedModel(t, g, strength=0.3)
            >>> out = guided(torch.randn(32, 4))
            >>> loss = guided.total_loss(out.square().mean())
            >>> round(guided.guidance_metrics()["guidance_pull"], 6)
            0.3
        """
        engine = self._usable_engine()
        if engine.term_in_output:
            raise ConfigError(
                "this forward's output loss already holds the alignment term (outputs.loss of a model given "
                "labels): use outputs.loss as it is, not total_loss(outputs.loss)"
            )
        return engine.total_for(task_loss)

    @property
    def last_alignment(self) -> dict[str, float]:
        """Per-pair alignment (CKA for ``metric="cka"``) of the last guided forward."""
        return dict(self._engine.last_alignment)

    @property
    def step_count(self) -> int:
        """Optimizer steps counted so far (drives the window and decay)."""
        return self._engine.step_count

    def step(self) -> None:
        """Count one optimizer step (use when no ``optimizer=`` was given)."""
        self._usable_engine().step()

    def guidance_metrics(self) -> dict[str, float]:
        """Loggable values of the last forward: ``guidance_loss``, ``guidance_weight``, per pair."""
        return self._engine.guidance_metrics()

    def plan(self, *example_args: Any, **example_kwargs: Any) -> LayerPlan:
        """The matched layer pairs with feature sizes; pass an example input to resolve it.

        Examples:
            >>> import torch
            >>> from guidewrap import GuidedModel
            >>> t = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
            >>> g = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
            >>> [p.key for p in GuidedModel(t, g).plan(torch.randn(10, 4))]
            ['0<-0']
        """
        return self._usable_engine().plan(example_args, example_kwargs)

    def pre_align(
        self,
        *example_args: Any,
        steps: int = 300,
        lr: float = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
        **example_kwargs: Any,
    ) -> list[float]:
        """Guidance as initialisation: train the target on the alignment loss alone, on noise
        shaped like the example input, for ``steps`` steps. Returns the loss per step.

        Examples:
            >>> import torch
            >>> from guidewrap import GuidedModel
            >>> t = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
            >>> g = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
            >>> history = GuidedModel(t, g).pre_align(torch.randn(32, 4), steps=20, lr=1e-2)
            >>> history[-1] < history[0]
            True
        """
        return pre_align(self._usable_engine(), example_args, example_kwargs, steps, lr, optimizer)
