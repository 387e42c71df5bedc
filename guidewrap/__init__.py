"""guidewrap: guidance (representational alignment to a frozen guide network) for any PyTorch loop.

The front door holds what a training script imports; everything else lives in its submodule:
``guidewrap.metrics`` (every measure, the :class:`~guidewrap.metrics.Metric` protocol and the
registry), ``guidewrap.errors`` (error and warning types), ``guidewrap.analysis`` (similarity
matrices, error consistency), ``guidewrap.schedules``, ``guidewrap.integrations.transformers``.

Examples:
    >>> import torch, guidewrap
    >>> target = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> guided = guidewrap.GuidedModel(target, guide)
    >>> _ = guided(torch.randn(8, 4))
    >>> float(guided.alignment_loss.detach()) >= 0
    True
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from . import errors as _errors
from .analysis import similarity_matrix
from .config import GuidanceConfig
from .context import Guidance
from .discovery import list_layers
from .errors import GuidewrapError, GuidewrapWarning
from .matching import LayerPlan
from .metrics import linear_cka, register_metric
from .model import GuidedModel
from .utils import unwrap_model

__version__ = "0.2.0"

__all__ = [
    "GuidedModel",
    "Guidance",
    "GuidanceConfig",
    "LayerPlan",
    "list_layers",
    "unwrap_model",
    "similarity_matrix",
    "linear_cka",
    "register_metric",
    "GuidewrapError",
    "GuidewrapWarning",
    "__version__",
]

# Names that were importable from the top level in 0.1; they still are, for one release, with a
# DeprecationWarning naming their home.
_MOVED = {
    **{name: "guidewrap.metrics" for name in ("debiased_cka", "rbf_cka", "rsa", "procrustes_distance")},
    **{name: "guidewrap.metrics" for name in ("get_metric", "available_metrics")},
    **{name: "guidewrap.errors" for name in _errors.__all__ if name not in __all__},
    **{name: "guidewrap.errors" for name in _errors._DEPRECATED},
    "SimilarityMatrix": "guidewrap.analysis",
    "GuidanceSchedule": "guidewrap.schedules",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        home = _MOVED[name]
        warnings.warn(f"guidewrap.{name} moved: import it from {home}", DeprecationWarning, stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # one warning, for the top-level name
            return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module 'guidewrap' has no attribute {name!r}")
