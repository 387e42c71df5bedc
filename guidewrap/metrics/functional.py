"""The other measures as functions: RBF CKA, RSA and the Procrustes distance.

Each returns a similarity (a distance for :func:`procrustes_distance`), is differentiable in the
target side ``x`` and never returns NaN: degenerate input gives the fallback with a warning.

Examples:
    >>> import torch
    >>> x = torch.randn(12, 4)
    >>> round(rsa(x, 2 * x).item(), 4)
    1.0
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import DegenerateFeaturesWarning, MetricError
from ._numerics import (
    _TINY,
    _center,
    _double_centre,
    _measure,
    _n_ok,
    _no_autocast,
    _rescale,
    _safe_div,
    _sanitize,
    _upcast,
    _varies,
)

__all__ = ["rbf_cka", "rsa", "procrustes_distance"]


def _rbf_gram(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    x, finite = _sanitize(_upcast(x))
    xc, nonzero = _rescale(_center(x))
    nonzero = nonzero & _varies(x)
    sq_norms = xc.square().sum(-1)
    n = xc.shape[-2]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
    sq = (sq_norms[..., :, None] + sq_norms[..., None, :] - 2.0 * (xc @ xc.mT)).clamp_min(0.0) * off_diag
    # Identical rows leave rounding noise, not 0, in the expanded form: call it 0, so a median of
    # noise cannot become the bandwidth. Noise is ~100 ulps of the pair's own squared norms (a
    # threshold of 1e-5 of the largest norm zeroed real distances between rows near the origin).
    norms = sq_norms.detach()
    noise = 100 * torch.finfo(xc.dtype).eps * (norms[..., :, None] + norms[..., None, :])
    sq = torch.where(sq.detach() > noise, sq, torch.zeros_like(sq))
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
    if not sigma > 0:
        raise MetricError(f"rbf_cka: sigma must be > 0, got {sigma}")
    value = _measure("rbf_cka", _rbf_core, 2, x, y, sigma)
    for side, z in (("x", x), ("y", y)):
        if z.dim() == 2 and _mostly_repeated(z):
            warnings.warn(
                f"rbf_cka: half or more of the sample pairs of {side} are identical rows, so the median "
                "heuristic's bandwidth is 0; the mean non-zero distance is used instead (the value depends on "
                "that choice: prefer linear CKA, or deduplicate the samples)",
                DegenerateFeaturesWarning,
                stacklevel=2,
            )
    return value


def _mostly_repeated(z: Tensor) -> bool:
    n = z.shape[0]
    _, counts = torch.unique(z.detach(), dim=0, return_counts=True)
    if counts.numel() < 2:  # constant: already reported as degenerate
        return False
    # The bandwidth is the (lower) median of all n^2 squared distances, the diagonal included.
    return bool(counts.square().sum() > (n * n - 1) // 2)


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
        value, ok = _safe_div(num, torch.sqrt(torch.where(ok, den_sq, torch.ones_like(den_sq))), ok)
        return value.to(_upcast(x).dtype), ok


def _cosine_rdm(x: Tensor) -> tuple[Tensor, Tensor]:
    # float64: nearly collinear samples have cosines that differ only past float32's 7 digits, and
    # RSA correlates exactly those differences (0.90 in float32 for 0.42 in float64 otherwise).
    x, finite = _sanitize(x.double())
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
    return _measure("rsa", _rsa_core, 3, x, y)


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
    nonzero = nonzero & _varies(x)
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
    return _measure("procrustes_distance", _procrustes_core, 2, x, y)
