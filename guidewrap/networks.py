"""The two networks of a guided run: a target and a guide that share nothing, the guide frozen.

Examples:
    >>> import torch
    >>> target, guide = separate_networks(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    >>> freeze_guide(guide, strict=False)
    >>> guide.training, guide.weight.requires_grad
    (False, False)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import ConfigError, GuideRequiresGradError
from .utils import unwrap_model

__all__ = ["freeze_guide", "separate_networks"]


def freeze_guide(guide: nn.Module, strict: bool) -> None:
    """The guide is frozen and kept in eval mode; a lazy guide cannot be (its shapes are unknown)."""
    lazy = [name for name, p in guide.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ConfigError(
            f"the guide has uninitialised lazy parameters (e.g. {lazy[0]!r}, of a Lazy* module): their shapes "
            "are set by its first forward, and a frozen guide never trains one. Run the guide once on an example "
            "batch (guide(example)) before passing it"
        )
    trainable = [name for name, p in guide.named_parameters() if p.requires_grad]
    if trainable and strict:
        raise GuideRequiresGradError(
            f"the guide has {len(trainable)} parameters that require gradients (e.g. {trainable[0]!r}) and "
            "strict_guide=True; call guide.requires_grad_(False) first or drop strict_guide"
        )
    guide.requires_grad_(False)
    guide.eval()


def separate_networks(target: Any, guide: Any) -> tuple[nn.Module, nn.Module]:
    """The unwrapped target and guide: two modules sharing nothing. The guide is frozen and kept in
    eval mode; a module or parameter it shares with the target would silently freeze (and switch to
    eval) part of the network being trained."""
    for role, model in (("target", target), ("guide", guide)):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the {role} must be a torch.nn.Module, got {type(model).__name__}")
    target, guide = unwrap_model(target), unwrap_model(guide)
    if target is guide:
        raise ConfigError("the guide must be a separate network from the target (pass a copy to self-guide)")
    in_target = {id(m): name for name, m in target.named_modules()}
    shared = [(in_target[id(m)], name) for name, m in guide.named_modules() if id(m) in in_target]
    params = {id(p): name for name, p in target.named_parameters()}
    shared += [(params[id(p)], name) for name, p in guide.named_parameters() if id(p) in params]
    if shared:
        examples = "; ".join(f"target {t!r} is guide {g!r}" for t, g in shared[:3])
        raise ConfigError(
            f"the guide shares modules or parameters with the target ({examples}); guidance freezes the guide and "
            "keeps it in eval mode, which would freeze that part of the target too. Give the guide its own copy: "
            "copy.deepcopy(guide) after building both (or build the guide with untied weights)"
        )
    return target, guide
