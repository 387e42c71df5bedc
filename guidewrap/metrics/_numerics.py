"""Numerical helpers shared by every measure: input checks, centring, the one rescaling rule,
safe division and the degenerate-input warning.

Every measure here is scale invariant, so features are divided by their (detached) peak
magnitude before any product: 1e30 activations do not overflow and 1e-30 ones do not underflow,
and the gradient is unchanged.

Examples:
    >>> import torch
    >>> x, ok = _rescale(torch.tensor([[1e30, -2e30], [0.0, 1e30]]))
    >>> x.tolist(), bool(ok)
    ([[0.5, -1.0], [0.0, 0.5]], True)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import DegenerateFeaturesWarning, ShapeMismatchError

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
    """Centre over samples (dim -2) in O(n d); with 0/1 weights, excluded rows become zero.

    Two passes: with a common offset far larger than the spread (transformer hidden states with
    massive activation dimensions), the first mean's rounding error is itself an offset, which
    the second pass removes. The Jacobian is the same centring projection either way.
    """
    if weights is None:
        xc = x - x.mean(-2, keepdim=True)
        return xc - xc.mean(-2, keepdim=True)
    w = weights.to(x.dtype).unsqueeze(-1)
    count = w.sum(-2, keepdim=True).clamp_min(1.0)
    xc = (x - (x * w).sum(-2, keepdim=True) / count) * w
    return (xc - xc.sum(-2, keepdim=True) / count) * w


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


def _warn_if_degenerate(ok: Tensor, x: Tensor, y: Tensor, name: str, minimum: int, stacklevel: int = 3) -> None:
    if not bool(ok.all()):
        warnings.warn(
            f"{name}: cannot measure {_reason(x, y, minimum)}; returning similarity 0 with zero gradient",
            DegenerateFeaturesWarning,
            stacklevel=stacklevel,
        )


def _measure(name: str, core: Any, minimum: int, x: Tensor, y: Tensor, *options: Any) -> Tensor:
    """A public measure: check the inputs, compute ``core(x, y, *options)``, warn on degenerate input."""
    _check(x, y, name)
    value, ok = core(x, y, *options)
    _warn_if_degenerate(ok, x, y, name, minimum, stacklevel=4)
    return value


def _peak(x: Tensor) -> tuple[Tensor, Tensor]:
    """Largest magnitude per problem (NaN/inf propagate), and whether any feature varies across
    samples. A constant layer (a dead ReLU, a bias-only output) is detected exactly here: after
    centring, rounding would leave noise that looks like a measurable signal."""
    x = x.detach()
    hi, lo = x.amax(-2), x.amin(-2)
    return torch.maximum(hi.amax(-1), -lo.amin(-1)), (hi != lo).any(-1)


def _varies(x: Tensor) -> Tensor:
    """Whether any feature of ``x`` varies across samples, per problem."""
    return _peak(x)[1]


def _inverse_scale(peak: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 / peak, finite)``; CKA is scale invariant, and rescaling keeps 1e30 activations from
    overflowing (and 1e-30 ones from underflowing) in the products."""
    finite = torch.isfinite(peak)
    return 1.0 / torch.where(finite & (peak > _TINY), peak, torch.ones_like(peak)), finite


def _rescale(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` divided by its peak magnitude per problem, and a flag: finite and not all zero."""
    peak = _peak(x)[0]
    inv_scale, finite = _inverse_scale(peak)
    return x * inv_scale[..., None, None], finite & (peak > _TINY)


def _double_centre(gram: Tensor) -> Tensor:
    """``H K H`` in O(n^2): subtract row and column means, add back the grand mean."""
    row = gram.mean(-1, keepdim=True)
    return gram - row - row.mT + row.mean(-2, keepdim=True)
