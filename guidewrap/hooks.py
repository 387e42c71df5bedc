"""The one hook mechanism every entry point uses.

Two kinds of hooks exist: *root* hooks around the target's forward, which open and close one
guided step on the engine (:func:`attach_root`, used by :class:`~guidewrap.Guidance` and the
Trainer callback; :class:`~guidewrap.GuidedModel` calls :func:`guided_call` from its own
``forward`` instead), and *taps* on individual layers, which hand a layer's output to a sink
(the engine's capture of target layers, the guide's feature reduction, the similarity matrix).
Handles installed together live in one :class:`HookSet` and are removed together, always in a
``finally`` or a ``close``.

Examples:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> seen = {}
    >>> hooks = HookSet()
    >>> hooks.tap(dict(net.named_children()), lambda name, out: seen.__setitem__(name, tuple(out.shape)))
    >>> _ = net(torch.randn(4, 2)); hooks.remove()
    >>> seen, len(hooks), len(net[0]._forward_hooks)
    ({'0': (4, 3), '1': (4, 3)}, 0, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .engine import GuidanceEngine

__all__ = ["HookSet", "attach_root", "guided_call"]


class HookSet:
    """Handles installed together and removed together (idempotent)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        """Keep ``handle`` for :meth:`remove`."""
        self._handles.append(handle)

    def tap(self, modules: Mapping[str, nn.Module], sink: Callable[[str, Any], None]) -> None:
        """A forward hook on each module calling ``sink(name, output)``."""
        for name, module in modules.items():
            self.add(module.register_forward_hook(_tap(name, sink)))

    def remove(self) -> None:
        """Remove every handle held."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


def _tap(name: str, sink: Callable[[str, Any], None]) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        sink(name, output)

    return hook


def attach_root(engine: GuidanceEngine, on_end: Callable[[Any], Any] | None = None) -> HookSet:
    """Pre/post hooks on the engine's target that open and close a guided step around each forward.

    ``on_end(output)`` runs after the engine has finished a step (the Trainer callback keeps the
    term there); a forward that raises aborts the step.
    """

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        engine.begin(args, kwargs)

    def post_hook(_module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if engine.busy:
            return None
        if output is None:  # the forward raised (always_call): forget this step
            engine.abort()
            return None
        output = engine.end(output, kwargs)
        if on_end is not None:
            on_end(output)
        return output

    hooks = HookSet()
    root = engine.target
    hooks.add(root.register_forward_pre_hook(pre_hook, with_kwargs=True))
    hooks.add(root.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
    return hooks


def guided_call(
    engine: GuidanceEngine, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run ``forward(*args, **kwargs)`` as one guided step (what :class:`~guidewrap.GuidedModel` does)."""
    engine.begin(args, kwargs)
    try:
        output = forward(*args, **kwargs)
    except BaseException:
        engine.abort()
        raise
    return engine.end(output, kwargs)
