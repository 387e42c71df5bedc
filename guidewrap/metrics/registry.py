"""Metrics as losses: the :class:`Metric` protocol, the built-in metrics and the registry.

A metric is a *distance* (lower is more aligned). A custom one needs two methods:
:meth:`Metric.prepare` (reduce the guide's features; the default keeps them) and
:meth:`Metric.distance_prepared` (the distance and an ok flag). Splitting the target side out
(:meth:`Metric.prepare_target` / :meth:`Metric.compare`) and batching same-shaped pairs
(:meth:`Metric.batch_key` and friends) are optional fast paths, used by linear CKA.

Examples:
    >>> import torch
    >>> abs(get_metric("cka").distance(torch.eye(8), torch.eye(8)).item()) < 1e-6
    True
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from ..errors import MetricError
from ._numerics import _check, _n_ok, _no_autocast, _warn_if_degenerate
from .debiased import DebiasedSide, _debiased_sides
from .functional import _gram_cka, _procrustes_core, _rbf_gram, _rsa_core
from .linear import CenteredSide, _linear_cka_sides

__all__ = ["Metric", "CallableMetric", "register_metric", "available_metrics", "get_metric"]


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

    def prepare(self, y: Tensor, weights: Tensor | None = None) -> DebiasedSide:
        _reject_weights(self.name, weights)
        with _no_autocast(y.device.type):
            return DebiasedSide.of(y)

    def clone_prepared(self, prepared: DebiasedSide) -> DebiasedSide:
        return prepared.clone()

    def distance_prepared(
        self, x: Tensor, prepared: DebiasedSide, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        _reject_weights(self.name, weights)
        with _no_autocast(x.device.type):
            value, ok = _debiased_sides(DebiasedSide.of(x), prepared)
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
