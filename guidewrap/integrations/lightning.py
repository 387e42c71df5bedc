"""Guidance for a PyTorch Lightning ``LightningModule`` in one line: add :class:`GuidanceCallback` to
the ``Trainer``'s callbacks.

The callback guides the LightningModule (or one of its submodules, ``target="model"``) while
``fit`` runs: it adds the weighted alignment term to the loss ``training_step`` returns (before
Lightning divides it for ``accumulate_grad_batches``, so the term is normalised like the task loss),
counts the window in ``trainer.global_step`` (optimizer steps: right under accumulation and after
resuming), logs ``guidance_*`` values through ``LightningModule.log_dict`` (so every Lightning logger
receives them) and keeps its state (step, strength, the plan's record) in the checkpoint's callback
state. The guide is never part of the LightningModule, so checkpoints hold only the target's weights.
Hooks and the wrapped ``training_step`` exist only while ``fit`` runs (removed also when it raises).

Examples:
    >>> import lightning as L
    >>> import torch
    >>> from torch import nn
    >>> from guidewrap.integrations.lightning import GuidanceCallback
    >>> class Classifier(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    ...     def forward(self, x):
    ...         return self.net(x)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return nn.functional.cross_entropy(self(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.Adam(self.parameters(), lr=1e-3)
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    >>> guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> guidance = GuidanceCallback(guide, until_step=100)
    >>> trainer = L.Trainer(max_steps=3, callbacks=[guidance], accelerator="cpu", logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=16))
    >>> guidance.engine.step_count, guidance.hook_count, "guidance_loss" in trainer.callback_metrics
    (3, 0, True)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

from torch import Tensor, nn

from ..config import GuidanceConfig
from ..engine import GuidanceEngine
from ..errors import ConfigError, LayerNotFoundError
from ..hooks import HookSet, attach_root
from ..utils import is_lightning_available

if not is_lightning_available():  # pragma: no cover - exercised only without the extra
    raise ImportError("guidewrap.integrations.lightning needs lightning: pip install 'guidewrap[lightning]'")

from lightning.pytorch import Callback

__all__ = ["GuidanceCallback"]


class GuidanceCallback(Callback):
    """Guide a ``LightningModule`` by a frozen ``guide``: ``L.Trainer(callbacks=[GuidanceCallback(guide)])``.

    Args:
        guide: the frozen guide network (never trained, never saved with the module).
        config: a :class:`~guidewrap.GuidanceConfig`; or pass its settings as keywords
            (``layers``, ``weight``, ``strength``, ``until_step``, ...).
        target: the attribute path of the guided network inside the LightningModule, when
            ``training_step`` calls a submodule (``self.model(x)``) instead of ``self(x)``;
            ``None`` (default): the LightningModule itself.

    ``training_step`` must return the task loss (a tensor, or a dict with ``"loss"``), under automatic
    optimization; the returned loss then holds the term, so what the module logs itself stays the task
    loss, and the callback logs ``guidance_task_loss`` beside ``guidance_loss``.

    Attributes:
        engine: the :class:`~guidewrap.engine.GuidanceEngine` (plan, counters), built at ``fit``.

    Examples:
        >>> from torch import nn
        >>> guidance = GuidanceCallback(nn.Linear(3, 4), until_step=500, target="model")
        >>> guidance.engine is None, guidance.hook_count
        (True, 0)
        >>> GuidanceCallback(nn.Linear(3, 4), wieght=2.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        guidewrap.errors.ConfigError: unknown guidance setting 'wieght'. Did you mean 'weight'? Settings: ...
    """

    def __init__(
        self, guide: nn.Module, config: GuidanceConfig | None = None, *, target: str | None = None, **settings: Any
    ) -> None:
        self.guide = guide
        # The term goes into training_step's returned loss, never into a model's output loss.
        self.config = dataclasses.replace(GuidanceConfig.build(config, **settings), add_to_output_loss=False)
        self.target = target
        self.engine: GuidanceEngine | None = None
        self._root_hooks = HookSet()
        self._module: Any = None  # the LightningModule whose training_step is wrapped
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, restored before the engine exists
        self._guided = False  # the latest forward was guided: its term is added once, to the step's loss

    @property
    def state_key(self) -> str:
        return "guidewrap.GuidanceCallback"  # one guidance per Trainer; stable across versions

    @property
    def hook_count(self) -> int:
        """Hooks currently attached to the target, and the wrapped ``training_step`` (0 outside ``fit``)."""
        engine = 0 if self.engine is None else self.engine.hook_count
        return len(self._root_hooks) + engine + int(self._module is not None)

    # ------------------------------------------------------------------ set-up and removal

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "GuidanceCallback adds the term to the loss training_step returns, which manual optimization "
                "does not use; under manual optimization wrap the network yourself: self.model = "
                "GuidedModel(net, guide, ...) and backward guided.total_loss(task_loss)"
            )
        if self.engine is None:
            self.engine = GuidanceEngine(self._resolve_target(pl_module), self.guide, self.config)
            self.engine.steps.has_source = True  # trainer.global_step drives it
            if self._pending is not None:
                self.engine.load_state_dict(self._pending)
                self._pending = None
        self._wrap_training_step(pl_module)

    def _resolve_target(self, pl_module: nn.Module) -> nn.Module:
        if self.target is None:
            return pl_module
        modules = dict(pl_module.named_modules())
        if self.target not in modules:
            close = difflib.get_close_matches(self.target, [name for name in modules if name], n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise LayerNotFoundError(
                f"GuidanceCallback(target={self.target!r}): {type(pl_module).__name__} has no such submodule.{hint} "
                f"Its children: {[name for name, _ in pl_module.named_children()]}"
            )
        return modules[self.target]

    def _wrap_training_step(self, pl_module: Any) -> None:
        if self._module is not None:
            return
        training_step = pl_module.training_step

        @functools.wraps(training_step)
        def guided_training_step(*args: Any, **kwargs: Any) -> Any:
            if not self.engine.is_active():
                return training_step(*args, **kwargs)
            # The root hooks exist only inside training_step: under DDP, Lightning calls the module itself
            # to reach training_step (a forward that is not the network's), which must not open a step.
            self._root_hooks = attach_root(self.engine, on_end=self._keep_term)
            try:
                result = training_step(*args, **kwargs)
            finally:
                self._root_hooks.remove()
            return self._add_term(pl_module, result)

        pl_module.training_step = guided_training_step
        self._module = pl_module

    def _detach(self) -> None:
        self._root_hooks.remove()
        if self.engine is not None:
            self.engine.release()
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)  # the class's own method again
            self._module = None
        self._guided = False

    def _keep_term(self, _output: Any) -> None:
        self._guided = self.engine.has_term

    # ------------------------------------------------------------------ the loss

    def _add_term(self, pl_module: Any, result: Any) -> Any:
        guided, self._guided = self._guided, False
        if result is None:  # Lightning's "skip this batch": nothing to add the term to
            return None
        if not guided:  # inside the window, so the guided network did not run
            raise ConfigError(_NOT_RUN.format(type(self.engine.target).__name__, self.target))
        loss = result.get("loss") if isinstance(result, dict) else result
        if not isinstance(loss, Tensor):
            raise ConfigError(
                "GuidanceCallback needs training_step to return the task loss (a tensor, or a dict with 'loss'); "
                f"it returned {type(result).__name__}"
            )
        total = self.engine.total_for(loss).to(loss.dtype)
        pl_module.log_dict(self.engine.guidance_metrics(), on_step=True, on_epoch=False)
        return {**result, "loss": total} if isinstance(result, dict) else total

    # ------------------------------------------------------------------ fit events

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.engine.set_step(trainer.global_step)  # a resumed fit continues the window
        for optimizer in trainer.optimizers:  # a tensor cap clears the state of the tensors it caps
            self.engine.steps.remember_optimizer(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.engine.set_step(trainer.global_step)  # after the window the layer taps are dropped

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._detach()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The guidance state a checkpoint keeps: step, counters, strength, the plan's record."""
        if self.engine is None:
            return dict(self._pending or {})
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed ``fit``); a different plan warns, naming what changed."""
        if not state_dict:
            return
        if self.engine is None:
            self._pending = dict(state_dict)
        else:
            self.engine.load_state_dict(state_dict)


_NOT_RUN = (
    "GuidanceCallback: the guided network ({}, target={!r}) did not run in training_step; if training_step "
    "calls a submodule (self.model(x)), pass target='model' (the attribute's name)"
)
