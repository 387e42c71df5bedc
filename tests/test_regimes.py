"""How people train: activation checkpointing, generation in the loop, inference mode, quantization-aware
training, lazy modules, cross-attention, packing, sequence-first inputs, layers that change after the plan.

Each regime is checked against the run without it (the same term, alignment and gradients) and, where a
value is reported, against a float64 reference computed from the test's own hooks (tests/reference.py);
where guidance cannot be right, the error must name the setting that works.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from reference import capture_outputs, linear_cka_textbook
from torch import nn
from torch.utils.checkpoint import checkpoint

from guidewrap import Guidance, GuidedModel
from guidewrap.errors import BatchSizeMismatchError, ConfigError, GuidewrapWarning
from tests.conftest import tiny_bart_pair


def _cka64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return linear_cka_textbook(a - a.mean(0), b - b.mean(0)).item()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


# --------------------------------------------------------------------------- 1-2. activation checkpointing


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.block(h) if self.reentrant is None else checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _guide() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Linear(12, 4))


def _checkpoint_step(reentrant: bool | None) -> tuple[GuidedModel, dict[str, torch.Tensor], float]:
    torch.manual_seed(0)
    net = _Checkpointed()
    net.reentrant = reentrant
    guided = GuidedModel(net, _guide())
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    loss = guided.total_loss(nn.functional.cross_entropy(guided(x), y))
    loss.backward()
    return guided, _grads(net), float(guided.alignment_loss)


def test_non_reentrant_checkpointing_gives_the_unchecked_term_alignment_and_every_gradient() -> None:
    plain, plain_grads, plain_term = _checkpoint_step(None)
    ckpt, ckpt_grads, ckpt_term = _checkpoint_step(False)
    assert [p.key for p in ckpt.plan()] == [p.key for p in plain.plan()] and len(plain.plan()) == 3
    assert ckpt_term == pytest.approx(plain_term, abs=1e-7)
    assert ckpt.last_alignment == pytest.approx(plain.last_alignment, abs=1e-6)
    _same_grads(ckpt_grads, plain_grads)


def test_reentrant_checkpointing_is_refused_with_the_setting_that_works() -> None:
    with pytest.raises(ConfigError, match=r"use_reentrant=False.*gradient_checkpointing_kwargs"):
        _checkpoint_step(True)


def _tiny_gpt2(width: int = 32, seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=50, n_embd=width, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def _hf_step(kwargs: dict | None, lora: bool = False) -> tuple[GuidedModel, dict[str, torch.Tensor]]:
    target, guide = _tiny_gpt2(), _tiny_gpt2(16, seed=1)
    if lora:
        peft = pytest.importorskip("peft")
        target = peft.get_peft_model(target, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    if kwargs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias, as users still call it
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    target.train()
    guided = GuidedModel(target, guide)
    ids = torch.randint(0, 50, (12, 10), generator=torch.Generator().manual_seed(3))
    guided(input_ids=ids, labels=ids).loss.backward()
    return guided, _grads(target)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_checkpointing_gives_the_unchecked_gradients_and_plan_or_names_the_fix(lora: bool) -> None:
    plain, plain_grads = _hf_step(None, lora)
    ckpt, ckpt_grads = _hf_step({"use_reentrant": False}, lora)
    assert [p.key for p in ckpt.plan()] == [p.key for p in plain.plan()]  # enable_input_require_grads too
    assert ckpt.last_alignment == pytest.approx(plain.last_alignment, abs=1e-6)
    _same_grads(ckpt_grads, plain_grads)
    with pytest.raises(ConfigError, match="use_reentrant=False"):
        _hf_step({"use_reentrant": True}, lora)


def test_lora_plan_does_not_gain_a_frozen_layer_under_checkpointing() -> None:
    plain, _ = _hf_step(None, lora=True)
    ckpt, _ = _hf_step({"use_reentrant": False}, lora=True)
    names = [p.target.name for p in ckpt.plan()]
    assert len(names) == len(plain.plan()) and not any(name.endswith("h.0.ln_1") for name in names)


def _lora_trainer_step(tmp_path, checkpointing: dict | None) -> tuple[dict, dict[str, torch.Tensor]]:  # noqa: ANN001
    """One Trainer step of LoRA GPT-2 guided by a GPT-2 of another width: the logged row and the adapters'
    gradients as the optimizer receives them."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from guidewrap.integrations.transformers import guide_trainer

    ids = torch.randint(0, 50, (16, 10), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": row, "labels": row} for row in ids]
    target = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    grads: dict[str, torch.Tensor] = {}

    class KeepGrads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    args = transformers.TrainingArguments(
        str(tmp_path / str(bool(checkpointing))), max_steps=1, per_device_train_batch_size=16, learning_rate=1e-3,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        gradient_checkpointing=checkpointing is not None, gradient_checkpointing_kwargs=checkpointing, seed=0,
        max_grad_norm=0.0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=target, args=args, train_dataset=data, callbacks=[KeepGrads()])
    guide_trainer(trainer, _tiny_gpt2(16, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return next(row for row in trainer.state.log_history if "guidance_loss" in row), grads


def test_lora_with_checkpointing_through_the_trainer_matches_the_unchecked_run(tmp_path) -> None:  # noqa: ANN001
    plain_row, plain_grads = _lora_trainer_step(tmp_path, None)
    ckpt_row, ckpt_grads = _lora_trainer_step(tmp_path, {"use_reentrant": False})
    assert ckpt_row["guidance_loss"] == pytest.approx(plain_row["guidance_loss"], rel=1e-5)
    assert ckpt_row["guidance_pull"] == pytest.approx(plain_row["guidance_pull"], rel=1e-4)
    assert plain_row["guidance_pull"] < 1e6  # the term reaches the adapters (it was logged as inf)
    assert plain_grads and any("lora" in name for name in plain_grads)
    _same_grads(ckpt_grads, plain_grads)
    with pytest.raises(ConfigError, match="use_reentrant=False"):
        _lora_trainer_step(tmp_path, {"use_reentrant": True})


# --------------------------------------------------------------------------- 3-4. generation, inference mode


def test_generate_in_train_mode_does_not_feed_the_guide_and_leaves_the_next_step_unchanged() -> None:
    ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(5))
    results = []
    for generate in (False, True):
        target, guide = _tiny_gpt2(), _tiny_gpt2(16, seed=1)  # another width: the KV cache would not fit it
        target.train()
        with Guidance(target, guide) as g:
            if generate:
                with torch.no_grad():
                    target.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
                assert g.engine.counters["guide_forwards"] == 0
            out = target(input_ids=ids, labels=ids)
            out.loss.backward()
            results.append((float(out.loss), dict(g.last_alignment), _grads(target)))
    assert results[1][0] == results[0][0] and results[1][1] == results[0][1]
    _same_grads(results[1][2], results[0][2])


def test_a_forward_under_inference_mode_in_train_mode_runs_unguided() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    guided = GuidedModel(net, _guide(), exclude_output_layer=False)
    x = torch.randn(16, 8)
    with torch.inference_mode():
        out = guided(x)
    assert torch.equal(out, net(x).detach()) and guided.engine.counters["guide_forwards"] == 0
    guided(x)
    assert guided.engine.counters["guide_forwards"] == 1


# --------------------------------------------------------------------------- 5-6. QAT, lazy modules


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )  # fmt: skip


def _cnn_guide() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 10))  # fmt: skip


def test_quantization_aware_training_is_guided_against_the_float64_reference() -> None:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    model = _small_cnn()
    model.qconfig = get_default_qat_qconfig("fbgemm")
    model = prepare_qat(model.train())
    guided = GuidedModel(model, _cnn_guide())
    x = torch.randn(16, 1, 8, 8)
    guided.total_loss(guided(x).square().mean()).backward()
    name, g_name = next((p.target.name, p.guide.name) for p in guided.plan())
    with torch.no_grad():
        t_out = capture_outputs(model, [name], lambda: model(x))[name]
        g_out = capture_outputs(guided.guide, [g_name], lambda: guided.guide(x))[g_name]
    assert guided.last_alignment[f"{name}<-{g_name}"] == pytest.approx(_cka64(t_out, g_out), abs=1e-4)
    assert all(torch.isfinite(g).all() for g in _grads(model).values())


def test_the_probe_restores_observer_buffers_that_change_shape() -> None:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    model = _small_cnn()
    model.qconfig = get_default_qat_qconfig("fbgemm")
    model = prepare_qat(model.train())
    before = {n: b.clone() for n, b in model.named_buffers()}
    GuidedModel(model, _cnn_guide()).plan(torch.randn(16, 1, 8, 8))
    after = dict(model.named_buffers())
    assert before.keys() == after.keys()
    for name, value in before.items():  # the probe changed nothing: per-channel ranges are empty again
        assert after[name].shape == value.shape and torch.equal(after[name], value), name


def test_a_lazy_target_is_planned_and_guided_like_its_materialised_twin() -> None:
    torch.manual_seed(0)
    lazy = nn.Sequential(
        nn.LazyLinear(16), nn.LazyBatchNorm1d(), nn.ReLU(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4)
    )
    x = torch.randn(32, 8)
    guided = GuidedModel(lazy, _guide())
    guided.plan(x)  # the probe materialises the lazy layers (as the first forward would)
    bn = lazy[1]
    assert torch.equal(bn.running_mean, torch.zeros(16)) and int(bn.num_batches_tracked) == 0  # not updated
    twin = copy.deepcopy(lazy)
    guided.total_loss(guided(x).square().mean()).backward()
    plain = GuidedModel(twin, _guide())
    plain.total_loss(plain(x).square().mean()).backward()
    assert guided.last_alignment == pytest.approx(plain.last_alignment, abs=1e-6)
    _same_grads(_grads(lazy), _grads(twin))


# --------------------------------------------------------------------------- 7-9. masks, packing, layouts


def test_cross_attention_keys_and_values_take_the_source_mask() -> None:
    pytest.importorskip("transformers")
    target, guide = tiny_bart_pair()
    ids, dec = torch.randint(3, 50, (12, 8)), torch.randint(3, 50, (12, 6))
    mask = torch.ones(12, 8, dtype=torch.long)
    mask[:6, 5:] = 0
    call = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    names = ["decoder.layers.0.encoder_attn.k_proj", "decoder.layers.0.encoder_attn.v_proj"]
    for name in names:
        guided = GuidedModel(target, guide, layers=[(name, "encoder.layers.0.fc2")])
        guided(**call)
        with torch.no_grad():
            t_out = capture_outputs(target, [name], lambda: target(**call))[name]
            g_out = capture_outputs(guide, ["encoder.layers.0.fc2"], lambda: guide(**call))["encoder.layers.0.fc2"]
        expected = _cka64(t_out * mask[..., None], g_out * mask[..., None])  # source padding left out of both
        assert guided.last_alignment[f"{name}<-encoder.layers.0.fc2"] == pytest.approx(expected, abs=1e-4)
        guided.close()


def test_padding_free_packing_is_refused_with_what_to_do() -> None:
    target, guide = _tiny_gpt2(), _tiny_gpt2(16, seed=1)
    packed = torch.randint(0, 50, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])  # DataCollatorWithFlattening's rows
    guided = GuidedModel(target, guide)
    with pytest.raises(ConfigError, match=r"packing.*padding_free=False"):
        guided(input_ids=packed, position_ids=positions, labels=packed)
    left = torch.tensor([[1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]] * 4)  # left padding is not packing
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]] * 4)
    ids = torch.randint(0, 50, (8, 6))
    GuidedModel(_tiny_gpt2(), guide)(input_ids=ids, attention_mask=mask, position_ids=left, labels=ids)


def test_a_sequence_first_target_behind_an_adapter_is_told_its_own_batch_axis() -> None:
    torch.manual_seed(0)
    target = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
    guide = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    src, tgt = torch.randn(10, 24, 16), torch.randn(7, 24, 16)
    adapter = lambda src, tgt: src.mean(0)  # noqa: E731 - (24, 16): the batch first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor notice for batch_first=False
        with pytest.raises(BatchSizeMismatchError, match=r"set input_batch_dim=1"):
            GuidedModel(target, guide, guide_inputs=adapter)(src, tgt)
        guided = GuidedModel(target, guide, guide_inputs=adapter, input_batch_dim=1)
        guided(src, tgt)
    assert guided.last_alignment


# --------------------------------------------------------------------------- 10. layers that change after the plan


def test_a_layer_unfrozen_after_planning_warns_once_that_it_is_not_guided() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    net[0].requires_grad_(False)
    guided = GuidedModel(net, _guide(), exclude_output_layer=False)
    x = torch.randn(32, 8)
    guided(x)
    assert "0" not in [p.target.name for p in guided.plan()]
    net[0].requires_grad_(True)  # progressive unfreezing
    with pytest.warns(GuidewrapWarning, match=r"'0' were left out of the plan as frozen and are trainable now"):
        guided(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)  # said once
        guided(x)


def test_a_hook_added_later_that_replaces_an_output_is_what_cka_measures() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    guided = GuidedModel(net, copy.deepcopy(net), exclude_output_layer=False)
    x = torch.randn(64, 8)
    guided(x)
    assert guided.last_alignment["0<-0"] == pytest.approx(1.0, abs=1e-6)  # a self-copy
    noise = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    net[0].register_forward_hook(lambda m, i, o: o + 0.5 * noise)  # registered after guidance attached
    guided(x)
    with torch.no_grad():
        used = capture_outputs(net, ["0"], lambda: net(x))["0"]  # the output the network goes on with
        original = guided.guide[0](x)
    assert guided.last_alignment["0<-0"] == pytest.approx(_cka64(used, original), abs=1e-5)
    assert guided.last_alignment["0<-0"] < 0.99
