"""Representational alignment measures as differentiable losses.

Every measure takes two feature matrices ``x`` of shape ``(n, d1)`` and ``y`` of shape
``(n, d2)`` (same ``n``; extra leading dimensions are treated as a batch of independent
problems, which is how token-wise CKA runs) and is differentiable in ``x``, the target side.

Functions return a *similarity* (:func:`linear_cka`, :func:`debiased_cka`, :func:`rbf_cka`,
:func:`rsa`) or a distance (:func:`procrustes_distance`). The registry (:func:`get_metric`)
wraps each as a :class:`Metric` whose :meth:`Metric.distance` is the loss the engine
minimises (``1 - CKA`` for ``"cka"``).

Degenerate input never produces NaN or inf: constant or all-zero features, too few samples and
non-finite values give the fallback similarity 0 (distance 1) with a zero gradient and one
:class:`~guidewrap.errors.DegenerateFeaturesWarning`.

Examples:
    >>> import torch
    >>> from guidewrap.metrics import linear_cka
    >>> x = torch.randn(64, 10)
    >>> round(linear_cka(x, x).item(), 4)
    1.0
    >>> round(linear_cka(x, 3 * x @ torch.linalg.qr(torch.randn(10, 10))[0]).item(), 4)
    1.0
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import DegenerateFeaturesWarning, MetricError, ShapeMismatchError

__all__ = [
    "linear_cka",
    "debiased_cka",
    "rbf_cka",
    "rsa",
    "procrustes_distance",
    "Metric",
    "get_metric",
    "register_metric",
    "available_metrics",
]

_TINY = 1e-30


# --------------------------------------------------------------------------- helpers


def _check(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ShapeMismatchError(f"{name}: x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() < 2 or y.dim() < 2:
        raise ShapeMismatchError(
            f"{name}: x and y must be (n, d) feature matrices, got shapes {tuple(x.shape)} and {tuple(y.shape)}; "
            "flatten per sample first (x.flatten(1))"
        )
    if x.shape[:-1] != y.shape[:-1]:
        raise ShapeMismatchError(
            f"{name}: x and y must have the same number of samples (and leading dims), got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    # Autocast would downcast the matmuls back to bf16/fp16; CKA needs float32 sums.
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # device types without autocast support
        return contextlib.nullcontext()


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def _sanitize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Replace non-finite entries by 0; return the clean tensor and a per-problem ok flag."""
    finite = torch.isfinite(x)
    ok = finite.flatten(-2).all(-1)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), ok


def _center(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Centre over samples (dim -2) in O(n d); with 0/1 weights, excluded rows become zero."""
    if weights is None:
        return x - x.mean(-2, keepdim=True)
    w = weights.to(x.dtype).unsqueeze(-1)
    mean = (x * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1.0)
    return (x - mean) * w


def _rescale(x: Tensor) -> tuple[Tensor, Tensor]:
    """Divide by the (detached) max magnitude: every measure here is scale invariant, so the
    gradient is unchanged, and 1e30 activations no longer overflow in the products."""
    scale = x.detach().abs().flatten(-2).amax(-1)
    ok = scale > _TINY
    safe = torch.where(ok, scale, torch.ones_like(scale))
    return x / safe[..., None, None], ok


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    ok = ok & (den > _TINY) & torch.isfinite(den)
    den = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, num / den, torch.zeros_like(num)), ok


def _n_ok(x: Tensor, minimum: int, weights: Tensor | None) -> Tensor:
    shape = x.shape[:-2]
    if weights is None:
        return torch.full(shape, x.shape[-2] >= minimum, dtype=torch.bool, device=x.device)
    return weights.sum(-1) >= minimum


def _reason(x: Tensor, y: Tensor, minimum: int) -> str:
    n = x.shape[-2]
    if n < minimum:
        return f"only {n} samples (needs at least {minimum})"
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(y).all()):
        return "non-finite (NaN or inf) features"
    return "constant or all-zero features (no variance across samples), e.g. a dead ReLU layer"


def _warn_if_degenerate(ok: Tensor, x: Tensor, y: Tensor, name: str, minimum: int) -> None:
    if not bool(ok.all()):
        warnings.warn(
            f"{name}: cannot measure {_reason(x, y, minimum)}; returning similarity 0 with zero gradient",
            DegenerateFeaturesWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- linear CKA


def _peak(x: Tensor) -> Tensor:
    """Largest magnitude per problem (NaN/inf propagate). One amax and one amin are ~10x faster
    on CPU than ``aminmax`` with a dim or an infinity norm."""
    x = x.detach()
    return torch.maximum(x.amax((-2, -1)), -x.amin((-2, -1)))


def _inverse_scale(peak: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 / peak, finite)``; CKA is scale invariant, and rescaling keeps 1e30 activations from
    overflowing (and 1e-30 ones from underflowing) in the products."""
    finite = torch.isfinite(peak)
    return 1.0 / torch.where(finite & (peak > _TINY), peak, torch.ones_like(peak)), finite


class _ScaledGrams(torch.autograd.Function):
    """Stacked Grams ``xs_i @ xs_i^T`` with ``xs_i = nan_to_num(x_i * inv_scale[i])``.

    Autograd's own backward of ``x @ x.mT`` runs two n x n x d products plus a strided
    accumulation; a symmetric Gram needs one, ``(G + G^T) @ x``, which roughly halves the cost
    of wide layers. Several same-shaped layers go in one call so the n x n work after it runs
    batched. Saves the inputs (alive anyway in the caller's graph), not rescaled copies.
    """

    @staticmethod
    def forward(ctx: Any, inv_scale: Tensor, in_range: bool, *xs: Tensor) -> Tensor:
        n = xs[0].shape[-2]
        out = xs[0].new_empty((len(xs), *xs[0].shape[:-1], n))
        for i, x in enumerate(xs):
            inv = inv_scale[i][..., None, None]
            if in_range:  # moderate finite values: scale the n x n result, skip two passes over x
                torch.matmul(x, x.mT, out=out[i]).mul_(inv.square())
                continue
            scaled = torch.nan_to_num_(x * inv, nan=0.0, posinf=0.0, neginf=0.0)
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
            if ctx.in_range:
                grads.append((symmetric[i] * inv.square()) @ x)
                continue
            # The scale is applied in two halves so 1e30 activations neither overflow nor
            # underflow. Non-finite x only occurs in problems whose similarity is the
            # zero-gradient fallback, so its NaN products become 0.
            grad_x = (symmetric[i] * inv) @ x
            grads.append(torch.nan_to_num_(grad_x.mul_(inv), nan=0.0, posinf=0.0, neginf=0.0))
        return (None, None, *grads)


def _double_centre(gram: Tensor) -> Tensor:
    """``H K H`` in O(n^2): subtract row and column means, add back the grand mean."""
    row = gram.mean(-1, keepdim=True)
    return gram - row - row.mT + row.mean(-2, keepdim=True)


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
        inv_scale, finite = _inverse_scale(_peak(x))
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        xc = _center(x, weights).mul_(inv_scale[..., None, None])
        if wide:
            gram = xc @ xc.mT
            return cls("gram", gram, torch.linalg.matrix_norm(gram), finite)
        return cls("features", xc, torch.linalg.matrix_norm(xc.mT @ xc), finite)

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
        # Wide features: one Gram each, then double centring in O(n^2) (no pass over n x d).
        peak = torch.stack([_peak(x) for x in xs])
        inv_scale, finite = _inverse_scale(peak)
        # On CPU a host read is free; elsewhere it would stall the stream, so always rescale.
        in_range = xs[0].device.type == "cpu" and bool(((peak > 1e-6) & (peak < 1e6)).all())
        gram = _double_centre(_ScaledGrams.apply(inv_scale, in_range, *xs))
        side = cls("gram", gram, torch.linalg.matrix_norm(gram), finite)
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
    _check(x, y, "linear_cka")
    value, ok = _linear_cka_core(x, y, weights)
    _warn_if_degenerate(ok, x, y, "linear_cka", 2)
    return value


# --------------------------------------------------------------------------- debiased CKA


def _hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 - the textbook's name
    """Song et al. (2012) unbiased HSIC estimator on Grams with zeroed diagonals."""
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0.0)
    l = l.masked_fill(eye, 0.0)  # noqa: E741
    k_sum = k.sum((-2, -1))
    l_sum = l.sum((-2, -1))
    trace = (k * l).sum((-2, -1))
    cross = (k.sum(-1) * l.sum(-1)).sum(-1)
    return (trace + k_sum * l_sum / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def _debiased_grams(x: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if weights is not None:
        raise MetricError("debiased_cka does not support sample weights; use 'cka' for masked sequences")
    x, finite = _sanitize(_upcast(x))
    xc, nonzero = _rescale(_center(x))
    return xc @ xc.mT, finite & nonzero


def _debiased_core_grams(kx: Tensor, ok_x: Tensor, ky: Tensor, ok_y: Tensor) -> tuple[Tensor, Tensor]:
    n = kx.shape[-1]
    if n < 4:
        zero = (kx.sum((-2, -1)) + ky.sum((-2, -1))) * 0.0
        return zero, torch.zeros_like(ok_x)
    hxy = _hsic_unbiased(kx, ky)
    hxx = _hsic_unbiased(kx, kx)
    hyy = _hsic_unbiased(ky, ky)
    ok = ok_x & ok_y & (hxx > _TINY) & (hyy > _TINY)
    den = torch.sqrt(torch.where(ok, hxx * hyy, torch.ones_like(hxx)))
    return _safe_div(hxy, den, ok)


def _debiased_core(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    with _no_autocast(x.device.type):
        kx, ok_x = _debiased_grams(x)
        ky, ok_y = _debiased_grams(y)
        return _debiased_core_grams(kx, ok_x, ky, ok_y)


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
    _check(x, y, "debiased_cka")
    value, ok = _debiased_core(x, y)
    _warn_if_degenerate(ok, x, y, "debiased_cka", 4)
    return value


# --------------------------------------------------------------------------- RBF CKA


def _rbf_gram(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    x, finite = _sanitize(_upcast(x))
    xc, nonzero = _rescale(_center(x))
    sq_norms = xc.square().sum(-1)
    n = xc.shape[-2]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
    sq = (sq_norms[..., :, None] + sq_norms[..., None, :] - 2.0 * (xc @ xc.mT)).clamp_min(0.0) * off_diag
    flat = sq.flatten(-2)  # not detached: the bandwidth is part of the function being differentiated
    median = flat.median(-1).values
    # More than half the pairs identical: fall back to the mean of the non-zero distances.
    positive = (flat.detach() > 0).sum(-1).clamp_min(1)
    fallback = flat.sum(-1) / positive
    bandwidth = torch.where(median > _TINY, median, fallback)
    ok = finite & nonzero & (bandwidth.detach() > _TINY)
    bandwidth = torch.where(ok, bandwidth, torch.ones_like(bandwidth))
    gram = torch.exp(-sq / (2.0 * sigma**2 * bandwidth[..., None, None]))
    return _double_centre(gram), ok


def _rbf_core(x: Tensor, y: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    with _no_autocast(x.device.type):
        kx, ok_x = _rbf_gram(x, sigma)
        ky, ok_y = _rbf_gram(y, sigma)
        return _gram_cka(kx, ok_x, ky, ok_y, _n_ok(x, 2, None))


def _gram_cka(kx: Tensor, ok_x: Tensor, ky: Tensor, ok_y: Tensor, n_ok: Tensor) -> tuple[Tensor, Tensor]:
    num = (kx * ky).sum((-2, -1))
    return _safe_div(num, torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky), ok_x & ok_y & n_ok)


def rbf_cka(x: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """CKA with a Gaussian (RBF) kernel; the bandwidth is ``sigma`` times the median distance.

    Args:
        x: ``(n, d1)`` target features.
        y: ``(n, d2)`` guide features.
        sigma: bandwidth as a multiple of the median pairwise distance (median heuristic).

    Examples:
        >>> import torch
        >>> x = torch.randn(20, 6)
        >>> 0.0 <= rbf_cka(x, torch.randn(20, 3)).item() <= 1.0
        True
    """
    _check(x, y, "rbf_cka")
    if not sigma > 0:
        raise MetricError(f"rbf_cka: sigma must be > 0, got {sigma}")
    value, ok = _rbf_core(x, y, sigma)
    _warn_if_degenerate(ok, x, y, "rbf_cka", 2)
    return value


# --------------------------------------------------------------------------- RSA


def _rsa_core(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    with _no_autocast(x.device.type):
        sx, ok_x = _cosine_rdm(x)
        sy, ok_y = _cosine_rdm(y)
        sx = sx - sx.mean(-1, keepdim=True)
        sy = sy - sy.mean(-1, keepdim=True)
        num = (sx * sy).sum(-1)
        den_sq = sx.square().sum(-1) * sy.square().sum(-1)
        ok = ok_x & ok_y & _n_ok(x, 3, None) & (den_sq > _TINY)
        # sqrt only of safe values: a zero under the root would send inf * 0 = NaN backwards
        return _safe_div(num, torch.sqrt(torch.where(ok, den_sq, torch.ones_like(den_sq))), ok)


def _cosine_rdm(x: Tensor) -> tuple[Tensor, Tensor]:
    x, finite = _sanitize(_upcast(x))
    x, _ = _rescale(x)
    norms = x.norm(dim=-1, keepdim=True)
    unit = x / torch.where(norms > _TINY, norms, torch.ones_like(norms))
    n = x.shape[-2]
    rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
    sims = (unit @ unit.mT)[..., rows, cols]
    spread = sims.detach().amax(-1) - sims.detach().amin(-1) if sims.shape[-1] else torch.zeros(x.shape[:-2])
    return sims, finite & (spread > 1e-12)


def rsa(x: Tensor, y: Tensor) -> Tensor:
    """Differentiable RSA: Pearson correlation of the two cosine-similarity matrices.

    Uses the ``n (n - 1) / 2`` off-diagonal entries; needs n >= 3.

    Examples:
        >>> import torch
        >>> x = torch.randn(12, 4)
        >>> round(rsa(x, 2 * x).item(), 4)
        1.0
    """
    _check(x, y, "rsa")
    value, ok = _rsa_core(x, y)
    _warn_if_degenerate(ok, x, y, "rsa", 3)
    return value


# --------------------------------------------------------------------------- Procrustes


def _procrustes_core(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    with _no_autocast(x.device.type):
        xs, ok_x = _unit_centered(x)
        ys, ok_y = _unit_centered(y)
        # Nuclear norm of the smaller cross-covariance; svdvals has stable gradients.
        cross = ys.mT @ xs if ys.shape[-1] <= xs.shape[-1] else xs.mT @ ys
        nuclear = torch.linalg.svdvals(cross).sum(-1)
        ok = ok_x & ok_y & _n_ok(x, 2, None)
        similarity = torch.where(ok, nuclear, torch.zeros_like(nuclear))
        return 1.0 - similarity, ok


def _unit_centered(x: Tensor) -> tuple[Tensor, Tensor]:
    x, finite = _sanitize(_upcast(x))
    xc, nonzero = _rescale(_center(x))
    norm = torch.linalg.matrix_norm(xc)
    return xc / torch.where(nonzero, norm, torch.ones_like(norm))[..., None, None], finite & nonzero


def procrustes_distance(x: Tensor, y: Tensor) -> Tensor:
    """Orthogonal Procrustes distance ``1 - ||Xc^T Yc||_*`` on centred, unit-Frobenius features.

    0 when ``y`` is a rotation (and rescaling) of ``x``, at most 1. Costs an SVD of the
    ``min(d1, d2)``-sized cross-covariance: prefer CKA for very wide layers.

    Examples:
        >>> import torch
        >>> x = torch.randn(30, 4)
        >>> q = torch.linalg.qr(torch.randn(4, 4))[0]
        >>> abs(procrustes_distance(x, x @ q).item()) < 1e-5
        True
    """
    _check(x, y, "procrustes_distance")
    value, ok = _procrustes_core(x, y)
    _warn_if_degenerate(ok, x, y, "procrustes_distance", 2)
    return value


# --------------------------------------------------------------------------- registry


class Metric:
    """A named alignment *distance* used as a loss (lower means more aligned).

    The engine calls :meth:`prepare` on the guide's features inside the guide's hook (so only
    the reduced form is kept) and :meth:`distance_prepared` with the target's features.
    Subclass it, or register any callable ``(x, y) -> distance`` with :func:`register_metric`.

    Examples:
        >>> import torch
        >>> metric = get_metric("cka")
        >>> x = torch.randn(16, 8)
        >>> abs(metric.distance(x, x).item()) < 1e-6
        True
    """

    name: str = "custom"

    def distance(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
        """Distance between target features ``x`` and guide features ``y``."""
        _check(x, y, self.name)
        value, ok = self.distance_prepared(x, self.prepare(y, weights), weights)
        _warn_if_degenerate(ok, x, y, self.name, 2)
        return value

    def prepare(self, y: Tensor, weights: Tensor | None = None) -> Any:
        """Reduce guide features to what :meth:`distance_prepared` needs (default: keep them)."""
        return y

    def distance_prepared(self, x: Tensor, prepared: Any, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(distance, ok)``; ``ok`` is False where the pair cannot be measured."""
        return self.compare(self.prepare_target(x, weights), prepared, weights)

    def prepare_target(self, x: Tensor, weights: Tensor | None = None) -> Any:
        """Reduce target features once per layer and forward (differentiable); default: keep them."""
        return x

    def compare(self, target: Any, prepared: Any, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(distance, ok)`` between a :meth:`prepare_target` and a :meth:`prepare` result."""
        if type(self).distance_prepared is Metric.distance_prepared:
            raise NotImplementedError(f"{type(self).__name__} must implement compare() or distance_prepared()")
        return self.distance_prepared(target, prepared, weights)

    def clone_prepared(self, prepared: Any) -> Any:
        """Copy a prepared guide value out of inference mode (autograd may save it)."""
        return prepared.clone() if isinstance(prepared, Tensor) else prepared

    # Batching: pairs whose target features share a shape and whose prepared guide values share
    # a batch_key run as one batched problem (fewer, larger kernels). Metrics opt in by
    # returning a key; the default runs every pair on its own.

    def batch_key(self, prepared: Any) -> Hashable | None:
        """A key under which prepared guide values can be stacked, or None (never batched)."""
        return None

    def stack_prepared(self, prepared: list[Any]) -> Any:
        """Stack prepared guide values that share a :meth:`batch_key` along a new leading dim."""
        raise NotImplementedError(f"{type(self).__name__} does not batch pairs")

    def prepare_target_many(self, xs: list[Tensor]) -> Any:
        """:meth:`prepare_target` for same-shaped, unweighted features, stacked along a new leading dim."""
        raise NotImplementedError(f"{type(self).__name__} does not batch pairs")

    def select_target(self, target: Any, index: Tensor) -> Any:
        """Entries ``index`` (along the leading dim) of a :meth:`prepare_target_many` result."""
        raise NotImplementedError(f"{type(self).__name__} does not batch pairs")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _LinearCKA(Metric):
    name = "cka"

    def prepare(self, y: Tensor, weights: Tensor | None = None) -> CenteredSide:
        return CenteredSide.of(y, weights)

    def clone_prepared(self, prepared: CenteredSide) -> CenteredSide:
        return prepared.detach_clone()

    def prepare_target(self, x: Tensor, weights: Tensor | None = None) -> tuple[CenteredSide, Tensor]:
        with _no_autocast(x.device.type):
            return CenteredSide.of(x, weights), _n_ok(x, 2, weights)

    def batch_key(self, prepared: CenteredSide) -> Hashable:
        return (prepared.kind, tuple(prepared.value.shape), prepared.value.dtype, prepared.value.device)

    def stack_prepared(self, prepared: list[CenteredSide]) -> CenteredSide:
        return CenteredSide.stack(prepared)

    def select_target(self, target: tuple[CenteredSide, Tensor], index: Tensor) -> tuple[CenteredSide, Tensor]:
        side, n_ok = target
        return CenteredSide(side.kind, side.value[index], side.norm[index], side.ok[index]), n_ok[index]

    def prepare_target_many(self, xs: list[Tensor]) -> tuple[CenteredSide, Tensor]:
        with _no_autocast(xs[0].device.type):
            side = CenteredSide.of_many(xs)
        return side, torch.full(side.norm.shape, xs[0].shape[-2] >= 2, dtype=torch.bool, device=side.norm.device)

    def compare(
        self, target: tuple[CenteredSide, Tensor], prepared: CenteredSide, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        side, n_ok = target
        with _no_autocast(side.value.device.type):
            value, ok = _linear_cka_sides(side, prepared, n_ok)
        return 1.0 - value, ok


class _DebiasedCKA(Metric):
    name = "debiased_cka"

    def prepare(self, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with _no_autocast(y.device.type):
            return _debiased_grams(y, weights)

    def clone_prepared(self, prepared: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return prepared[0].clone(), prepared[1].clone()

    def distance_prepared(
        self, x: Tensor, prepared: tuple[Tensor, Tensor], weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        with _no_autocast(x.device.type):
            kx, ok_x = _debiased_grams(x, weights)
            value, ok = _debiased_core_grams(kx, ok_x, *prepared)
        return 1.0 - value, ok


class _RBFCKA(Metric):
    name = "rbf_cka"

    def __init__(self, sigma: float = 1.0) -> None:
        if not sigma > 0:
            raise MetricError(f"rbf_cka: sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def prepare(self, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _reject_weights(self.name, weights)
        with _no_autocast(y.device.type):
            return _rbf_gram(y, self.sigma)

    def clone_prepared(self, prepared: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return prepared[0].clone(), prepared[1].clone()

    def distance_prepared(
        self, x: Tensor, prepared: tuple[Tensor, Tensor], weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        _reject_weights(self.name, weights)
        with _no_autocast(x.device.type):
            kx, ok_x = _rbf_gram(x, self.sigma)
            value, ok = _gram_cka(kx, ok_x, *prepared, _n_ok(x, 2, None))
        return 1.0 - value, ok


def _reject_weights(name: str, weights: Tensor | None) -> None:
    if weights is not None:
        raise MetricError(f"{name} does not support sample weights (padding masks); use metric='cka'")


class _FunctionMetric(Metric):
    """Wraps a plain ``(x, y) -> Tensor`` function computed on full guide features."""

    def __init__(self, name: str, fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        self.name = name
        self._fn = fn

    def prepare(self, y: Tensor, weights: Tensor | None = None) -> Tensor:
        _reject_weights(self.name, weights)
        return y

    def distance_prepared(self, x: Tensor, prepared: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _reject_weights(self.name, weights)
        return self._fn(x, prepared)


def _rsa_distance(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    value, ok = _rsa_core(x, y)
    return 1.0 - value, ok


class CallableMetric(Metric):
    """A user's ``(x, y) -> distance`` callable, checked to return a finite 0-dim tensor.

    Leading batch dimensions (token-wise mode) are handled by calling it once per index
    and averaging.

    Examples:
        >>> import torch
        >>> metric = CallableMetric(lambda x, y: (x.mean() - y.mean()).abs())
        >>> metric.distance(torch.ones(4, 2), torch.ones(4, 3)).item()
        0.0
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str | None = None) -> None:
        if not callable(fn):
            raise MetricError(f"metric must be a name or a callable (x, y) -> distance, got {type(fn).__name__}")
        self._fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def distance_prepared(self, x: Tensor, prepared: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _reject_weights(self.name, weights)
        if x.dim() > 2:
            values = [self._call(xi, yi) for xi, yi in zip(x.flatten(0, -3), prepared.flatten(0, -3), strict=True)]
            value = torch.stack(values).reshape(x.shape[:-2])
        else:
            value = self._call(x, prepared)
        return value, torch.isfinite(value.detach())

    def _call(self, x: Tensor, y: Tensor) -> Tensor:
        value = self._fn(x, y)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise MetricError(f"metric {self.name!r} must return a 0-dim tensor, got {shape}; reduce it (e.g. .mean())")
        return value


_REGISTRY: dict[str, Callable[[], Metric]] = {
    "cka": _LinearCKA,
    "linear_cka": _LinearCKA,
    "debiased_cka": _DebiasedCKA,
    "rbf_cka": _RBFCKA,
    "rsa": lambda: _FunctionMetric("rsa", _rsa_distance),
    "procrustes": lambda: _FunctionMetric("procrustes", _procrustes_core),
}


def register_metric(name: str, metric: Metric | Callable[[Tensor, Tensor], Tensor]) -> None:
    """Register a metric under ``name`` so configs can refer to it by string.

    Examples:
        >>> import torch
        >>> register_metric("mean_gap", lambda x, y: (x.mean() - y.mean()).abs())
        >>> get_metric("mean_gap").name
        'mean_gap'
    """
    if not isinstance(name, str) or not name:
        raise MetricError(f"metric name must be a non-empty string, got {name!r}")
    if isinstance(metric, Metric):
        _REGISTRY[name] = lambda: metric
    else:
        wrapped = CallableMetric(metric, name)
        _REGISTRY[name] = lambda: wrapped


def available_metrics() -> list[str]:
    """Names accepted by :func:`get_metric`.

    Examples:
        >>> "cka" in available_metrics()
        True
    """
    return sorted(_REGISTRY)


def get_metric(metric: str | Metric | Callable[[Tensor, Tensor], Tensor]) -> Metric:
    """Resolve a metric name, :class:`Metric` or ``(x, y) -> distance`` callable.

    Examples:
        >>> get_metric("rbf_cka").name
        'rbf_cka'
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return _REGISTRY[metric]()
        except KeyError:
            import difflib

            close = difflib.get_close_matches(metric, _REGISTRY, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise MetricError(f"unknown metric {metric!r}.{hint} Available: {', '.join(available_metrics())}") from None
    return CallableMetric(metric)
