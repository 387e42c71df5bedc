"""``Guidance``: the same guidance as a context manager, with hooks on an unwrapped target.

Examples:
    >>> import torch
    >>> from guidewrap import Guidance
    >>> target = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> opt = torch.optim.SGD(target.parameters(), lr=0.1)
    >>> with Guidance(target, guide, until_step=2, optimizer=opt) as g:
    ...     for _ in range(3):
    ...         loss = target(torch.randn(16, 8)).pow(2).mean() + g.alignment_loss
    ...         opt.zero_grad(); loss.backward(); opt.step()
    ...     g.step_count
    3
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .config import GuidanceConfig
from .engine import GuidanceEngine
from .errors import GuidanceClosedError
from .hooks import HookSet, attach_root
from .interface import GuidanceInterface

__all__ = ["Guidance"]


class Guidance(GuidanceInterface):
    """Guide ``target`` without wrapping it: hooks are attached on ``__enter__`` and every one
    of them is removed on ``__exit__``, also when the block raises.

    Takes the same settings as :class:`~guidewrap.GuidedModel`. Inside the block, each
    training forward of ``target`` runs the guide and :attr:`alignment_loss` holds the weighted
    term (also added to ``output.loss`` when the target returns one). ``target`` may be
    wrapped in DDP or ``torch.compile``; layer names refer to the unwrapped model.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        >>> with Guidance(net, guide) as g:
        ...     _ = net(torch.randn(10, 4))
        ...     round(g.alignment_loss.item(), 3) >= 0
        True
        >>> len(net[0]._forward_hooks)  # all hooks gone
        0
    """

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        config: GuidanceConfig | None = None,
        *,
        optimizer: Any = None,
        **settings: Any,
    ) -> None:
        cfg = GuidanceConfig.build(config, **settings)
        self._engine = GuidanceEngine(target, guide, cfg, optimizer=optimizer)
        self._root_hooks = HookSet()
        self._entered = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Guidance:
        self._check_open()
        if self._entered:
            raise GuidanceClosedError("this Guidance is already active; a Guidance can be entered once")
        self._entered = True
        self._root_hooks = attach_root(self._engine)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (root, layers, optimizer). Idempotent."""
        self._root_hooks.remove()
        self._engine.close()

    def _usable_engine(self) -> GuidanceEngine:
        self._check_open()
        return self._engine

    def _check_open(self) -> None:
        if self._engine.closed:
            raise GuidanceClosedError(
                "this Guidance has exited and removed its hooks; create a new Guidance(...) to guide again"
            )

    # ------------------------------------------------------------------ guidance API

    @property
    def hook_count(self) -> int:
        """Hooks currently held (0 after exit)."""
        return len(self._root_hooks) + self._engine.hook_count

    def metrics(self) -> dict[str, float]:
        """Deprecated name of :meth:`guidance_metrics`."""
        warnings.warn("Guidance.metrics() is now Guidance.guidance_metrics()", DeprecationWarning, stacklevel=2)
        return self._engine.guidance_metrics()

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (the step counter)."""
        return self._engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._engine.load_state_dict(state)
