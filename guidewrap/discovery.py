"""Layer discovery: which modules are candidates, what they are called, how they are laid out.

Layers are named by their ``named_modules()`` paths (as in torchvision's feature extraction); a
wrong name fails at once with close matches. A level (``"blocks"``, ``"sublayers"``, ``"paper"``)
decides the candidates: the repeated blocks of a network, or every module of the aligned types. A
layer is known by the class it is (an adapter's base layer, a sharded layer's own class), so
wrappers never change what is matched. :mod:`guidewrap.probing` records which candidates run;
:mod:`guidewrap.matching` pairs them.

Examples:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> list_layers(net), level_of("auto")
    (['0', '1'], 'sublayers')
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import sequence_length
from .errors import LayerNotFoundError

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LEVELS",
    "PAPER_LAYER_TYPES",
    "LayerInfo",
    "base_layer",
    "block_names",
    "layer_type",
    "level_of",
    "list_layers",
    "resolve_names",
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
