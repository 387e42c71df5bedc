"""Matching rules: the published code's rule on request (layers="paper")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guidewrap import ConfigError, GuidedModel
from guidewrap.layers import spread

torchvision = pytest.importorskip("torchvision")


def _fcn(hidden_layers: int = 8) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(hidden_layers):
        layers += [nn.Linear(3 * 32 * 32 if i == 0 else 64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def test_paper_rule_fcn8_guided_by_resnet18_has_eight_terms() -> None:
    """The published code: 21 ResNet-18 layers onto 8 FCN layers keep one guide layer per target
    layer (the last landing on it): 8 terms, where the default keeps all 21."""
    x = torch.randn(8, 3, 32, 32)
    resnet = torchvision.models.resnet18(num_classes=10)
    plan = GuidedModel(_fcn(), resnet, layers="paper").plan(x)
    assert len(plan) == 8 and len(GuidedModel(_fcn(), resnet).plan(x)) == 21
    # the guide's hooked layers in forward order, the logits (fc) dropped, as the published code hooks them
    hooked = [n for n, m in resnet.named_modules() if type(m) in (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d)]
    order = {n: i for i, n in enumerate(hooked)}
    guide_layers = sorted((n for n in hooked if n != "fc"), key=lambda n: order[n])
    assert guide_layers[-1] == "avgpool"  # forward order: the pool comes after the last block
    target_layers = [str(i) for i in range(1, 16, 2)]
    expected = {}
    for g, ti in zip(guide_layers, spread(8, len(guide_layers)), strict=True):
        expected[ti] = g  # the last guide layer landing on a target layer wins
    assert [(p.target.name, p.guide.name) for p in plan] == [(target_layers[t], g) for t, g in sorted(expected.items())]
    assert {info.name for side, info in plan.skipped} >= {"17", "fc"}


def test_paper_rule_on_the_copy_paste_pair_has_four_terms() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from lab.copy_paste import CausalTransformer, StackedRNN

    plan = GuidedModel(StackedRNN(12), CausalTransformer(12), layers="paper").plan(torch.randint(0, 12, (8, 20)))
    assert [p.target.name for p in plan] == ["rnns.0", "rnns.1", "rnns.2", "rnns.3"]


class _MyLinear(nn.Linear):
    """A subclass: the published code matches types exactly, so it is not hooked there."""


def test_paper_rule_matches_types_exactly_and_fixes_them() -> None:
    target = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), _MyLinear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    plan = GuidedModel(target, guide, layers="paper").plan(torch.randn(8, 4))
    assert "2" not in {p.target.name for p in plan}
    with pytest.raises(ConfigError, match="layers='paper' uses the published code's layer types"):
        GuidedModel(target, guide, layers="paper", layer_types=[nn.Linear])
