"""Turning a layer's raw output into a feature matrix.

A hooked module may return a tensor, a tuple (``nn.LSTM`` returns ``(output, (h, c))``,
``nn.MultiheadAttention`` returns ``(output, weights)``), a ``PackedSequence``, or a dict /
Hugging Face ``ModelOutput``. :func:`extract` finds the activation and :func:`features`
moves the batch dimension first and shapes it for the chosen sequence mode.

Examples:
    >>> import torch
    >>> out, lengths = extract((torch.zeros(4, 7, 3), torch.zeros(1, 4, 3)))
    >>> tuple(out.shape), lengths is None
    ((4, 7, 3), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = ["extract", "find_batch_dim", "features", "unfold_calls", "SEQUENCE_MODES"]

SEQUENCE_MODES = ("flatten", "tokenwise", "mean")

# Modules whose 3-D output is (n, channels, length): the sequence axis is the last one.
_CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.AdaptiveAvgPool1d, nn.AvgPool1d, nn.MaxPool1d, nn.BatchNorm1d)


def extract(output: Any) -> tuple[Tensor | None, Tensor | None]:
    """Return ``(activation, lengths)`` from a module output; ``lengths`` only for packed sequences.

    ``(None, None)`` means the output holds no floating-point tensor.

    Examples:
        >>> import torch
        >>> extract({"last_hidden_state": torch.ones(2, 3)})[0].shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return (output, None) if output.is_floating_point() else (None, None)
    if isinstance(output, PackedSequence):
        padded, lengths = pad_packed_sequence(output, batch_first=True)
        return padded, lengths
    if isinstance(output, Mapping):
        for value in output.values():
            found = extract(value)
            if found[0] is not None:
                return found
        return None, None
    if isinstance(output, (tuple, list)) and output:
        return extract(output[0])
    return None, None


def find_batch_dim(t: Tensor, n: int, batch_first: bool | None, prefer: int = 0) -> int | None:
    """Index of the batch dimension of ``t`` for a batch of ``n`` samples, or None.

    When several dimensions have size ``n``, the module's declared layout decides
    (``batch_first=False``, as in ``nn.LSTM`` / transformer layers built sequence-first, means
    dimension 1; ``True`` means 0), then ``prefer`` (the input's batch axis), then the first.

    Examples:
        >>> import torch
        >>> find_batch_dim(torch.zeros(7, 4, 3), 4, batch_first=False)
        1
        >>> find_batch_dim(torch.zeros(4, 4, 3), 4, batch_first=None, prefer=1)
        1
        >>> find_batch_dim(torch.zeros(3, 3), 5, batch_first=None) is None
        True
    """
    candidates = [i for i, size in enumerate(t.shape) if size == n]
    if not candidates:
        return None
    for wanted in ((None if batch_first is None else 0 if batch_first else 1), prefer):
        if wanted in candidates:
            return wanted
    return candidates[0]


def is_channels_first(module: nn.Module) -> bool:
    """Whether a 3-D output of ``module`` is laid out (n, channels, length)."""
    return isinstance(module, _CHANNELS_FIRST)


def features(
    t: Tensor,
    batch_dim: int,
    mode: str,
    mask: Tensor | None = None,
    channels_first: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Shape an activation for a metric.

    Returns ``(x, weights)``: ``x`` is ``(n, D)`` for ``"flatten"`` and ``"mean"`` and
    ``(T, n, D)`` for ``"tokenwise"`` (``weights`` then ``(T, n)``, 0 at padding). A 3-D
    output ``(n, T, D)`` is a sequence; anything else is flattened whatever the mode.
    ``mask`` is an ``(n, T)`` 0/1 padding mask; padded positions are zeroed (flatten), left
    out of the mean (mean) or excluded from each position's CKA (tokenwise).

    Examples:
        >>> import torch
        >>> x, w = features(torch.ones(2, 5, 3), 0, "tokenwise")
        >>> tuple(x.shape), w is None
        ((5, 2, 3), True)
    """
    t = t.movedim(batch_dim, 0) if batch_dim else t
    if t.dim() != 3:
        return t.flatten(1), None
    if channels_first:
        t = t.transpose(1, 2)
    if mask is not None and mask.shape != t.shape[:2]:
        mask = None  # e.g. a layer after pooling; the mask does not describe it
    if mode == "flatten":
        if mask is not None:
            t = t * mask.unsqueeze(-1).to(t.dtype)
        return t.flatten(1), None
    if mode == "mean":
        if mask is None:
            return t.mean(1), None
        w = mask.unsqueeze(-1).to(t.dtype)
        return (t * w).sum(1) / w.sum(1).clamp_min(1.0), None
    weights = None if mask is None else mask.transpose(0, 1).to(torch.bool)
    return t.transpose(0, 1), weights


def unfold_calls(t: Tensor, mask: Tensor | None, calls: int) -> tuple[Tensor, Tensor | None]:
    """A layer run several times per forward (ALBERT's shared layer), its calls stacked as
    ``(n, calls, T, D)``, with an ``(n, T)`` padding mask: ``(n, calls * T, D)`` and the mask repeated
    per call, so padding is left out of every call (as it is of a layer run once). Anything else is
    returned as it is.

    Examples:
        >>> import torch
        >>> x, m = unfold_calls(torch.ones(2, 3, 4, 5), torch.ones(2, 4), calls=3)
        >>> tuple(x.shape), tuple(m.shape)
        ((2, 12, 5), (2, 12))
    """
    if calls < 2 or mask is None or t.dim() != 4 or mask.dim() != 2 or tuple(mask.shape) != (t.shape[0], t.shape[2]):
        return t, mask
    return t.flatten(1, 2), mask.repeat(1, calls)


def sequence_length(t_shape: torch.Size, channels_first: bool) -> int | None:
    """Length of the sequence axis of a batch-first feature shape, or None if not 3-D."""
    if len(t_shape) != 3:
        return None
    return t_shape[2] if channels_first else t_shape[1]


def lengths_to_mask(lengths: Tensor, total: int, device: torch.device) -> Tensor:
    """(n,) lengths -> (n, total) 0/1 mask."""
    return (torch.arange(total, device=device)[None, :] < lengths.to(device)[:, None]).to(torch.long)
