"""All guidance settings in one validated dataclass.

Examples:
    >>> cfg = GuidanceConfig(until_step=300, decay="cosine")
    >>> cfg.schedule().weight_at(150)
    0.5
    >>> GuidanceConfig(weight=-1)
    Traceback (most recent call last):
    ...
    guidewrap.errors.ConfigError: weight must be >= 0, got -1; a negative weight would push layers apart
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .capture import SEQUENCE_MODES
from .discovery import level_of
from .errors import ConfigError
from .metrics import Metric, get_metric
from .schedules import GuidanceSchedule

__all__ = ["GuidanceConfig"]

LayerSpec = Any  # "auto" | "paper" | list[tuple[str, str]] | {"target": ..., "guide": ...}


@dataclass
class GuidanceConfig:
    """Settings of a guided run. Every field can also be passed as a keyword argument to
    :class:`~guidewrap.GuidedModel` and :class:`~guidewrap.Guidance`.

    Attributes:
        layers: a matching level, a list of explicit ``(target_name, guide_name)`` pairs, or
            ``{"target": spec, "guide": spec}`` where a spec is a level, a name pattern
            (``"encoder.layer.*"``) or a list of names/patterns; the selected layers are then
            spread over depth. Levels: ``"blocks"`` (the repeated blocks: transformer layers,
            ResNet blocks, recurrent layers; a network without repeated blocks falls back to
            ``"sublayers"``), ``"sublayers"`` (every module of ``layer_types``), ``"paper"`` (the
            published code's rule exactly, for reproduction runs: its layer types matched exactly,
            the last hooked layer of each side dropped, one guide layer per target layer, a plain
            sum) and ``"auto"`` (the default level, ``"sublayers"``; chosen by measurement, see
            ``docs/concepts/layers.md``). Networks sharing a body pair namesakes.
        metric: a name from :func:`~guidewrap.metrics.available_metrics`, a
            :class:`~guidewrap.metrics.Metric` or a callable ``(x, y) -> distance``.
        weight: multiplier of the reduced per-pair distances.
        strength: instead of a fixed ``weight``, the alignment term's pull in the terms users think
            in: the term's gradient is held at ``strength`` times the task loss's (norms over the
            target's trainable parameters), re-measured every ``strength_every`` guided steps. Needs
            the task loss: ``guided.total_loss(task_loss)``, a model output's ``loss``, or a
            ``Trainer``. ``None`` (default): the fixed ``weight``, whose pull is measured once and
            warned about when under 0.01 (a persistent domination is warned about per tensor,
            see ``tensor_cap``).
        strength_every: guided steps between measurements of the pull (each costs two backward
            passes through the target).
        tensor_cap: cap the term's pull tensor by tensor: from the ``tensor_cap_after``-th guided step
            on, the term's gradient in every trainable tensor of the target is at most ``tensor_cap``
            times the task loss's gradient in that tensor, and a tensor's optimizer state (Adam's
            moments) is cleared when the cap first binds on it. Needs the task loss, like
            ``strength``. ``None`` (default): uncapped; the tensor pulls are measured once after
            ``tensor_cap_after`` guided steps and a term still over 100 times the task's in some
            tensor warns. See ``docs/concepts/strength.md``.
        tensor_cap_after: guided steps before the cap applies (the early, uncapped pull is where
            guidance makes its gains), and when the warning's one measurement is taken.
        reduction: how per-pair distances combine: ``"mean"`` (weight times their mean, so the
            term's scale does not grow with the number of pairs) or ``"sum"`` (the paper's).
            ``None`` (default): ``"sum"`` with ``layers="paper"``, else ``"mean"``.
        start_step / until_step: the window, in optimizer steps (``until_step=None``: whole run).
        decay: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of the weight inside the window.
        guide_inputs: ``"same"`` (the target's batch), ``"noise"`` (both nets see noise shaped like
            the batch for the alignment term) or a callable mapping the target's inputs to the
            guide's (returning a tensor, tuple of args or dict of kwargs).
        sequence: ``"flatten"`` (paper default), ``"tokenwise"`` (CKA per position, averaged) or
            ``"mean"`` (mean over positions) for 3-D ``(n, T, D)`` outputs.
        distributed: ``"global"`` (CKA over the batch gathered from all processes) or ``"local"``.
        layer_types: module types (or class names) that ``"auto"`` discovery hooks.
        exclude_output_layer: leave out the last discovered layer (the logits) in ``"auto"``.
        add_to_output_loss: add the term to ``output.loss`` / ``output["loss"]`` when present.
        input_batch_dim: which dimension of the target's first input tensor is the batch.
            ``None`` (default): decided from evidence, 0 unless the network's layers that declare
            a layout (``batch_first=False`` in ``nn.LSTM``/``nn.GRU``/transformer layers) show the
            batch on another axis of the input. The plan shows the axis taken for every layer.
        guide_input_batch_dim: the same for the guide's input (after ``guide_inputs``). ``None``
            (default): the target's axis if it holds the batch's samples there, else the one
            axis of that size, else the guide's declared layouts decide.
        mask_key: keyword argument holding the ``(n, T)`` padding mask.
        strict_guide: raise instead of freezing a guide whose parameters require gradients.
        max_features: approximation for very wide layers: a layer with more flattened features
            than this is measured on a fixed random subset of ``max_features`` of them (the same
            subset every step). ``None`` (default): exact. See ``docs/concepts/cost.md`` for the
            measured error.

    Examples:
        >>> GuidanceConfig(layers=[("fc1", "conv1")]).layers
        [('fc1', 'conv1')]
    """

    layers: LayerSpec = "auto"
    metric: str | Metric | Callable[..., Any] = "cka"
    weight: float = 1.0
    strength: float | None = None
    strength_every: int = 25
    tensor_cap: float | None = None
    tensor_cap_after: int = 100
    reduction: str | None = None
    start_step: int = 0
    until_step: int | None = None
    decay: str = "constant"
    guide_inputs: str | Callable[..., Any] = "same"
    sequence: str = "flatten"
    distributed: str = "global"
    layer_types: Sequence[type[nn.Module] | str] | None = None
    exclude_output_layer: bool = True
    add_to_output_loss: bool = True
    input_batch_dim: int | None = None
    guide_input_batch_dim: int | None = None
    mask_key: str = "attention_mask"
    strict_guide: bool = False
    max_features: int | None = None

    def __post_init__(self) -> None:
        self.schedule()  # validates weight and window
        self.metric = get_metric(self.metric)
        self.layers = _validate_layers(self.layers)
        if not (callable(self.guide_inputs) or self.guide_inputs in ("same", "noise")):
            raise ConfigError(f"guide_inputs must be 'same', 'noise' or a callable, got {self.guide_inputs!r}")
        if self.reduction is None:
            self.reduction = "sum" if self.layers == "paper" else "mean"
        if self.reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum' (or None for the default), got {self.reduction!r}")
        if self.sequence not in SEQUENCE_MODES:
            raise ConfigError(f"sequence must be one of {SEQUENCE_MODES}, got {self.sequence!r}")
        if self.distributed not in ("global", "local"):
            raise ConfigError(f"distributed must be 'global' or 'local', got {self.distributed!r}")
        if self.layers == "paper" and self.layer_types is not None:
            raise ConfigError("layers='paper' uses the published code's layer types; leave layer_types unset")
        if self.layer_types is not None:
            bad = [
                t
                for t in self.layer_types
                if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module)))
            ]
            if bad or not self.layer_types:
                raise ConfigError(
                    "layer_types must be a non-empty list of nn.Module classes or class names, "
                    f"got {bad or self.layer_types!r}"
                )
        if self.strength is not None:
            if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
                raise ConfigError(f"strength must be a number > 0 or None, got {self.strength!r}")
            if not (math.isfinite(self.strength) and self.strength > 0):
                raise ConfigError(f"strength must be a finite number > 0 (e.g. 0.3), got {self.strength!r}")
            if self.weight != 1.0:
                raise ConfigError(
                    f"strength={self.strength} sets the weight from the gradients; weight={self.weight} would fix it "
                    "too: give one of them"
                )
        if self.tensor_cap is not None and (
            isinstance(self.tensor_cap, bool)
            or not isinstance(self.tensor_cap, (int, float))
            or not (math.isfinite(self.tensor_cap) and self.tensor_cap > 0)
        ):
            raise ConfigError(f"tensor_cap must be a finite number > 0 (e.g. 1.0) or None, got {self.tensor_cap!r}")
        after = self.tensor_cap_after
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ConfigError(f"tensor_cap_after must be an integer >= 0 (guided steps), got {after!r}")
        if not isinstance(self.strength_every, int) or isinstance(self.strength_every, bool) or self.strength_every < 1:
            raise ConfigError(f"strength_every must be an integer >= 1, got {self.strength_every!r}")
        if self.max_features is not None and (not isinstance(self.max_features, int) or self.max_features < 1):
            raise ConfigError(f"max_features must be None or an integer >= 1, got {self.max_features!r}")
        for key in ("input_batch_dim", "guide_input_batch_dim"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{key} must be None (decided from evidence) or an integer >= 0, got {value!r}")

    def schedule(self) -> GuidanceSchedule:
        """The :class:`~guidewrap.schedules.GuidanceSchedule` these settings describe."""
        return GuidanceSchedule(self.weight, self.start_step, self.until_step, self.decay)

    @classmethod
    def build(cls, config: GuidanceConfig | None = None, **overrides: Any) -> GuidanceConfig:
        """A config from an optional base plus keyword overrides; unknown keys fail with suggestions.

        Examples:
            >>> GuidanceConfig.build(weight=0.5).weight
            0.5
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=2)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ConfigError(f"unknown guidance setting {key!r}.{hint} Settings: {', '.join(sorted(fields))}")
        if config is None:
            return cls(**overrides)
        if not isinstance(config, GuidanceConfig):
            raise ConfigError(f"config must be a GuidanceConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **overrides)


def _validate_layers(layers: LayerSpec) -> LayerSpec:
    if level_of(layers):
        return layers
    if isinstance(layers, dict):
        if set(layers) != {"target", "guide"}:
            raise ConfigError(f"layers dict needs exactly the keys 'target' and 'guide', got {sorted(layers)}")
        out = {}
        for side, spec in layers.items():
            if level_of(spec) in ("blocks", "sublayers"):  # "paper" is a rule for both sides together
                out[side] = spec
            elif isinstance(spec, str):
                out[side] = [spec]
            elif isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
                out[side] = list(spec)
            else:
                raise ConfigError(
                    f"layers[{side!r}] must be 'auto', 'blocks', 'sublayers', a name pattern or a list of names, "
                    f"got {spec!r}"
                )
        return out
    if isinstance(layers, (list, tuple)) and layers:
        pairs = []
        for pair in layers:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise ConfigError(f"each explicit layer pair must be (target_name, guide_name), got {pair!r}")
            pairs.append((pair[0], pair[1]))
        return pairs
    raise ConfigError(
        "layers must be 'auto', 'blocks', 'sublayers', 'paper', a non-empty list of (target_name, guide_name) pairs or "
        f"{{'target': ..., 'guide': ...}}, got {layers!r}"
    )
