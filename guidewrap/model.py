"""``GuidedModel``: the target wrapped as an ``nn.Module`` that adds the alignment term.

Examples:
    >>> import torch
    >>> from guidewrap import GuidedModel
    >>> target = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> guided = GuidedModel(target, guide)
    >>> out = guided(torch.randn(64, 8))
    >>> loss = out.pow(2).mean() + guided.alignment_loss
    >>> loss.backward()
    >>> sorted(guided.last_alignment)
    ['0<-0']
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import GuidanceConfig
from .engine import GuidanceEngine
from .errors import ConfigError
from .forwards import evaluate
from .hooks import guided_call
from .interface import GuidanceInterface

__all__ = ["GuidedModel"]


class GuidedModel(GuidanceInterface, nn.Module):
    """Wrap ``target`` so each training forward is guided by the frozen ``guide``.

    ``guided(x)`` returns exactly what ``target(x)`` returns; the weighted alignment term of
    that forward is :attr:`alignment_loss` and, when the output carries a loss
    (``output.loss`` or ``output["loss"]``), it is already added to it. The guide is not a
    submodule: it is never in :meth:`parameters`, :meth:`state_dict` or a saved model, but it
    follows ``.to()``/``.cuda()``. Unknown attributes are forwarded to the target, and the
    target's forward signature is kept (the HF Trainer reads it).

    ``state_dict()`` holds the target's weights (under ``target.``) plus ``guidance_step``, the
    optimizer-step counter, so a checkpoint resumes the window where it stopped, and, once the plan
    is resolved, ``guidance_plan`` (its pairs and settings as JSON bytes) and, once measured,
    ``guidance_strength`` (the strength controller's state, JSON bytes): loading it into a run
    whose plan differs warns, naming what changed.
    :meth:`save_pretrained` writes the target alone, in its own format.

    Args:
        target: the network being trained.
        guide: the frozen network whose representations it is aligned to (trained or not).
        config: a :class:`~guidewrap.GuidanceConfig`; keyword arguments override its fields.
        optimizer: count window steps from this optimizer's ``step()`` calls.

    Examples:
        >>> import torch
        >>> net, guide = torch.nn.Linear(4, 4), torch.nn.Linear(4, 6)
        >>> guided = GuidedModel(net, guide, until_step=100, exclude_output_layer=False)
        >>> [name for name, _ in guided.named_parameters()]
        ['target.weight', 'target.bias']
        >>> guided.in_features  # forwarded to the target
        4
    """

    guidance_step: Tensor

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        config: GuidanceConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        cfg = GuidanceConfig.build(config, **settings)
        engine = GuidanceEngine(target, guide, cfg, optimizer=optimizer)
        self.target = target
        # Kept out of _modules: the guide must never reach parameters() or state_dict().
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_checked_caller", False)
        self.register_buffer("guidance_step", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(_restore_step)
        self._bind()

    def _bind(self) -> None:
        """Connect this wrapper to its engine: the step counter and the instance's ``forward``."""
        # A weak reference: the target's hooks hold the engine, and the engine must not keep the
        # wrapper alive (dropping the wrapper removes its hooks, see close()).
        store = weakref.WeakMethod(self._store_step)
        self._engine.steps.on_step = lambda step: (method := store()) is not None and method(step)
        target = self._modules["target"]
        forward_impl = self._guided_forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return forward_impl(*args, **kwargs)

        try:  # Trainer's remove_unused_columns inspects the forward signature
            forward.__signature__ = inspect.signature(target.forward)  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            pass
        object.__setattr__(self, "forward", forward)

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy / pickle: the instance's forward closes over this wrapper, so the copy binds its
        # own (its engine copy carries no hooks and no step state, see GuidanceEngine.__getstate__).
        return {k: v for k, v in super().__getstate__().items() if k != "forward"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._bind()

    # ------------------------------------------------------------------ module plumbing

    def _guided_forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._checked_caller and self.training:
            _refuse_trainer_caller()
            object.__setattr__(self, "_checked_caller", True)
        return guided_call(self._engine, self.target, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"target", "_engine"}:
                raise
            return getattr(self._modules["target"], name)

    def _apply(self, fn: Any, recurse: bool = True) -> GuidedModel:
        super()._apply(fn, recurse)
        self._engine.guide._apply(fn)  # the guide follows .to()/.cuda()/.half()
        return self

    def _store_step(self, step: int) -> None:
        self.guidance_step.fill_(step)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The plan's record and the strength controller's state as bytes: safetensors and weights_only take them.
        if self._engine.planner.plan is not None:
            record = json.dumps(self._engine.plan_record(), sort_keys=True).encode()
            destination[prefix + "guidance_plan"] = torch.frombuffer(bytearray(record), dtype=torch.uint8)
        if self._engine.strength.measured:
            record = json.dumps(self._engine.strength.state_dict()).encode()
            destination[prefix + "guidance_strength"] = torch.frombuffer(bytearray(record), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        strength = state_dict.pop(prefix + "guidance_strength", None)  # torch passes a copy: popping is safe
        if strength is not None:
            self._engine.strength.load_state_dict(json.loads(bytes(strength.to("cpu", torch.uint8).tolist()).decode()))
        record = state_dict.pop(prefix + "guidance_plan", None)
        if record is not None:
            self._engine.planner.expect(json.loads(bytes(record.to("cpu", torch.uint8).tolist()).decode()))
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ------------------------------------------------------------------ guidance API

    @property
    def guide(self) -> nn.Module:
        """The frozen guide network."""
        return self._engine.guide

    @property
    def guidance(self) -> GuidanceEngine:
        """Deprecated name of :attr:`engine`."""
        warnings.warn("GuidedModel.guidance is now GuidedModel.engine", DeprecationWarning, stacklevel=2)
        return self._engine

    @property
    def config(self) -> Any:
        """The target's ``config`` if it has one (Hugging Face models), else the guidance config."""
        target_config = getattr(self._modules["target"], "config", None)
        return target_config if target_config is not None else self._engine.config

    @property
    def guidance_config(self) -> GuidanceConfig:
        """The validated :class:`~guidewrap.GuidanceConfig`."""
        return self._engine.config

    def close(self) -> None:
        """Remove every hook guidance holds on the target and optimizer; the model then runs unguided.

        Also done when the ``GuidedModel`` is garbage-collected, so dropping a wrapper (and keeping
        the bare target) leaves no hook behind.

        Examples:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> guided = GuidedModel(net, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
            >>> _ = guided(torch.randn(8, 4))
            >>> guided.close()
            >>> sum(len(m._forward_hooks) for m in net.modules())
            0
        """
        self._engine.close()

    def __del__(self) -> None:
        engine = self.__dict__.get("_engine")
        if engine is not None:
            try:
                engine.close()
            except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to clean
                pass

    def attach_optimizer(self, optimizer: Any) -> None:
        """Count steps from ``optimizer.step()`` (for optimizers built after wrapping)."""
        self._engine.attach_optimizer(optimizer)

    def evaluate_alignment(self, *args: Any, **kwargs: Any) -> float:
        """Unweighted sum of pair distances on these inputs, without gradients."""
        return evaluate(self._engine, args, kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Save the target alone, in its own format (for the final model; for resuming use
        ``state_dict()`` / ``accelerator.save_state``, which keep the step counter).

        A Hugging Face target uses its own ``save_pretrained`` (loadable with ``from_pretrained``
        without guidewrap); any other module gets ``pytorch_model.bin`` holding its state dict. A
        ``state_dict=`` passed in (Accelerate's ``accelerator.get_state_dict(model)`` of this wrapper)
        is reduced to the target's own keys: the ``target.`` prefix is stripped and ``guidance_step``
        dropped, so the checkpoint loads as the target.

        Examples:
            >>> import tempfile, torch
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> guided = GuidedModel(net, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
            >>> folder = tempfile.mkdtemp()
            >>> guided.save_pretrained(folder, state_dict=guided.state_dict())
            >>> sorted(torch.load(f"{folder}/pytorch_model.bin"))
            ['0.bias', '0.weight', '2.bias', '2.weight']
        """
        target = self._modules["target"]
        state = kwargs.pop("state_dict", None)
        if state is not None:
            state = _target_keys(state)
        if hasattr(target, "save_pretrained"):
            target.save_pretrained(save_directory, **kwargs, **({"state_dict": state} if state is not None else {}))
            return
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state if state is not None else target.state_dict(), path / "pytorch_model.bin")


def _refuse_trainer_caller() -> None:
    """A ``transformers.Trainer`` must hold the bare target (it inspects the model's class for labels
    and saving, and logs nothing of a wrapper): found on the first training forward by its
    ``training_step`` frame. Only code objects and module names are read: reading a frame's locals
    would keep the caller's objects alive."""
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return
        module = frame.f_globals.get("__name__", "")
        if module.startswith("transformers.trainer") and frame.f_code.co_name == "training_step":
            raise ConfigError(
                "a GuidedModel was given to a transformers Trainer; give the Trainer the bare target and add "
                "guidance with one line: guide_trainer(trainer, guide, ...) "
                "(from guidewrap.integrations.transformers import guide_trainer)"
            )
        frame = frame.f_back


def _target_keys(state: dict[str, Any]) -> dict[str, Any]:
    """A wrapper's state dict as the target's: ``target.`` prefixes stripped, guidance entries dropped.
    A state dict that is already the target's passes unchanged."""
    if not any(key.startswith("target.") for key in state):
        return dict(state)
    return {key[len("target.") :]: value for key, value in state.items() if key.startswith("target.")}


def _restore_step(module: nn.Module, _incompatible: Any) -> None:
    if isinstance(module, GuidedModel):
        module._engine.set_step(int(module.guidance_step))
