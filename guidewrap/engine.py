"""The guidance engine shared by :class:`~guidewrap.GuidedModel`, :class:`~guidewrap.Guidance` and
the Trainer callback.

One guided step, in order: :meth:`GuidanceEngine.begin` routes the inputs
(:func:`~guidewrap.inputs.route`), resolves the layer plan on the first step, runs the frozen guide
once keeping only the metric's reduced form of each planned layer
(:func:`~guidewrap.alignment.reduce_guide`), and opens a :class:`GuidedStep`; the target then runs
normally while taps on its planned layers record their outputs into that step;
:meth:`GuidanceEngine.end` turns the step into the weighted term
(:func:`~guidewrap.alignment.alignment_term`), adds it to ``output.loss`` when there is one, and
drops the step. Outside the window the guide is not run and, once the window is over, the
target's taps are removed.

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

import functools
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .alignment import FeatureSubsets, Gatherer, SinkSlot, alignment_term, reduce_guide
from .config import GuidanceConfig
from .errors import (
    ConfigError,
    GuideRequiresGradError,
    GuidewrapWarning,
    MetricError,
    PlanError,
    SkippedPairWarning,
)
from .hooks import HookSet, watch_double_count
from .inputs import Routed, call_guide, distinct_samples, first_tensor, float_dtype, noise_call, route
from .layers import (
    DEFAULT_LAYER_TYPES,
    PAPER_LAYER_TYPES,
    LayerPlan,
    block_names,
    build_plan,
    check_names,
    layout_conflicts,
    level_of,
    probe,
)
from .outputs import add_to_loss
from .step import GuidedStep
from .utils import unwrap_model

__all__ = ["GuidanceEngine"]


class GuidanceEngine:
    """Plan, guide forward, alignment term and step counting for one target/guide pair.

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
        for role, model in (("target", target), ("guide", guide)):
            if not isinstance(model, nn.Module):
                raise ConfigError(f"the {role} must be a torch.nn.Module, got {type(model).__name__}")
        self.target = unwrap_model(target)
        self.guide = unwrap_model(guide)
        if self.target is self.guide:
            raise ConfigError("the guide must be a separate network from the target (pass a copy to self-guide)")
        _refuse_shared_modules(self.target, self.guide)
        self.config = config
        self.metric = config.metric
        self.schedule = config.schedule()
        self.layer_types = tuple(config.layer_types) if config.layer_types is not None else DEFAULT_LAYER_TYPES
        if config.layers == "paper":
            self.layer_types = PAPER_LAYER_TYPES
        self._freeze_guide()
        self._names = check_names(config.layers, self.target, self.guide)
        self._subsets = FeatureSubsets(config.max_features)
        # The batch axis of the target's and the guide's first input (None: found per step from the
        # batch size); evidence from declared layouts may change them at planning (_resolve_plan).
        self._input_axes: list[int | None] = [config.input_batch_dim or 0, config.guide_input_batch_dim]
        self._target_float: torch.dtype | None = None  # the target's precision, read at each step
        self.step_count = 0
        # The schedule at the current step, for a step traced by torch.compile: a flag that flips at
        # the window's edges and the weight as a tensor, so no guard on the counter (a Python int that
        # changes every step) recompiles every step. Updated where the counter changes.
        self._in_window = self.schedule.is_active(0)
        self._step_weight = torch.tensor(self.schedule.weight_at(0))
        self.on_step: Callable[[int], None] | None = None
        self._plan: LayerPlan | None = None
        self._copied: frozenset[str] = frozenset()  # target layers whose output is changed in place later
        self._resumed_plan: dict[str, Any] | None = None  # a checkpoint's plan record, checked at planning
        self._taps = HookSet()  # on the planned layers of target and guide, while the window lasts
        self._guide_slot = SinkSlot()
        self._optimizer_hooks = HookSet()
        self._step: GuidedStep | None = None
        self.busy = False  # set while the engine itself runs the target (probe, noise pass)
        self._loss: Tensor | None = None
        self._last_alignment: dict[str, float] = {}
        self._unread: _Unread | None = None  # values of guided steps not yet read on the host
        self._counts = {"guided_forwards": 0, "guide_forwards": 0, "skipped_pairs": 0}
        # Forwards counted while torch.compile traces a step: a tensor updated in the graph (a Python
        # int changing every step would be a guard, and a recompile, every step).
        self._traced_counts = torch.zeros(2, dtype=torch.long)
        self._double_count_checks = 3
        # Something advances step_count (an attached optimizer, step() calls, the Trainer's callback);
        # without it a finite window never ends, which end() says once.
        self.has_step_source = False
        self._warned_tiny_batch = False
        self._left_padded = False  # read from the first guided step's mask under data parallelism
        self._padding_checked = False
        self.closed = False
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    def __getstate__(self) -> dict[str, Any]:
        # A snapshot (deepcopy of a GuidedModel, pickling) keeps the settings, the plan and the
        # counters, never a step in flight (non-leaf tensors) or hooks: the copy installs its own
        # taps at its first guided step, and is not attached to the original's optimizer.
        state = dict(self.__dict__)
        state.update(_step=None, _loss=None, _unread=None, _taps=HookSet(), _optimizer_hooks=HookSet())
        state.update(_guide_slot=SinkSlot())
        state.update(on_step=None, busy=False)
        return state

    def _freeze_guide(self) -> None:
        lazy = [name for name, p in self.guide.named_parameters() if nn.parameter.is_lazy(p)]
        if lazy:
            raise ConfigError(
                f"the guide has uninitialised lazy parameters (e.g. {lazy[0]!r}, of a Lazy* module): their shapes "
                "are set by its first forward, and a frozen guide never trains one. Run the guide once on an example "
                "batch (guide(example)) before passing it"
            )
        trainable = [name for name, p in self.guide.named_parameters() if p.requires_grad]
        if trainable and self.config.strict_guide:
            raise GuideRequiresGradError(
                f"the guide has {len(trainable)} parameters that require gradients (e.g. {trainable[0]!r}) and "
                "strict_guide=True; call guide.requires_grad_(False) first or drop strict_guide"
            )
        self.guide.requires_grad_(False)
        self.guide.eval()

    def attach_optimizer(self, optimizer: Any) -> None:
        """Count guidance steps from ``optimizer.step()`` calls (via its step post-hook).

        Wrappers such as Accelerate's ``AcceleratedOptimizer`` are unwrapped, so steps skipped
        during gradient accumulation are not counted.
        """
        opt = optimizer
        while not isinstance(opt, torch.optim.Optimizer):
            inner = getattr(opt, "optimizer", None)
            if inner is None or inner is opt:
                break
            opt = inner
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}"
            )
        self._optimizer_hooks.add(opt.register_step_post_hook(lambda *_: self.step()))
        self.has_step_source = True

    # ------------------------------------------------------------------ steps and state

    def step(self) -> None:
        """Advance the optimizer-step counter that drives the window and the decay."""
        self.has_step_source = True
        self.step_count += 1
        self._sync_schedule()
        if self.on_step is not None:
            self.on_step(self.step_count)
        if self.schedule.is_finished(self.step_count):
            self._taps.remove()

    def _sync_schedule(self) -> None:
        self._in_window = self.schedule.is_active(self.step_count)
        self._step_weight.fill_(self.schedule.weight_at(self.step_count))

    def set_step(self, step: int) -> None:
        """Set the counter, e.g. when resuming (taps of a finished window are dropped)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}")
        self.step_count = step
        self._sync_schedule()
        if self.schedule.is_finished(step):
            self._taps.remove()

    def state_dict(self) -> dict[str, Any]:
        """Resumable state: the step counter, counters and the plan's fingerprint (once resolved)."""
        state: dict[str, Any] = {"step": self.step_count, "counters": dict(self.counters)}
        if self._plan is not None:
            state["plan"] = self.plan_record()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a recorded plan is compared with this run's
        (now, or when it is resolved) and a difference warns, naming what changed."""
        self.set_step(int(state["step"]))
        counts = dict(state.get("counters", {}))
        self._traced_counts.zero_()
        self._counts.update({k: int(v) for k, v in counts.items() if k in self._counts})
        if state.get("plan") is not None:
            self.expect_plan(state["plan"])

    @property
    def counters(self) -> dict[str, int]:
        """Guided forwards, guide forwards and skipped pairs so far (a snapshot)."""
        traced = self._traced_counts.tolist()
        out = dict(self._counts)
        out["guided_forwards"] += traced[0]
        out["guide_forwards"] += traced[1]
        return out

    def _count(self, index: int, key: str) -> None:
        if torch.compiler.is_compiling():
            self._traced_counts[index] += 1
        else:
            self._counts[key] += 1

    @property
    def has_plan(self) -> bool:
        """Whether the layer plan is resolved (after the first guided forward or ``plan(example)``)."""
        return self._plan is not None

    def plan_record(self) -> dict[str, Any]:
        """What a checkpoint records of the plan: its pairs, the settings that shape the term, and
        a fingerprint of both (equal fingerprints: the same alignment term)."""
        if self._plan is None:
            raise PlanError("the plan is not resolved yet: call plan(example_input) or run a guided forward first")
        cfg = self.config
        settings = {
            "layers": cfg.layers if isinstance(cfg.layers, str) else repr(cfg.layers),
            "metric": self.metric.name,
            "weight": cfg.weight,
            "reduction": cfg.reduction,
            "sequence": cfg.sequence,
            "max_features": cfg.max_features,
        }
        pairs = [f"{p.key} ({p.mode})" for p in self._plan]
        digest = hashlib.sha256(json.dumps([pairs, settings], sort_keys=True).encode()).hexdigest()[:16]
        return {"fingerprint": digest, "pairs": pairs, "settings": settings}

    def expect_plan(self, record: Mapping[str, Any]) -> None:
        """Warn if this run's plan differs from ``record`` (a checkpoint's :meth:`plan_record`)."""
        self._resumed_plan = dict(record)
        if self._plan is not None:
            self._check_resumed_plan()

    def _check_resumed_plan(self) -> None:
        record, self._resumed_plan = self._resumed_plan, None
        if record is None:
            return
        now = self.plan_record()
        if record.get("fingerprint") == now["fingerprint"]:
            return
        changes = []
        before, after = record.get("settings", {}), now["settings"]
        changes += [f"{k} {before.get(k)!r} -> {after[k]!r}" for k in after if before.get(k) != after[k]]
        old_pairs, new_pairs = list(record.get("pairs", [])), now["pairs"]
        gone = [p for p in old_pairs if p not in new_pairs]
        added = [p for p in new_pairs if p not in old_pairs]
        if gone or added:
            changes.append(f"pairs {len(old_pairs)} -> {len(new_pairs)}")
            changes += [f"no longer aligned: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}"] if gone else []
            changes += [f"newly aligned: {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}"] if added else []
        warnings.warn(
            "resuming with a different guidance plan than the checkpoint's ("
            + ("; ".join(changes) or "fingerprint differs")
            + "): the alignment term changes meaning mid-run. Pin layers=... and weight=... to keep the plan",
            GuidewrapWarning,
            stacklevel=3,
        )

    @property
    def weight(self) -> float:
        """Current weight of the alignment term (0 outside the window)."""
        return self.schedule.weight_at(self.step_count)

    @property
    def alignment_loss(self) -> Tensor:
        """Weighted alignment term of the last forward (0 when guidance was off)."""
        return self._loss if self._loss is not None else torch.zeros(())

    @property
    def has_term(self) -> bool:
        """Whether the last forward was guided (its alignment term is available)."""
        return self._loss is not None

    @property
    def hook_count(self) -> int:
        """Hooks this engine holds on the target's layers and on optimizers."""
        return len(self._taps) + len(self._optimizer_hooks)

    @property
    def last_alignment(self) -> dict[str, float]:
        """Per-pair alignment (1 - distance) of the last guided forward, by pair key."""
        self._read()
        return self._last_alignment

    def guidance_metrics(self) -> dict[str, float]:
        """Values to log: loss, weight, skipped pairs and per-pair alignment of the last forward."""
        self._read()
        out = {
            "guidance_loss": float(self.alignment_loss.detach()),
            "guidance_weight": self.weight,
            "guidance_skipped_pairs": float(self.counters["skipped_pairs"]),
        }
        out.update({f"guidance_align/{key}": value for key, value in self.last_alignment.items()})
        return out

    def metrics(self) -> dict[str, float]:
        """Deprecated name of :meth:`guidance_metrics`."""
        warnings.warn("engine.metrics() is now engine.guidance_metrics()", DeprecationWarning, stacklevel=2)
        return self.guidance_metrics()

    # ------------------------------------------------------------------ one guided step

    def is_active(self) -> bool:
        """Whether the next forward is guided (training mode, inside the window)."""
        if torch.compiler.is_compiling():  # no guard on the counter (see _sync_schedule)
            return not self.closed and self.target.training and self._in_window
        return not self.closed and self.target.training and self.schedule.is_active(self.step_count)

    def begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        """Open a step before the target's forward (runs the guide); returns whether it is guided."""
        if self.busy:
            return False
        self.abort()
        if not self.is_active():
            # Under torch.compile, step() (eager, at the optimizer step) has removed them already.
            if not torch.compiler.is_compiling() and self.schedule.is_finished(self.step_count):
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
        if step.noise:
            noise = noise_call(self.target, self.guide, step.args, step.kwargs)
            self._loss = self._aligned_forward(*noise, weight=self.weight)
        else:
            weight = self._step_weight if torch.compiler.is_compiling() else self.weight
            self._loss = self._finish(step, weight)
            self._count(0, "guided_forwards")
            if not self.has_step_source and not torch.compiler.is_compiling():
                self._warn_if_window_cannot_end()
        if self.config.add_to_output_loss:
            output, with_term = add_to_loss(output, self._loss)
            checking = self._double_count_checks and not torch.compiler.is_compiling()  # a diagnostic only
            if with_term is not None and checking and self._loss.requires_grad:
                self._double_count_checks -= 1  # the first steps show the pattern; later ones cost nothing
                watch_double_count(with_term, self._loss)
        return output

    def _warn_if_window_cannot_end(self) -> None:
        """Once: a finite window (or decay) with nothing advancing the step counter never ends.
        Checked after ``until_step + 100`` guided forwards (gradient accumulation calls step() late)."""
        until = self.schedule.until_step
        if until is None or self._counts["guided_forwards"] != until + 100:
            return
        warnings.warn(
            f"guidance has run {until + 100} guided forwards but its step counter is still {self.step_count}: "
            f"nothing advances it, so the window until_step={until} never ends (nor does the weight decay). Pass "
            "optimizer=your_optimizer (its step() counts), or call guided.step() after each optimizer step",
            GuidewrapWarning,
            stacklevel=4,
        )

    def abort(self) -> None:
        """Forget the open step (a forward that raised, or a new one starting)."""
        self._step = None
        self._loss = None

    def _open_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GuidedStep:
        routed = self._route(args, kwargs)
        self._target_float = float_dtype(self.target)
        world = distributed.world_size(self.config.distributed)
        if not self._warned_tiny_batch and self._counts["guided_forwards"] < 3 and not torch.compiler.is_compiling():
            distinct = routed.n * world if world > 1 else distinct_samples(args, kwargs, routed.axes[0])
            if distinct <= 2:
                self._warned_tiny_batch = True
                warnings.warn(
                    f"guided step on a batch of {routed.n * world} samples of which {distinct} differ: centred "
                    f"features of {distinct} distinct samples have rank {max(distinct - 1, 0)}, so CKA is 1 for any "
                    "layers and the alignment term is 0 (nothing is guided); use batches of 8 or more distinct samples",
                    GuidewrapWarning,
                    stacklevel=4,
                )
        if not self._padding_checked and routed.mask is not None and routed.mask.dim() == 2:
            self._padding_checked = True  # the collator's padding side does not change: one host read
            if world > 1:
                mask = routed.mask
                self._left_padded = bool(((mask[:, 0] == 0) & (mask[:, -1] != 0)).any())
        if self._plan is None:
            routed = self._resolve_plan(args, kwargs, routed)
        plan = self._plan
        self._install_taps(plan)
        step = GuidedStep(routed, copy=self._copied)
        step.prepared = reduce_guide(
            self.guide, plan, self.metric, routed, self._shape, self._guide_slot, self._gatherer()
        )
        self._count(1, "guide_forwards")
        return step

    def _shape(self, x: Tensor, w: Tensor | None, side: str, name: str) -> tuple[Tensor, Tensor | None]:
        if side == "guide" and x.dtype == torch.float64 and self._target_float != torch.float64:
            x = x.float()  # a float64 guide beside a float32 target: compare in the target's precision
        return self._subsets(x, (side, name)), w

    def _gatherer(self) -> Gatherer | None:
        """The bucketed gather of a side's layers under global-batch CKA with several processes."""
        mode = self.config.distributed
        if distributed.world_size(mode) == 1:
            return None
        return functools.partial(distributed.gather_layers, mode=mode, left_padded=self._left_padded)

    def _finish(self, step: GuidedStep, weight: float | Tensor) -> Tensor:
        if self._plan is None or step.routed is None:
            raise PlanError("a guided step ended before its plan was resolved")
        modified = [name for name in step.modified_in_place() if name not in self._copied]
        if modified:  # not seen by the probe (a data-dependent in-place op): copied from now on
            self._copied |= frozenset(modified)
            warnings.warn(
                f"target layer {modified[0]!r}'s output was modified in place after it returned, so this step "
                "measured the modified value; from the next step on it is copied when captured",
                GuidewrapWarning,
                stacklevel=4,
            )
        if self.config.reduction == "mean":
            weight = weight / len(self._plan)
        term = alignment_term(
            self._plan,
            self.metric,
            step.captured,
            step.prepared,
            step.routed,
            weight,
            self._shape,
            step.routed.n,
            self._gatherer(),
        )
        readout = term.readout
        skipped = 1.0 - readout[1]
        nonfinite = ~torch.isfinite(readout[0]) & (readout[1] == 0)
        if self._unread is None:
            self._unread = _Unread(self._plan, readout, skipped, nonfinite, set(term.missing))
        else:  # accumulate on the device since the last read: no host synchronisation
            unread = self._unread
            unread.readout, unread.skipped = readout, unread.skipped + skipped
            unread.nonfinite, unread.missing = unread.nonfinite | nonfinite, unread.missing | term.missing
        if _reads_at_once(readout.device):
            self._read()
        return term.loss

    def _read(self) -> None:
        """Turn the device values accumulated since the last read into ``last_alignment``, the
        skipped-pair counter and warnings (and raise on a non-finite custom metric result).

        On an accelerator this is the only host synchronisation guidance adds, so it waits until
        someone reads (``guidance_metrics()`` when logging, ``last_alignment``): no per-step stall.
        """
        if self._unread is None:
            return
        unread, self._unread = self._unread, None
        distances, measured = unread.readout.cpu().tolist()
        skips, bad = unread.skipped.cpu().tolist(), unread.nonfinite.cpu().tolist()
        self._last_alignment = {p.key: 1.0 - v for p, v, f in zip(unread.plan, distances, measured, strict=True) if f}
        for pair, count, nonfinite in zip(unread.plan, skips, bad, strict=True):
            if nonfinite:  # the built-in metrics never return one: a custom metric did
                raise MetricError(
                    f"metric {self.metric.name!r} returned a non-finite distance for pair {pair.key}; a metric "
                    "must return a finite distance (guard its divisions, or return a fallback for degenerate input)"
                )
            if not count:
                continue
            self._counts["skipped_pairs"] += int(count)
            why = "degenerate or non-finite features"
            if pair.key in unread.missing:
                why = "a layer of it did not run, here or on another process"
            steps = "this step" if count == 1 else f"on {int(count)} steps"
            warnings.warn(
                f"guidance pair {pair.key} skipped {steps} ({why}); it adds nothing to the loss",
                SkippedPairWarning,
                stacklevel=5,
            )

    def _install_taps(self, plan: LayerPlan) -> None:
        if len(self._taps):
            return
        modules = dict(self.target.named_modules())
        names = dict.fromkeys(p.target.name for p in plan)
        self._taps.tap({name: modules[name] for name in names}, self._capture)
        guide_modules = dict(self.guide.named_modules())
        self._taps.tap(
            {name: guide_modules[name] for name in dict.fromkeys(p.guide.name for p in plan)}, self._guide_slot
        )

    def _capture(self, name: str, output: Any) -> None:
        if self._step is not None:
            self._step.capture(name, output)

    # ------------------------------------------------------------------ plan

    def plan(self, args: tuple[Any, ...] | None = None, kwargs: Mapping[str, Any] | None = None) -> LayerPlan:
        """The layer plan; resolved from an example input if one is given."""
        if args or kwargs:
            args, kwargs = tuple(args or ()), dict(kwargs or {})
            self._resolve_plan(args, kwargs, self._route(args, kwargs))
        if self._plan is None:
            raise PlanError(
                "the layer plan is resolved from a forward pass: call plan(example_input) (the same arguments "
                "you pass to the target), or run one training forward first"
            )
        return self._plan

    def _route(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Routed:
        t_axis, g_axis = self._input_axes
        return route(self.guide, self.config.guide_inputs, args, kwargs, t_axis or 0, self.config.mask_key, g_axis)

    def _resolve_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any], routed: Routed) -> Routed:
        """Probe both networks, settle the inputs' batch axes from the evidence, build the plan;
        returns the step's inputs routed with the axes finally taken."""
        notes: list[str] = []
        self.busy = True
        try:
            for side in ("target", "guide"):
                names = self._candidates(side, notes)
                for _attempt in range(2):
                    layers = self._probe(side, names, args, kwargs, routed)
                    conflicts = layout_conflicts(layers, routed.n)
                    if not conflicts:
                        break
                    axis = self._axis_from_evidence(side, conflicts, args, kwargs, routed)
                    self._input_axes[0 if side == "target" else 1] = axis
                    routed = self._route(args, kwargs)
                    notes.append(
                        f"batch axis of the {side}'s input: {axis}, from {conflicts[0].name!r} ({conflicts[0].type}) "
                        f"declaring batch_first={conflicts[0].declared[0] == 0}"  # type: ignore[index]
                    )
                else:
                    raise PlanError(f"the {side}'s layers disagree on the batch axis of its input; set it explicitly")
                if side == "target":
                    t_layers = layers
                else:
                    g_layers = layers
        finally:
            self.busy = False
        self._plan = build_plan(
            t_layers, g_layers, self.config.layers, self.config.sequence, self.config.exclude_output_layer
        )
        self._plan.notes.extend(notes)
        self._copied = frozenset(p.target.name for p in self._plan if p.target.in_place)
        self._plan.notes.extend(
            f"target layer {name!r}: its output is modified in place after it returns (an in-place op such as "
            "ReLU(inplace=True) follows it), so it is copied when captured"
            for name in sorted(self._copied)
        )
        self._check_resumed_plan()
        self._taps.remove()
        return routed

    def _candidates(self, side: str, notes: list[str]) -> list[str] | None:
        """The modules a side's probe records: named ones, its blocks, or (``None``) every module of
        ``layer_types``; a ``"blocks"`` side without repeated blocks falls back to the latter."""
        names = self._names[side]
        if names is not None or self._level(side) != "blocks":
            return names
        blocks = block_names(self.target if side == "target" else self.guide)
        if not blocks:
            notes.append(f"the {side} has no repeated blocks: its sub-layers are aligned (level 'sublayers')")
        return blocks or None

    def _probe(
        self, side: str, names: list[str] | None, args: tuple[Any, ...], kwargs: dict[str, Any], routed: Routed
    ) -> list[Any]:
        if side == "target":
            # With gradients on (nothing runs backward), each output's requires_grad says whether a
            # trainable parameter is at or upstream of its layer: frozen layers are not planned.
            trainable = any(p.requires_grad for p in self.target.parameters())
            with torch.enable_grad() if trainable else torch.no_grad():
                run = lambda: self.target(*args, **kwargs)  # noqa: E731
                return probe(self.target, run, routed.n, names, self.layer_types, routed.axes[0])
        with torch.inference_mode():
            run = lambda: call_guide(self.guide, routed.guide_args, routed.guide_kwargs)  # noqa: E731
            return probe(self.guide, run, routed.n, names, self.layer_types, routed.axes[1])

    def _level(self, side: str) -> str | None:
        """The matching level of a side with automatic discovery (``None`` for named layers)."""
        spec = self.config.layers
        return level_of(spec[side] if isinstance(spec, dict) else spec)

    def _axis_from_evidence(
        self, side: str, conflicts: list[Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], routed: Routed
    ) -> int:
        """The input axis that the layers declaring a layout agree on, or a PlanError saying why not."""
        key = "input_batch_dim" if side == "target" else "guide_input_batch_dim"
        configured = getattr(self.config, key)
        axis = routed.axes[0 if side == "target" else 1]
        first = conflicts[0]
        declared_axis, size = first.declared
        why = (
            f"{side} layer {first.name!r} ({first.type}, batch_first={declared_axis == 0}) has {size} samples on its "
            f"batch axis {declared_axis}, but the {side}'s input was read as a batch of {routed.n} on axis {axis}"
        )
        if configured is not None:
            raise PlanError(f"{why}; {key}={configured} contradicts the layer: correct {key} or its batch_first")
        tensor = first_tensor(*((args, kwargs) if side == "target" else (routed.guide_args, routed.guide_kwargs)))
        sizes = {c.declared[1] for c in conflicts}
        fits = [] if tensor is None or len(sizes) != 1 else [i for i, s in enumerate(tensor.shape) if s == size]
        fits = [i for i in fits if i != axis]
        if len(fits) != 1:
            raise PlanError(f"{why}; set {key} to the batch axis of the {side}'s input")
        return fits[0]

    # ------------------------------------------------------------------ engine-driven forwards

    def _aligned_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], weight: float) -> Tensor:
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
        if not self.schedule.is_active(self.step_count):
            self._taps.remove()  # no hook may stay outside the window
        return loss

    def pre_align(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        steps: int,
        lr: float,
        optimizer: torch.optim.Optimizer | None,
    ) -> list[float]:
        """Train the target on the alignment loss alone, on fresh noise shaped like the example."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        params = [p for p in self.target.parameters() if p.requires_grad]
        opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
        was_training = self.target.training
        self.target.train()
        history = []
        try:
            for _ in range(steps):
                loss = self._aligned_forward(*noise_call(self.target, self.guide, args, kwargs), weight=1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
        finally:
            self.target.train(was_training)
            self.abort()
            self._taps.remove()  # re-attached by the next guided forward, if any
        return history

    def evaluate(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        """Unweighted sum of pair distances on given inputs, without gradients."""
        try:
            with torch.no_grad():
                value = float(self._aligned_forward(tuple(args), dict(kwargs), weight=1.0))
        finally:
            self.abort()
            self._taps.remove()  # re-attached by the next guided forward, if any
        return value

    def release(self) -> None:
        """Drop the open step and the taps on the target (they come back with the next guided step)."""
        self.abort()
        self._taps.remove()

    def close(self) -> None:
        """Remove every hook this engine holds."""
        self._taps.remove()
        self._optimizer_hooks.remove()
        self.abort()
        self.closed = True


def _refuse_shared_modules(target: nn.Module, guide: nn.Module) -> None:
    """The guide is frozen and kept in eval mode; a module or parameter it shares with the target
    would silently freeze (and switch to eval) part of the network being trained."""
    in_target = {id(m): name for name, m in target.named_modules()}
    shared = [(in_target[id(m)], name) for name, m in guide.named_modules() if id(m) in in_target]
    params = {id(p): name for name, p in target.named_parameters()}
    shared += [(params[id(p)], name) for name, p in guide.named_parameters() if id(p) in params]
    if shared:
        examples = "; ".join(f"target {t!r} is guide {g!r}" for t, g in shared[:3])
        raise ConfigError(
            f"the guide shares modules or parameters with the target ({examples}); guidance freezes the guide and "
            "keeps it in eval mode, which would freeze that part of the target too. Give the guide its own copy: "
            "copy.deepcopy(guide) after building both (or build the guide with untied weights)"
        )


def _reads_at_once(device: torch.device) -> bool:
    """A host read of CPU values costs nothing: report skipped pairs at the step itself there (not
    while torch.compile traces the step: a read would break its graph)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


@dataclass
class _Unread:
    """Per-pair values since the last host read: the latest step's ``readout`` (distances, flags),
    how many steps skipped each pair, whether any returned a non-finite distance, and which pairs'
    target layers did not run."""

    plan: LayerPlan
    readout: Tensor
    skipped: Tensor
    nonfinite: Tensor
    missing: set[str]
