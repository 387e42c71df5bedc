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

from .debiased import debiased_cka
from .functional import procrustes_distance, rbf_cka, rsa
from .linear import CenteredSide, linear_cka
from .registry import CallableMetric, Metric, available_metrics, get_metric, register_metric

__all__ = [
    "linear_cka",
    "debiased_cka",
    "rbf_cka",
    "rsa",
    "procrustes_distance",
    "Metric",
    "CallableMetric",
    "CenteredSide",
    "get_metric",
    "register_metric",
    "available_metrics",
]
