"""Guidance for an existing Hugging Face ``Trainer`` in one line: :func:`guide_trainer`.

The Trainer keeps training the bare target (so ``save_model``, ``remove_unused_columns``, label
detection and ``from_pretrained`` reloading see exactly the model they would without guidance);
guidance attaches hooks to it for the duration of each ``train()`` call. The alignment term
is added in ``compute_loss`` with the Trainer's own gradient-accumulation normalisation, the
window counts ``state.global_step`` (optimizer steps, also when resuming from a checkpoint,
whose ``trainer_state.json`` carries it), and the mean alignment values since the last log go
into the Trainer's logs, so every reporter (console, TensorBoard, W&B) receives them.

Examples:
    >>> import torch
    >>> from transformers import Trainer, TrainingArguments
    >>> from guidewrap.integrations.transformers import guide_trainer
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ...     def forward(self, x, labels=None):
    ...         logits = self.body(x)
    ...         return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}
    >>> data = [{"x": torch.randn(4), "labels": i % 2} for i in range(32)]
    >>> args = TrainingArguments("/tmp/gw-doc", max_steps=2, per_device_train_batch_size=16,
    ...                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=Net(), args=args, train_dataset=data)
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> callback = guide_trainer(trainer, guide)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> callback.engine.step_count, callback.hook_count
    (2, 0)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from torch import nn

from ..config import GuidanceConfig
from ..engine import GuidanceEngine
from ..errors import ConfigError
from ..hooks import HookSet, attach_root
from ..model import GuidedModel
from ..utils import is_transformers_available, unwrap_model

if not is_transformers_available():  # pragma: no cover - exercised only without the extra
    raise ImportError("guidewrap.integrations.transformers needs transformers: pip install 'guidewrap[hf]'")

from transformers import TrainerCallback

__all__ = ["GuidanceCallback", "guide_trainer"]

# Where checkpoints (trainer_state.json) record the guidance plan.
PLAN_KEY = "guidewrap_plan"
STRENGTH_KEY = "guidewrap_strength"


class GuidanceCallback(TrainerCallback):
    """Trainer callback that runs guidance on the Trainer's model; create it with :func:`guide_trainer`.

    Attributes:
        engine: the :class:`~guidewrap.engine.GuidanceEngine` (plan, counters, ``last_alignment``).

    Examples:
        >>> import torch
        >>> from transformers import Trainer, TrainingArguments
        >>> net = torch.nn.Linear(3, 3)
        >>> args = TrainingArguments("/tmp/gw-doc", report_to=[], use_cpu=True)
        >>> callback = guide_trainer(Trainer(model=net, args=args), torch.nn.Linear(3, 4), exclude_output_layer=False)
        >>> isinstance(callback, GuidanceCallback), callback.hook_count
        (True, 0)
    """

    def __init__(self, trainer: Any, guide: nn.Module, config: GuidanceConfig) -> None:
        self.trainer = trainer
        self.guide = guide
        # The term goes in through compute_loss (which knows the Trainer's normalisation),
        # never twice through the model's output loss.
        self.config = dataclasses.replace(config, add_to_output_loss=False)
        self.engine = self._engine_for(trainer.model, self.config)
        self.enabled = True  # a hyperparameter-search trial may train unguided (guidance_enabled=False)
        self._trial_settings: dict[str, Any] = {}
        self._root_hooks = HookSet()
        self._sums: dict[str, float] = {}
        self._count = 0
        self._guided = False  # the latest forward was guided: its term is added once, in compute_loss

    def _engine_for(self, model: Any, config: GuidanceConfig) -> GuidanceEngine:
        engine = GuidanceEngine(model, self.guide, config)
        engine.steps.has_source = True  # the Trainer's global_step drives it (on_step_end)
        return engine

    def _follow_the_run(self, state: Any) -> None:
        """A hyperparameter search re-creates the model every trial (``model_init``) and may set guidance
        settings: trial parameters named ``guidance_<setting>`` (``guidance_weight``, ``guidance_tensor_cap``,
        ...) override the settings for that trial, and ``guidance_enabled=False`` trains it unguided."""
        params = getattr(state, "trial_params", None) or {}
        settings = {key[len("guidance_") :]: value for key, value in params.items() if key.startswith("guidance_")}
        self.enabled = bool(settings.pop("enabled", True))
        model = unwrap_model(self.trainer.model)
        if model is not self.engine.target or settings != self._trial_settings:
            self.engine.close()
            self.engine = self._engine_for(model, GuidanceConfig.build(self.config, **settings))
            self._trial_settings = settings

    # ------------------------------------------------------------------ hooks on the bare model

    @property
    def hook_count(self) -> int:
        """Hooks currently attached (0 outside ``train()``)."""
        return len(self._root_hooks) + self.engine.hook_count

    def attach(self) -> None:
        """Attach the root hooks (done by ``train()``; idempotent)."""
        if not len(self._root_hooks):
            self._root_hooks = attach_root(self.engine, on_end=self._keep_term)

    def detach(self) -> None:
        """Remove every hook on the target (done when ``train()`` returns or raises; idempotent)."""
        self._root_hooks.remove()
        self.engine.release()
        self._guided = False

    def _keep_term(self, _output: Any) -> None:
        self._guided = self.engine.has_term  # weighed in compute_loss, against the task loss

    # ------------------------------------------------------------------ loss

    def _ga_scale(self, num_items_in_batch: Any) -> float:
        """Mirror Trainer.training_step: when the task loss is already normalised over the whole
        accumulated batch, the Trainer does not divide by the accumulation steps, so we do."""
        trainer = self.trainer
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(trainer, "compute_loss_func", None) is not None
            )
        steps = (
            getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
        )
        return 1.0 / steps if scaled else 1.0

    def wrap_compute_loss(self, compute_loss: Any) -> Any:
        """Return ``compute_loss`` with the weighted alignment term of its forward added."""

        @functools.wraps(compute_loss)
        def guided_compute_loss(
            model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None, **kwargs: Any
        ) -> Any:
            result = compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
            guided, self._guided = self._guided, False
            if not guided:  # evaluation, or outside the window
                return result
            loss = result[0] if return_outputs else result
            scale = self._ga_scale(num_items_in_batch)
            # The pull is measured against the task loss as the backward sees it beside the scaled term.
            total = self.engine.total_for(loss / scale) * scale
            self._accumulate()  # guidance_task_loss: the task loss unscaled, as the engine weighed it
            loss = total.to(loss.dtype)
            return (loss, result[1]) if return_outputs else loss

        return guided_compute_loss

    def _accumulate(self) -> None:
        for key, value in self.engine.guidance_metrics().items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._follow_the_run(state)
        self._sums, self._count = {}, 0
        self.engine.set_step(state.global_step)  # resumed runs continue the window
        optimizer = kwargs.get("optimizer") or getattr(self.trainer, "optimizer", None)
        if optimizer is not None:  # a tensor cap clears the state of the tensors it caps
            self.engine.steps.remember_optimizer(optimizer)
        records = getattr(state, "stateful_callbacks", None)
        record = records.pop(PLAN_KEY, None) if isinstance(records, dict) else None
        if isinstance(record, dict):  # a resumed checkpoint's plan: a different plan warns, and this
            self.engine.planner.expect(record)  # run's checkpoints record this run's plan
        strength = records.get(STRENGTH_KEY) if isinstance(records, dict) else None
        if isinstance(strength, dict):  # the strength controller continues where the checkpoint left it
            self.engine.strength.load_state_dict(strength)
        if self.enabled and not self.engine.steps.schedule.is_finished(state.global_step):
            self.attach()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.engine.set_step(state.global_step)
        records = getattr(state, "stateful_callbacks", None)
        if isinstance(records, dict) and self.engine.strength.measured:
            records[STRENGTH_KEY] = self.engine.strength.state_dict()  # written with every checkpoint
        if self.engine.planner.plan is not None and isinstance(records, dict) and PLAN_KEY not in records:
            # trainer_state.json of every checkpoint records the plan (written after this event); once
            records[PLAN_KEY] = self.engine.plan_record()
        if self.engine.steps.schedule.is_finished(state.global_step):
            self.detach()  # after the window no hook costs time

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self._count:
            return  # evaluation logs, or nothing guided since the last log
        means = {key: value / self._count for key, value in self._sums.items()}
        means["guidance_skipped_pairs"] = float(self.engine.counters["skipped_pairs"])
        logs.update(means)  # reporters after us (TensorBoard, W&B, console) see these
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)
        self._sums, self._count = {}, 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()


def guide_trainer(
    trainer: Any, guide: nn.Module, config: GuidanceConfig | None = None, **settings: Any
) -> GuidanceCallback:
    """Add guidance by ``guide`` to an existing ``transformers.Trainer`` (one line).

    Takes the settings of :class:`~guidewrap.GuidanceConfig` (``layers``, ``metric``, ``weight``,
    ``until_step``, ...). Steps are the Trainer's optimizer steps (``state.global_step``), so the
    window is right under ``gradient_accumulation_steps`` and after ``resume_from_checkpoint``.
    Evaluation never runs the guide. Hooks exist only while ``train()`` runs and are removed
    when it returns or raises.

    Returns:
        The :class:`GuidanceCallback`, inserted first among the Trainer's callbacks so the
        reporting callbacks see the alignment values it adds to the logs.

    Examples:
        >>> import torch
        >>> from transformers import Trainer, TrainingArguments
        >>> args = TrainingArguments("/tmp/gw-doc", report_to=[], use_cpu=True)
        >>> trainer = Trainer(model=torch.nn.Linear(3, 3), args=args)
        >>> callback = guide_trainer(trainer, torch.nn.Linear(3, 5), until_step=100, exclude_output_layer=False)
        >>> trainer.callback_handler.callbacks[0] is callback
        True
    """
    model = unwrap_model(trainer.model)
    if isinstance(model, GuidedModel):
        raise ConfigError(
            "guide_trainer() needs the Trainer to hold the bare target, not a GuidedModel: the Trainer inspects "
            "the model's class for labels and saving. Build Trainer(model=target, ...) and call "
            "guide_trainer(trainer, guide, ...)"
        )
    if any(isinstance(cb, GuidanceCallback) for cb in trainer.callback_handler.callbacks):
        raise ConfigError("this Trainer already has guidance; call guide_trainer() once per Trainer")
    callback = GuidanceCallback(trainer, guide, GuidanceConfig.build(config, **settings))
    trainer.callback_handler.callbacks.insert(0, callback)
    trainer.compute_loss = callback.wrap_compute_loss(trainer.compute_loss)
    train = trainer.train

    @functools.wraps(train)
    def guided_train(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        finally:
            callback.detach()  # also when training raises: no hook is left behind

    trainer.train = guided_train
    return callback
