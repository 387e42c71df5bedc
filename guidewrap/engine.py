"""The guidance engine shared by :class:`~guidewrap.GuidedModel`, :class:`~guidewrap.Guidance` and
the Trainer callback: the life of one guided step, delegating the rest.

One guided step, in order: :meth:`GuidanceEngine.begin` routes the inputs and, on the first step,
has the :class:`~guidewrap.planner.Planner` resolve the layer plan; it runs the frozen guide once
keeping only the metric's reduced form of each planned layer
(:func:`~guidewrap.alignment.reduce_guide`), and opens a :class:`GuidedStep`; the target then runs
normally while taps on its planned layers record their outputs into that step;
:meth:`GuidanceEngine.end` turns the step into the weighted term
(:func:`~guidewrap.alignment.alignment_term`), hands its per-pair values to the
:class:`~guidewrap.readout.Readout`, adds the term to ``output.loss`` when there is one, and drops
the step. The :class:`~guidewrap.stepping.StepCounter` decides whether a step is inside the window;
outside it the guide is not run and, once the window is over, the taps are removed.

Examples:
    >>> import torch
    >>> from guidewrap.config import GuidanceConfig
    >>> target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    >>> engine = GuidanceEngine(target, guide, GuidanceConfig())
    >>> x = torch.randn(16, 4)
    >>> engine.begin((x,), {})
    True
    >>> out = engine.end(target(x), {})
    >>> sorted(engine.last_alignment)
    ['0<-0']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .alignment import FeatureShaper, FeatureSubsets, SinkSlot, alignment_term, reduce_guide
from .config import GuidanceConfig
from .errors import ConfigError, GuidewrapWarning, PlanError
from .hooks import HookSet, watch_double_count
from .inputs import check_not_packed, distinct_samples, float_dtype, noise_call
from .matching import LayerPlan
from .networks import freeze_guide, separate_networks
from .outputs import add_to_loss, output_loss, set_loss
from .planner import Planner
from .readout import Readout
from .step import GuidedStep, report_no_grad
from .stepping import StepCounter
from .strength import StrengthController

__all__ = ["GuidanceEngine"]

_NEEDS_TASK_LOSS = (
    "{} sets the term's weight from the task loss's gradient, so the term needs the task loss: "
    "loss = guided.total_loss(task_loss) (or use outputs.loss of a model given labels, or guide_trainer); "
    "alignment_loss alone cannot be weighted"
)


class GuidanceEngine:
    """One target/guide pair: the guided step's life, with planning, read-out and step counting
    delegated to a :class:`~guidewrap.planner.Planner`, a :class:`~guidewrap.readout.Readout` and a
    :class:`~guidewrap.stepping.StepCounter`.

    Users reach it through :class:`~guidewrap.GuidedModel` or :class:`~guidewrap.Guidance`
    (their ``.engine``); integrations drive it directly.

    Examples:
        >>> import torch
        >>> from guidewrap.config import GuidanceConfig
        >>> t, g = torch.nn.Linear(3, 3), torch.nn.Linear(3, 5)
        >>> engine = GuidanceEngine(t, g, GuidanceConfig(exclude_output_layer=False, until_step=1))
        >>> engine.step(); engine.step_count
        1
    """

    def __init__(self, target: nn.Module, guide: nn.Module, config: GuidanceConfig, optimizer: Any = None) -> None:
        self.target, self.guide = separate_networks(target, guide)
        self.config = config
        self.metric = config.metric
        freeze_guide(self.guide, config.strict_guide)
        self.planner = Planner(self.target, self.guide, config)
        self.steps = StepCounter(config.schedule())
        self.readout = Readout(self.metric.name)
        self._shape = FeatureShaper(FeatureSubsets(config.max_features))
        self._taps = HookSet()  # on the planned layers of target and guide, while the window lasts
        self._guide_slot = SinkSlot()
        self._step: GuidedStep | None = None
        self.busy = False  # set while the engine itself runs the target (probe, noise pass)
        self.strength = StrengthController(
            config.strength, config.strength_every, config.tensor_cap, config.tensor_cap_after
        )
        self.term_in_output = False  # the last forward's output loss holds the term
        self.double_count = _DoubleCountWatch(checks=3)
        self._warned_no_grad = False
        self._batches = _BatchChecks(config.distributed)  # what the first guided batches must show
        self.closed = False
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    def __getstate__(self) -> dict[str, Any]:
        # A snapshot (deepcopy, pickling) keeps settings, plan and counters, never a step in flight or
        # hooks: the copy taps at its first guided step (the step counter drops its optimizer hooks).
        return dict(self.__dict__) | {"_taps": HookSet(), "_guide_slot": SinkSlot(), "busy": False, "_step": None}

    # ------------------------------------------------------------------ steps and state

    def attach_optimizer(self, optimizer: Any) -> None:
        """Count guidance steps from ``optimizer.step()`` calls (a wrapper's skipped steps do not count)."""
        self.steps.attach_optimizer(optimizer, self.step)

    def step(self) -> None:
        """Advance the optimizer-step counter that drives the window and the decay."""
        self.steps.advance()
        if self.steps.is_finished():
            self._taps.remove()

    def set_step(self, step: int) -> None:
        """Set the counter, e.g. when resuming (taps of a finished window are dropped)."""
        self.steps.set(step)
        if self.steps.is_finished():
            self._taps.remove()

    @property
    def step_count(self) -> int:
        """Optimizer steps so far (drives the window and the decay)."""
        return self.steps.count

    def state_dict(self) -> dict[str, Any]:
        """Resumable state: step counter, counters, the strength controller and the plan's record."""
        state = {"step": self.step_count, "counters": dict(self.counters), "strength": self.strength.state_dict()}
        return state | ({"plan": self.plan_record()} if self.planner.plan is not None else {})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a recorded plan is compared with this run's
        (now, or when it is resolved) and a difference warns, naming what changed."""
        self.set_step(int(state["step"]))
        self.readout.restore_counters(state.get("counters", {}))
        if state.get("strength") is not None:
            self.strength.load_state_dict(state["strength"])
        if state.get("plan") is not None:
            self.planner.expect(state["plan"])

    @property
    def counters(self) -> dict[str, int]:
        """Guided forwards, guide forwards and skipped pairs so far (a snapshot)."""
        return self.readout.counters

    def plan_record(self) -> dict[str, Any]:
        """What a checkpoint records of the plan (see :meth:`~guidewrap.planner.Planner.record`)."""
        return self.planner.record(self.metric.name)

    @property
    def weight(self) -> float:
        """The weight in force (0 outside the window): the schedule's, times the strength's scale."""
        return self.strength.scale * self.steps.weight

    @property
    def alignment_loss(self) -> Tensor:
        """Weighted alignment term of the last forward (0 when guidance was off)."""
        loss = self.strength.loss
        if loss is None and self.strength.term is not None:
            raise ConfigError(_NEEDS_TASK_LOSS.format(self.strength.described()))
        return loss if loss is not None else torch.zeros(())

    @property
    def has_term(self) -> bool:
        """Whether the last forward was guided (its alignment term is available)."""
        return self.strength.term is not None

    @property
    def hook_count(self) -> int:
        """Hooks this engine holds on the target's layers and on optimizers."""
        return len(self._taps) + len(self.steps.hooks)

    @property
    def last_alignment(self) -> dict[str, float]:
        """Per-pair alignment (1 - distance) of the last guided forward, by pair key."""
        return self.readout.last_alignment

    def guidance_metrics(self) -> dict[str, float]:
        """Values to log: loss, weight, skipped pairs and per-pair alignment of the last forward, and
        the task loss it was weighed against when one was given (``guidance_task_loss``)."""
        loss = float(self.strength.loss.detach()) if self.strength.loss is not None else 0.0
        task = self.strength.task_loss
        values = self.readout.values(loss, self.weight, self.strength.pull, None if task is None else float(task))
        return values | self.strength.tensors.values()

    def metrics(self) -> dict[str, float]:
        """Deprecated name of :meth:`guidance_metrics`."""
        warnings.warn("engine.metrics() is now engine.guidance_metrics()", DeprecationWarning, stacklevel=2)
        return self.guidance_metrics()

    # ------------------------------------------------------------------ one guided step

    def is_active(self) -> bool:
        """Whether the next forward is guided: training mode, inside the window, with gradients (a
        forward without them, ``generate()`` in a sampling loop or one under ``torch.inference_mode()``,
        trains nothing and needs no term: the guide does not run)."""
        return not self.closed and self.target.training and torch.is_grad_enabled() and self.steps.is_active()

    def begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        """Open a step before the target's forward (runs the guide); returns whether it is guided."""
        if self.busy:
            return False
        self.abort()
        if not self.is_active():
            # Under torch.compile, step() (eager, at the optimizer step) has removed them already.
            if not torch.compiler.is_compiling() and self.steps.is_finished():
                self._taps.remove()
            return False
        if self.config.guide_inputs == "noise":
            self._step = GuidedStep(None, tuple(args), dict(kwargs), noise=True)
            return True
        self._step = self._open_step(tuple(args), dict(kwargs))
        self._step.capturing = True
        return True

    def end(self, output: Any, kwargs: Mapping[str, Any]) -> Any:
        """Close the step after the target's forward; adds the term to ``output.loss`` if present."""
        if self.busy:
            return output
        step, self._step = self._step, None
        if step is None:
            return output
        step.capturing = False
        weight = self.steps.step_weight if torch.compiler.is_compiling() else self.steps.weight
        if step.noise:
            term = self.aligned_forward(*noise_call(self.target, self.guide, step.args, step.kwargs), weight)
        else:
            term = self._finish(step, weight)
            self.readout.count("guided_forwards")
            if not torch.compiler.is_compiling():
                self.steps.check_window_can_end(self.readout.guided_forwards)
        self.strength.hold(term, weight)
        self.term_in_output = False
        return _into_output_loss(self, output) if self.config.add_to_output_loss else output

    def total_for(self, task_loss: Tensor) -> Tensor:
        """``task_loss`` plus the last guided forward's term in force against it (its pull measured when
        due, capped tensor by tensor with ``tensor_cap``); ``task_loss`` itself if unguided."""
        return self.strength.total(task_loss, self._trainable, self.target, self.steps.optimizers)

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.target.parameters() if p.requires_grad]

    def term_for(self, task_loss: Tensor | None) -> Tensor | None:
        """The last guided forward's term in force against ``task_loss`` (its pull measured when due:
        the strength controller's weight, or the fixed weight's one-time check); None if unguided."""
        return self.strength.in_force(task_loss, self._trainable)

    def abort(self) -> None:
        """Forget the open step (a forward that raised, or a new one starting)."""
        self._step = None
        self.strength.hold(None)

    def _open_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GuidedStep:
        self._batches.check_packing(kwargs, self.readout.guided_forwards)
        routed = self.planner.route(args, kwargs)
        self._shape.target_dtype = float_dtype(self.target)
        self._batches.check(args, kwargs, routed, self.readout.guided_forwards)
        if self.planner.plan is None:
            routed = self._resolve(args, kwargs, routed)
        plan = self.plan()
        self._install_taps(plan)
        if not torch.compiler.is_compiling():
            self._taps.keep_last()  # a user's hook added later may replace an output: measure what the net uses
            self.planner.warn_if_unfrozen()
        step = GuidedStep(routed, copy=self.planner.copied)
        gather = distributed.gatherer(self.config.distributed, self._batches.left_padded)
        step.prepared = reduce_guide(self.guide, plan, self.metric, routed, self._shape, self._guide_slot, gather)
        self.readout.count("guide_forwards")
        return step

    def _finish(self, step: GuidedStep, weight: float | Tensor) -> Tensor:
        plan = self.plan()
        if step.routed is None:
            raise PlanError("a guided step ended before its inputs were routed")
        self.planner.copy_from_now_on(step.modified_in_place())
        if step.no_grad:
            self._warned_no_grad = report_no_grad(step.no_grad, self._warned_no_grad)
        if self.config.reduction == "mean":
            weight = weight / len(plan)
        term = alignment_term(
            plan, self.metric, step.captured, step.prepared, step.routed, weight, self._shape, step.routed.n,
            distributed.gatherer(self.config.distributed, self._batches.left_padded),
        )  # fmt: skip
        self.readout.add(plan, term.readout, term.missing)
        return term.loss

    def _install_taps(self, plan: LayerPlan) -> None:
        if len(self._taps):
            return
        modules = dict(self.target.named_modules())
        self._taps.tap({name: modules[name] for name in dict.fromkeys(p.target.name for p in plan)}, self._capture)
        guide_modules = dict(self.guide.named_modules())
        self._taps.tap(
            {name: guide_modules[name] for name in dict.fromkeys(p.guide.name for p in plan)}, self._guide_slot
        )

    def _capture(self, name: str, output: Any) -> None:
        if self._step is not None:
            self._step.capture(name, output)

    # ------------------------------------------------------------------ plan, engine-driven forwards

    def plan(self, args: tuple[Any, ...] | None = None, kwargs: Mapping[str, Any] | None = None) -> LayerPlan:
        """The layer plan; resolved from an example input if one is given."""
        if args or kwargs:
            args, kwargs = tuple(args or ()), dict(kwargs or {})
            self._resolve(args, kwargs, self.planner.route(args, kwargs))
        return self.planner.resolved()

    def _resolve(self, args: tuple[Any, ...], kwargs: dict[str, Any], routed: Any) -> Any:
        """Resolve the plan (the probe runs the target: its root hooks must not open a step); taps of
        an earlier plan go."""
        self.busy = True
        try:
            routed = self.planner.resolve(args, kwargs, routed)
        finally:
            self.busy = False
        self._taps.remove()
        return routed

    def aligned_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], weight: float) -> Tensor:
        """Guide + captured target forward on given inputs; returns the weighted term."""
        self.abort()
        step = self._step = self._open_step(args, kwargs)
        self.busy = True
        step.capturing = True
        try:
            self.target(*args, **kwargs)
        finally:
            step.capturing = False
            self.busy = False
            self._step = None
        loss = self._finish(step, weight)
        if not self.steps.is_active():
            self._taps.remove()  # no hook may stay outside the window
        return loss

    def release(self) -> None:
        """Drop the open step and the taps on the target (they come back with the next guided step)."""
        self.abort()
        self._taps.remove()

    def close(self) -> None:
        """Remove every hook this engine holds."""
        self._taps.remove()
        self.steps.hooks.remove()
        self.abort()
        self.closed = True


def _into_output_loss(engine: GuidanceEngine, output: Any) -> Any:
    """``output`` with the term in force added to the loss it carries (weighed against that loss, capped
    per tensor with ``tensor_cap``); unchanged when it carries none or the term needs a task loss."""
    task = output_loss(output)
    if isinstance(task, Tensor):
        loss = engine.term_for(task)
        output, with_term = set_loss(output, engine.total_for(task))
    elif not engine.strength.needs_task_loss:  # else: weighed by total_for(task) later
        loss = engine.term_for(None)
        output, with_term = add_to_loss(output, loss)
    else:
        return output
    engine.term_in_output = with_term is not None
    if with_term is not None:
        engine.double_count.watch(with_term, loss)
    return output


class _DoubleCountWatch:
    """Watches the first few output losses that carry the term for the term being added a second time
    (``hooks.watch_double_count``): a diagnostic, so the first steps show the pattern and later ones cost
    nothing."""

    def __init__(self, checks: int) -> None:
        self.remaining = checks

    def watch(self, loss_with_term: Tensor, term: Tensor | None) -> None:
        if self.remaining and term is not None and term.requires_grad and not torch.compiler.is_compiling():
            self.remaining -= 1
            watch_double_count(loss_with_term, term)


class _BatchChecks:
    """The checks the first guided batches get: not packed, more than 2 distinct samples, and (read once,
    needed with several processes) whether the collator pads on the left."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.warned_few = False
        self.left_padded: bool | None = None  # read from the first guided step's mask (None: not yet)

    def check_packing(self, kwargs: Mapping[str, Any], guided_forwards: int) -> None:
        if guided_forwards == 0 and not torch.compiler.is_compiling():
            check_not_packed(kwargs)  # a collator packs every batch or none: the first one tells

    def check(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], routed: Any, guided_forwards: int) -> None:
        world = distributed.world_size(self.mode)
        if guided_forwards < 3 and not self.warned_few and not torch.compiler.is_compiling():
            self.warned_few = _warn_if_few_distinct(args, kwargs, routed.n, routed.axes[0], world)
        if self.left_padded is None and routed.mask is not None and routed.mask.dim() == 2:
            # The collator's padding side does not change: one host read, needed with several processes.
            self.left_padded = world > 1 and bool(((routed.mask[:, 0] == 0) & (routed.mask[:, -1] != 0)).any())


def _warn_if_few_distinct(args: tuple[Any, ...], kwargs: Mapping[str, Any], n: int, axis: int, world: int) -> bool:
    """Warn (and say so) when the batch holds 2 or fewer distinct samples: CKA is then 1 for any layers."""
    distinct = n * world if world > 1 else distinct_samples(args, kwargs, axis)
    if distinct > 2:
        return False
    warnings.warn(
        f"guided step on a batch of {n * world} samples of which {distinct} differ: centred features of "
        f"{distinct} distinct samples have rank {max(distinct - 1, 0)}, so CKA is 1 for any layers and the "
        "alignment term is 0 (nothing is guided); use batches of 8 or more distinct samples",
        GuidewrapWarning,
        stacklevel=6,
    )
    return True
