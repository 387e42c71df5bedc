"""The Gram kernels of debiased CKA: Grams fast for wide features and many samples, centred
blockwise when large, with a zeroed diagonal and the sums the unbiased estimator needs
(:mod:`guidewrap.metrics.debiased` builds the estimator on them).

Examples:
    >>> import torch
    >>> x = torch.randn(6, 4)
    >>> torch.allclose(_gram(x), x @ x.T)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# Raw Grams are tried from this many entries per problem and this many features (below, a
# centring pass costs less than the check that would skip it).
RAW_GRAM_MIN_ELEMENTS = 1 << 16
RAW_GRAM_MIN_FEATURES = 512
# Narrow batches of wide features: the product is split along the features (one thread each).
SPLIT_GRAM_MAX_ROWS = 128
SPLIT_GRAM_MIN_FEATURES = 8192
# From this many samples a Gram is built from its diagonal blocks and one off-diagonal block
# (3/4 of the multiply-adds; torch exposes no symmetric rank-k product).
SYMMETRIC_GRAM_MIN_ROWS = 256
# Centred copies from this size on are made a block of columns at a time into one reused buffer
# (of CENTRING_CHUNK_ELEMENTS, 16 MiB in float32):
# a fresh copy above glibc's mmap threshold (32 MiB) page-faults on every call.
CHUNKED_CENTRING_MIN_BYTES = 1 << 25
CENTRING_CHUNK_ELEMENTS = 1 << 22
# Fast-path limits on a Gram's trace: inside them no product overflows or underflows.
_TRACE_RANGE = (1e-15, 1e15)
# A raw Gram is kept when the estimator's cancellation loses at most 4 bits.
_MAX_CANCELLATION = 16.0


def _gram(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``x @ x.mT`` (written into ``out`` when given), faster for wide features and many samples."""
    n, d = x.shape[-2:]
    if x.dim() == 2 and n <= SPLIT_GRAM_MAX_ROWS and d >= SPLIT_GRAM_MIN_FEATURES and d % 8 == 0:
        parts = x.reshape(n, 8, d // 8).transpose(0, 1)
        return torch.sum(torch.bmm(parts, parts.mT), 0, out=out)
    if n < SYMMETRIC_GRAM_MIN_ROWS:
        return torch.matmul(x, x.mT, out=out)
    h = n // 2
    top, bottom = x[..., :h, :], x[..., h:, :]
    out = x.new_empty((*x.shape[:-1], n)) if out is None else out
    # blocks are written in place (BLAS takes the row stride; copies cost 10% at n = 256)
    if n < 2 * SYMMETRIC_GRAM_MIN_ROWS:  # the top rows against all in one larger, faster product
        torch.matmul(top, x.mT, out=out[..., :h, :])
    else:
        _gram(top, out[..., :h, :h])
        torch.matmul(top, bottom.mT, out=out[..., :h, h:])
    _gram(bottom, out[..., h:, h:])
    out[..., h:, :h] = out[..., :h, h:].mT
    return out


def _column_blocks(x: Tensor, mean: Tensor | None) -> int:
    """Columns per block for centring ``x`` blockwise, or 0 to centre it in one copy."""
    if mean is None or x.dim() != 2 or x.numel() * x.element_size() < CHUNKED_CENTRING_MIN_BYTES:
        return 0
    return max(1, CENTRING_CHUNK_ELEMENTS // x.shape[0])


def _centred_gram(x: Tensor, mean: Tensor | None) -> Tensor:
    """The Gram of ``x - mean`` (of ``x`` when ``mean`` is None)."""
    width = _column_blocks(x, mean)
    if not width or mean is None:
        return _gram(x if mean is None else x - mean)
    n, d = x.shape
    out, buffer = x.new_zeros(n, n), x.new_empty(n, width)
    for j in range(0, d, width):
        block = buffer[:, : min(width, d - j)]
        out += _gram(torch.sub(x[:, j : j + width], mean[:, j : j + width], out=block))
    return out


def _times_centred(g: Tensor, x: Tensor, mean: Tensor | None) -> Tensor:
    """``g @ (x - mean)`` (``g @ x`` when ``mean`` is None)."""
    width = _column_blocks(x, mean)
    if not width or mean is None:
        return g @ (x if mean is None else x - mean)
    n, d = x.shape
    out, buffer = x.new_empty(n, d), x.new_empty(n, width)
    for j in range(0, d, width):
        block = buffer[:, : min(width, d - j)]
        out[:, j : j + width] = g @ torch.sub(x[:, j : j + width], mean[:, j : j + width], out=block)
    return out


def _zero_diagonal_gram(x: Tensor, centre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(K~, row sums, trace K, mean)``: the Gram of ``x`` (of mean-centred ``x`` when ``centre``)
    with its diagonal zeroed; ``mean`` is None when not centred."""
    mean = x.mean(-2, keepdim=True) if centre else None
    gram = _centred_gram(x, mean)
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    trace = diagonal.sum(-1)
    diagonal.zero_()
    return gram, gram.sum(-1), trace, mean


class _ZeroDiagonalGram(torch.autograd.Function):
    """``(K~, row sums, statistics)`` for ``K`` the Gram of ``x`` (of mean-centred ``x`` when
    ``centre``); the statistics are ``(trace K, total, <K~, K~>, r . r)`` per problem.

    The gradients it receives come only from :class:`_DebiasedCKAFromSides` and are symmetric,
    zero-diagonal and U-centred (zero row sums), so the backward is one product, ``2 G @ x``: the
    centring's backward and any common offset of ``x`` drop out.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, centre: bool) -> tuple[Tensor, Tensor, Tensor]:
        gram, rows, trace, mean = _zero_diagonal_gram(x, centre)
        flat = gram.flatten(-2)
        stats = torch.stack((trace, rows.sum(-1), _dot(flat, flat), _dot(rows, rows)), -1)
        ctx.save_for_backward(x, mean)
        ctx.mark_non_differentiable(rows, stats)
        return gram, rows, stats

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        x, mean = ctx.saved_tensors
        return _times_centred(grad * 2.0, x, mean), None


def _hsic_terms(dot: Any, rowdot: Any, total_a: Any, total_b: Any, n: int) -> Any:
    """``n (n - 3) HSIC_u`` from ``<K~, L~>``, ``r_K . r_L`` and the totals (floats or tensors)."""
    return dot + total_a * total_b / ((n - 1) * (n - 2)) - 2.0 * rowdot / (n - 2)


def _cosine(cross: float, ex: float, ey: float, ok: bool) -> tuple[float, float, float, float]:
    """``(value, 1 / root, value / ex, value / ey)`` for ``value = cross / sqrt(ex ey)``: the value
    and its backward's coefficients; 0 and zero coefficients where not ``ok``."""
    root = math.sqrt(ex * ey) if ok else math.inf
    value = cross / root
    return value, 1 / root, value / ex if ok else 0.0, value / ey if ok else 0.0


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Sum of the elementwise product over the last dim, batched over the leading dims."""
    if a.dim() == 1:
        return torch.dot(a, b)
    return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]


def _dot2(a: Tensor, b: Tensor) -> Tensor:
    """Sum of the elementwise product over the last two dims, without an n x n temporary."""
    return _dot(a.flatten(-2), b.flatten(-2))
