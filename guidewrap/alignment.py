"""The metric side of a guided step: reduce the guide's layers, shape the target's, sum the term.

:func:`reduce_guide` runs the frozen guide once under ``torch.inference_mode``; the engine's tap on
each planned guide layer hands its output to a sink that keeps only the metric's reduced form (a
centred Gram or centred features for CKA). :func:`alignment_term` turns the captured target
outputs into feature matrices (each target layer once), runs same-shaped pairs as one batched
problem, and returns the weighted sum of per-pair distances together with each pair's value and
whether it could be measured.

Examples:
    >>> import torch
    >>> from guidewrap.metrics import get_metric
    >>> subsets = FeatureSubsets(None)
    >>> subsets(torch.ones(4, 10), ("target", "fc")).shape  # exact: no subset
    torch.Size([4, 10])
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .capture import extract, features, lengths_to_mask, unfold_calls
from .errors import BatchSizeMismatchError, MetricError
from .inputs import Routed, call_guide
from .matching import LayerPlan
from .metrics import Metric

__all__ = ["FeatureShaper", "FeatureSubsets", "SinkSlot", "Term", "alignment_term", "reduce_guide", "stack_calls"]

# shape(x, w, side, layer): one process's features as the metric will see them (the feature subset);
# returns the features and sample weights.
Shaper = Callable[[Tensor, "Tensor | None", str, str], tuple[Tensor, "Tensor | None"]]
# gather(keys, layers): every process's samples of each layer, in one bucketed collective per side
# (distributed.gather_layers); None in a single process, where each guide layer is reduced in its hook.
Gatherer = Callable[
    [list[tuple[str, str]], dict[tuple[str, str], tuple[Tensor, "Tensor | None"]]],
    Iterator[tuple[Any, tuple[Tensor, "Tensor | None"]]],
]


class FeatureSubsets:
    """``max_features`` approximation: a fixed random subset of a wide layer's features.

    The subset is seeded by the layer's name and width, so it is the same every step and on every
    process; ``limit=None`` keeps every feature (exact).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._index: dict[tuple[str, str, int], Tensor] = {}

    def __call__(self, x: Tensor, layer: tuple[str, str]) -> Tensor:
        if self.limit is None or x.shape[-1] <= self.limit:
            return x
        key = (*layer, x.shape[-1])
        index = self._index.get(key)
        if index is None or index.device != x.device:
            gen = torch.Generator().manual_seed(zlib.crc32("/".join(map(str, key)).encode()))
            index = torch.randperm(x.shape[-1], generator=gen)[: self.limit].sort().values.to(x.device)
            self._index[key] = index
        return x.index_select(-1, index)


class FeatureShaper:
    """One process's features as the metric will see them: the feature subset, and a float64 guide
    beside a float32 target compared in the target's precision (``target_dtype``, read each step)."""

    def __init__(self, subsets: FeatureSubsets) -> None:
        self.subsets = subsets
        self.target_dtype: torch.dtype | None = None

    def __call__(self, x: Tensor, w: Tensor | None, side: str, name: str) -> tuple[Tensor, Tensor | None]:
        if side == "guide" and x.dtype == torch.float64 and self.target_dtype != torch.float64:
            x = x.float()
        return self.subsets(x, (side, name)), w


class SinkSlot:
    """Where the guide's persistent taps send layer outputs: the current step's sink, or nowhere.

    The taps stay on the guide for the whole window (installing hooks in every step would break a
    ``torch.compile`` graph each time); only while :func:`reduce_guide` runs is a sink plugged in,
    so a user's own forward of the guide is not captured.
    """

    def __init__(self) -> None:
        self.current: Callable[[str, Any], None] | None = None

    def __call__(self, name: str, output: Any) -> None:
        if self.current is not None:
            self.current(name, output)


def reduce_guide(
    guide: nn.Module,
    plan: LayerPlan,
    metric: Metric,
    routed: Routed,
    shape: Shaper,
    slot: SinkSlot,
    gather: Gatherer | None = None,
) -> dict[tuple[str, str], Any]:
    """Run the guide once; per planned guide layer and mode, keep only ``metric.prepare``'s result.

    ``shape`` applies the feature subset (see ``Shaper``); ``slot`` is the :class:`SinkSlot` the
    guide's taps (installed by the engine) report to. In one process each layer is reduced in its
    hook; with ``gather`` (several processes) the layers wait for the end of the forward, are gathered
    in buckets, and each is reduced as its bucket arrives.
    """
    wanted: dict[str, set[str]] = {}
    for pair in plan:
        wanted.setdefault(pair.guide.name, set()).add(pair.mode)
    infos = {p.guide.name: p.guide for p in plan}
    prepared: dict[tuple[str, str], Any] = {}
    pending: dict[tuple[str, str], tuple[Tensor, Tensor | None]] = {}  # awaiting the gather
    repeated: dict[str, list[Any]] = {}  # layers planned as several calls: stacked after the forward

    def sink(name: str, output: Any) -> None:
        if infos[name].calls > 1:
            repeated.setdefault(name, []).append(output)
        else:
            reduce(name, *extract(output))

    def reduce(name: str, tensor: Tensor | None, lengths: Tensor | None) -> None:
        info = infos[name]
        if tensor is None or info.batch_dim is None:
            return
        if tensor.shape[info.batch_dim] != routed.n:
            raise BatchSizeMismatchError(
                f"guide layer {name!r} produced {tensor.shape[info.batch_dim]} samples for a batch of {routed.n}"
            )
        if lengths is not None:
            mask = lengths_to_mask(lengths, tensor.shape[1], tensor.device)
        else:
            mask = routed.mask_for("guide", info.decoder)
            tensor, mask = unfold_calls(tensor, mask, info.calls)
        for mode in wanted[name]:
            x, w = features(tensor, info.batch_dim, mode, mask, info.channels_first)
            x, w = shape(x, w, "guide", name)
            if gather is None:
                prepared[(name, mode)] = metric.prepare(x, w)
            else:
                pending[(name, mode)] = (x, w)

    if guide.training:
        guide.eval()  # the guide stays in eval mode whatever the caller did
    slot.current = sink
    try:
        # inference_mode is the cheapest; torch.compile cannot trace into it (a graph break), so
        # under compile the guide runs under no_grad, which it traces.
        with torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode():
            call_guide(guide, routed.guide_args, routed.guide_kwargs)
            for name, calls in repeated.items():
                reduce(name, *stack_calls(calls, infos[name].batch_dim))
            if gather is not None:
                keys = list(dict.fromkeys((p.guide.name, p.mode) for p in plan))
                for key, (x, w) in gather(keys, pending):
                    pending.pop(key)  # each bucket's local features go once it is gathered
                    prepared[key] = metric.prepare(x, w)
    finally:
        slot.current = None
    # Out of inference mode: autograd may save these for the target's backward.
    return {key: metric.clone_prepared(value) for key, value in prepared.items()}


def stack_calls(calls: list[Any], batch_dim: int | None) -> tuple[Tensor | None, Tensor | None]:
    """One layer's outputs in a forward: the activation of a single call, or those of a module run
    several times (a recurrent cell in a Python loop, a block reused at several depths) stacked in
    call order right after the batch axis, ``(n, calls, ...)``: one time step per call.

    Examples:
        >>> import torch
        >>> stack_calls([torch.zeros(4, 3), torch.ones(4, 3)], 0)[0].shape
        torch.Size([4, 2, 3])
    """
    if len(calls) == 1 or batch_dim is None:
        return extract(calls[-1])
    tensors = [extract(c)[0] for c in calls]
    if any(t is None for t in tensors) or len({t.shape for t in tensors}) != 1:  # type: ignore[union-attr]
        return None, None  # counted as a skipped pair: no one layout to stack
    return torch.stack(tensors, dim=batch_dim + 1), None  # type: ignore[arg-type]


@dataclass
class Term:
    """The result of one step: the weighted term, and ``readout``: each pair's distance (row 0) and
    whether it counted (row 1), detached and left on the device, so nothing waits for it until
    someone reads it (see ``GuidanceEngine.last_alignment``)."""

    loss: Tensor
    readout: Tensor
    missing: set[str]


def alignment_term(
    plan: LayerPlan,
    metric: Metric,
    captured: dict[str, list[Any]],
    prepared: dict[tuple[str, str], Any],
    routed: Routed,
    weight: float | Tensor,
    shape: Shaper,
    n: int,
    gather: Gatherer | None = None,
) -> Term:
    """Weighted sum over pairs of ``metric`` distances between captured target and prepared guide layers.

    ``gather`` (several processes) gathers the target's layers in one bucketed collective after
    they are all shaped (see :func:`reduce_guide`)."""
    pairs = list(plan)
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(pairs)
    missing: set[str] = set()
    shaped: dict[tuple[str, str], tuple[Tensor, Tensor | None]] = {}  # target features, once per layer
    measured: list[int] = []
    for i, pair in enumerate(pairs):
        calls = captured.get(pair.target.name)
        tensor, lengths = stack_calls(calls, pair.target.batch_dim) if calls else (None, None)
        if tensor is None or (pair.guide.name, pair.mode) not in prepared or pair.target.batch_dim is None:
            continue
        if tensor.dim() <= pair.target.batch_dim or tensor.shape[pair.target.batch_dim] != n:
            raise BatchSizeMismatchError(
                f"target layer {pair.target.name!r} produced output {tuple(tensor.shape)}, which has no batch axis "
                f"{pair.target.batch_dim} of size {n} as planned; a layer whose layout changes from step to step "
                "cannot be aligned (choose another with layers=...)"
            )
        key = (pair.target.name, pair.mode)
        if key not in shaped:
            if lengths is not None:
                layer_mask = lengths_to_mask(lengths, tensor.shape[1], tensor.device)
            else:
                tensor, layer_mask = unfold_calls(
                    tensor, routed.mask_for("target", pair.target.decoder), pair.target.calls
                )
            x, w = features(tensor, pair.target.batch_dim, pair.mode, layer_mask, pair.target.channels_first)
            shaped[key] = shape(x, w, "target", pair.target.name)
        measured.append(i)
    if gather is not None:  # a layer missing on another process is left out everywhere
        shaped = dict(gather(list(dict.fromkeys((p.target.name, p.mode) for p in pairs)), shaped))
    groups: dict[Any, list[int]] = {}
    for i in measured:
        pair = pairs[i]
        if (pair.target.name, pair.mode) not in shaped:
            continue
        x, w = shaped[(pair.target.name, pair.mode)]
        batch_key = metric.batch_key(prepared[(pair.guide.name, pair.mode)]) if w is None else None
        group = (tuple(x.shape), x.dtype, x.device, batch_key) if batch_key is not None else i
        groups.setdefault(group, []).append(i)
    grouped = {i for members in groups.values() for i in members}
    for i, pair in enumerate(pairs):
        if i not in grouped:  # a layer of it did not run (here or on another process)
            missing.add(pair.key)
            results[i] = (torch.ones(()), torch.zeros((), dtype=torch.bool))
    _measure_groups(pairs, metric, groups, shaped, prepared, results)
    return _sum_term(pairs, results, weight, missing)


def _measure_groups(
    pairs: list[Any],
    metric: Metric,
    groups: dict[Any, list[int]],
    shaped: dict[tuple[str, str], tuple[Tensor, Tensor | None]],
    prepared: dict[tuple[str, str], Any],
    results: list[tuple[Tensor, Tensor] | None],
) -> None:
    target_sides: dict[tuple[str, str], Any] = {}  # each target layer is reduced once per forward
    for members in groups.values():
        if len(members) > 1:  # same shapes: one batched problem, n x n work in few kernels
            group = [pairs[i] for i in members]
            keys = [(p.target.name, p.mode) for p in group]
            unique = list(dict.fromkeys(keys))  # a target layer paired with several guide layers
            side = metric.prepare_target_many([shaped[k][0] for k in unique])
            if len(unique) < len(keys):
                positions = {k: i for i, k in enumerate(unique)}
                index = torch.tensor([positions[k] for k in keys], device=shaped[keys[0]][0].device)
                side = metric.select_target(side, index)
            stacked = metric.stack_prepared([prepared[(p.guide.name, p.mode)] for p in group])
            distance, ok = metric.compare(side, stacked, None)
            x = shaped[keys[0]][0]
            _check_distance(metric, distance, (len(members), *x.shape[:-2]), group[0].key)
            for j, i in enumerate(members):
                results[i] = _reduce_positions(distance[j], ok[j])
            continue
        pair = pairs[members[0]]
        key = (pair.target.name, pair.mode)
        x, w = shaped[key]
        if key not in target_sides:
            target_sides[key] = metric.prepare_target(x, w)
        distance, ok = metric.compare(target_sides[key], prepared[(pair.guide.name, pair.mode)], w)
        _check_distance(metric, distance, tuple(x.shape[:-2]), pair.key)
        results[members[0]] = _reduce_positions(distance, ok)


def _sum_term(
    pairs: list[Any], results: list[tuple[Tensor, Tensor] | None], weight: float | Tensor, missing: set[str]
) -> Term:
    distances = [r[0] for r in results if r is not None]
    oks = [r[1] for r in results if r is not None]
    device = next((d.device for d in distances if d.requires_grad), distances[0].device)
    stacked = torch.stack([d.to(device) for d in distances])
    ok_all = torch.stack([o.to(device) for o in oks]) & torch.isfinite(stacked.detach())
    loss = weight * torch.where(ok_all, stacked, torch.zeros_like(stacked)).sum()
    return Term(loss, torch.stack([stacked.detach(), ok_all.to(stacked.dtype)]), missing)


def _check_distance(metric: Metric, distance: Any, expected: tuple[int, ...], key: str) -> None:
    if not isinstance(distance, Tensor) or tuple(distance.shape) != expected:
        shape = tuple(distance.shape) if isinstance(distance, Tensor) else type(distance).__name__
        raise MetricError(f"metric {metric.name!r} returned {shape} for pair {key}; expected a 0-dim tensor")


def _reduce_positions(distance: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    if distance.dim():  # token-wise: mean over the positions that could be measured
        okf = ok.to(distance.dtype)
        distance = torch.where(ok, distance, torch.zeros_like(distance)).sum() / okf.sum().clamp_min(1.0)
        ok = ok.any()
    return distance.float(), ok
