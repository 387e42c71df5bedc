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

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import GuidewrapWarning


class GuidanceEngine(Protocol):
    """What the root hooks need of an engine (:class:`guidewrap.engine.GuidanceEngine`): the hooks
    depend on this shape, not on the engine's module, so the two do not import each other."""

    target: nn.Module
    busy: bool

    def begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool: ...

    def end(self, output: Any, kwargs: Mapping[str, Any]) -> Any: ...

    def abort(self) -> None: ...


__all__ = ["HookSet", "attach_root", "guided_call", "watch_double_count"]


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
            self.add(module.register_forward_hook(_Tap(name, sink)))

    def keep_last(self) -> None:
        """Move each held forward hook to the end of its module's hooks: a tap then sees the output
        the network goes on with, also when a user's hook registered later replaces it."""
        for handle in self._handles:
            table = handle.hooks_dict_ref()
            if table is not None and handle.id in table and next(reversed(table)) != handle.id:
                table.move_to_end(handle.id)

    def remove(self) -> None:
        """Remove every handle held."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


class _GuidanceHook:
    """Base of every hook guidewrap installs on a user's module.

    A snapshot of the module (``copy.deepcopy``, ``AveragedModel``, ``torch.save`` of the whole
    module) copies its hook dicts; a copied guidance hook would capture into, or run the guide
    of, the original's engine. So a copy of one is :class:`_Inert`: it does nothing and removes
    every inert hook from its module the first time the copy runs.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _Inert:
        return _Inert()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Inert, ()


class _Inert:
    """What a snapshot holds in place of a guidance hook (see :class:`_GuidanceHook`)."""

    def __call__(self, module: nn.Module, *_: Any) -> None:
        # Pre-hooks and forward hooks are called from materialised copies of the hook dicts, so
        # removing entries here is safe; the pre-hook (when there is one) clears them all first.
        for table in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in table.items() if isinstance(hook, _Inert)]:
                del table[key]
                for flags in (
                    module._forward_pre_hooks_with_kwargs,
                    module._forward_hooks_with_kwargs,
                    module._forward_hooks_always_called,
                ):
                    flags.pop(key, None)


class _Tap(_GuidanceHook):
    def __init__(self, name: str, sink: Callable[[str, Any], None]) -> None:
        self.name, self.sink = name, sink

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.sink(self.name, output)


class _RootPreHook(_GuidanceHook):
    def __init__(self, engine: GuidanceEngine) -> None:
        self.engine = engine

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.engine.begin(args, kwargs)


class _RootPostHook(_GuidanceHook):
    def __init__(self, engine: GuidanceEngine, on_end: Callable[[Any], Any] | None) -> None:
        self.engine, self.on_end = engine, on_end

    def __call__(self, _module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        engine = self.engine
        if engine.busy:
            return None
        if output is None:  # the forward raised (always_call): forget this step
            engine.abort()
            return None
        output = engine.end(output, kwargs)
        if self.on_end is not None:
            self.on_end(output)
        return output


def attach_root(engine: GuidanceEngine, on_end: Callable[[Any], Any] | None = None) -> HookSet:
    """Pre/post hooks on the engine's target that open and close a guided step around each forward.

    ``on_end(output)`` runs after the engine has finished a step (the Trainer callback keeps the
    term there); a forward that raises aborts the step.
    """
    hooks = HookSet()
    root = engine.target
    hooks.add(root.register_forward_pre_hook(_RootPreHook(engine), with_kwargs=True))
    hooks.add(root.register_forward_hook(_RootPostHook(engine, on_end), with_kwargs=True, always_call=True))
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


def watch_double_count(loss_with_term: Tensor, term: Tensor) -> None:
    """Warn if ``term``, already inside ``loss_with_term``, is also added to the loss a second time.

    Checked in the backward: when the term reaches the loss only through ``loss_with_term``, both get
    the same gradient; a larger gradient on the term means it was added again (the classic
    ``outputs.loss + guided.alignment_loss`` with a model whose ``outputs.loss`` already holds it).
    """
    seen: dict[str, Tensor] = {}

    def on_loss(grad: Tensor) -> None:
        seen["loss"] = grad

    def on_term(grad: Tensor) -> None:
        through_loss = seen.get("loss")
        if through_loss is not None and not bool(torch.isclose(grad, through_loss.to(grad.dtype), rtol=1e-3).all()):
            warnings.warn(
                "the alignment term was counted twice: the model's output loss already contains it "
                "(add_to_output_loss=True) and it was added to the loss again (e.g. outputs.loss + "
                "guided.alignment_loss). Use outputs.loss alone, or pass add_to_output_loss=False.",
                GuidewrapWarning,
                stacklevel=2,
            )

    loss_with_term.register_hook(on_loss)
    term.register_hook(on_term)
