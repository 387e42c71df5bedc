"""Fine-tuning setups and layers that used to give silently wrong values.

In-place ops after a planned layer, losses on dataclass / namedtuple outputs, axes folded into the
batch, frozen backbones and LoRA adapters (real peft), encoder-decoder padding, a layer run several
times over padded sequences, keyword inputs to a positional guide, windows that cannot end, the
errors that must lead to a fix, and plans that must not change when the target is sharded. Values are
checked against a float64 reference computed from the test's own hooks (tests/reference.py).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import tempfile
import warnings

import pytest
import torch
from reference import capture_outputs, linear_cka_textbook
from torch import nn

from guidewrap import GuidedModel
from guidewrap.errors import ConfigError, GuidewrapWarning, PlanError
from tests.conftest import tiny_bart_pair


def _cka64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return linear_cka_textbook(a - a.mean(0), b - b.mean(0)).item()


# --------------------------------------------------------------------------- 1. in-place ops


def _relu_net(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 4)
    )


def test_an_in_place_relu_after_a_planned_layer_does_not_change_its_value() -> None:
    target, guide = _relu_net(inplace=True), _relu_net(inplace=False)
    guided = GuidedModel(target, guide, exclude_output_layer=False)
    x = torch.randn(64, 8)
    guided(x)
    assert guided.last_alignment == pytest.approx({"0<-0": 1.0, "2<-2": 1.0, "4<-4": 1.0}, abs=1e-5)
    notes = "\n".join(guided.plan().notes)
    assert "'0'" in notes and "'2'" in notes and "'4'" not in notes  # copied only where modified in place
    assert guided.engine.planner.copied == frozenset({"0", "2"})


def test_the_backward_through_a_copied_layer_is_the_one_without_in_place_ops() -> None:
    x = torch.randn(32, 8)
    guide = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    grads = []
    for inplace in (True, False):
        target = _relu_net(inplace)
        guided = GuidedModel(target, copy.deepcopy(guide), exclude_output_layer=False)
        (guided(x).square().mean() + guided.alignment_loss).backward()
        grads.append([p.grad.clone() for p in target.parameters()])
        guided.close()
    for with_inplace, without in zip(*grads, strict=True):
        torch.testing.assert_close(with_inplace, without, rtol=1e-5, atol=1e-7)


def test_an_in_place_change_the_probe_did_not_see_is_found_and_copied_from_then_on() -> None:
    class Sometimes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.armed = nn.Linear(8, 8), nn.Linear(8, 8), False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if self.armed:
                h.relu_()  # a data-dependent in-place change
            return self.b(h)

    target = Sometimes()
    guided = GuidedModel(target, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), exclude_output_layer=False)
    guided.plan(torch.randn(16, 8))
    target.armed = True
    with pytest.warns(GuidewrapWarning, match="modified in place"):
        guided(torch.randn(16, 8))
    assert "a" in guided.engine.planner.copied


# --------------------------------------------------------------------------- 2. loss on other outputs


@dataclasses.dataclass
class _Out:
    loss: torch.Tensor
    logits: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _FrozenOut:
    loss: torch.Tensor
    logits: torch.Tensor


_TupleOut = collections.namedtuple("_TupleOut", ["loss", "logits"])


@pytest.mark.parametrize("kind", [_Out, _FrozenOut, _TupleOut], ids=["dataclass", "frozen", "namedtuple"])
def test_the_term_reaches_a_loss_on_a_dataclass_or_namedtuple_output(kind: type) -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> object:
            z = self.b(torch.tanh(self.a(x)))
            return kind(z.square().mean(), z)

    torch.manual_seed(0)
    target, guide = WithLoss(), WithLoss()
    x = torch.randn(32, 8)
    task = float(target(x).loss)
    guided = GuidedModel(target, guide, exclude_output_layer=False)
    out = guided(x)
    assert isinstance(out, kind)
    term = float(guided.alignment_loss)
    assert term > 1e-3 and float(out.loss) == pytest.approx(task + term, rel=1e-6)


# --------------------------------------------------------------------------- 3. axes folded into the batch


class _Frames(nn.Module):
    """Video as images: (n, T, C, H, W) folded to (n * T, C, H, W) through two convs, then unfolded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.mix, self.head = nn.Linear(2 * 4 * 8 * 8, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.conv2(torch.relu(self.conv(x.flatten(0, 1))))
        return self.head(torch.relu(self.mix(h.reshape(n, -1))))


@pytest.mark.parametrize("n", [3, 4])  # 4: the channel axis has the batch's size
def test_layers_that_fold_frames_into_the_batch_are_never_planned_on_a_coincidental_axis(n: int) -> None:
    guide = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 64, 32), nn.Tanh(), nn.Linear(32, 10))
    plan = GuidedModel(_Frames(), guide).plan(torch.randn(n, 2, 3, 8, 8))
    planned = {p.target.name for p in plan}
    assert planned == {"mix"}
    reasons = {info.name: info.skip_reason for side, info in plan.skipped if side == "target"}
    assert "folded into the batch" in reasons["conv"] and "folded into the batch" in reasons["conv2"]


def test_a_sequence_first_transformer_with_a_long_sequence_is_not_taken_for_a_fold() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)  # sequence first: (T, n, d), T = 2n
    guide = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    x = torch.randn(16, 8, 16)
    guided = GuidedModel(layer, guide)
    guided(x)
    assert guided.plan() and all(p.target.batch_dim == 1 for p in guided.plan())


# --------------------------------------------------------------------------- 4. frozen backbones, LoRA


def test_a_frozen_backbone_is_left_out_of_the_plan_and_said_so() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6))).requires_grad_(False)
    target = nn.Sequential(backbone, nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    guide = nn.Sequential(*(nn.Linear(16, 16) for _ in range(5)))
    x = torch.randn(32, 16)
    plan = GuidedModel(target, guide).plan(x)
    assert {p.target.name for p in plan} == {"1", "3"}
    assert any("6 frozen target layers left out" in note for note in plan.notes)
    named = GuidedModel(target, guide, layers=[("0.2.0", "1")]).plan(x)  # an explicit name still works
    assert [p.key for p in named] == ["0.2.0<-1"]


def _tiny_hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)  # fmt: skip
        return transformers.BertModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize(
    ("kind", "modules"),
    [("gpt2", ["c_attn"]), ("bert", ["query", "value"]), ("llama", ["q_proj", "v_proj"])],
)
def test_a_lora_adapted_layer_is_planned_as_one_layer_with_its_adapted_output(kind: str, modules: list[str]) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_hf(kind), peft.LoraConfig(r=4, target_modules=modules, lora_dropout=0.0,
                                                                fan_in_fan_out=kind == "gpt2"))  # fmt: skip
    for name, param in model.named_parameters():  # adapters away from zero: the update must show
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    guide = _tiny_hf(kind)
    ids = torch.randint(0, 50, (12, 10))
    guided = GuidedModel(model, guide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF notices
        guided(input_ids=ids)
        plan, reported = guided.plan(), guided.last_alignment
        t_out = capture_outputs(model, {p.target.name for p in plan}, torch.no_grad()(lambda: model(input_ids=ids)))
        g_out = capture_outputs(guide, {p.guide.name for p in plan}, torch.no_grad()(lambda: guide(input_ids=ids)))
    names = [p.target.name for p in plan]
    assert not any("lora_" in n or "base_layer" in n for n in names), names
    adapted = [n for n in names if n.rsplit(".", 1)[-1] in modules]
    assert len(adapted) == 2 * len(modules)  # each adapted layer of both blocks, as one layer
    assert set(reported) == {p.key for p in plan}
    for pair in plan:
        expected = _cka64(t_out[pair.target.name], g_out[pair.guide.name])
        assert reported[pair.key] == pytest.approx(expected, abs=1e-4), pair.key
    guided.close()


# --------------------------------------------------------------------------- 5. encoder-decoder padding


def test_decoder_positions_are_not_padded_by_the_source_mask() -> None:
    pytest.importorskip("transformers")
    target, guide = tiny_bart_pair()
    ids, dec = torch.randint(3, 50, (12, 8)), torch.randint(3, 50, (12, 8))
    mask = torch.ones(12, 8, dtype=torch.long)
    mask[:6, 5:] = 0  # source padded; decoder inputs of the same length, unpadded
    call = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    guided = GuidedModel(target, guide, layers={"target": ["decoder.layers.0.fc2"], "guide": ["encoder.layers.0.fc2"]})
    guided(**call)
    with torch.no_grad():
        t_out = capture_outputs(target, ["decoder.layers.0.fc2"], lambda: target(**call))["decoder.layers.0.fc2"]
        g_out = capture_outputs(guide, ["encoder.layers.0.fc2"], lambda: guide(**call))["encoder.layers.0.fc2"]
    expected = _cka64(t_out, g_out * mask[..., None])  # the decoder unmasked, the encoder's padding left out
    assert guided.last_alignment["decoder.layers.0.fc2<-encoder.layers.0.fc2"] == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- 6. shared layers over padding


class _SharedLayer(nn.Module):
    """One Linear run three times over (n, T, d) token features (ALBERT's shared layer)."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.emb, self.layer, self.repeats = nn.Embedding(20, 8), nn.Linear(8, 8), repeats

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        for _ in range(self.repeats):
            h = torch.tanh(self.layer(h))
        return h


def test_a_layer_run_several_times_leaves_padding_out_of_every_call() -> None:
    torch.manual_seed(0)
    target, guide = _SharedLayer(3), _SharedLayer(1)
    ids = torch.randint(0, 20, (12, 6))
    mask = torch.ones(12, 6, dtype=torch.long)
    mask[::2, 4:] = 0
    guided = GuidedModel(target, guide, exclude_output_layer=False)
    guided(input_ids=ids, attention_mask=mask)
    calls: list[torch.Tensor] = []
    handle = target.layer.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone()))
    with torch.no_grad():
        target(ids, mask)
    handle.remove()
    g_out = capture_outputs(guide, ["layer"], torch.no_grad()(lambda: guide(ids, mask)))["layer"]
    stacked = torch.stack([c * mask[..., None] for c in calls], dim=1)
    expected = _cka64(stacked, g_out * mask[..., None])
    assert guided.last_alignment["layer<-layer"] == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- 7. keywords to a positional guide


class _Recording(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.b(torch.tanh(self.a(x.float())))


class _KeywordTarget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(input_ids.float() * attention_mask)))


def test_keyword_inputs_reach_a_positional_guide_by_name_not_by_order() -> None:
    guide = _Recording()
    ids, mask = torch.randint(0, 9, (16, 6)), torch.ones(16, 6)
    GuidedModel(_KeywordTarget(), guide)(attention_mask=mask, input_ids=ids)
    assert guide.seen and all(torch.equal(seen, ids) for seen in guide.seen)


def test_keywords_that_do_not_name_the_guide_input_raise_with_the_fix() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 2)

        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return self.a(left + right)

    with pytest.raises(ConfigError, match="guide_inputs"):
        GuidedModel(TwoInputs(), _Recording())(right=torch.randn(16, 6), left=torch.randn(16, 6))


# --------------------------------------------------------------------------- 8. a window that cannot end


def test_a_window_without_a_step_source_warns_once() -> None:
    target = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    guided = GuidedModel(target, guide, until_step=2)
    x = torch.randn(16, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(110):
            guided(x)
    said = [str(w.message) for w in caught if "never ends" in str(w.message)]
    assert len(said) == 1 and "optimizer=" in said[0] and "guided.step()" in said[0]


def test_a_window_with_an_optimizer_does_not_warn() -> None:
    target = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(target.parameters(), lr=0.0)
    guided = GuidedModel(target, nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), until_step=200,
                         optimizer=opt)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        for _ in range(120):
            guided(torch.randn(16, 4))


# --------------------------------------------------------------------------- 9. errors that lead to a fix


def test_a_bare_multihead_attention_is_planned() -> None:
    x = torch.randn(16, 6, 8)
    plan = GuidedModel(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)).plan(x, x, x)
    assert len(plan) == 1 and plan.pairs[0].target.batch_dim == 1  # sequence first, settled by its layout


def test_an_embedding_only_model_says_what_ran_and_how_to_choose_it() -> None:
    guide = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8))
    with pytest.raises(PlanError, match=r"ran: \(the model\) \(Embedding\).*layer_types"):
        GuidedModel(nn.Embedding(20, 8), guide).plan(torch.randint(0, 20, (16, 5)))


def test_flat_tokens_with_offsets_say_how_to_give_the_batch() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.fc, self.out = nn.EmbeddingBag(20, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc(self.bag(text, offsets))))

    with pytest.raises(PlanError, match="input_batch_dim") as err:
        GuidedModel(Bag(), Bag()).plan(torch.randint(0, 20, (40,)), torch.arange(0, 40, 4))
    assert "layer_types" not in str(err.value)


def test_a_scalar_first_argument_does_not_hide_the_batch() -> None:
    class Timed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x) * t))

    plan = GuidedModel(Timed(), Timed()).plan(torch.tensor(0.5), torch.randn(16, 8))
    assert [p.key for p in plan] == ["a<-a", "b<-b"]


def test_a_lazy_guide_raises_with_the_fix() -> None:
    guide = nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"guide\(example\)"):
        GuidedModel(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), guide)


def test_a_batch_of_two_distinct_samples_warns_whatever_its_size() -> None:
    target = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    guided = GuidedModel(target, copy.deepcopy(target).requires_grad_(False))
    with pytest.warns(GuidewrapWarning, match="12 samples of which 2 differ"):
        guided(torch.randn(2, 8).repeat(6, 1))


# --------------------------------------------------------------------------- 10. sharding and index names


def test_index_names_of_two_sequentials_are_spread_first_to_first_and_last_to_last() -> None:
    target, guide = (
        nn.Sequential(*(nn.Linear(8, 8) for _ in range(4))),
        nn.Sequential(*(nn.Linear(8, 8) for _ in range(3))),
    )
    plan = GuidedModel(target, guide, exclude_output_layer=False).plan(torch.randn(16, 8))
    assert [p.key for p in plan] == ["0<-0", "2<-1", "3<-2"]


def test_sharding_the_target_with_fsdp2_does_not_change_the_plan() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without gloo")
    from torch.distributed.fsdp import fully_shard

    target = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    guide = nn.Sequential(*(nn.Linear(8, 8) for _ in range(3)))
    x = torch.randn(16, 8)
    plain = [p.key for p in GuidedModel(target, guide, exclude_output_layer=False).plan(x)]
    with tempfile.NamedTemporaryFile() as rendezvous:  # a file, not a port: nothing can be taken under load
        dist.init_process_group("gloo", init_method=f"file://{rendezvous.name}", rank=0, world_size=1)
        try:
            for layer in target:
                fully_shard(layer)
            fully_shard(target)
            assert type(target[0]).__name__ == "FSDPLinear"
            sharded = [p.key for p in GuidedModel(target, guide, exclude_output_layer=False).plan(x)]
        finally:
            dist.destroy_process_group()
    assert sharded == plain == ["0<-0", "2<-1", "3<-2"]
