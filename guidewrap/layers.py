"""Layer discovery and matching.

Layers are named by their ``named_modules()`` paths (as in torchvision's feature extraction).
Discovery runs one probe forward and records which candidate modules actually fire, in
forward order, with their output shapes; modules that never run (a fused fast path, an
unused branch) are therefore never planned. Matching follows the guidance paper: the guide's
``i``-th layer goes to the target's ``round(i * (n_t - 1) / (n_g - 1))``-th layer, first to
first and last to last.

Examples:
    >>> spread(5, 3)
    [0, 2, 4]
    >>> spread(2, 4)  # more guide layers than target layers: several land on one
    [0, 0, 1, 1]
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .capture import extract, find_batch_dim, is_channels_first, sequence_length
from .errors import LayerNotFoundError, PlanError

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LEVELS",
    "PAPER_LAYER_TYPES",
    "LayerInfo",
    "LayerPair",
    "LayerPlan",
    "block_names",
    "level_of",
    "list_layers",
    "spread",
]

# The paper's hooked types (Conv2d, Linear, AdaptiveAvgPool2d, LSTM, RNN, TransformerDecoderLayer,
# LayerNorm, MultiheadAttention), widened to the other dimensions and families. Class names
# are matched for Hugging Face's GPT-2 ``Conv1D`` so transformers need not be imported.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module] | str, ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.RNN,
    nn.LSTM,
    nn.GRU,
    nn.RNNCell,
    nn.LSTMCell,
    nn.GRUCell,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.LayerNorm,
    "Conv1D",
)


# layers="paper": the published code's hooked types, matched exactly (type(m) is the class, not a
# subclass: MultiheadAttention's NonDynamicallyQuantizableLinear out_proj is not a Linear there).
PAPER_LAYER_TYPES: tuple[str, ...] = (
    "Conv2d",
    "Linear",
    "AdaptiveAvgPool2d",
    "LSTM",
    "RNN",
    "TransformerDecoderLayer",
    "LayerNorm",
    "MultiheadAttention",
)


# Granularity of automatic matching (``layers=``): "blocks" (the repeated blocks of a network: the
# residual stream of transformer layers, ResNet blocks, recurrent layers), "sublayers" (every module
# of DEFAULT_LAYER_TYPES) or "paper" (the published code's rule). "auto" is DEFAULT_LEVEL.
LEVELS: tuple[str, ...] = ("blocks", "sublayers", "paper")
DEFAULT_LEVEL = "sublayers"  # chosen by the matching study (docs/results.md, "Matching")


def level_of(spec: Any) -> str | None:
    """The level a ``layers`` spec (or one side's spec) selects; ``None`` for named layers.

    Examples:
        >>> level_of("auto"), level_of("blocks"), level_of(["fc1"])
        ('sublayers', 'blocks', None)
    """
    if not isinstance(spec, str) or spec not in ("auto", *LEVELS):
        return None
    return DEFAULT_LEVEL if spec == "auto" else spec


# Blocks on their own: a recurrent layer or a transformer layer is a block wherever it sits.
_ATOMIC_BLOCKS = (nn.RNNBase, nn.RNNCellBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# Layers that map features to outputs: when the model returns such a layer's output, it is a head.
_LINEAR_LIKE = (nn.Linear, nn.Bilinear, "Conv1D")


def spread(n_target: int, n_guide: int) -> list[int]:
    """Target index for each guide layer: ``round(i * (n_t - 1) / (n_g - 1))``.

    Examples:
        >>> spread(48, 21)[:4]
        [0, 2, 5, 7]
    """
    if n_guide == 1:
        return [0]
    return [round(i * (n_target - 1) / (n_guide - 1)) for i in range(n_guide)]


def list_layers(model: nn.Module) -> list[str]:
    """All layer names of ``model`` (its ``named_modules()`` paths, wrappers stripped).

    Examples:
        >>> import torch
        >>> list_layers(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
        ['0', '1']
    """
    from .utils import unwrap_model

    return [name for name, _ in unwrap_model(model).named_modules() if name]


@dataclass
class LayerInfo:
    """One hookable layer as seen by the probe forward.

    Examples:
        >>> LayerInfo("fc1", "Linear", (8, 16), batch_dim=0).features
        16
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    batch_dim: int | None = None
    channels_first: bool = False
    skip_reason: str | None = None
    calls: int = 1
    declared: tuple[int, int] | None = None  # (batch axis, its size) per the module's batch_first
    ambiguous: bool = False  # several output axes have the batch's size and nothing declared which
    head: bool = False  # a linear layer whose output the model returns: a real output head
    in_place: bool = False  # the network modifies this output in place after it returns (ReLU(inplace=True))
    folded: int | None = None  # skipped as folded; the axis of size n it would have taken (see _agree)
    trainable: bool | None = None  # a trainable parameter at or upstream of it (None: not known)
    decoder: bool = False  # in an encoder-decoder's decoder: padded by the decoder's mask, not the source's

    @property
    def features(self) -> int:
        """Number of features per sample when flattened."""
        if not self.shape:
            return 0
        out = 1
        for size in self.shape[1:]:
            out *= size
        return out

    @property
    def seq_len(self) -> int | None:
        """Sequence length for a 3-D (sequence) output, else None."""
        return None if self.shape is None else sequence_length(torch.Size(self.shape), self.channels_first)


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


def block_names(model: nn.Module) -> list[str]:
    """The repeated blocks of ``model``, in definition order: the level ``layers="blocks"`` aligns.

    A block is a module with sub-modules that sits in an ``nn.ModuleList`` / ``nn.Sequential``
    beside at least one sibling of its own class (GPT-2's ``h.0``, ``h.1``..., BERT's
    ``encoder.layer.*``, a ResNet's ``layer1.0``...), or a recurrent / transformer layer anywhere.
    The outermost such modules are taken, except that a block which is itself a plain container
    (a stage of a ``Sequential`` of stages) is looked into for the blocks inside it.

    Examples:
        >>> from torch import nn
        >>> stack = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)], nn.Linear(4, 2))
        >>> block_names(stack)
        ['0', '1', '2']
        >>> block_names(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))  # no repeated blocks
        []
    """
    from .utils import unwrap_model

    model = unwrap_model(model)
    chosen: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        repeated: dict[type, int] = {}
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            for _, child in children:
                repeated[type(child)] = repeated.get(type(child), 0) + 1
        for name, child in children:
            path = f"{prefix}.{name}" if prefix else name
            composite = next(child.children(), None) is not None
            is_block = isinstance(child, _ATOMIC_BLOCKS) or (composite and repeated.get(type(child), 0) >= 2)
            if is_block and not isinstance(child, (nn.ModuleList, nn.Sequential)):
                chosen.append(path)  # outermost: what is inside a block is not looked at
            elif is_block and not _has_blocks(child):
                chosen.append(path)  # a container of plain layers repeated (a Sequential per block)
            else:
                visit(path, child)

    visit("", model)
    return chosen


def _has_blocks(module: nn.Module) -> bool:
    """Whether blocks exist inside ``module`` (so a container of blocks is looked into)."""
    return bool(block_names(module))


# --------------------------------------------------------------------------- name resolution


def _not_found(model_name: str, wanted: str, names: Sequence[str]) -> LayerNotFoundError:
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return LayerNotFoundError(
        f"{model_name} has no layer matching {wanted!r}.{hint} Layer names are named_modules() paths; "
        f"list them with guidewrap.list_layers({model_name})."
    )


def resolve_names(model: nn.Module, patterns: Sequence[str], model_name: str) -> list[str]:
    """Expand names / fnmatch patterns to module names, failing at once on a bad one."""
    names = [name for name, _ in model.named_modules() if name]
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise LayerNotFoundError(f"{model_name} layer names must be strings, got {pattern!r}")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise _not_found(model_name, pattern, names)
        chosen.extend(m for m in matched if m not in chosen)
    return chosen


def _is_candidate(module: nn.Module, layer_types: Sequence[type[nn.Module] | str]) -> bool:
    module = base_layer(module)
    for kind in layer_types:
        if isinstance(kind, str):
            if layer_type(module) == kind:
                return True
        elif isinstance(module, kind):
            return True
    return False


def base_layer(module: nn.Module) -> nn.Module:
    """The layer an adapter wraps (peft's LoRA keeps it as ``base_layer`` beside ``lora_A`` /
    ``lora_B``), else the module itself. The wrapper's output is the adapted layer's output, so the
    wrapper is planned as that layer and nothing inside it is.

    Examples:
        >>> from torch import nn
        >>> class Adapter(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base_layer, self.lora_A = nn.Linear(4, 4), nn.Linear(4, 1)
        >>> type(base_layer(Adapter())).__name__, type(base_layer(nn.ReLU())).__name__
        ('Linear', 'ReLU')
    """
    inner = getattr(module, "base_layer", None)
    while isinstance(inner, nn.Module) and inner is not module:
        module, inner = inner, getattr(inner, "base_layer", None)
    return module


@functools.cache
def _fsdp_module() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def layer_type(module: nn.Module) -> str:
    """The class name a layer is known by: its own, or for a sharded layer (FSDP2 makes a ``Linear``
    an ``FSDPLinear``) the class it shards, so sharding never changes what is matched.

    Examples:
        >>> import torch
        >>> layer_type(torch.nn.Linear(2, 2))
        'Linear'
    """
    fsdp = _fsdp_module()
    cls = type(module)
    if fsdp is not None and isinstance(module, fsdp):
        cls = next((c for c in cls.__mro__ if not issubclass(c, fsdp)), cls)
    return cls.__name__


def _batch_first_hint(model: nn.Module, name: str) -> bool | None:
    """``batch_first`` of the module, else of a direct child (a ``TransformerEncoderLayer`` keeps it
    on its ``self_attn``), else of the nearest ancestor that declares one."""
    module = model.get_submodule(name) if name else model
    own = getattr(module, "batch_first", None)
    if isinstance(own, bool):
        return own
    for child in module.children():
        flag = getattr(child, "batch_first", None)
        if isinstance(flag, bool):
            return flag
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        try:
            ancestor = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        flag = getattr(ancestor, "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return None


def layout_conflicts(infos: list[LayerInfo], n: int) -> list[LayerInfo]:
    """Layers whose declared layout (``batch_first``) puts a size other than ``n`` on the batch
    axis: evidence that the input's batch axis was taken wrongly (e.g. an ``nn.LSTM`` without
    ``batch_first`` fed ``(T, n, d)`` while axis 0 was assumed)."""
    return [i for i in infos if i.declared is not None and i.declared[1] != n]


# --------------------------------------------------------------------------- probing


@contextlib.contextmanager
def _no_side_effects(model: nn.Module) -> Iterator[None]:
    """Run a probe forward without changing buffers (BatchNorm stats) or the global RNG."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def probe(
    model: nn.Module,
    run: Callable[[], Any],
    n: int,
    names: Sequence[str] | None,
    layer_types: Sequence[type[nn.Module] | str],
    input_axis: int = 0,
) -> list[LayerInfo]:
    """Record, in firing order, the layers of ``model`` that run during ``run()``.

    ``names`` restricts the candidates to those modules; otherwise every module of a type in
    ``layer_types`` is a candidate. ``input_axis`` (the input's batch axis) breaks ties between
    output dimensions of size ``n``. Also marks each layer that is a real output head (a
    linear layer whose output the model returns) and skips a layer whose output is the very
    tensor a later-finishing layer returns (a post-norm block and its final norm). Hooks are
    always removed.
    """
    modules = dict(model.named_modules())
    if names is None:
        candidates = {name: m for name, m in modules.items() if name and _is_candidate(m, layer_types)}
        wrappers = [name for name in candidates if base_layer(modules[name]) is not modules[name]]
        candidates = {
            name: m for name, m in candidates.items() if not any(name.startswith(w + ".") for w in wrappers)
        }  # inside an adapter: its base layer alone, or the adapter's rank-r parts, are not the adapted layer
        if not candidates and _is_candidate(model, layer_types):
            candidates = {"": model}  # a bare layer as the whole model (nn.LSTM, nn.Linear): itself
    else:
        candidates = {name: modules[name] for name in names}
    seen: dict[str, LayerInfo] = {}
    last: dict[str, Tensor] = {}  # each layer's latest output tensor, for the identity checks
    finished: dict[str, None] = {}  # names in the order their (last) call returned
    versions: list[tuple[str, Tensor, int]] = []  # each output's version counter when it returned

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = extract(output)[0]
            if tensor is not None:
                last[name] = tensor
                if not tensor.is_inference():  # inference tensors (the guide's probe) have no counter
                    versions.append((name, tensor, tensor._version))
            finished.pop(name, None)
            finished[name] = None
            if name not in seen:
                seen[name] = describe(model, name, module, output, n, input_axis)
                if tensor is not None and torch.is_grad_enabled() and not tensor.is_inference():
                    seen[name].trainable = tensor.requires_grad  # through a trainable parameter, or not
                return
            first, again = seen[name], describe(model, name, module, output, n, input_axis)
            first.calls += 1
            if first.skip_reason is None and (again.shape, again.batch_dim) != (first.shape, first.batch_dim):
                # Calls are stacked as a sequence (alignment.stack_calls): that needs one layout for all.
                first.skip_reason = (
                    f"runs {first.calls}+ times per forward with different output layouts ({first.shape}, batch axis "
                    f"{first.batch_dim}, then {again.shape}, batch axis {again.batch_dim}); align a module that runs "
                    "once per forward, or wrap each call in its own module"
                )

        return hook

    handles = [m.register_forward_hook(make_hook(name, m)) for name, m in candidates.items()]
    try:
        with _no_side_effects(model):
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    if not seen and names is None and "" not in candidates:
        if _is_candidate(model, layer_types):  # a bare MultiheadAttention computes without its out_proj module
            return probe(model, run, n, [""], layer_types, input_axis)
        raise PlanError(_none_ran(model, run, candidates))
    returned = {_storage_key(t) for t in _float_tensors(result)}
    infos = list(seen.values())
    changed = {name for name, tensor, version in versions if tensor._version != version}
    encoder_decoder = _is_encoder_decoder(model)
    for info in infos:
        info.in_place = info.name in changed
        info.decoder = encoder_decoder and "decoder" in info.name.split(".")
    for info in infos:
        tensor = last.get(info.name)
        info.head = (
            tensor is not None
            and info.calls == 1
            and _is_candidate(modules[info.name], _LINEAR_LIKE)
            and _storage_key(tensor) in returned
        )
        if info.calls > 1 and info.skip_reason is None and info.shape is not None:
            info.shape = (info.shape[0], info.calls, *info.shape[1:])  # the calls, stacked as a sequence
            info.channels_first = False
    _skip_same_tensor(infos, last, finished)
    return _agree(infos)


def _none_ran(model: nn.Module, run: Callable[[], Any], candidates: Mapping[str, nn.Module]) -> str:
    """Why no layer can be planned when no candidate ran: the candidates, and what ran instead."""
    ran: dict[str, None] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            ran[name] = None

        return hook

    leaves = {name: m for name, m in model.named_modules() if next(m.children(), None) is None}
    handles = [m.register_forward_hook(record(name)) for name, m in leaves.items()]
    try:
        with _no_side_effects(model):
            run()
    finally:
        for handle in handles:
            handle.remove()
    listed = ", ".join(f"{name or '(the model)'} ({layer_type(leaves[name])})" for name in list(ran)[:6])
    where = (
        f"{len(candidates)} modules of those types exist ({', '.join(list(candidates)[:3])}) but none ran"
        if candidates
        else "it has none"
    )
    return (
        f"nothing to align: no layer of the types guidance aligns ran in the forward of {type(model).__name__} "
        f"({where}). The modules "
        f"that ran: {listed or 'none'}. Choose its layers by name, layers={{'target': [...], 'guide': [...]}}, or "
        "by type, layer_types=(nn.Embedding, ...)"
    )


def _is_encoder_decoder(model: nn.Module) -> bool:
    """A Hugging Face encoder-decoder (``config.is_encoder_decoder``), or a model with an ``encoder``
    and a ``decoder`` of its own."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return True
    children = dict(model.named_children())
    return isinstance(children.get("encoder"), nn.Module) and isinstance(children.get("decoder"), nn.Module)


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.dtype.itemsize)
    except (RuntimeError, NotImplementedError):  # tensors without storage (functional wrappers)
        return (id(tensor), 0)


def _float_tensors(value: Any) -> Iterator[Tensor]:
    """Every floating-point tensor in a (nested) model output."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _float_tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_tensors(item)


def _skip_same_tensor(infos: list[LayerInfo], last: dict[str, Tensor], finished: dict[str, None]) -> None:
    """Of layers whose outputs are one and the same tensor (a post-norm ``TransformerEncoderLayer``
    returns its ``norm2``'s output), keep the one that returns last (the outer module)."""
    order = {name: i for i, name in enumerate(finished)}
    groups: dict[tuple[Any, ...], list[LayerInfo]] = {}
    for info in infos:
        tensor = last.get(info.name)
        if tensor is None or info.skip_reason is not None:
            continue
        key = (*_storage_key(tensor), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), info.calls)
        groups.setdefault(key, []).append(info)
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda i: order.get(i.name, -1))
        keep = group[-1]
        for info in group[:-1]:
            info.skip_reason = f"its output is the same tensor as {keep.name!r}'s, which is planned instead"


def _agree(infos: list[LayerInfo]) -> list[LayerInfo]:
    """Agreement across layers: a 3-D output whose batch axis is ambiguous (sequence length equal
    to the batch size, no declared layout) takes the axis that the model's declaring layers use
    (the input projection of a sequence-first transformer is (T, n, d) like its layers)."""
    declared = {i.declared[0] for i in infos if i.declared is not None}
    if len(declared) != 1:
        return infos
    axis = declared.pop()
    for info in infos:
        if info.folded is not None and info.folded == axis and info.shape is not None:
            # A sequence-first model ((T, n, d) with T a multiple of n): the declared layout, not a fold.
            shape = list(info.shape)
            shape.insert(0, shape.pop(axis))
            info.shape, info.batch_dim, info.skip_reason, info.folded = tuple(shape), axis, None, None
    for info in infos:
        if info.ambiguous and info.batch_dim != axis and info.shape is not None and len(info.shape) == 3:
            info.batch_dim = axis  # the sizes are equal, so the batch-first shape is unchanged
    return infos


def _folded(tensor: Tensor, n: int, input_axis: int) -> bool:
    """Whether the input's batch axis holds a multiple of the batch in this output: samples times
    frames (video folded into the batch) or times windows (Swin's attention), sample-major or not."""
    if tensor.dim() <= input_axis or n < 1:
        return False
    rows = int(tensor.shape[input_axis])
    return rows > n and rows % n == 0


def describe(model: nn.Module, name: str, module: nn.Module, output: Any, n: int, input_axis: int = 0) -> LayerInfo:
    """LayerInfo for one output of ``module`` given a batch of ``n`` samples."""
    kind = layer_type(base_layer(module))
    tensor, lengths = extract(output)
    if tensor is None:
        return LayerInfo(name, kind, None, skip_reason=f"output of type {type(output).__name__} holds no float tensor")
    hint = True if lengths is not None else _batch_first_hint(model, name)
    declared = None
    if hint is not None and lengths is None and tensor.dim() == 3:
        axis = 0 if hint else 1
        declared = (axis, int(tensor.shape[axis]))
    batch_dim = find_batch_dim(tensor, n, hint, input_axis)
    if hint is None and _folded(tensor, n, input_axis):
        k = tensor.shape[input_axis] // n
        return LayerInfo(
            name, kind, tuple(tensor.shape), skip_reason=f"its output {tuple(tensor.shape)} holds {k} x {n} rows on "
            f"the batch axis {input_axis}: another axis (frames, windows, crops) is folded into the batch, so a size "
            f"{n} elsewhere is a coincidence, not the batch; align a layer where the fold is undone (layers=...)",
            folded=batch_dim,
        )  # fmt: skip
    if batch_dim is None:
        return LayerInfo(
            name, kind, tuple(tensor.shape), skip_reason=f"no batch dimension of size {n} in output shape "
            f"{tuple(tensor.shape)}", declared=declared
        )  # fmt: skip
    if tensor.dim() < 2:
        return LayerInfo(
            name, kind, tuple(tensor.shape), skip_reason=f"1-D output {tuple(tensor.shape)}: no per-sample "
            "features (is the input batched? guidance needs (n, ...) inputs)"
        )  # fmt: skip
    shape = tuple(tensor.movedim(batch_dim, 0).shape)
    channels_first = is_channels_first(module)
    ambiguous = hint is None and sum(size == n for size in tensor.shape) > 1
    return LayerInfo(
        name, kind, shape, batch_dim=batch_dim, channels_first=channels_first, declared=declared, ambiguous=ambiguous
    )


# --------------------------------------------------------------------------- matching


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
        by_t = {i.name: i for i in target_layers}
        by_g = {i.name: i for i in guide_layers}
        pairs = []
        for t_name, g_name in layers:
            for side, table, wanted in (("target", by_t, t_name), ("guide", by_g, g_name)):
                if wanted not in table:
                    raise PlanError(
                        f"{side} layer {wanted!r} did not run during the forward pass, so it cannot be aligned"
                    )
            t_info, g_info = by_t[t_name], by_g[g_name]
            _usable([t_info], "target", True, False, skipped)
            _usable([g_info], "guide", True, False, skipped)
            pairs.append(_pair(t_info, g_info, sequence, notes))
        return _finish(LayerPlan(pairs, skipped, notes))

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
        side = "target" if not t_good else "guide"
        reasons = [i.skip_reason or "" for s, i in skipped if s == side]
        fix = "Pass layers={'target': [...], 'guide': [...]} or layer_types=... to choose layers."
        if reasons and all(r.startswith("no batch dimension") for r in reasons):
            fix = (
                f"Every {side} layer's output lacks the batch size read from the {side}'s first tensor input (its "
                "axis 0, or input_batch_dim): if that input does not count the samples (a flat token list with "
                "offsets, as EmbeddingBag(text, offsets) takes), pass batched inputs ((n, T) ids) or set "
                "input_batch_dim / guide_input_batch_dim to the axis that counts them."
            )
        raise PlanError(
            f"no usable {side} layer was found, so there is nothing to align. Skipped: "
            + ", ".join(f"{i.name} ({i.skip_reason})" for s, i in skipped if s == side)
            + f". {fix}"
        )
    if namesakes is not None:
        pairs_found, unmatched = namesakes
        for side, info in unmatched:
            info.skip_reason = "no namesake in the other network (the two share a body; heads may differ)"
            skipped.append((side, info))
        for t, g in pairs_found:
            if t not in t_good:  # left out as frozen: its namesake goes too
                g.skip_reason = f"its namesake {t.name!r} in the target is frozen"
                skipped.append(("guide", g))
        pairs_found = [(t, g) for t, g in pairs_found if t in t_good]
        notes.append(
            f"the two networks share a body: each of its {len(pairs_found)} layers is paired with its namesake"
        )
        pairs = [_pair(t, g, sequence, notes) for t, g in pairs_found]
        return _finish(LayerPlan(pairs, skipped, notes))
    index = spread(len(t_good), len(g_good))
    if len(g_good) > len(t_good):
        notes.append(
            f"guide has {len(g_good)} layers for {len(t_good)} target layers: several guide layers share a target "
            "layer and all of their terms are kept (the paper's code kept only the last)"
        )
    pairs = [_pair(t_good[ti], g, sequence, notes) for g, ti in zip(g_good, index, strict=True)]
    return _finish(LayerPlan(pairs, skipped, notes))


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
