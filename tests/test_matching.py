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
    assert len(plan) == 8 and len(GuidedModel(_fcn(), resnet, layers="sublayers").plan(x)) == 21
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


# --------------------------------------------------------------------------- levels, namesakes, heads

transformers = pytest.importorskip("transformers")


def _gpt2(width: int, layers: int = 2, head: bool = True) -> nn.Module:
    config = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=2, vocab_size=50, n_positions=32)
    return transformers.GPT2LMHeadModel(config) if head else transformers.GPT2Model(config)


def _bert_config() -> object:
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )


def _names(plan) -> list[tuple[str, str]]:  # noqa: ANN001
    return [(p.target.name, p.guide.name) for p in plan]


def test_gpt2_lm_head_model_guided_by_a_narrower_gpt2_pairs_namesakes() -> None:
    """Same body, different heads and widths: every sub-layer with its namesake (no shift from the
    head), the LM head left out, and the bare model's final norm kept (it is not a head)."""
    ids = torch.randint(0, 50, (8, 12))
    plan = GuidedModel(_gpt2(64), _gpt2(32, head=False), layers="sublayers").plan(input_ids=ids)
    pairs = _names(plan)
    assert len(pairs) == 13 and all(t == f"transformer.{g}" for t, g in pairs)
    assert ("transformer.h.1.mlp.c_fc", "h.1.mlp.c_fc") in pairs and ("transformer.ln_f", "ln_f") in pairs
    assert [(side, i.name) for side, i in plan.skipped] == [("target", "lm_head")]


def test_bert_classifier_guided_by_bert_model_pairs_namesakes() -> None:
    ids = torch.randint(0, 50, (8, 12))
    target = transformers.BertForSequenceClassification(_bert_config())
    plan = GuidedModel(target, transformers.BertModel(_bert_config()), layers="sublayers").plan(input_ids=ids)
    pairs = _names(plan)
    assert all(t == f"bert.{g}" for t, g in pairs) and len(pairs) == 18
    assert ("bert.encoder.layer.1.attention.self.key", "encoder.layer.1.attention.self.key") in pairs
    assert pairs[-1] == ("bert.pooler.dense", "pooler.dense")  # the guide's pooler is not dropped as a head
    assert [(side, i.name) for side, i in plan.skipped] == [("target", "classifier")]


def test_resnet_family_namesakes_and_spread() -> None:
    x = torch.randn(4, 3, 32, 32)
    same = GuidedModel(torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(), layers="sublayers")
    plan = same.plan(x)
    assert len(plan) == 21 and all(t == g for t, g in _names(plan))
    assert sorted((side, i.name) for side, i in plan.skipped) == [("guide", "fc"), ("target", "fc")]
    deeper = GuidedModel(torchvision.models.resnet18(), torchvision.models.resnet34(), layers="sublayers").plan(x)
    assert not any("namesake" in n for n in deeper.notes) and len(deeper) == 37  # other depth: spread
    blocks = GuidedModel(torchvision.models.resnet18(), torchvision.models.resnet34(), layers="blocks").plan(x)
    assert [p.guide.name for p in blocks][:3] == ["layer1.0", "layer1.1", "layer1.2"] and len(blocks) == 16
    assert {p.target.type for p in blocks} == {"BasicBlock"}


def test_different_depths_are_spread_not_paired_by_name() -> None:
    ids = torch.randint(0, 50, (8, 12))
    plan = GuidedModel(_gpt2(32, layers=4), _gpt2(32, layers=2), layers="blocks").plan(input_ids=ids)
    assert _names(plan) == [("transformer.h.0", "transformer.h.0"), ("transformer.h.3", "transformer.h.1")]
    mlp8 = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(8)], nn.Linear(8, 2))
    mlp4 = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)], nn.Linear(8, 2))
    plan = GuidedModel(mlp8, mlp4, layers="blocks").plan(torch.randn(8, 8))
    assert [p.target.name for p in plan] == ["0", "2", "5", "7"]  # spread over depth, not the first four


def test_blocks_level_on_transformers_and_fallback_without_blocks() -> None:
    ids = torch.randint(0, 50, (8, 12))
    bert = transformers.BertModel(_bert_config())
    plan = GuidedModel(_gpt2(32, layers=4), bert, layers="blocks").plan(input_ids=ids)
    assert [p.guide.name for p in plan] == ["encoder.layer.0", "encoder.layer.1"]
    assert [p.target.name for p in plan] == ["transformer.h.0", "transformer.h.3"]
    assert GuidedModel(_gpt2(32), bert).plan(input_ids=ids).pairs[0].target.type == "LayerNorm"  # "auto"
    flat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    plan = GuidedModel(flat, _fcn_small(), layers="blocks").plan(torch.randn(8, 8))
    assert list(dict.fromkeys(p.target.name for p in plan)) == ["0", "2"]
    assert any("the target has no repeated blocks" in n for n in plan.notes)


def _fcn_small() -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)], nn.Linear(8, 2))


def test_a_post_norm_block_and_its_final_norm_are_not_both_planned() -> None:
    def encoder(norm_first: bool) -> nn.Module:
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    x = torch.randn(8, 5, 16)
    target = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    plan = GuidedModel(target, encoder(norm_first=False), layers="sublayers").plan(x)
    guide_layers = [p.guide.name for p in plan]
    assert "layers.0" in guide_layers and "layers.0.norm2" not in guide_layers
    assert any(i.name == "layers.1.norm2" and "same tensor as 'layers.1'" in i.skip_reason for _, i in plan.skipped)
    pre_norm = [p.guide.name for p in GuidedModel(target, encoder(norm_first=True), layers="sublayers").plan(x)]
    assert "layers.0.norm2" in pre_norm  # pre-norm: norm2's output is not the block's output


def test_heads_are_left_out_symmetrically_only_when_they_are_heads() -> None:
    """A guide ending in a norm (a bare GPT-2) keeps it; a target whose last layer is a linear head
    loses it; exclude_output_layer=False keeps both."""
    lstm = nn.Sequential(nn.Embedding(50, 16), _LSTMBody(), nn.Linear(16, 50))
    ids = torch.randint(0, 50, (8, 12))
    plan = GuidedModel(lstm, _gpt2(32, head=False), layers="sublayers").plan(ids)
    assert plan.pairs[-1].guide.name == "ln_f" and {i.name for _, i in plan.skipped} == {"2"}
    kept = GuidedModel(lstm, _gpt2(32, head=False), layers="sublayers", exclude_output_layer=False).plan(ids)
    assert kept.pairs[-1].target.name == "2"


class _LSTMBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


# --------------------------------------------------------------------------- repeated calls and cells


class _CellLoop(nn.Module):
    """A recurrent cell unrolled in Python, as in many research scripts."""

    def __init__(self, cell: str, d: int = 6, h: int = 10) -> None:
        super().__init__()
        self.cell = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}[cell](d, h)
        self.head = nn.Linear(h, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


def _linear_cka64(a: torch.Tensor, b: torch.Tensor) -> float:
    """The shared float64 textbook reference on flattened activations."""
    from reference import linear_cka_textbook

    return float(linear_cka_textbook(a.detach().double().flatten(1), b.detach().double().flatten(1)))


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_a_cell_in_a_python_loop_is_one_layer_of_time_steps(cell: str) -> None:
    torch.manual_seed(0)
    target, guide = _CellLoop(cell), _CellLoop(cell, h=7)
    x = torch.randn(12, 5, 6)
    guided = GuidedModel(target, guide, layers="sublayers", exclude_output_layer=True)
    plan = guided.plan(x)
    assert _names(plan) == [("cell", "cell")] and plan.pairs[0].target.shape == (12, 5, 10)
    assert any("ran 5 times per forward" in n for n in plan.notes)
    steps: dict[str, list[torch.Tensor]] = {"t": [], "g": []}
    for key, model in (("t", target), ("g", guide)):
        model.cell.register_forward_hook(
            lambda m, i, o, key=key: steps[key].append(o[0] if isinstance(o, tuple) else o)
        )
    guided.train()
    guided(x)
    expected = 1 - _linear_cka64(torch.stack(steps["t"], 1), torch.stack(steps["g"], 1))
    assert guided.alignment_loss.item() == pytest.approx(expected, abs=1e-5)
    guided.alignment_loss.backward()
    assert target.cell.weight_hh.grad is not None and target.cell.weight_hh.grad.abs().sum() > 0


def test_a_module_called_twice_stacks_both_calls_and_tuple_outputs_use_the_first_tensor() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)  # returns (output, (h, c)): output is aligned
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
            return self.head(self.lstm(h)[0][:, -1])

    torch.manual_seed(0)
    target, guide = Twice(), Twice()
    x = torch.randn(10, 4, 8)
    guided = GuidedModel(target, guide, layers=[("shared", "shared"), ("lstm", "lstm")], reduction="sum")
    assert guided.plan(x).pairs[0].target.shape == (10, 2, 4, 8)
    seen: dict[str, list[torch.Tensor]] = {}
    for key, model in (("t", target), ("g", guide)):
        model.shared.register_forward_hook(lambda m, i, o, key=key: seen.setdefault(key + "s", []).append(o))
        model.lstm.register_forward_hook(lambda m, i, o, key=key: seen.setdefault(key + "l", []).append(o[0]))
    guided.train()
    guided(x)
    expected = 1 - _linear_cka64(torch.stack(seen["ts"], 1), torch.stack(seen["gs"], 1))
    expected += 1 - _linear_cka64(seen["tl"][0], seen["gl"][0])
    assert guided.alignment_loss.item() == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- weights and checkpoints


def test_mean_reduction_is_the_sum_over_the_number_of_pairs() -> None:
    torch.manual_seed(0)
    target = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)], nn.Linear(8, 2))
    x, guide = torch.randn(16, 8), _fcn_small()
    values = {}
    for reduction in ("sum", "mean"):
        guided = GuidedModel(target, guide, reduction=reduction, weight=0.7).train()
        guided(x)
        values[reduction] = guided.alignment_loss.item()
    assert len(GuidedModel(target, guide).plan(x)) == 3
    assert values["mean"] == pytest.approx(values["sum"] / 3, rel=1e-6) and values["sum"] > 0
    assert GuidedModel(target, _fcn_small()).engine.config.reduction == "mean"  # the default
    assert GuidedModel(target, _fcn_small(), layers="paper").engine.config.reduction == "sum"
    with pytest.raises(ConfigError, match="reduction must be 'mean' or 'sum'"):
        GuidedModel(target, _fcn_small(), reduction="max")


def test_a_checkpoint_records_the_plan_and_resuming_with_another_warns(tmp_path) -> None:  # noqa: ANN001
    from guidewrap.errors import GuidewrapWarning

    target = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)], nn.Linear(8, 2))
    x = torch.randn(16, 8)
    first = GuidedModel(target, _fcn_small(), weight=0.5)
    first.plan(x)
    state = first.state_dict()
    assert "guidance_plan" in state and state["guidance_plan"].dtype == torch.uint8
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    import warnings

    same = GuidedModel(target, _fcn_small(), weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        same.load_state_dict(loaded)
        same.plan(x)  # the same plan: silent
    other = GuidedModel(target, _fcn_small(), weight=0.5, layers="blocks", reduction="sum")
    other.load_state_dict(loaded)
    with pytest.warns(GuidewrapWarning, match=r"different guidance plan.*layers 'auto' -> 'blocks'.*reduction"):
        other.plan(x)
    ctx_state = first.engine.state_dict()
    assert ctx_state["plan"]["fingerprint"] == first.engine.plan_record()["fingerprint"]
