"""Layers: where to find what discovers, probes and matches them (kept for imports of this name).

Discovery (names, levels, candidates) is :mod:`guidewrap.discovery`, the probe forward
:mod:`guidewrap.probing`, matching and the plan :mod:`guidewrap.matching`.

Examples:
    >>> from guidewrap.layers import spread
    >>> spread(5, 3)
    [0, 2, 4]
"""

from __future__ import annotations

from .discovery import DEFAULT_LAYER_TYPES, LEVELS, PAPER_LAYER_TYPES, LayerInfo, block_names, level_of, list_layers
from .matching import LayerPair, LayerPlan, build_plan, spread
from .probing import probe

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LEVELS",
    "PAPER_LAYER_TYPES",
    "LayerInfo",
    "LayerPair",
    "LayerPlan",
    "block_names",
    "build_plan",
    "level_of",
    "list_layers",
    "probe",
    "spread",
]
