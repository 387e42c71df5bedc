"""The model output's own loss: where the weighted term goes when the target returns one.

Hugging Face models return a ``ModelOutput`` (a mapping) with ``loss`` when given labels; user code
returns a dict, a dataclass or a namedtuple with a ``loss`` field. :func:`add_to_loss` adds the term
to any of them, and says so when an output has a loss it cannot change (the term would be lost).

Examples:
    >>> import collections, torch
    >>> Out = collections.namedtuple("Out", ["loss", "logits"])
    >>> out, loss = add_to_loss(Out(torch.tensor(1.0), None), torch.tensor(0.5))
    >>> float(out.loss), float(loss)
    (1.5, 1.5)
    >>> add_to_loss(torch.zeros(2), torch.tensor(0.5))[1] is None  # no loss in the output: nothing added
    True
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .errors import GuidewrapWarning

__all__ = ["add_to_loss", "output_loss", "set_loss"]


def output_loss(output: Any) -> Any:
    """The ``loss`` an output carries (a mapping's key, a dataclass's or namedtuple's field, an
    attribute), or ``None``.

    Examples:
        >>> output_loss({"loss": 2.0}), output_loss((1, 2))
        (2.0, None)
    """
    if isinstance(output, Mapping):
        return output.get("loss")
    if isinstance(output, Tensor):
        return None
    return getattr(output, "loss", None)


def add_to_loss(output: Any, term: Tensor) -> tuple[Any, Tensor | None]:
    """``(output with term added to its loss, the new loss)``; ``(output, None)`` when the output
    carries no loss. A namedtuple or frozen dataclass is replaced by a copy with the new loss."""
    loss = output_loss(output)
    if loss is None:
        return output, None
    return set_loss(output, loss + term.to(loss.device, loss.dtype) if isinstance(loss, Tensor) else loss + term)


def set_loss(output: Any, new: Any) -> tuple[Any, Any]:
    """``(output with its loss replaced by new, new)``; ``(output, None)`` when the output carries no
    loss or its loss cannot be set (said in a warning). A namedtuple or frozen dataclass is replaced
    by a copy.

    Examples:
        >>> import torch
        >>> out, loss = set_loss({"loss": torch.tensor(1.0)}, torch.tensor(3.0))
        >>> float(out["loss"])
        3.0
    """
    if output_loss(output) is None:
        return output, None
    if isinstance(output, Mapping):
        output["loss"] = new  # type: ignore[index]
        return output, new
    if isinstance(output, tuple) and "loss" in getattr(output, "_fields", ()):
        return output._replace(loss=new), new  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(output) and any(f.name == "loss" for f in dataclasses.fields(output)):
        if type(output).__dataclass_params__.frozen:
            return dataclasses.replace(output, loss=new), new  # type: ignore[type-var]
    try:
        output.loss = new
    except (AttributeError, TypeError):
        warnings.warn(
            f"the target's output ({type(output).__name__}) carries a loss, but guidewrap cannot add the alignment "
            "term to it (the attribute cannot be set), so output.loss holds the task loss alone: add "
            "guided.alignment_loss to your loss yourself, and pass add_to_output_loss=False to silence this",
            GuidewrapWarning,
            stacklevel=5,
        )
        return output, None
    return output, new
