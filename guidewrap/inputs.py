"""What the guide sees: the target's batch, noise, or the output of a user's adapter.

:func:`route` runs once per guided step: it finds the batch size, builds the guide's call
(the same inputs, or the user's adapter applied once), checks that the guide gets as many
samples as the target, and moves the guide to the data's device.

Examples:
    >>> import torch
    >>> noisy = make_noise({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}, 50)
    >>> noisy["attention_mask"].tolist(), bool((noisy["input_ids"] < 50).all())
    ([[1.0, 1.0, 1.0]], True)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BatchSizeMismatchError, ConfigError, NoiseInputError

__all__ = [
    "Routed",
    "route",
    "batch_size",
    "distinct_samples",
    "noise_call",
    "make_noise",
    "vocab_size_of",
    "normalize_call",
    "fit_call",
    "check_not_packed",
]

Call = tuple[tuple[Any, ...], dict[str, Any]]

# Arguments that only matter for the task loss: never forwarded to the guide or noised.
TRAINING_ONLY_KEYS = ("labels", "label", "num_items_in_batch", "return_loss")
_KEEP_KEYS = ("token_type_ids", "position_ids")


def vocab_size_of(model: nn.Module) -> int | None:
    """Vocabulary size of a token model: ``config.vocab_size`` or its first ``nn.Embedding``.

    Examples:
        >>> import torch
        >>> vocab_size_of(torch.nn.Sequential(torch.nn.Embedding(11, 4)))
        11
    """
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def make_noise(value: Any, vocab_size: int | None, key: str | None = None) -> Any:
    """Noise shaped like ``value``: Gaussian with the input's mean/std for float tensors, uniform
    random tokens below ``vocab_size`` for integer tensors; masks become all ones, labels are
    dropped, other Python scalars pass through.

    Examples:
        >>> import torch
        >>> make_noise(torch.zeros(2, 3), None).shape
        torch.Size([2, 3])
    """
    if isinstance(value, Tensor):
        if key is not None and "mask" in key:
            return torch.ones_like(value)
        if value.is_floating_point():
            std = value.float().std() if value.numel() > 1 else torch.tensor(1.0)
            std = std if bool(std > 0) else torch.tensor(1.0)
            return (torch.randn_like(value, dtype=torch.float32) * std + value.float().mean()).to(value.dtype)
        if value.dtype == torch.bool or (key in _KEEP_KEYS):
            return value.clone()
        high = vocab_size if vocab_size is not None else int(value.max()) + 1
        return torch.randint(0, max(high, 1), value.shape, device=value.device, dtype=value.dtype)
    if isinstance(value, Mapping):
        return {k: make_noise(v, vocab_size, k) for k, v in value.items() if k not in TRAINING_ONLY_KEYS}
    if isinstance(value, (tuple, list)):
        return type(value)(make_noise(v, vocab_size, key) for v in value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise NoiseInputError(
        f"cannot make noise for an input of type {type(value).__name__}"
        + (f" (argument {key!r})" if key else "")
        + "; noise needs tensors (or dicts/tuples of them). Pass guide_inputs='same' or a callable instead."
    )


def normalize_call(result: Any) -> Call:
    """Turn an adapter's return value into ``(args, kwargs)``.

    A tensor becomes one positional argument, a dict keyword arguments, a tuple positional
    arguments; an explicit ``(tuple, dict)`` pair is used as is.

    Examples:
        >>> import torch
        >>> normalize_call({"x": 1})
        ((), {'x': 1})
    """
    if isinstance(result, Mapping):
        return (), dict(result)
    if (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], tuple)
        and isinstance(result[1], Mapping)
    ):
        return tuple(result[0]), dict(result[1])
    if isinstance(result, (tuple, list)):
        return tuple(result), {}
    return (result,), {}


def filter_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop training-only keys, and keys ``fn`` does not accept (unless it takes ``**kwargs``)."""
    import inspect

    kwargs = {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY_KEYS}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def fit_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """Fit a call made for one network's forward to another's signature.

    Keywords ``fn`` accepts pass by name; training-only keys are dropped; the other keyword
    values fill ``fn``'s missing required positional parameters in order (a Trainer calls
    ``target(x=...)``, a guide ``nn.Sequential`` takes ``forward(input)``).

    Examples:
        >>> import torch
        >>> fit_call(torch.nn.Linear(2, 2).forward, (), {"x": 1, "labels": 0})
        ((1,), {})
    """
    import inspect

    kwargs = {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY_KEYS}
    kept = filter_kwargs(fn, kwargs)
    leftover = {k: v for k, v in kwargs.items() if k not in kept}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return args, kept
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    missing = [
        p
        for p in params[len(args) :]
        if p.kind in positional and p.default is inspect.Parameter.empty and p.name not in kept
    ]
    return tuple(args) + tuple(_fill_by_name(missing, leftover)), kept


# The names a model's main input goes by, for a guide whose forward takes it positionally.
PRIMARY_INPUTS = ("input_ids", "x", "input", "inputs", "pixel_values", "input_values", "inputs_embeds", "images", "src")


def _fill_by_name(missing: list[Any], leftover: dict[str, Any]) -> list[Any]:
    """Values for a forward's required positional parameters from keywords it does not name: by name
    (``mask`` takes ``attention_mask``), then the one main input (``input_ids``, ``x``, ...) for the
    first parameter, then the only keyword left; never by the keywords' order."""
    pool, fill = dict(leftover), []
    for position, param in enumerate(missing):
        if not pool:
            break
        found = [k for k in pool if k.endswith("_" + param.name) or param.name.endswith("_" + k)]
        if len(found) != 1 and position == 0:
            found = [k for k in pool if k in PRIMARY_INPUTS]
        if len(found) != 1 and len(pool) == 1:
            found = list(pool)
        if len(found) != 1:
            raise ConfigError(
                f"the guide's forward takes {param.name!r} positionally, and the call's keywords "
                f"({', '.join(pool)}) do not say which one it is; pass guide_inputs=lambda **kw: ... returning "
                "the guide's arguments (e.g. (kw['input_ids'],) or a dict of its parameter names)"
            )
        fill.append(pool.pop(found[0]))
    return fill


def first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The first tensor among the positional, then keyword, arguments (searching containers)."""
    from torch.nn.utils.rnn import PackedSequence

    from .capture import extract

    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            if value.dim() == 0:
                continue  # a scalar argument (a diffusion time step, a temperature) holds no batch
            return value
        if isinstance(value, PackedSequence):  # a tuple subclass: test before containers
            return extract(value)[0]
        if isinstance(value, (Mapping, tuple, list)):
            found = first_tensor(tuple(value.values()) if isinstance(value, Mapping) else tuple(value), {})
            if found is not None:
                return found
    return None


@dataclass
class Routed:
    """One step's inputs, routed: the batch size, the guide's call and the padding masks."""

    n: int
    guide_args: tuple[Any, ...]
    guide_kwargs: dict[str, Any]
    mask: Tensor | None
    guide_mask: Tensor | None
    axes: tuple[int, int] = (0, 0)  # the batch axis of the target's and of the guide's first input
    # An encoder-decoder's decoder positions: their own mask (decoder_attention_mask), never the source's.
    decoder_mask: Tensor | None = None
    guide_decoder_mask: Tensor | None = None

    def mask_for(self, side: str, decoder: bool) -> Tensor | None:
        """The padding mask of a layer: the decoder's for a decoder layer, else the input's."""
        if side == "target":
            return self.decoder_mask if decoder else self.mask
        return self.guide_decoder_mask if decoder else self.guide_mask


def batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_dim: int) -> int:
    """Number of samples in a call: the size of its first tensor along ``batch_dim``.

    Examples:
        >>> import torch
        >>> batch_size((torch.zeros(5, 3),), {}, 0)
        5
    """
    tensor = first_tensor(args, kwargs)
    if tensor is None:
        raise ConfigError("guidance needs a tensor input to find the batch size, but the forward got none")
    if tensor.dim() <= batch_dim:
        raise ConfigError(
            f"the batch axis is {batch_dim} (input_batch_dim), but the first tensor input has shape "
            f"{tuple(tensor.shape)}: set input_batch_dim to the axis that counts the samples"
        )
    return int(tensor.shape[batch_dim])


def distinct_samples(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_dim: int) -> int:
    """How many samples of a call's first tensor differ (a batch of one sample repeated has 1).

    Examples:
        >>> import torch
        >>> distinct_samples((torch.tensor([[1.0], [2.0], [1.0]]),), {}, 0)
        2
    """
    n = batch_size(args, kwargs, batch_dim)
    rows = [
        t.detach().movedim(batch_dim, 0).reshape(n, -1).double()
        for t in _tensors((*args, *kwargs.values()))
        if t.dim() > batch_dim and t.shape[batch_dim] == n
    ]  # every input counted: samples differ when any of their inputs does
    table = torch.cat(rows, dim=1) if rows else torch.zeros(n, 0)
    return int(torch.unique(table, dim=0).shape[0]) if table.numel() else n


def _tensors(values: Any) -> Any:
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, Mapping):
            yield from _tensors(value.values())
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)


def route(
    guide: nn.Module,
    adapter: str | Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    batch_dim: int,
    mask_key: str,
    guide_batch_dim: int | None = None,
) -> Routed:
    """Route one step's inputs to the guide (the user's adapter, if any, runs exactly once).

    ``batch_dim`` is the batch axis of the target's first input tensor; ``guide_batch_dim`` the
    guide's (``None``: the target's axis if it holds the same number of samples there, else the
    one axis of that size).

    Examples:
        >>> import torch
        >>> r = route(torch.nn.Linear(3, 2), "same", (torch.zeros(4, 3),), {}, 0, "attention_mask")
        >>> r.n, len(r.guide_args)
        (4, 1)
    """
    n = batch_size(args, kwargs, batch_dim)
    if callable(adapter):
        g_args, g_kwargs = normalize_call(adapter(*args, **kwargs))
    else:
        g_args, g_kwargs = tuple(args), dict(kwargs)
    g_axis = guide_batch_dim if guide_batch_dim is not None else _guide_axis(g_args, g_kwargs, batch_dim, n)
    g_n = batch_size(g_args, g_kwargs, g_axis)
    if g_n != n:
        raise BatchSizeMismatchError(_mismatch(args, kwargs, batch_dim, n, g_axis, g_n))
    g_args, g_kwargs = fit_call(guide.forward, tuple(g_args), g_kwargs)
    dtype = float_dtype(guide)
    g_args, g_kwargs = _to_dtype(g_args, dtype), _to_dtype(g_kwargs, dtype)
    mask, g_mask = _tensor_or_none(kwargs.get(mask_key)), _tensor_or_none(g_kwargs.get(mask_key))
    decoder, g_decoder = (_tensor_or_none(kw.get("decoder_" + mask_key)) for kw in (kwargs, g_kwargs))
    move_to_data(guide, g_args, g_kwargs)
    return Routed(
        n, g_args, g_kwargs, mask, mask if mask_key not in g_kwargs else g_mask, (batch_dim, g_axis), decoder,
        decoder if "decoder_" + mask_key not in g_kwargs else g_decoder,
    )  # fmt: skip


def _tensor_or_none(value: Any) -> Tensor | None:
    return value if isinstance(value, Tensor) else None


def check_not_packed(kwargs: Mapping[str, Any]) -> None:
    """Refuse padding-free packing (``DataCollatorWithFlattening``, TRL's ``padding_free=True``):
    ``position_ids`` that restart inside a row, or ``cu_seq_lens_*``. CKA compares a batch's rows.

    Examples:
        >>> import torch
        >>> check_not_packed({"position_ids": torch.tensor([[0, 1, 2, 0, 1]])})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        guidewrap.errors.ConfigError: padding-free packing: ...
    """
    positions, mask, restarts = kwargs.get("position_ids"), kwargs.get("attention_mask"), False
    if isinstance(positions, Tensor) and positions.dim() == 2 and positions.shape[1] > 1:
        # A position that falls back between two attended tokens (padding, on either side, is not one).
        falls = positions[:, 1:] < positions[:, :-1]
        if isinstance(mask, Tensor) and mask.shape == positions.shape:
            falls &= mask[:, 1:].bool() & mask[:, :-1].bool()
        restarts = bool(falls.any())
    if not (restarts or any(key.startswith("cu_seq_lens") for key in kwargs)):
        return
    raise ConfigError(
        "padding-free packing: several sequences share one row (position_ids restart inside a row, as "
        "transformers' DataCollatorWithFlattening and TRL's padding_free=True produce). CKA compares the samples "
        "of a batch, its rows: a packed row mixes unrelated sequences (and a batch of one packed row gives no term "
        "at all). Train the guided run on padded batches (DataCollatorForLanguageModeling, DataCollatorWithPadding; "
        "TRL: padding_free=False); the padding is left out of the term by the attention mask"
    )


def _mismatch(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_dim: int, n: int, g_axis: int, g_n: int) -> str:
    """Why the guide's input does not hold the target's samples, and the setting that fixes it: the
    target's batch axis when the target's input has the guide's batch size on another axis (a
    sequence-first network read as batch-first), else the guide's."""
    tensor = first_tensor(args, kwargs)
    other = [] if tensor is None else [i for i, size in enumerate(tensor.shape) if size == g_n and i != batch_dim]
    why = (
        f"the guide's input has {g_n} samples on axis {g_axis} but the target's input was read as {n} samples on "
        f"axis {batch_dim}; CKA compares the same samples, so a guide_inputs adapter must keep the batch size. "
    )
    if other:
        return why + (
            f"The target's input has {g_n} on axis {other[0]}: if that is its batch (a sequence-first target, such as "
            f"nn.Transformer(batch_first=False) or nn.LSTM(batch_first=False)), set input_batch_dim={other[0]}"
        )
    return why + "Set guide_input_batch_dim if the guide's input holds the batch on another axis"


def _guide_axis(args: tuple[Any, ...], kwargs: Mapping[str, Any], target_axis: int, n: int) -> int:
    """The guide input's batch axis from the known batch size: the target's axis if it has ``n``
    there, else the single axis of size ``n`` (a sequence-first guide behind an adapter)."""
    tensor = first_tensor(args, kwargs)
    if tensor is None or (tensor.dim() > target_axis and tensor.shape[target_axis] == n):
        return target_axis
    # The last axis of a float input holds features (a (7, 8) batch is not 8 samples); token ids
    # (T, n) have no feature axis.
    axes = tensor.shape[:-1] if tensor.is_floating_point() else tensor.shape
    sized = [i for i, size in enumerate(axes) if size == n]
    return sized[0] if len(sized) == 1 else target_axis


def noise_call(target: nn.Module, guide: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Call:
    """Noise shaped like a call, with token ids below both networks' vocabularies."""
    sizes = [s for s in (vocab_size_of(target), vocab_size_of(guide)) if s is not None]
    vocab = min(sizes) if sizes else None
    return make_noise(tuple(args), vocab), make_noise(dict(kwargs), vocab)


def move_to_data(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Move ``model`` to the device of the call's first tensor (the guide follows the data)."""
    tensor = first_tensor(args, kwargs)
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    if tensor is not None and ref is not None and ref.device != tensor.device:
        model.to(tensor.device)


def call_guide(guide: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Run the guide on a routed call; the usual mismatches become errors that name the fix."""
    try:
        return guide(*args, **kwargs)
    except IndexError as exc:
        tokens = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and not t.is_floating_point()]
        vocab = vocab_size_of(guide)
        largest = max((int(t.max()) for t in tokens if t.numel()), default=-1)
        if vocab is not None and largest >= vocab:
            raise ConfigError(
                f"the guide's vocabulary has {vocab} tokens but the batch holds ids up to {largest}; map the "
                "target's ids to the guide's with a guide_inputs adapter, or use a guide sharing its tokenizer"
            ) from exc
        raise
    except ValueError as exc:
        encoder_decoder = bool(getattr(getattr(guide, "config", None), "is_encoder_decoder", False))
        given = any(key.startswith("decoder_") for key in kwargs)
        if (encoder_decoder and not given) or "decoder_input_ids" in str(exc):
            raise ConfigError(
                "this guide is an encoder-decoder model and needs decoder inputs: guide its encoder "
                "(pass guide.get_encoder() as the guide) or give guide_inputs=lambda **kw: {**kw, "
                "'decoder_input_ids': ...}"
            ) from exc
        raise


def float_dtype(model: nn.Module) -> torch.dtype | None:
    """The precision of the model's first floating-point parameter (or buffer)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _to_dtype(value: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors cast to the guide's own precision (a float64 guide given float32 inputs);
    autocast, when on, still decides the precision of the guide's operations."""
    if dtype is None:
        return value
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, Mapping):
        return {k: _to_dtype(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_dtype(v, dtype) for v in value)
    if isinstance(value, list):
        return [_to_dtype(v, dtype) for v in value]
    return value
