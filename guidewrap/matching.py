"""Matching: probed layers into pairs, following the guidance paper's spreading rule.

The guide's ``i``-th layer goes to the target's ``round(i * (n_t - 1) / (n_g - 1))``-th layer, first
to first and last to last; networks sharing a body pair namesakes; ``layers="paper"`` is the published
rule exactly. A :class:`LayerPlan` holds the pairs, every layer left out with its reason, and notes.

Examples:
    >>> spread(5, 3)
    [0, 2, 4]
    >>> spread(2, 4)  # more guide layers than target layers: several land on one
    [0, 0, 1, 1]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .discovery import PAPER_LAYER_TYPES, LayerInfo, level_of, resolve_names
from .errors import LayerNotFoundError, PlanError

__all__ = ["LayerPair", "LayerPlan", "build_plan", "check_names", "spread"]


def spread(n_target: int, n_guide: int) -> list[int]:
    """Target index for each guide layer: ``round(i * (n_t - 1) / (n_g - 1))``.

    Examples:
        >>> spread(48, 21)[:4]
        [0, 2, 5, 7]
    """
    if n_guide == 1:
        return [0]
    return [round(i * (n_target - 1) / (n_guide - 1)) for i in range(n_guide)]


@dataclass
class LayerPair:
    """A (target layer, guide layer) pair aligned by the loss.

    Examples:
        >>> t, g = LayerInfo("a", "Linear", (4, 8)), LayerInfo("b", "Conv2d", (4, 2, 3, 3))
        >>> LayerPair(t, g).key
        'a<-b'
    """

    target: LayerInfo
    guide: LayerInfo
    mode: str = "flatten"

    @property
    def key(self) -> str:
        """``"target_name<-guide_name"``, the key used in logs."""
        return f"{self.target.name}<-{self.guide.name}"


@dataclass
class LayerPlan:
    """The matched layer pairs, plus every layer left out and why. Printing shows a table.

    Examples:
        >>> t, g = LayerInfo("fc", "Linear", (4, 8)), LayerInfo("conv", "Conv2d", (4, 2, 3, 3))
        >>> print(LayerPlan([LayerPair(t, g)]))  # doctest: +NORMALIZE_WHITESPACE
        guidance plan: 1 pair
          #  target       features  axis  <- guide          features  axis  mode
          0  fc (Linear)         8     -  <- conv (Conv2d)        18     -  flatten

    ``axis`` is the dimension of each layer's output taken as the batch.
    """

    pairs: list[LayerPair]
    skipped: list[tuple[str, LayerInfo]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[LayerPair]:
        return iter(self.pairs)

    def __str__(self) -> str:
        def axis(info: LayerInfo) -> str:
            return "-" if info.batch_dim is None else str(info.batch_dim)

        rows = [(f"{p.target.name} ({p.target.type})", p.target.features, axis(p.target),
                 f"{p.guide.name} ({p.guide.type})", p.guide.features, axis(p.guide), p.mode)
                for p in self.pairs]  # fmt: skip
        w_t = max([len("target")] + [len(r[0]) for r in rows])
        w_g = max([len("guide")] + [len(r[3]) for r in rows])
        lines = [f"guidance plan: {len(self.pairs)} pair{'s' if len(self.pairs) != 1 else ''}"]
        lines.append(f"  {'#':>2}  {'target':<{w_t}}  features  axis  <- {'guide':<{w_g}}  features  axis  mode")
        for i, (t, tf, ta, g, gf, ga, mode) in enumerate(rows):
            lines.append(f"  {i:>2}  {t:<{w_t}}  {tf:>8}  {ta:>4}  <- {g:<{w_g}}  {gf:>8}  {ga:>4}  {mode}")
        for side, info in self.skipped:
            lines.append(f"  skipped {side} {info.name} ({info.type}): {info.skip_reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    __repr__ = __str__


def build_plan(
    target_layers: list[LayerInfo],
    guide_layers: list[LayerInfo],
    layers: Any,
    sequence: str,
    exclude_output_layer: bool,
) -> LayerPlan:
    """Match probed layers into pairs according to the ``layers`` setting.

    Automatic levels (``"auto"``, ``"blocks"``, ``"sublayers"``) leave out real output heads on
    either side (``exclude_output_layer``), pair namesakes when the networks share a body, and
    otherwise spread the guide's layers over the target's depth.
    """
    skipped: list[tuple[str, LayerInfo]] = []
    notes: list[str] = []
    if isinstance(layers, list):  # explicit pairs, in the user's order
        return _explicit_plan(target_layers, guide_layers, layers, sequence, skipped, notes)
    if layers == "paper":
        return _paper_plan(target_layers, guide_layers, skipped, notes)
    _check_named_layers_ran(layers, {"target": target_layers, "guide": guide_layers})
    t_auto = level_of(layers["target"] if isinstance(layers, dict) else layers) is not None
    g_auto = level_of(layers["guide"] if isinstance(layers, dict) else layers) is not None
    t_good = _usable(target_layers, "target", not t_auto, exclude_output_layer and t_auto, skipped)
    g_good = _usable(guide_layers, "guide", not g_auto, exclude_output_layer and g_auto, skipped)
    # Namesakes are found over every usable layer: a frozen target layer still names its place in the body.
    namesakes = _namesakes(t_good, g_good) if t_auto and g_auto else None
    if t_auto:
        t_good = _trainable(t_good, skipped, notes)
    if not t_good or not g_good:
        raise _nothing_usable("target" if not t_good else "guide", skipped)
    if namesakes is not None:
        pairs_found = _keep_namesakes(*namesakes, t_good, skipped)
        notes.append(
            f"the two networks share a body: each of its {len(pairs_found)} layers is paired with its namesake"
        )
        return _finish(LayerPlan([_pair(t, g, sequence, notes) for t, g in pairs_found], skipped, notes))
    index = spread(len(t_good), len(g_good))
    if len(g_good) > len(t_good):
        notes.append(
            f"guide has {len(g_good)} layers for {len(t_good)} target layers: several guide layers share a target "
            "layer and all of their terms are kept (the paper's code kept only the last)"
        )
    pairs = [_pair(t_good[ti], g, sequence, notes) for g, ti in zip(g_good, index, strict=True)]
    return _finish(LayerPlan(pairs, skipped, notes))


def _explicit_plan(
    target_layers: list[LayerInfo],
    guide_layers: list[LayerInfo],
    layers: list[tuple[str, str]],
    sequence: str,
    skipped: list[tuple[str, LayerInfo]],
    notes: list[str],
) -> LayerPlan:
    """The user's pairs, in the user's order; a layer that did not run or cannot be aligned raises."""
    by_t = {i.name: i for i in target_layers}
    by_g = {i.name: i for i in guide_layers}
    pairs = []
    for t_name, g_name in layers:
        for side, table, wanted in (("target", by_t, t_name), ("guide", by_g, g_name)):
            if wanted not in table:
                raise PlanError(f"{side} layer {wanted!r} did not run during the forward pass, so it cannot be aligned")
        t_info, g_info = by_t[t_name], by_g[g_name]
        _usable([t_info], "target", True, False, skipped)
        _usable([g_info], "guide", True, False, skipped)
        pairs.append(_pair(t_info, g_info, sequence, notes))
    return _finish(LayerPlan(pairs, skipped, notes))


def _nothing_usable(side: str, skipped: list[tuple[str, LayerInfo]]) -> PlanError:
    """The error for a side without a usable layer: each skipped layer's reason and the fix."""
    reasons = [i.skip_reason or "" for s, i in skipped if s == side]
    fix = "Pass layers={'target': [...], 'guide': [...]} or layer_types=... to choose layers."
    if reasons and all(r.startswith("no batch dimension") for r in reasons):
        fix = (
            f"Every {side} layer's output lacks the batch size read from the {side}'s first tensor input (its "
            "axis 0, or input_batch_dim): if that input does not count the samples (a flat token list with "
            "offsets, as EmbeddingBag(text, offsets) takes), pass batched inputs ((n, T) ids) or set "
            "input_batch_dim / guide_input_batch_dim to the axis that counts them."
        )
    return PlanError(
        f"no usable {side} layer was found, so there is nothing to align. Skipped: "
        + ", ".join(f"{i.name} ({i.skip_reason})" for s, i in skipped if s == side)
        + f". {fix}"
    )


def _keep_namesakes(
    pairs_found: list[tuple[LayerInfo, LayerInfo]],
    unmatched: list[tuple[str, LayerInfo]],
    t_good: list[LayerInfo],
    skipped: list[tuple[str, LayerInfo]],
) -> list[tuple[LayerInfo, LayerInfo]]:
    """The namesake pairs whose target layer is usable; the rest recorded as skipped, with why."""
    for side, info in unmatched:
        info.skip_reason = "no namesake in the other network (the two share a body; heads may differ)"
        skipped.append((side, info))
    for t, g in pairs_found:
        if t not in t_good:  # left out as frozen: its namesake goes too
            g.skip_reason = f"its namesake {t.name!r} in the target is frozen"
            skipped.append(("guide", g))
    return [(t, g) for t, g in pairs_found if t in t_good]


def _namesakes(
    t_good: list[LayerInfo], g_good: list[LayerInfo]
) -> tuple[list[tuple[LayerInfo, LayerInfo]], list[tuple[str, LayerInfo]]] | None:
    """Pairs of same-named layers when the two networks share a body, else None.

    Names match up to a leading prefix (``bert.encoder.layer.0`` is ``encoder.layer.0``;
    ``transformer.h.1.ln_2`` is ``h.1.ln_2``) and must be of one type. The body is shared when at
    least two layers match, in the same order on both sides, and the layers left without a
    namesake come after the last match on their side (heads), at most a quarter of that side (or
    one): GPT-2 with 4 blocks and GPT-2 with 2 are not one body, nor an 8-layer MLP and a 4-layer
    one; those are spread over depth instead.
    """
    by_suffix: dict[str, list[int]] = {}
    for j, g in enumerate(g_good):
        by_suffix.setdefault(g.name, []).append(j)
    matched: list[tuple[int, int]] = []
    for i, t in enumerate(t_good):
        parts = t.name.split(".")
        found = None
        for start in range(len(parts)):  # the target name, then without its leading components
            options = by_suffix.get(".".join(parts[start:]))
            if options:
                found = options
                break
        if found is None:
            for j, g in enumerate(g_good):  # the guide's name longer (prefix on the guide side)
                if g.name.endswith("." + t.name):
                    found = [j]
                    break
        if found is not None and len(found) == 1 and g_good[found[0]].type == t.type:
            matched.append((i, found[0]))
    if len(matched) < 2 or [j for _, j in matched] != sorted(j for _, j in matched):
        return None
    if all(_is_index_path(t_good[i].name) for i, _ in matched):
        return None  # "0", "2": positions in two different Sequentials, not names of one shared body
    t_hit, g_hit = {i for i, _ in matched}, {j for _, j in matched}
    if len(g_hit) < len(matched):
        return None
    for hit, size in ((t_hit, len(t_good)), (g_hit, len(g_good))):
        if any(k not in hit for k in range(max(hit) + 1)):
            return None  # a layer without namesake inside the body: not one body
        if size - len(hit) > max(1, size // 4):
            return None  # many layers after the shared part: a deeper network, not another head
    unmatched = [("target", t_good[i]) for i in range(len(t_good)) if i not in t_hit]
    unmatched += [("guide", g_good[j]) for j in range(len(g_good)) if j not in g_hit]
    return [(t_good[i], g_good[j]) for i, j in matched], unmatched


def _is_index_path(name: str) -> bool:
    """A name made of container indices only (``"2"``, ``"1.0"``)."""
    return all(part.isdigit() for part in name.split("."))


def _paper_plan(
    target_layers: list[LayerInfo],
    guide_layers: list[LayerInfo],
    skipped: list[tuple[str, LayerInfo]],
    notes: list[str],
) -> LayerPlan:
    """The published code's rule: its exact hooked types, the last hooked layer of each side dropped
    (the logits), guide layer i to target layer round(i (n_t - 1) / (n_g - 1)), and of several
    guide layers landing on one target layer only the last kept; flattened features."""
    sides = []
    for side, infos in (("target", target_layers), ("guide", guide_layers)):
        good = _usable(infos, side, False, False, skipped)
        if good:  # dropped even when it is the only layer, as the published code does
            last = good.pop()
            last.skip_reason = "last hooked layer (the logits), dropped by the paper's rule"
            skipped.append((side, last))
        if not good:
            raise PlanError(f"layers='paper' found no {side} layer of the paper's types {PAPER_LAYER_TYPES} to align")
        sides.append(good)
    t_good, g_good = sides
    landing: dict[int, LayerInfo] = {}
    for g, ti in zip(g_good, spread(len(t_good), len(g_good)), strict=True):
        landing[ti] = g  # a later guide layer on the same target layer replaces the earlier one
    if len(landing) < len(g_good):
        notes.append(
            f"paper rule: {len(g_good)} guide layers for {len(t_good)} target layers; of several guide layers "
            "landing on one target layer only the last is kept"
        )
    pairs = [LayerPair(t_good[ti], g, "flatten") for ti, g in sorted(landing.items())]
    return _finish(LayerPlan(pairs, skipped, notes))


def _check_named_layers_ran(layers: Any, fired: dict[str, list[LayerInfo]]) -> None:
    """A layer named exactly in a per-side list must run; a pattern may match modules that do not."""
    if not isinstance(layers, dict):
        return  # "auto" skips what does not run; explicit pairs are checked by their own branch
    for side, spec in layers.items():
        names = {info.name for info in fired[side]}
        exact = [] if level_of(spec) else [n for n in spec if not any(c in n for c in "*?[")]
        missing = [n for n in exact if n not in names]
        if missing:
            raise PlanError(
                f"{side} layer {missing[0]!r} did not run during the forward pass, so it cannot be aligned; "
                f"remove it from layers[{side!r}] (plan(example) lists the layers that run)"
            )


def _usable(
    infos: list[LayerInfo], side: str, explicit: bool, drop_output: bool, skipped: list[tuple[str, LayerInfo]]
) -> list[LayerInfo]:
    """Layers that can be aligned; an explicitly named one that cannot raises, others are recorded as skipped."""
    good = []
    for info in infos:
        if info.skip_reason is None:
            good.append(info)
        elif explicit:
            raise PlanError(
                f"{side} layer {info.name!r} cannot be aligned: {info.skip_reason}. Pick a layer whose output "
                "has the batch as one dimension (see plan(example) for candidates)."
            )
        else:
            skipped.append((side, info))
    heads = [i for i in good if i.head] if drop_output else []
    if heads and len(heads) < len(good):
        for head in heads:
            good.remove(head)
            head.skip_reason = (
                "output head (a linear layer whose output the model returns), left out as in the paper; "
                "set exclude_output_layer=False to align it"
            )
            skipped.append((side, head))
    return good


def _trainable(good: list[LayerInfo], skipped: list[tuple[str, LayerInfo]], notes: list[str]) -> list[LayerInfo]:
    """The target's layers that training can move: a frozen layer with no trainable parameter at or
    upstream of it (a frozen backbone under a trainable head) gives a constant term, which only
    dilutes the mean over pairs. Kept when every layer is frozen (a plan of a frozen model)."""
    frozen = [i for i in good if i.trainable is False]
    if not frozen or len(frozen) == len(good):
        return good
    for info in frozen:
        info.skip_reason = "frozen: no trainable parameter at or upstream of it (its term would be a constant)"
        skipped.append(("target", info))
    notes.append(
        f"{len(frozen)} frozen target layer{'s' if len(frozen) > 1 else ''} left out: no trainable parameter at or "
        "upstream of them, so aligning them trains nothing; name them in layers=... to align them anyway"
    )
    return [i for i in good if i.trainable is not False]


def _pair(t: LayerInfo, g: LayerInfo, sequence: str, notes: list[str]) -> LayerPair:
    if sequence == "flatten":
        return LayerPair(t, g, "flatten")
    if t.seq_len is not None and t.seq_len == g.seq_len:
        return LayerPair(t, g, sequence)
    why = "not both sequences" if t.seq_len is None or g.seq_len is None else f"lengths {t.seq_len} != {g.seq_len}"
    notes.append(f"{t.name}<-{g.name}: {sequence} needs two sequence outputs of one length ({why}); flattened")
    return LayerPair(t, g, "flatten")


def _finish(plan: LayerPlan) -> LayerPlan:
    if not plan.pairs:
        raise PlanError("the layer plan is empty: no pair to align. Check the layers=... setting.")
    infos = {id(i): i for p in plan.pairs for i in (p.target, p.guide)}.values()
    for info in infos:
        if info.calls > 1:
            plan.notes.append(
                f"{info.name} ran {info.calls} times per forward: its outputs are stacked in call order as a "
                f"sequence (n, {info.calls}, ...), one time step per call"
            )
    return plan


def check_names(layers: Any, target: nn.Module, guide: nn.Module) -> dict[str, list[str] | None]:
    """Resolve a config's explicit names and patterns per side now, so a typo fails before training.

    ``None`` for a side means automatic discovery.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> check_names([("0", "0")], net, net)
        {'target': ['0'], 'guide': ['0']}
    """
    if level_of(layers):
        return {"target": None, "guide": None}
    if isinstance(layers, list):
        out: dict[str, list[str] | None] = {}
        for side, model, names in (
            ("target", target, [t for t, _ in layers]),
            ("guide", guide, [g for _, g in layers]),
        ):
            valid = {name for name, _ in model.named_modules() if name}
            for name in names:
                if name not in valid:
                    resolve_names(model, [name], side)  # raises with close matches
                    raise LayerNotFoundError(f"{side} layer {name!r} must be an exact name, not a pattern")
            out[side] = list(dict.fromkeys(names))
        return out
    return {
        side: None if level_of(layers[side]) else resolve_names(model, layers[side], side)
        for side, model in (("target", target), ("guide", guide))
    }
