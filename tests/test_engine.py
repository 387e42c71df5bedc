"""GuidedModel / Guidance: every engine bullet with tiny models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from guidewrap import (
    ConfigError,
    Guidance,
    GuidanceClosedError,
    GuidedModel,
    LayerNotFoundError,
    PlanNotReadyError,
    list_layers,
)
from tests.conftest import RNNLM, mlp, small_cnn, transformer_lm


def _train(
    guided: nn.Module,
    steps: int,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.05,
    opt: torch.optim.Optimizer | None = None,
) -> list[float]:
    opt = opt if opt is not None else torch.optim.SGD(guided.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(guided(x), y) + guided.alignment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        guided.step()
        losses.append(loss.item())
    return losses


def _count_forwards(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------- the wrapper


def test_wrapper_returns_target_output_and_adds_term() -> None:
    target, guide = mlp(), mlp(width=12)
    reference = copy.deepcopy(target)
    guided = GuidedModel(target, guide)
    x = torch.randn(32, 8)
    out = guided(x)
    assert torch.equal(out, reference(x))
    assert guided.alignment_loss.requires_grad and guided.alignment_loss.item() > 0
    assert set(guided.last_alignment) == {p.key for p in guided.plan()}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in guided.last_alignment.values())


@pytest.mark.parametrize("width", [6, 40])  # features form (d <= n) and Gram form (d > n)
@pytest.mark.parametrize("guide_depth", [4, 9])  # 9: several guide layers share a target layer
def test_batched_pairs_equal_per_pair_cka(width: int, guide_depth: int) -> None:
    # Same-shaped pairs run as one batched problem; loss and gradients must match pair by pair.
    from guidewrap.metrics import linear_cka

    torch.manual_seed(0)
    target, guide = mlp(width=width, depth=4), mlp(width=width + 3, depth=guide_depth)
    guided = GuidedModel(target, guide, reduction="sum")
    x = torch.randn(24, 8)
    guided(x)
    guided.alignment_loss.backward()
    batched = {n: p.grad.clone() for n, p in target.named_parameters() if p.grad is not None}
    assert len(batched) >= 6
    target.zero_grad()
    t_mods, g_mods = dict(target.named_modules()), dict(guide.named_modules())
    t_out, g_out = {}, {}
    for p in guided.plan():
        t_mods[p.target.name].register_forward_hook(lambda m, i, o, k=p.target.name: t_out.__setitem__(k, o))
        g_mods[p.guide.name].register_forward_hook(lambda m, i, o, k=p.guide.name: g_out.__setitem__(k, o))
    target(x)
    with torch.no_grad():
        guide(x)
    manual = sum(1 - linear_cka(t_out[p.target.name], g_out[p.guide.name]) for p in guided.plan())
    assert len(guided.plan()) >= 3
    assert guided.alignment_loss.item() == pytest.approx(manual.item(), rel=1e-5)
    manual.backward()
    for name, param in target.named_parameters():
        if name in batched:
            torch.testing.assert_close(batched[name], param.grad, rtol=1e-4, atol=1e-6)


def test_guide_not_in_parameters_or_state_dict_and_attributes_forwarded(tmp_path) -> None:
    target, guide = mlp(), mlp(width=12)
    guided = GuidedModel(target, guide)
    assert {id(p) for p in guided.parameters()} == {id(p) for p in target.parameters()}
    keys = set(guided.state_dict())
    assert keys == {f"target.{k}" for k in target.state_dict()} | {"guidance_step"}
    assert guided.target is target and guided.guide is guide
    target.vocab_note = "forwarded"  # unknown attributes come from the target
    assert guided.vocab_note == "forwarded"
    with pytest.raises(AttributeError):
        _ = guided.no_such_attribute
    guided.save_pretrained(tmp_path)
    saved = torch.load(tmp_path / "pytorch_model.bin")
    assert set(saved) == set(target.state_dict())


def test_forward_signature_is_the_targets() -> None:
    import inspect

    guided = GuidedModel(RNNLM(), transformer_lm())
    assert list(inspect.signature(guided.forward).parameters) == ["input_ids", "labels"]


def test_output_loss_carries_the_term() -> None:
    guided = GuidedModel(RNNLM(), transformer_lm())
    ids = torch.randint(0, 20, (8, 10))
    out = guided(ids, labels=ids)
    plain = guided.target(ids, labels=ids)["loss"]  # not guided: called on the bare target
    assert out["loss"].item() == pytest.approx(plain.item() + guided.alignment_loss.item(), rel=1e-5)
    off = GuidedModel(RNNLM(), transformer_lm(), add_to_output_loss=False)
    out = off(ids, labels=ids)
    assert out["loss"].item() == pytest.approx(off.target(ids, labels=ids)["loss"].item(), rel=1e-6)


def test_guide_is_frozen_eval_and_unchanged_after_50_steps() -> None:
    target, guide = mlp(), nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    before = copy.deepcopy(guide.state_dict())
    guided = GuidedModel(target, guide)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    guide.train()  # a caller flipping the mode must not matter
    _train(guided, 50, x, y)
    assert not guide.training
    assert all(not p.requires_grad and p.grad is None for p in guide.parameters())
    for key, value in guide.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_one_target_forward_and_one_guide_forward_per_step() -> None:
    target, guide = mlp(), mlp(width=12)
    guided = GuidedModel(target, guide)
    guided.plan(torch.randn(4, 8))  # the probe happens here, before counting
    t_calls, g_calls = _count_forwards(target), _count_forwards(guide)
    _train(guided, 5, torch.randn(16, 8), torch.randint(0, 3, (16,)))
    assert t_calls[0] == 5 and g_calls[0] == 5


def test_eval_mode_does_not_run_the_guide() -> None:
    target, guide = mlp(), mlp(width=12)
    guided = GuidedModel(target, guide)
    calls = _count_forwards(guide)
    guided.eval()
    guided(torch.randn(4, 8))
    assert calls[0] == 0 and guided.alignment_loss.item() == 0


def test_to_moves_the_guide_too() -> None:
    guided = GuidedModel(mlp(), mlp(width=12))
    guided.to(torch.float64)
    assert next(guided.guide.parameters()).dtype == torch.float64


# ---------------------------------------------------------------- the context manager


def test_guidance_hooks_removed_on_exit_and_on_exception() -> None:
    target, guide = mlp(), mlp(width=12)

    def hooks(model: nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    with Guidance(target, guide, optimizer=opt) as g:
        target(torch.randn(8, 8)).sum().backward()
        assert g.hook_count > 0 and hooks(target) > 0
    assert hooks(target) == 0 and hooks(guide) == 0 and g.hook_count == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with Guidance(target, guide) as g:
            target(torch.randn(8, 8))
            raise RuntimeError("boom")
    assert hooks(target) == 0 and hooks(guide) == 0
    with pytest.raises(GuidanceClosedError):
        _ = g.alignment_loss
    with pytest.raises(GuidanceClosedError):
        g.step()


def test_guidance_forward_that_raises_leaves_no_state() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.fail = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            if self.fail:
                raise ValueError("bad batch")
            return h

    target = Flaky()
    with Guidance(target, mlp(width=12), exclude_output_layer=False) as g:
        target(torch.randn(8, 8))
        target.fail = True
        with pytest.raises(ValueError):
            target(torch.randn(8, 8))
        target.fail = False
        target(torch.randn(8, 8))
        assert g.alignment_loss.item() > 0


def test_guidance_and_wrapper_give_the_same_loss() -> None:
    target, guide = mlp(), mlp(width=12)
    x = torch.randn(16, 8)
    guided = GuidedModel(copy.deepcopy(target), guide)
    guided(x)
    with Guidance(target, guide) as g:
        target(x)
        assert g.alignment_loss.item() == pytest.approx(guided.alignment_loss.item(), rel=1e-6)


# ---------------------------------------------------------------- layer discovery and matching


class _PackedRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        lengths[0] = ids.shape[1] - 2
        packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        out = self.rnn(packed)[0]
        return self.head(nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0])


def _hf_models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=16)).train()
    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                vocab_size=20, max_position_embeddings=16))  # fmt: skip
    return gpt, bert


def _model_zoo():
    import torchvision

    ids = torch.randint(0, 20, (6, 10))
    gpt, bert = _hf_models()
    return {
        "mlp<-cnn": (nn.Sequential(nn.Flatten(), mlp(d_in=3 * 8 * 8)), small_cnn(), (torch.randn(6, 3, 8, 8),)),
        "resnet18": (
            mlp(d_in=10, d_out=10),
            torchvision.models.resnet18(weights=None, num_classes=10),
            None,
        ),  # fmt: skip
        "rnn<-transformer": (RNNLM(kind=nn.RNN), transformer_lm(), (ids,)),
        "lstm<-transformer": (RNNLM(kind=nn.LSTM), transformer_lm(), (ids,)),
        "gru packed": (_PackedRNN(), transformer_lm(), (ids,)),
        "rnn<-gpt2": (RNNLM(kind=nn.LSTM), gpt, (ids,)),
        "gpt2<-bert": (copy.deepcopy(gpt), bert, (ids,)),
    }


@pytest.mark.parametrize("case", list(_model_zoo()))
def test_auto_discovery_model_zoo(case: str) -> None:
    target, guide, example = _model_zoo()[case]
    if case == "resnet18":  # CNN target, so both see images
        import torchvision

        target = torchvision.models.resnet18(weights=None, num_classes=10)
        guide = small_cnn(d_out=10)
        example = (torch.randn(4, 3, 32, 32),)
    guided = GuidedModel(target, guide)
    plan = guided.plan(*example)
    assert len(plan) >= 1
    out = guided(*example)
    logits = out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out
    (logits.float().mean() + guided.alignment_loss).backward()
    assert guided.alignment_loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in target.parameters())


def test_paper_counts_resnet18_guide() -> None:
    import torchvision

    deep_fcn = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64),
                             *[m for _ in range(47) for m in (nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())],
                             nn.Linear(64, 10))  # fmt: skip
    resnet = torchvision.models.resnet18(weights=None)
    plan = GuidedModel(deep_fcn, resnet, layers="sublayers").plan(torch.randn(4, 3, 32, 32))
    assert len(plan) == 21  # the paper: deep FCN (48 hooked) <- ResNet-18 (21 hooked): 21 terms
    assert plan.pairs[0].target.name == "1" and plan.pairs[-1].target.name == "140"


def test_outputs_without_batch_dim_are_skipped_with_reason() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.stat = nn.Linear(8, 7)
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            self.stat(h.mean(0))  # a batch statistic: no batch dimension
            return self.out(h)

    plan = GuidedModel(Odd(), mlp()).plan(torch.randn(5, 8))
    reasons = {info.name: info.skip_reason for _, info in plan.skipped}
    assert "no batch dimension" in reasons["stat"]
    assert "no batch dimension" in str(plan)


def test_wrong_names_fail_at_once_with_suggestions() -> None:
    target = nn.Sequential()
    target.add_module("encoder_fc", nn.Linear(8, 8))
    with pytest.raises(LayerNotFoundError, match=r"Did you mean 'encoder_fc'.*list_layers"):
        GuidedModel(target, mlp(), layers=[("encoder_fx", "0")])
    with pytest.raises(LayerNotFoundError, match="guide"):
        GuidedModel(target, mlp(), layers={"target": "encoder_*", "guide": "nothing*"})
    with pytest.raises(ConfigError, match="Did you mean 'until_step'"):
        GuidedModel(target, mlp(), untill_step=3)
    assert list_layers(target) == ["encoder_fc"]


def test_explicit_pairs_and_patterns() -> None:
    target, guide = mlp(depth=4), mlp(depth=2)
    pairs = GuidedModel(target, guide, layers=[("2", "0"), ("6", "2")]).plan(torch.randn(5, 8))
    assert [p.key for p in pairs] == ["2<-0", "6<-2"]
    spread_plan = GuidedModel(target, guide, layers={"target": ["0", "2", "4", "6"], "guide": "[02]"}).plan(
        torch.randn(5, 8)
    )
    assert [p.key for p in spread_plan] == ["0<-0", "6<-2"]


def test_plan_needs_an_example_before_training() -> None:
    guided = GuidedModel(mlp(), mlp())
    with pytest.raises(PlanNotReadyError, match="plan\\(example_input\\)"):
        guided.plan()


def test_probe_has_no_side_effects() -> None:
    target = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    before = copy.deepcopy(target.state_dict())
    guided, x = GuidedModel(target, mlp()), torch.randn(6, 8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    guided.plan(x)
    assert torch.equal(torch.rand(3), expected)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


# ---------------------------------------------------------------- metric, weight, window


def test_metric_and_weight() -> None:
    x = torch.randn(16, 8)
    base = GuidedModel(mlp(), mlp(width=12))
    base(x)
    double = GuidedModel(copy.deepcopy(base.target), copy.deepcopy(base.guide), weight=2.0)
    double(x)
    assert double.alignment_loss.item() == pytest.approx(2 * base.alignment_loss.item(), rel=1e-5)
    for metric in ("rbf_cka", "debiased_cka", "rsa", "procrustes", lambda a, b: (a.std() - b.std()).abs()):
        guided = GuidedModel(mlp(), mlp(width=12), metric=metric)
        guided(x)
        assert torch.isfinite(guided.alignment_loss)


def test_window_counts_optimizer_steps_with_gradient_accumulation() -> None:
    target, guide = mlp(), mlp(width=12)
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    guided = GuidedModel(target, guide, until_step=3, optimizer=opt)
    guided.plan(torch.randn(4, 8))
    calls = _count_forwards(guide)
    counts = []
    for micro in range(24):  # 6 optimizer steps, accumulation 4
        loss = guided(torch.randn(8, 8)).sum() + guided.alignment_loss
        loss.backward()
        if micro % 4 == 3:
            opt.step()
            opt.zero_grad()
            counts.append(calls[0])
    assert counts == [4, 8, 12, 12, 12, 12]
    assert guided.step_count == 6
    assert all(len(m._forward_hooks) == 0 for m in target.modules())  # no hook outside the window


def test_start_step_and_decay() -> None:
    x = torch.randn(16, 8)
    guided = GuidedModel(mlp(), mlp(width=12), start_step=2, until_step=6, decay="linear")
    weights = []
    for _ in range(7):
        guided(x)
        weights.append(guided.guidance.weight)
        guided.step()
    assert weights == [0.0, 0.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ConfigError, match="start_step"):
        GuidedModel(mlp(), mlp(), start_step=5, until_step=3)
    with pytest.raises(ConfigError, match=">= 0"):
        GuidedModel(mlp(), mlp(), until_step=-1)


def test_resume_continues_the_window(tmp_path) -> None:
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    torch.manual_seed(1)
    target, guide = mlp(), mlp(width=12)
    straight = GuidedModel(copy.deepcopy(target), guide, until_step=5)
    losses_straight = _train(straight, 10, x, y)

    first = GuidedModel(copy.deepcopy(target), guide, until_step=5)
    opt = torch.optim.SGD(first.parameters(), lr=0.05)
    losses = _train(first, 3, x, y, opt=opt)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = GuidedModel(mlp(), guide, until_step=5)
    resumed.load_state_dict(ckpt["model"])
    assert resumed.step_count == 3
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    resumed_opt.load_state_dict(ckpt["opt"])
    losses += _train(resumed, 7, x, y, opt=resumed_opt)
    assert losses == pytest.approx(losses_straight, rel=1e-6)


# ---------------------------------------------------------------- guide inputs and sequences


def test_guide_inputs_noise_and_adapter() -> None:
    x = torch.randn(16, 3, 8, 8)
    noise = GuidedModel(nn.Sequential(nn.Flatten(), mlp(d_in=192)), small_cnn(), guide_inputs="noise")
    noise(x)
    assert noise.alignment_loss.item() > 0

    seen = []

    def resize(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape)
        return nn.functional.interpolate(images, size=16)

    adapted = GuidedModel(nn.Sequential(nn.Flatten(), mlp(d_in=192)), small_cnn(), guide_inputs=resize)
    adapted(x)
    assert adapted.alignment_loss.item() > 0 and seen
    ids = torch.randint(0, 20, (8, 10))
    tokens = GuidedModel(RNNLM(), transformer_lm(vocab=15), guide_inputs="noise")
    out = tokens(ids, labels=ids)  # noise tokens stay inside the smaller vocabulary
    assert torch.isfinite(out["loss"])


def test_batch_changing_adapter_is_an_error() -> None:
    from guidewrap import BatchSizeMismatchError

    guided = GuidedModel(mlp(), mlp(), guide_inputs=lambda x: x[:-1])
    with pytest.raises(BatchSizeMismatchError, match="keep the batch size"):
        guided(torch.randn(8, 8))


@pytest.mark.parametrize("mode", ["flatten", "tokenwise", "mean"])
def test_sequence_modes_exclude_padding(mode: str) -> None:
    from transformers import GPT2Config, GPT2Model

    target = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16)).train()
    target.config.attn_pdrop = target.config.resid_pdrop = target.config.embd_pdrop = 0.0
    for m in target.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    guide = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 20))

    class Guide(nn.Module):  # the guide reads only input_ids
        def __init__(self) -> None:
            super().__init__()
            self.net = guide

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.net(input_ids)

    guided = GuidedModel(target, Guide(), sequence=mode)
    ids = torch.randint(0, 20, (6, 8))
    mask = torch.ones(6, 8, dtype=torch.long)
    mask[:, 6:] = 0
    guided(input_ids=ids, attention_mask=mask)
    first = guided.alignment_loss.item()
    assert {p.mode for p in guided.plan()} == {mode}
    if mode == "tokenwise":
        ids2 = ids.clone()
        ids2[:, 7] = (ids2[:, 7] + 1) % 20  # change only a padded position (causal target, position-wise guide)
        guided(input_ids=ids2, attention_mask=mask)
        assert guided.alignment_loss.item() == pytest.approx(first, rel=1e-5)


# ---------------------------------------------------------------- pre-alignment, checkpointing


def test_pre_align_lowers_alignment_on_held_out_noise() -> None:
    target, guide = nn.Sequential(nn.Flatten(), mlp(d_in=192, width=32, depth=4)), small_cnn()
    guided = GuidedModel(target, guide)
    example = torch.rand(32, 3, 8, 8)
    held_out = torch.randn(64, 3, 8, 8)
    before = guided.evaluate_alignment(held_out)
    history = guided.pre_align(example, steps=60, lr=3e-3)
    after = guided.evaluate_alignment(held_out)
    assert len(history) == 60 and after < before - 0.05
    assert guided.step_count == 0  # pre-alignment does not consume the window


def test_activation_checkpointing_is_not_double_counted() -> None:
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.block, x, use_reentrant=False))

    plain, ckpt = Ckpt(), Ckpt()
    ckpt.load_state_dict(plain.state_dict())
    guide = mlp(width=12)
    x = torch.randn(16, 8)
    a, b = GuidedModel(plain, guide), GuidedModel(ckpt, guide)
    (a(x).sum() + a.alignment_loss).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (b(x).sum() + b.alignment_loss).backward()
    assert b.alignment_loss.item() == pytest.approx(a.alignment_loss.item(), rel=1e-6)
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_max_features_approximation_error_is_bounded() -> None:
    # Documented bound (docs/concepts/cost.md): on an untrained ResNet-18 guide over white-noise
    # images (no spatial redundancy: the worst case), keeping 4096 of the 16384 features of its
    # widest layer moves each pair's CKA by at most 0.02 and the loss by at most 0.5% at batch 64.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    target = nn.Sequential(
        nn.Flatten(), *[m for i in range(6) for m in (nn.Linear(3072 if i == 0 else 256, 256), nn.ReLU())]
    )
    guide = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(64, 3, 32, 32)
    exact = GuidedModel(target, guide, exclude_output_layer=False, layers="sublayers")
    exact(x)
    approx = GuidedModel(target, guide, exclude_output_layer=False, max_features=4096, layers="sublayers")
    approx(x)
    assert exact.last_alignment.keys() == approx.last_alignment.keys()
    errors = [abs(exact.last_alignment[k] - approx.last_alignment[k]) for k in exact.last_alignment]
    assert 0 < max(errors) <= 0.02  # measured 0.004; > 0: the approximation did change the widest pairs
    assert approx.alignment_loss.item() == pytest.approx(exact.alignment_loss.item(), rel=0.005)
    again = GuidedModel(target, guide, exclude_output_layer=False, max_features=4096, layers="sublayers")
    again(x)
    assert again.alignment_loss.item() == approx.alignment_loss.item()  # the same subset every time


def test_adapter_runs_once_per_step_and_no_step_state_outlives_the_forward() -> None:
    calls = []

    def adapter(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x[:, :4]

    target = mlp(d_in=8)
    guide = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    guided = GuidedModel(target, guide, guide_inputs=adapter)
    x = torch.randn(16, 8)
    for expected in (1, 2, 3):  # the first step plans the layers too, on the same routed inputs
        guided(x)
        assert len(calls) == expected
        assert guided.engine._step is None  # the step's captures and guide features are gone
    assert guided.alignment_loss.item() > 0 and len(guided.last_alignment) > 0


class _WithLoss(nn.Module):
    """Returns {"logits", "loss"} like a Hugging Face model given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(d_in=4, width=8, depth=2, d_out=2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


@pytest.mark.parametrize(("use", "warns"), [("output", False), ("output+term", True), ("logits+term", False)])
def test_a_term_counted_twice_is_reported(use: str, warns: bool) -> None:
    guide = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    guided = GuidedModel(_WithLoss(), guide)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = guided(x, labels=y)
        if use == "output":  # the rule: the output's loss already holds the term
            loss = out["loss"]
        elif use == "output+term":  # the mistake: the term a second time
            loss = out["loss"] + guided.alignment_loss
        else:  # a loss of the user's own from the logits, plus the term once: fine
            loss = nn.functional.cross_entropy(out["logits"], y) + guided.alignment_loss
        loss.backward()
    doubled = [w for w in caught if "counted twice" in str(w.message)]
    assert bool(doubled) == warns, [str(w.message) for w in caught]
