"""Error and warning types raised by guidewrap.

Every error derives from :class:`GuidewrapError` *and* from the builtin exception a
caller would naturally catch (``KeyError`` for an unknown layer, ``ValueError`` for a bad
value, ...), so ``except ValueError`` keeps working while ``except GuidewrapError``
catches everything this library raises.

Examples:
    >>> from guidewrap.errors import GuidewrapError, ConfigError
    >>> try:
    ...     raise ConfigError("weight must be >= 0, got -1.0")
    ... except ValueError as err:
    ...     isinstance(err, GuidewrapError)
    True
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = [
    "GuidewrapError",
    "ConfigError",
    "LayerNotFoundError",
    "PlanError",
    "BatchSizeMismatchError",
    "ShapeMismatchError",
    "GuideRequiresGradError",
    "MetricError",
    "NoiseInputError",
    "GuidanceClosedError",
    "GuidewrapWarning",
    "DegenerateFeaturesWarning",
    "SkippedPairWarning",
]


class GuidewrapError(Exception):
    """Base class of every error raised by guidewrap.

    Examples:
        >>> issubclass(LayerNotFoundError, GuidewrapError)
        True
    """


class ConfigError(GuidewrapError, ValueError):
    """A setting has a bad value (negative weight, start after stop, unknown option).

    Examples:
        >>> ConfigError("until_step (3) must be greater than start_step (5)").args[0][:10]
        'until_step'
    """


class LayerNotFoundError(GuidewrapError, KeyError):
    """A layer name or pattern matches no module of the model.

    The message lists close matches and how to list valid names.

    Examples:
        >>> err = LayerNotFoundError("no layer 'fc9'")
        >>> isinstance(err, KeyError)
        True
    """

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class PlanError(GuidewrapError, ValueError, RuntimeError):
    """The layer plan cannot be made: matching found no pair to align, a requested layer never ran
    or has no batch dimension, or the plan is asked for before an example input resolved it.

    Replaces ``EmptyPlanError``, ``NoBatchDimensionError`` and ``PlanNotReadyError`` (those names
    still work, with a ``DeprecationWarning``, for one release).

    Examples:
        >>> err = PlanError("no layer pair to align")
        >>> isinstance(err, ValueError), isinstance(err, RuntimeError)
        (True, True)
    """


class BatchSizeMismatchError(GuidewrapError, ValueError):
    """Target and guide features have different numbers of samples.

    Examples:
        >>> isinstance(BatchSizeMismatchError("n differs"), ValueError)
        True
    """


class ShapeMismatchError(GuidewrapError, ValueError):
    """Feature matrices given to a metric have incompatible shapes.

    Examples:
        >>> isinstance(ShapeMismatchError("x is 3-D"), ValueError)
        True
    """


class GuideRequiresGradError(GuidewrapError, ValueError):
    """A guide whose parameters require gradients was passed with ``strict_guide=True``.

    Examples:
        >>> isinstance(GuideRequiresGradError("guide trains"), ValueError)
        True
    """


class MetricError(GuidewrapError, TypeError):
    """A metric is unknown, or returned something other than a finite 0-dim tensor.

    Examples:
        >>> isinstance(MetricError("metric returned shape (3,)"), TypeError)
        True
    """


class NoiseInputError(GuidewrapError, TypeError):
    """Noise inputs cannot be generated for an input of this type.

    Examples:
        >>> isinstance(NoiseInputError("cannot make noise for a str"), TypeError)
        True
    """


class GuidanceClosedError(GuidewrapError, RuntimeError):
    """A :class:`~guidewrap.Guidance` was used after its ``with`` block ended.

    Examples:
        >>> isinstance(GuidanceClosedError("closed"), RuntimeError)
        True
    """


class GuidewrapWarning(UserWarning):
    """Base class of guidewrap's warnings.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("x", GuidewrapWarning)
        >>> caught[0].category.__name__
        'GuidewrapWarning'
    """


class DegenerateFeaturesWarning(GuidewrapWarning):
    """A metric got input it cannot measure (constant, zero, non-finite, too few samples).

    The metric then returns its defined fallback value (similarity 0) with a zero gradient.

    Examples:
        >>> issubclass(DegenerateFeaturesWarning, GuidewrapWarning)
        True
    """


class SkippedPairWarning(GuidewrapWarning):
    """A layer pair could not be measured this step and was left out of the loss.

    Examples:
        >>> issubclass(SkippedPairWarning, UserWarning)
        True
    """


_DEPRECATED = {"EmptyPlanError": "PlanError", "NoBatchDimensionError": "PlanError", "PlanNotReadyError": "PlanError"}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"guidewrap.errors.{name} is now {new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module 'guidewrap.errors' has no attribute {name!r}")
