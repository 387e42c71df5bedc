"""guidewrap: guidance (representational alignment to a frozen guide network) for any PyTorch loop.

Examples:
    >>> import torch, guidewrap
    >>> target = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> guided = guidewrap.GuidedModel(target, guide)
    >>> _ = guided(torch.randn(8, 4))
    >>> float(guided.alignment_loss.detach()) >= 0
    True
"""

from .analysis import SimilarityMatrix, similarity_matrix
from .config import GuidanceConfig
from .context import Guidance
from .errors import (
    BatchSizeMismatchError,
    ConfigError,
    DegenerateFeaturesWarning,
    EmptyPlanError,
    GuidanceClosedError,
    GuideRequiresGradError,
    GuidewrapError,
    GuidewrapWarning,
    LayerNotFoundError,
    MetricError,
    NoBatchDimensionError,
    NoiseInputError,
    PlanNotReadyError,
    ShapeMismatchError,
    SkippedPairWarning,
)
from .layers import LayerPlan, list_layers
from .metrics import (
    available_metrics,
    debiased_cka,
    get_metric,
    linear_cka,
    procrustes_distance,
    rbf_cka,
    register_metric,
    rsa,
)
from .model import GuidedModel
from .schedules import GuidanceSchedule
from .utils import unwrap_model

__version__ = "0.1.0"

__all__ = [
    "GuidedModel",
    "Guidance",
    "GuidanceConfig",
    "GuidanceSchedule",
    "LayerPlan",
    "list_layers",
    "unwrap_model",
    "similarity_matrix",
    "SimilarityMatrix",
    "linear_cka",
    "debiased_cka",
    "rbf_cka",
    "rsa",
    "procrustes_distance",
    "get_metric",
    "register_metric",
    "available_metrics",
    "GuidewrapError",
    "ConfigError",
    "LayerNotFoundError",
    "EmptyPlanError",
    "BatchSizeMismatchError",
    "NoBatchDimensionError",
    "ShapeMismatchError",
    "GuideRequiresGradError",
    "MetricError",
    "NoiseInputError",
    "GuidanceClosedError",
    "PlanNotReadyError",
    "GuidewrapWarning",
    "DegenerateFeaturesWarning",
    "SkippedPairWarning",
    "__version__",
]
