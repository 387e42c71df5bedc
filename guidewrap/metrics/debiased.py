"""Debiased linear CKA (CKA on the unbiased HSIC estimator) and its fast kernels.

The unbiased HSIC of two Grams is the inner product of their *U-centred* forms (Székely and
Rizzo, 2014). With ``K~`` a Gram with its diagonal zeroed, ``r`` its row sums and ``t`` its
total, ``n (n - 3) HSIC_u(K, L) = <K~, L~> + t_K t_L / ((n-1)(n-2)) - 2 r_K . r_L / (n-2)``. So
debiased CKA is a cosine between U-centred Grams, and its gradient with respect to a Gram is a
U-centred matrix (zero diagonal, zero row sums): one product with the features gives the
features' gradient, and the centring's own backward vanishes.

The estimator does not change when every sample is shifted by the same vector, so centring the
features matters only for float32 rounding, when a common offset dwarfs the spread. On CPU:

- narrow features (three d x d products cheaper than two n x n Grams): the estimator in feature
  space, O(n d1 d2), its gradient in closed form (:func:`_narrow_pair`);
- otherwise the Gram of the raw features when a few rows show no offset and the Gram confirms it
  (the expanded estimator then loses at most 4 bits to cancellation), else of mean-centred
  features; an unbatched call does both sides in one pass with one read-back
  (:func:`_fused_pair`), the engine one side at a time (the guide's prepared ahead,
  :class:`DebiasedSide`);
- a problem that fails a check (non-finite, out of range, constant) goes through the careful
  path: non-finite entries replaced, two-pass centring, peak rescaling, a constant-feature check.

The careful path is also the one on other devices and under ``torch.compile``, where reading a
check back to the host would stall the stream or break the graph.

Examples:
    >>> import torch
    >>> x = torch.randn(16, 40)
    >>> round(debiased_cka(x, x).item(), 4)
    1.0
    >>> round(debiased_cka(x + 1e4, x).item(), 4)  # the offset changes nothing
    1.0
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import MetricError
from ._grams import (  # noqa: F401 - the kernels' names stay importable from here
    _MAX_CANCELLATION,
    _TRACE_RANGE,
    CENTRING_CHUNK_ELEMENTS,
    CHUNKED_CENTRING_MIN_BYTES,
    RAW_GRAM_MIN_ELEMENTS,
    RAW_GRAM_MIN_FEATURES,
    SPLIT_GRAM_MAX_ROWS,
    SPLIT_GRAM_MIN_FEATURES,
    SYMMETRIC_GRAM_MIN_ROWS,
    _centred_gram,
    _column_blocks,
    _cosine,
    _dot,
    _dot2,
    _gram,
    _hsic_terms,
    _times_centred,
    _zero_diagonal_gram,
    _ZeroDiagonalGram,
)
from ._numerics import _TINY, _center, _measure, _no_autocast, _rescale, _sanitize, _upcast, _varies

__all__ = ["DebiasedSide", "debiased_cka"]


class DebiasedSide:
    """One side of a debiased-CKA computation: its Gram with a zeroed diagonal and the sums the
    estimator needs. ``gram`` keeps its autograd history (the target side's gradient flows
    through it); ``rows`` (row sums), ``total`` and ``energy`` (``|U(K~)|_F^2``) are detached,
    the backward accounts for them. ``ok`` flags measurable problems. On CPU the per-problem
    ``(total, energy, ok)`` are kept as Python values (``host``) and made tensors only if asked.

    Examples:
        >>> import torch
        >>> side = DebiasedSide.of(torch.randn(16, 40))
        >>> tuple(side.gram.shape), bool(side.ok)
        ((16, 16), True)
    """

    __slots__ = ("gram", "rows", "host", "_tensors")

    def __init__(
        self,
        gram: Tensor,
        rows: Tensor,
        tensors: tuple[Tensor, Tensor, Tensor] | None = None,
        host: list[tuple[float, float, bool]] | None = None,
    ) -> None:
        self.gram, self.rows, self.host, self._tensors = gram, rows, host, tensors

    @classmethod
    def of(cls, x: Tensor) -> DebiasedSide:
        """Reduce ``(..., n, d)`` features to a side, by the fast path where it applies."""
        x = _upcast(x)
        if _on_host(x, x) and x.shape[-2] >= 4:
            side = _fast_side(x)
            if side is not None:
                return side
        return _careful_side(x)

    def _get(self, i: int) -> Tensor:
        if self._tensors is None:
            host, batch = self.host or [], self.gram.shape[:-2]
            summary = torch.tensor([h[:2] for h in host], dtype=torch.float64).reshape(*batch, 2)
            ok = torch.tensor([h[2] for h in host], dtype=torch.bool).reshape(batch)
            self._tensors = (summary[..., 0], summary[..., 1], ok)
        return self._tensors[i]

    total = property(lambda self: self._get(0), doc="Sum of the zero-diagonal Gram, per problem (float64).")
    energy = property(lambda self: self._get(1), doc="``|U(K~)|_F^2 = n (n - 3) HSIC_u(K, K)`` (float64).")
    ok = property(lambda self: self._get(2), doc="Whether each problem can be measured.")

    def clone(self) -> DebiasedSide:
        """A plain (non-inference) copy, so autograd may save it for the target's backward."""
        tensors = None if self._tensors is None else tuple(t.clone() for t in self._tensors)
        return DebiasedSide(self.gram.clone(), self.rows.clone(), tensors, self.host)  # type: ignore[arg-type]


def _small_offset(x: Tensor) -> bool:
    """Whether four rows predict that a raw Gram passes its cancellation check.

    The check's ratio is about ``1 + |mean|^4 / tr(Cov^2)``, and ``tr(Cov^2) >= tr(Cov)^2 / d``;
    four rows estimate ``tr(Cov)`` and ``|mean|^2`` well when ``d`` is large.
    """
    head = x.detach()[..., :4, :]
    d = x.shape[-1]
    for g in (head @ head.mT).reshape(-1, 16).tolist():  # the 4 x 4 Gram of each problem's first rows
        # each squared difference of two rows estimates 2 tr(Cov); |mean of 4 rows|^2 has tr(Cov) / 4 of noise
        trace = (g[0] + g[5] - 2 * g[1] + g[10] + g[15] - 2 * g[11]) / 4
        offset = sum(g) / 16 - trace / 4
        if offset > math.sqrt((_MAX_CANCELLATION - 1) / d) * trace:
            return False
    return True


def _side_energy(trace: float, total: float, selfdot: float, rowdot: float, n: int, centred: bool) -> float | None:
    """A side's ``|U(K~)|^2`` from its statistics, or None where the fast path cannot be trusted."""
    energy = _hsic_terms(selfdot, rowdot, total, total, n)
    if not (math.isfinite(energy) and _TRACE_RANGE[0] <= trace <= _TRACE_RANGE[1]):
        return None
    if centred:  # constant features leave only rounding: the careful path flags them
        return energy if trace - (total + trace) / n > 0.5 * trace else None
    # the expanded estimator cancels the offset's share: keep <= 4 bits of loss
    return energy if 0 < energy and selfdot <= _MAX_CANCELLATION * energy else None


def _centre_first(x: Tensor) -> bool:
    n, d = x.shape[-2:]
    return not (n * d >= RAW_GRAM_MIN_ELEMENTS and d >= RAW_GRAM_MIN_FEATURES and _small_offset(x))


def _fast_side(x: Tensor) -> DebiasedSide | None:
    """A side from one plain Gram, or None where a check fails (the careful path then runs)."""
    n = x.shape[-2]
    for centre in (True,) if _centre_first(x) else (False, True):
        gram, rows, stats = _ZeroDiagonalGram.apply(x, centre)
        host = []
        for trace, total, selfdot, rowdot in stats.reshape(-1, 4).tolist():
            energy = _side_energy(trace, total, selfdot, rowdot, n, centre)
            if energy is None:
                break
            host.append((total, energy, energy > _TINY))
        else:
            return DebiasedSide(gram, rows, host=host)
    return None


def _fused_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """Both sides of one (unbatched) problem in one pass with one read-back: the public function's
    path (the engine prepares the guide's side ahead); None where a check fails."""
    n = x.shape[-2]
    with torch.no_grad():
        sides = (_zero_diagonal_gram(z, _centre_first(z)) for z in (x, y))
        (gx, rx, trace_x, mean_x), (gy, ry, trace_y, mean_y) = sides
        fx, fy = gx.view(-1), gy.view(-1)
        rows = torch.stack((rx, ry, torch.ones_like(rx)))
        dots = torch.stack((torch.dot(fx, fx), torch.dot(fy, fy), torch.dot(fx, fy), trace_x, trace_y))
        (rxx, rxy, tx, _, ryy, ty, *_), (fxx, fyy, fxy, trx, try_) = (rows @ rows.mT).view(-1).tolist(), dots.tolist()
    ex = _side_energy(trx, tx, fxx, rxx, n, mean_x is not None)
    ey = _side_energy(try_, ty, fyy, ryy, n, mean_y is not None)
    if ex is None or ey is None:
        return None
    ok = ex > _TINY and ey > _TINY
    value, *coefficients = _cosine(_hsic_terms(fxy, rxy, tx, ty, n), ex, ey, ok)
    numbers = (coefficients, (tx, ty))
    saved = (gx, gy, rx, ry, mean_x, mean_y)
    return _FusedPairGradient.apply(x, y, x.new_tensor(value), numbers, *saved), torch.tensor(ok)


class _FusedPairGradient(torch.autograd.Function):
    """:func:`_fused_pair`'s value (computed by the caller) and its gradient: for each side
    ``2 U(a K~_other + b K~_own) @ features`` (see :class:`_DebiasedCKAFromSides`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, value: Tensor, numbers: tuple, *saved: Tensor | None) -> Tensor:
        ctx.numbers = numbers
        ctx.save_for_backward(x, y, *saved)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, gx, gy, rx, ry, mean_x, mean_y = ctx.saved_tensors
        (inv_root, *over), totals = ctx.numbers
        g = 2.0 * grad.item()  # the 2 of d(Z Z^T) = dZ Z^T + Z dZ^T, folded into the scalars
        grams, rows, features = (gx, gy), (rx, ry), ((x, mean_x), (y, mean_y))
        out: list[Tensor | None] = [None, None]
        for i, j in ((0, 1), (1, 0)):
            if ctx.needs_input_grad[i]:
                a, b = g * inv_root, -g * over[i]
                u = _gram_gradient(grams[j], grams[i], rows[j], rows[i], totals[j], totals[i], a, b)
                out[i] = _times_centred(u, *features[i])
        return (*out, None, None, *([None] * 6))


def _careful_side(x: Tensor) -> DebiasedSide:
    """Non-finite entries zeroed, two-pass centring, peak rescaling, constant layers flagged."""
    clean, finite = _sanitize(x)
    centred, nonzero = _rescale(_center(clean))
    n = x.shape[-2]
    gram = (centred @ centred.mT).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)
    g = gram.detach()
    rows = g.sum(-1)
    total, selfdot, rowdot = rows.sum(-1).double(), _dot2(g, g).double(), _dot(rows, rows).double()
    if n < 4:  # the estimator is undefined
        return DebiasedSide(gram, rows, (total, torch.zeros_like(total), torch.zeros_like(finite)))
    energy = _hsic_terms(selfdot, rowdot, total, total, n)
    return DebiasedSide(gram, rows, (total, energy, finite & nonzero & _varies(clean) & (energy > _TINY)))


class _DebiasedCKAFromSides(torch.autograd.Function):
    """Debiased CKA of two sides' Grams; the gradient with respect to each Gram is U-centred."""

    @staticmethod
    def forward(ctx: Any, gx: Tensor, gy: Tensor, x: DebiasedSide, y: DebiasedSide) -> tuple[Tensor, Tensor]:
        n = gx.shape[-1]
        dot, rowdot = _dot2(gx, gy), _dot(x.rows, y.rows)
        if x.host is not None and y.host is not None:
            results = []
            per_problem = zip(torch.stack((dot, rowdot), -1).reshape(-1, 2).tolist(), x.host, y.host, strict=True)
            for (dot_, rowdot_), (tx, ex, okx), (ty, ey, oky) in per_problem:
                results.append(_cosine(_hsic_terms(dot_, rowdot_, tx, ty, n), ex, ey, okx and oky))
            table = torch.tensor(results, dtype=gx.dtype).reshape(*gx.shape[:-2], 4)
            value, coefficient = table[..., 0], table[..., 1:]
            ok = coefficient[..., 0] > 0
        else:
            ok = x.ok & y.ok
            root = torch.sqrt(torch.where(ok, x.energy * y.energy, torch.ones_like(x.energy)))
            value = torch.where(ok, _hsic_terms(dot.double(), rowdot.double(), x.total, y.total, n) / root, 0.0)
            safe = (torch.where(ok, e, torch.ones_like(e)) for e in (x.energy, y.energy))
            coefficient = torch.stack((ok / root, *(value / e for e in safe)), -1).to(gx.dtype)
            value = value.to(gx.dtype)
        ctx.sides = (x, y)  # their row sums and totals, read in the backward
        ctx.save_for_backward(gx, gy, coefficient)
        ctx.mark_non_differentiable(ok)
        return value, ok

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        gx, gy, coefficient = ctx.saved_tensors
        sides, grams = ctx.sides, (gx.detach(), gy.detach())
        if grad.dim() == 0 and all(side.host is not None for side in sides):  # one problem: Python scalars
            g: Any = grad.item()
            inv_root, *over = coefficient.tolist()
            totals = [side.host[0][0] for side in sides]
        else:
            g, inv_root, over = grad, coefficient[..., 0], [coefficient[..., 1], coefficient[..., 2]]
            totals = [side.total.to(grad.dtype) for side in sides]
        out: list[Tensor | None] = [None, None]
        for i, j in ((0, 1), (1, 0)):
            if ctx.needs_input_grad[i]:
                rows = (sides[j].rows, sides[i].rows)
                out[i] = _gram_gradient(grams[j], grams[i], *rows, totals[j], totals[i], g * inv_root, -g * over[i])
        return (*out, None, None)


def _gram_gradient(
    other: Tensor, own: Tensor, rows_other: Tensor, rows_own: Tensor, total_other: Any, total_own: Any, a: Any, b: Any
) -> Tensor:
    """``U(a K~_other + b K~_own)``: d value / d K~_own of a cosine between U-centred Grams
    (``a = 1 / root``, ``b = -value / energy_own``, times the incoming gradient). The combination's
    row sums and total follow from the stored ones. ``a``, ``b`` are floats or per-problem tensors."""
    if isinstance(a, float) and isinstance(b, float):
        rows = torch.add(rows_other * a, rows_own, alpha=b)
        if other.dim() == 2:  # a K~_other - (shift 1^T + 1 shift^T) in one pass, then + b K~_own
            shift = _u_shift(rows, total_other * a + total_own * b, other.shape[-1])
            ones = torch.ones_like(shift)
            combined = torch.addmm(other, torch.stack((shift, ones), 1), torch.stack((ones, shift)), beta=a, alpha=-1.0)
            combined.add_(own, alpha=b).diagonal().zero_()
            return combined
        combined = torch.add(other * a, own, alpha=b)
    else:
        combined = other * a[..., None, None] + own * b[..., None, None]
        rows = rows_other * a[..., None] + rows_own * b[..., None]
    return _u_centre(combined, rows, total_other * a + total_own * b)


def _u_shift(rows: Tensor, total: Tensor | float, n: int) -> Tensor:
    """What U-centring subtracts from each row and column: ``rows / (n-2) - total / (2 (n-1)(n-2))``."""
    half = total / (2 * (n - 1) * (n - 2))
    return rows / (n - 2) - (half if isinstance(half, float) else half[..., None])


def _u_centre(m: Tensor, rows: Tensor, total: Tensor | float) -> Tensor:
    """U-centring of a zero-diagonal symmetric ``m`` with row sums ``rows`` and total ``total``."""
    shift = _u_shift(rows, total, m.shape[-1])
    m = m.sub_(shift[..., :, None]).sub_(shift[..., None, :])
    m.diagonal(dim1=-2, dim2=-1).zero_()
    return m


def _debiased_sides(x: DebiasedSide, y: DebiasedSide) -> tuple[Tensor, Tensor]:
    """``(debiased CKA, ok)`` of two sides; 0 with a zero gradient where ``ok`` is False."""
    if x.gram.shape[-1] < 4:  # the estimator is undefined: the fallback 0, still attached to the graph
        zero = (x.gram.sum((-2, -1)) + y.gram.sum((-2, -1))) * 0.0
        return zero, torch.zeros(zero.shape, dtype=torch.bool, device=zero.device)
    return _DebiasedCKAFromSides.apply(x.gram, y.gram, x, y)


def _narrow_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """Both sides narrow (see :func:`_narrow`): the estimator from d x d products, O(n d1 d2)
    instead of O(n^2 d); None where a check fails (the Gram path then runs).

    With features mean-centred (the estimator is shift invariant; centring keeps float32 digits),
    ``q_i = |x_i|^2`` and ``s = X^T 1``: ``<K~, L~> = |X^T Y|^2 - q_x . q_y``, row sums ``X s - q``
    and total ``|s|^2 - sum q``. The cancellation in ``|X^T X|^2 - |q|^2`` is about ``d / n`` of it.
    """
    n = x.shape[-2]
    with torch.no_grad():
        xc, yc = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
        sides = []
        for zc in (xc, yc):
            q, s = zc.square().sum(-1), zc.sum(-2)
            sides.append((zc, q, s, (zc @ s.unsqueeze(-1)).squeeze(-1) - q, zc.mT @ zc))
        (_, qx, sx, rx, fx), (_, qy, sy, ry, fy) = sides
        cross = xc.mT @ yc
        vectors = torch.stack((qx, qy, rx, ry, torch.ones_like(qx)), -2)
        inner = (vectors @ vectors.mT).flatten(-2)  # 5 x 5: q.q, r.r, sums of q
        norms = torch.stack(
            [_dot(m.flatten(-2), m.flatten(-2)) for m in (fx, fy, cross)] + [_dot(sx, sx), _dot(sy, sy)], -1
        )
        table = torch.cat((inner, norms), -1).reshape(-1, 30).tolist()
    results = []
    for row in table:
        g, (fxx, fyy, fxy, sxx, syy) = row[:25], row[25:]
        trace_x, trace_y = g[4], g[9]
        tx, ty = sxx - trace_x, syy - trace_y  # totals of K~: |s|^2 - trace
        ex = _side_energy(trace_x, tx, fxx - g[0], g[12], n, centred=True)
        ey = _side_energy(trace_y, ty, fyy - g[6], g[18], n, centred=True)
        if ex is None or ey is None or not math.isfinite(fxy):
            return None
        ok = ex > _TINY and ey > _TINY
        results.append((*_cosine(_hsic_terms(fxy - g[1], g[13], tx, ty, n), ex, ey, ok), tx, ty, ok))
    batch = x.shape[:-2]
    numbers = torch.tensor([r[:6] for r in results], dtype=x.dtype).reshape(*batch, 6)
    ok = torch.tensor([r[6] for r in results], dtype=torch.bool).reshape(batch)
    saved = (xc, qx, sx, rx, fx, yc, qy, sy, ry, fy, cross)
    return _NarrowDebiasedCKA.apply(x, y, numbers, *saved), ok


class _NarrowDebiasedCKA(torch.autograd.Function):
    """The narrow form's value (computed by the caller) and its gradient in O(n d^2).

    ``d value / d K~_x = U(A)``, ``A = a L~ + b K~`` (``a = 1 / root``, ``b = -value / energy_x``);
    with ``U(A) = A - v 1^T - 1 v^T + 2 diag(v)`` (``v`` from A's row sums and total), the features'
    gradient ``2 U(A) X`` needs only ``Y (Y^T X)``, ``X (X^T X)`` and row scalings.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, numbers: Tensor, *saved: Tensor) -> Tensor:
        ctx.save_for_backward(numbers, *saved)
        return numbers[..., 0].clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        numbers, xc, qx, sx, rx, fx, yc, qy, sy, ry, fy, cross = ctx.saved_tensors
        n = xc.shape[-2]
        a = grad * numbers[..., 1]
        tx, ty = numbers[..., 4], numbers[..., 5]
        out: list[Tensor | None] = [None, None]
        sides = ((xc, qx, sx, rx, fx, tx), (yc, qy, sy, ry, fy, ty))
        for i in (0, 1):
            if not ctx.needs_input_grad[i]:
                continue
            (zc, q, s, r, f, t), (wc, q_o, _, r_o, _, t_o) = sides[i], sides[1 - i]
            b = -grad * numbers[..., 2 + i]
            rows = a[..., None] * r_o + b[..., None] * r
            v = rows / (n - 2) - ((a * t_o + b * t) / (2 * (n - 1) * (n - 2)))[..., None]
            other_product = wc @ (cross.mT if i == 0 else cross)  # W (W^T Z)
            grad_z = a[..., None, None] * other_product + b[..., None, None] * (zc @ f)
            grad_z = grad_z - (a[..., None] * q_o + b[..., None] * q - 2.0 * v).unsqueeze(-1) * zc
            grad_z = grad_z - v.unsqueeze(-1) * s.unsqueeze(-2) - (v.unsqueeze(-2) @ zc)
            out[i] = 2.0 * grad_z
        return (*out, None, *([None] * 11))


def _on_host(x: Tensor, y: Tensor) -> bool:
    """CPU, not traced, same float dtype: checks may be read back for free."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.float64)
        and y.dtype == x.dtype
    )


def _narrow(x: Tensor, y: Tensor) -> bool:
    """Both sides narrow enough that three d x d products cost less than two n x n Grams."""
    n, d1, d2 = x.shape[-2], x.shape[-1], y.shape[-1]
    return _on_host(x, y) and x.dim() == y.dim() and n >= 8 and d1 * d1 + d2 * d2 + d1 * d2 <= n * (d1 + d2)


def _fused(x: Tensor, y: Tensor) -> bool:
    return _on_host(x, y) and x.dim() == y.dim() == 2 and x.shape[-2] >= 4


def _debiased_core(x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if weights is not None:
        raise MetricError("debiased_cka does not support sample weights; use 'cka' for masked sequences")
    with _no_autocast(x.device.type):
        result = _narrow_pair(x, y) if _narrow(x, y) else None
        if result is None and _fused(x, y):
            result = _fused_pair(x, y)
        return result if result is not None else _debiased_sides(DebiasedSide.of(x), DebiasedSide.of(y))


def debiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """Debiased linear CKA: CKA built on the unbiased HSIC estimator (needs n >= 4).

    Less biased than :func:`linear_cka` for small batches with wide features; its value
    can be slightly negative.

    Examples:
        >>> import torch
        >>> x = torch.randn(16, 40)
        >>> round(debiased_cka(x, x).item(), 4)
        1.0
    """
    return _measure("debiased_cka", _debiased_core, 4, x, y)
