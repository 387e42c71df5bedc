"""Plan resolution: probe both networks once, settle the inputs' batch axes from evidence, match.

The engine calls :meth:`Planner.resolve` on its first guided step (or ``plan(example)``); the
planner also owns the plan's checkpoint record (:meth:`Planner.record`) and compares a resumed
run's plan with the checkpoint's.

Examples:
    >>> import torch
    >>> from guidewrap.config import GuidanceConfig
    >>> target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    >>> planner = Planner(target, guide, GuidanceConfig())
    >>> x = torch.randn(8, 4)
    >>> _ = planner.resolve((x,), {}, planner.route((x,), {}))
    >>> [p.key for p in planner.plan]
    ['0<-0']
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import GuidanceConfig
from .discovery import DEFAULT_LAYER_TYPES, PAPER_LAYER_TYPES, LayerInfo, block_names, layout_conflicts, level_of
from .errors import GuidewrapWarning, PlanError
from .inputs import Routed, call_guide, first_tensor, route
from .matching import LayerPlan, build_plan, check_names
from .probing import probe

__all__ = ["Planner"]


class Planner:
    """The layer plan of one target/guide pair, and the batch axes of their inputs."""

    def __init__(self, target: nn.Module, guide: nn.Module, config: GuidanceConfig) -> None:
        self.target, self.guide, self.config = target, guide, config
        self.layer_types = tuple(config.layer_types) if config.layer_types is not None else DEFAULT_LAYER_TYPES
        if config.layers == "paper":
            self.layer_types = PAPER_LAYER_TYPES
        self.names = check_names(config.layers, target, guide)
        # The batch axis of the target's and the guide's first input (None: found per step from the
        # batch size); evidence from declared layouts may change them at planning (resolve).
        self.input_axes: list[int | None] = [config.input_batch_dim or 0, config.guide_input_batch_dim]
        self.plan: LayerPlan | None = None
        self.copied: frozenset[str] = frozenset()  # target layers whose output is changed in place later
        self._resumed: dict[str, Any] | None = None  # a checkpoint's plan record, checked at planning
        self._frozen: dict[str, list[nn.Parameter]] = {}  # target layers left out as frozen: their parameters
        self._warned_unfrozen = False

    def route(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Routed:
        """One step's inputs routed to the guide, with the batch axes settled so far."""
        t_axis, g_axis = self.input_axes
        return route(self.guide, self.config.guide_inputs, args, kwargs, t_axis or 0, self.config.mask_key, g_axis)

    def resolve(self, args: tuple[Any, ...], kwargs: dict[str, Any], routed: Routed) -> Routed:
        """Probe both networks, settle the inputs' batch axes from the evidence, build the plan;
        returns the step's inputs routed with the axes finally taken. The caller keeps its root
        hooks quiet meanwhile (the probe runs the target)."""
        notes: list[str] = []
        sides: dict[str, list[LayerInfo]] = {}
        for side in ("target", "guide"):
            sides[side], routed = self._probe_side(side, args, kwargs, routed, notes)
        cfg = self.config
        self.plan = build_plan(sides["target"], sides["guide"], cfg.layers, cfg.sequence, cfg.exclude_output_layer)
        self.plan.notes.extend(notes)
        self.copied = frozenset(p.target.name for p in self.plan if p.target.in_place)
        self.plan.notes.extend(
            f"target layer {name!r}: its output is modified in place after it returns (an in-place op such as "
            "ReLU(inplace=True) follows it), so it is copied when captured"
            for name in sorted(self.copied)
        )
        modules = dict(self.target.named_modules())
        self._frozen = {
            info.name: [p for p in modules[info.name].parameters()]
            for side, info in self.plan.skipped
            if side == "target" and (info.skip_reason or "").startswith("frozen") and info.name in modules
        }
        self._check_resumed()
        return routed

    def warn_if_unfrozen(self) -> None:
        """Once: target layers left out of the plan as frozen have trainable parameters now (progressive
        unfreezing); the plan is made once, so they stay unguided."""
        if self._warned_unfrozen:
            return
        unfrozen = [name for name, params in self._frozen.items() if any(p.requires_grad for p in params)]
        if not unfrozen:
            return
        self._warned_unfrozen = True
        warnings.warn(
            f"target layers {', '.join(map(repr, unfrozen[:3]))} were left out of the plan as frozen and are "
            "trainable now: the plan is made at the first guided step, so they are not guided. To guide them, "
            "create the guidance after unfreezing them (or name the pairs in layers=...)",
            GuidewrapWarning,
            stacklevel=5,
        )

    def _probe_side(
        self, side: str, args: tuple[Any, ...], kwargs: dict[str, Any], routed: Routed, notes: list[str]
    ) -> tuple[list[LayerInfo], Routed]:
        """One side's layers; a layer declaring another batch axis re-routes the inputs once."""
        names = self._candidates(side, notes)
        for _attempt in range(2):
            layers = self._probe(side, names, args, kwargs, routed)
            conflicts = layout_conflicts(layers, routed.n)
            if not conflicts:
                return layers, routed
            axis = self._axis_from_evidence(side, conflicts, args, kwargs, routed)
            self.input_axes[0 if side == "target" else 1] = axis
            routed = self.route(args, kwargs)
            notes.append(
                f"batch axis of the {side}'s input: {axis}, from {conflicts[0].name!r} ({conflicts[0].type}) "
                f"declaring batch_first={conflicts[0].declared[0] == 0}"  # type: ignore[index]
            )
        raise PlanError(f"the {side}'s layers disagree on the batch axis of its input; set it explicitly")

    def _candidates(self, side: str, notes: list[str]) -> list[str] | None:
        """The modules a side's probe records: named ones, its blocks, or (``None``) every module of
        ``layer_types``; a ``"blocks"`` side without repeated blocks falls back to the latter."""
        names = self.names[side]
        spec = self.config.layers
        if names is not None or level_of(spec[side] if isinstance(spec, dict) else spec) != "blocks":
            return names
        blocks = block_names(self.target if side == "target" else self.guide)
        if not blocks:
            notes.append(f"the {side} has no repeated blocks: its sub-layers are aligned (level 'sublayers')")
        return blocks or None

    def _probe(
        self, side: str, names: list[str] | None, args: tuple[Any, ...], kwargs: dict[str, Any], routed: Routed
    ) -> list[LayerInfo]:
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

    def resolved(self) -> LayerPlan:
        """The plan, or the error that says how to resolve it."""
        if self.plan is None:
            raise PlanError(
                "the layer plan is resolved from a forward pass: call plan(example_input) (the same arguments "
                "you pass to the target), or run one training forward first"
            )
        return self.plan

    def copy_from_now_on(self, modified: list[str]) -> None:
        """Target layers whose output a step found changed in place after capture, by an op the probe
        did not see (data-dependent): that step measured the changed value; from now on they are copied."""
        new = [name for name in modified if name not in self.copied]
        if not new:
            return
        self.copied |= frozenset(new)
        warnings.warn(
            f"target layer {new[0]!r}'s output was modified in place after it returned, so this step measured "
            "the modified value; from the next step on it is copied when captured",
            GuidewrapWarning,
            stacklevel=5,
        )

    # ------------------------------------------------------------------ the plan's checkpoint record

    def record(self, metric_name: str) -> dict[str, Any]:
        """What a checkpoint records of the plan: its pairs, the settings that shape the term, and
        a fingerprint of both (equal fingerprints: the same alignment term)."""
        if self.plan is None:
            raise PlanError("the plan is not resolved yet: call plan(example_input) or run a guided forward first")
        cfg = self.config
        settings = {
            "layers": cfg.layers if isinstance(cfg.layers, str) else repr(cfg.layers),
            "metric": metric_name,
            "weight": cfg.weight,
            "reduction": cfg.reduction,
            "sequence": cfg.sequence,
            "max_features": cfg.max_features,
        }
        pairs = [f"{p.key} ({p.mode})" for p in self.plan]
        digest = hashlib.sha256(json.dumps([pairs, settings], sort_keys=True).encode()).hexdigest()[:16]
        return {"fingerprint": digest, "pairs": pairs, "settings": settings}

    def expect(self, record: Mapping[str, Any]) -> None:
        """Warn if this run's plan differs from ``record`` (now, or once the plan is resolved)."""
        self._resumed = dict(record)
        if self.plan is not None:
            self._check_resumed()

    def _check_resumed(self) -> None:
        record, self._resumed = self._resumed, None
        if record is None:
            return
        now = self.record(self.config.metric.name)
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
            stacklevel=4,
        )
