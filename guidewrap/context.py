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

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import GuidanceConfig
from .engine import GuidanceEngine
from .errors import GuidanceClosedError
from .layers import LayerPlan

__all__ = ["Guidance"]


class Guidance:
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
        self._root_hooks: list[RemovableHandle] = []
        self._entered = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Guidance:
        self._check_open()
        if self._entered:
            raise GuidanceClosedError("this Guidance is already active; a Guidance can be entered once")
        self._entered = True
        root = self._engine.target
        self._root_hooks = [
            root.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            root.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (root, layers, optimizer). Idempotent."""
        for handle in self._root_hooks:
            handle.remove()
        self._root_hooks = []
        self._engine.close()

    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._forward_kwargs = kwargs
        self._engine.begin(args, kwargs)

    def _post_hook(self, _module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self._engine.busy:
            return None
        if output is None:  # the forward raised (always_call): forget this forward
            self._engine.abort()
            return None
        return self._engine.end(output, kwargs)

    def _check_open(self) -> None:
        if self._engine.closed:
            raise GuidanceClosedError(
                "this Guidance has exited and removed its hooks; create a new Guidance(...) to guide again"
            )

    # ------------------------------------------------------------------ guidance API

    @property
    def engine(self) -> GuidanceEngine:
        """The underlying :class:`~guidewrap.engine.GuidanceEngine`."""
        return self._engine

    @property
    def alignment_loss(self) -> Tensor:
        """Weighted alignment term of the last forward of the target."""
        self._check_open()
        return self._engine.alignment_loss

    @property
    def last_alignment(self) -> dict[str, float]:
        """Per-pair alignment of the last guided forward (still readable after exit)."""
        return dict(self._engine.last_alignment)

    @property
    def step_count(self) -> int:
        """Optimizer steps counted so far."""
        return self._engine.step_count

    @property
    def hook_count(self) -> int:
        """Hooks currently held (0 after exit)."""
        return len(self._root_hooks) + self._engine.hook_count

    def step(self) -> None:
        """Count one optimizer step (when no ``optimizer=`` was given)."""
        self._check_open()
        self._engine.step()

    def plan(self, *example_args: Any, **example_kwargs: Any) -> LayerPlan:
        """The matched layer pairs (pass an example input to resolve them)."""
        self._check_open()
        return self._engine.plan(example_args, example_kwargs)

    def pre_align(
        self, *example_args: Any, steps: int = 300, lr: float = 1e-3, optimizer: Any = None, **example_kwargs: Any
    ) -> list[float]:
        """Train the target on the alignment loss alone on noise (see ``GuidedModel.pre_align``)."""
        self._check_open()
        return self._engine.pre_align(example_args, example_kwargs, steps, lr, optimizer)

    def metrics(self) -> dict[str, float]:
        """Loggable values of the last forward."""
        return self._engine.metrics()

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (the step counter)."""
        return self._engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._engine.load_state_dict(state)
