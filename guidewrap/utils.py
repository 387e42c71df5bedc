"""Small helpers: the optional-dependency check and unwrapping of parallel/compile wrappers.

Examples:
    >>> import torch
    >>> from guidewrap.utils import unwrap_model
    >>> net = torch.nn.Linear(2, 2)
    >>> unwrap_model(torch.nn.DataParallel(net)) is net
    True
"""

from __future__ import annotations

import importlib.util

from torch import nn

__all__ = ["unwrap_model", "is_transformers_available", "is_lightning_available"]

_WRAPPER_NAMES = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / DeepSpeed / FSDP / ``torch.compile`` wrappers.

    Layer names are always resolved on the unwrapped model, so the names a user reads from
    ``model.named_modules()`` before wrapping keep working after it.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> unwrap_model(net) is net
        True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if type(model).__name__ in _WRAPPER_NAMES and isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def is_transformers_available() -> bool:
    """Whether Hugging Face ``transformers`` can be imported (without importing it).

    Examples:
        >>> isinstance(is_transformers_available(), bool)
        True
    """
    return _available("transformers")


def is_lightning_available() -> bool:
    """Whether PyTorch Lightning (the ``lightning`` package) can be imported (without importing it).

    Examples:
        >>> isinstance(is_lightning_available(), bool)
        True
    """
    return _available("lightning")
