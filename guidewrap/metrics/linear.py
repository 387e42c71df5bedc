"""Linear CKA, the guidance paper's measure, and its fast kernels.

Each side is centred in O(n d) before any product and kept as centred features when ``d <= n``
or as a centred Gram otherwise (no n x n centring matrix); same-shaped layers are reduced in one
stacked call, and the Gram's backward is one symmetric product (:class:`_ScaledGrams`).

Examples:
    >>> import torch
    >>> x = torch.randn(64, 10)
    >>> round(linear_cka(x, x).item(), 4)
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._numerics import (
    _center,
    _double_centre,
    _inverse_scale,
    _measure,
    _n_ok,
    _no_autocast,
    _peak,
    _safe_div,
    _upcast,
)

__all__ = ["CenteredSide", "linear_cka"]


class _ScaledGrams(torch.autograd.Function):
    """Stacked centred Grams ``xc_i @ xc_i^T``, ``xc_i = nan_to_num((x_i - mean_i) * inv_scale[i])``.

    Features are centred before the product: a Gram of uncentred features centred afterwards
    loses every digit to cancellation when a common offset dwarfs the spread (CKA 0.02 for 0.97
    at an offset of 1e4 in float32). Autograd's own backward of ``x @ x.mT`` runs two n x n x d
    products plus a strided accumulation; a symmetric Gram needs one, ``(G + G^T) @ xc``, which
    roughly halves the cost of wide layers. Several same-shaped layers go in one call so the
    n x n work after it runs batched. Callers double-centre the result (which also removes what
    rounding left of the offset). Saves the inputs (alive anyway in the caller's graph) and
    recomputes the centred copy in the backward instead of keeping it.
    """

    @staticmethod
    def forward(ctx: Any, inv_scale: Tensor, in_range: bool, *xs: Tensor) -> Tensor:
        n = xs[0].shape[-2]
        out = xs[0].new_empty((len(xs), *xs[0].shape[:-1], n))
        for i, x in enumerate(xs):
            inv = inv_scale[i][..., None, None]
            xc = x - x.mean(-2, keepdim=True)  # one pass: the caller's double centring removes the rest
            if in_range:  # moderate finite values: scale the n x n result, skip a pass over x
                torch.matmul(xc, xc.mT, out=out[i]).mul_(inv.square())
                continue
            scaled = torch.nan_to_num_(xc.mul_(inv), nan=0.0, posinf=0.0, neginf=0.0)
            torch.matmul(scaled, scaled.mT, out=out[i])
        ctx.in_range = in_range
        ctx.save_for_backward(inv_scale, *xs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inv_scale, *xs = ctx.saved_tensors
        symmetric = grad + grad.mT
        grads: list[Tensor | None] = []
        for i, x in enumerate(xs):
            if not ctx.needs_input_grad[i + 2]:
                grads.append(None)
                continue
            inv = inv_scale[i][..., None, None]
            xc = x - x.mean(-2, keepdim=True)
            if ctx.in_range:
                grad_x = (symmetric[i] * inv.square()) @ xc
            else:
                # The scale is applied in two halves so 1e30 activations neither overflow nor
                # underflow. Non-finite x only occurs in problems whose similarity is the
                # zero-gradient fallback, so its NaN products become 0.
                grad_x = torch.nan_to_num_(((symmetric[i] * inv) @ xc).mul_(inv), nan=0.0, posinf=0.0, neginf=0.0)
            # The centring's own backward (subtracting grad_x's column means) is skipped: the
            # incoming gradient is double-centred (the caller's H K H), so those means are zero.
            grads.append(grad_x)
        return (None, None, *grads)


@dataclass
class CenteredSide:
    """One side of a linear-CKA computation, centred and rescaled.

    ``kind`` is ``"features"`` (``value`` is ``(..., n, d)``, used when d <= n) or ``"gram"``
    (``value`` is the centred ``(..., n, n)`` Gram, used when d > n). ``norm`` is the Frobenius
    norm of the centred Gram (``sqrt(HSIC(K, K))`` up to a constant) and ``ok`` flags problems
    that can be measured. A guide's activations are reduced to this inside its hook.

    Examples:
        >>> import torch
        >>> side = CenteredSide.of(torch.randn(8, 100))
        >>> side.kind, tuple(side.value.shape)
        ('gram', (8, 8))
    """

    kind: str
    value: Tensor
    norm: Tensor
    ok: Tensor

    @classmethod
    def of(cls, x: Tensor, weights: Tensor | None = None, form: str | None = None) -> CenteredSide:
        """Centre ``x`` (n, d) over samples and pick the cheaper form (features if d <= n)."""
        x = _upcast(x)
        n, d = x.shape[-2:]
        wide = form == "gram" or (form is None and d > n)
        if wide and weights is None:
            return cls._stack_of_grams([x], squeeze=True)
        peak, varies = _peak(x)
        inv_scale, finite = _inverse_scale(peak)
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        xc = _center(x, weights).mul_(inv_scale[..., None, None])
        if wide:
            gram = xc @ xc.mT
            return cls("gram", gram, torch.linalg.matrix_norm(gram), finite & varies)
        return cls("features", xc, torch.linalg.matrix_norm(xc.mT @ xc), finite & varies)

    @classmethod
    def of_many(cls, xs: list[Tensor], form: str | None = None) -> CenteredSide:
        """Several same-shaped, unweighted feature matrices as one side with a leading ``k`` dim.

        Examples:
            >>> import torch
            >>> side = CenteredSide.of_many([torch.randn(8, 100), torch.randn(8, 100)])
            >>> side.kind, tuple(side.value.shape), tuple(side.norm.shape)
            ('gram', (2, 8, 8), (2,))
        """
        xs = [_upcast(x) for x in xs]
        n, d = xs[0].shape[-2:]
        if form == "gram" or (form is None and d > n):
            return cls._stack_of_grams(xs, squeeze=False)
        return cls.of(torch.stack(xs), form=form)  # narrow features: the copy is small

    @classmethod
    def _stack_of_grams(cls, xs: list[Tensor], squeeze: bool) -> CenteredSide:
        # Wide features: one Gram of centred features each, then double centring in O(n^2),
        # which removes what rounding left of the offset.
        peak, varies = (torch.stack(t) for t in zip(*(_peak(x) for x in xs), strict=True))
        inv_scale, finite = _inverse_scale(peak)
        # On CPU a host read is free; elsewhere it would stall the stream (and under torch.compile
        # break the graph), so always rescale there.
        in_range = (
            xs[0].device.type == "cpu"
            and not torch.compiler.is_compiling()
            and bool(((peak > 1e-6) & (peak < 1e6)).all())
        )
        gram = _double_centre(_ScaledGrams.apply(inv_scale, in_range, *xs))
        side = cls("gram", gram, torch.linalg.matrix_norm(gram), finite & varies)
        return side[0] if squeeze else side

    def __getitem__(self, index: int) -> CenteredSide:
        return CenteredSide(self.kind, self.value[index], self.norm[index], self.ok[index])

    @classmethod
    def stack(cls, sides: list[CenteredSide]) -> CenteredSide:
        """Stack same-kind, same-shape sides along a new leading dim."""
        return cls(
            sides[0].kind,
            torch.stack([s.value for s in sides]),
            torch.stack([s.norm for s in sides]),
            torch.stack([s.ok for s in sides]),
        )

    def detach_clone(self) -> CenteredSide:
        """A plain (non-inference) copy, so autograd may save it for the target's backward."""
        return CenteredSide(self.kind, self.value.clone(), self.norm.clone(), self.ok.clone())


def _cross(a: CenteredSide, b: CenteredSide) -> Tensor:
    """<Kc_a, Kc_b>_F computed in whichever form each side holds."""
    if a.kind == "features" and b.kind == "features":
        return (b.value.mT @ a.value).square().sum((-2, -1))
    if a.kind == "features":
        return (a.value * (b.value @ a.value)).sum((-2, -1))
    if b.kind == "features":
        return (b.value * (a.value @ b.value)).sum((-2, -1))
    return (a.value * b.value).sum((-2, -1))


def _linear_cka_sides(a: CenteredSide, b: CenteredSide, n_ok: Tensor) -> tuple[Tensor, Tensor]:
    return _safe_div(_cross(a, b), a.norm * b.norm, a.ok & b.ok & n_ok)


def _linear_cka_core(x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    with _no_autocast(x.device.type):
        return _linear_cka_sides(CenteredSide.of(x, weights), CenteredSide.of(y, weights), _n_ok(x, 2, weights))


def linear_cka(x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """Linear CKA (Kornblith et al., 2019), the measure used by the guidance paper.

    ``CKA = <Kc, Lc>_F / (||Kc||_F ||Lc||_F)`` with ``Kc`` the centred Gram of ``x``. Each side
    is centred in O(n d) and kept as centred features when ``d <= n`` (feature-space form
    ``||Yc^T Xc||_F^2``) or as a centred Gram otherwise; no n x n centring matrix is built.
    Half-precision inputs are computed in float32 even under autocast.

    Args:
        x: ``(..., n, d1)`` target features.
        y: ``(..., n, d2)`` guide features.
        weights: optional ``(..., n)`` 0/1 mask of samples to include (padding excluded).

    Returns:
        CKA in ``[0, 1]`` (a 0-dim tensor, or one value per leading index).

    Examples:
        >>> import torch
        >>> x = torch.randn(32, 5)
        >>> round(linear_cka(x, x + 10).item(), 4)  # invariant to translation
        1.0
    """
    return _measure("linear_cka", _linear_cka_core, 2, x, y, weights)
