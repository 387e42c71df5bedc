"""Zoo: every reported pair value, across model families, against a float64 reference.

Target/guide pairs from torchvision CNNs and ViTs, Hugging Face encoder, decoder, encoder-decoder and
state-space models (from tiny configs), RNNs in both layouts and custom modules. For each pair in the
plan, the test captures the two layers' outputs with its own hooks, lays them out with what it knows
about each family (every layer batch first, except the sequence-first LSTM's), and computes linear
CKA in float64 with the textbook formula. Zero silent differences: every pair is measured and
agrees within 1e-4, and the guide's weights are unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from reference import capture_outputs, linear_cka_textbook
from torch import nn

from guidewrap import GuidedModel

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

N, T, VOCAB = 12, 12, 50  # T == N: only evidence can tell the batch axis from the sequence axis


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class _MLPWithTupleBlock(nn.Module):
    """A custom module: a block that returns a (features, aux) tuple, and a dict output."""

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.lin = nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.lin(x))
            return h, h.sum(-1)

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 24))
        self.blocks = nn.ModuleList(self.Block(24) for _ in range(3))
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.inp(x)
        for block in self.blocks:
            h, _ = block(h)
        return {"logits": self.head(h)}


class _TokenLSTM(nn.Module):
    """Embedding + LSTM over (n, T) token ids; ``seq_first`` runs the LSTM on (T, n, d)."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.emb = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, 16, num_layers=1, batch_first=not seq_first)
        self.rnn2 = nn.LSTM(16, 16, num_layers=1, batch_first=not seq_first)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        if self.seq_first:
            h = h.transpose(0, 1)
        h = self.rnn2(self.rnn(h)[0])[0]
        return self.head(h.transpose(0, 1) if self.seq_first else h)


class _MassiveActivations(nn.Module):
    """Hidden states with two huge, nearly constant dimensions (as in large transformers): the
    odd Linear layers add 3e4 there, the even ones ignore those inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layers = nn.Sequential(*(nn.Linear(16, 16) for _ in range(4)))
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                if i % 2 == 0:
                    layer.bias[:2] += 3e4
                else:
                    layer.weight[:, :2] = 0.0
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layers(self.emb(input_ids))))


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def _hf(kind: str) -> nn.Module:
    t = transformers
    if kind == "bert":
        cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        return t.BertModel(cfg)
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return t.GPT2LMHeadModel(cfg)
    if kind == "t5":
        cfg = t.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                         num_heads=2, dropout_rate=0.0, decoder_start_token_id=0)  # fmt: skip
        return t.T5ForConditionalGeneration(cfg)
    if kind == "mamba":
        cfg = t.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                            intermediate_size=32, conv_kernel=2)  # fmt: skip
        return t.MambaModel(cfg)
    raise KeyError(kind)


def _t5_inputs(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": input_ids, "decoder_input_ids": input_ids}


def _densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)


def _vgg() -> nn.Module:  # in-place ReLUs after every conv
    cfg = [8, "M", 16, "M", 16]
    net = torchvision.models.VGG(torchvision.models.vgg.make_layers(cfg), num_classes=10, dropout=0.0)
    net.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))
    return net


def _hf_more(kind: str) -> nn.Module:
    t = transformers
    small = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 32}  # fmt: skip
    if kind == "albert":  # one layer shared by both depths: its calls are stacked
        return t.AlbertModel(t.AlbertConfig(embedding_size=8, hidden_dropout_prob=0.0, **small))
    if kind == "distilbert":
        cfg = t.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=0.0)
        return t.DistilBertModel(cfg)
    if kind == "llama":
        return t.LlamaModel(t.LlamaConfig(num_key_value_heads=1, max_position_embeddings=32, **small))
    if kind == "qwen2":
        return t.Qwen2Model(t.Qwen2Config(num_key_value_heads=1, max_position_embeddings=32, **small))
    if kind == "opt":
        cfg = t.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                          word_embed_proj_dim=16, max_position_embeddings=32, dropout=0.0)  # fmt: skip
        return t.OPTModel(cfg)
    if kind == "swin":  # attention over windows folded into the batch
        cfg = t.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                           num_heads=[2, 2], window_size=2, hidden_dropout_prob=0.0, drop_path_rate=0.0)  # fmt: skip
        return t.SwinModel(cfg)
    raise KeyError(kind)


IMAGES: dict[str, Callable[[], nn.Module]] = {
    "vgg": _vgg,
    "squeezenet": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "densenet": _densenet,
    "swin": lambda: _hf_more("swin"),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "vit": _vit,
    "custom_mlp": _MLPWithTupleBlock,
}
TOKENS: dict[str, Callable[[], nn.Module]] = {
    "bert": lambda: _hf("bert"),
    "gpt2": lambda: _hf("gpt2"),
    "t5": lambda: _hf("t5"),
    "mamba": lambda: _hf("mamba"),
    "lstm_batch_first": lambda: _TokenLSTM(seq_first=False),
    "lstm_seq_first": lambda: _TokenLSTM(seq_first=True),
    "massive_activations": _MassiveActivations,
    "albert": lambda: _hf_more("albert"),
    "distilbert": lambda: _hf_more("distilbert"),
    "llama": lambda: _hf_more("llama"),
    "qwen2": lambda: _hf_more("qwen2"),
    "opt": lambda: _hf_more("opt"),
}
# (target, guide): every family is a target or a guide at least once.
CASES = [
    ("resnet18", "vit"),
    ("vit", "mobilenet_v3_small"),
    ("mobilenet_v3_small", "custom_mlp"),
    ("custom_mlp", "resnet18"),
    ("bert", "gpt2"),
    ("gpt2", "mamba"),
    ("mamba", "t5"),
    ("lstm_batch_first", "bert"),
    ("lstm_seq_first", "gpt2"),
    ("gpt2", "lstm_seq_first"),
    ("massive_activations", "bert"),
    ("lstm_batch_first", "massive_activations"),
    ("vgg", "squeezenet"),
    ("squeezenet", "densenet"),
    ("densenet", "swin"),
    ("swin", "vgg"),
    ("albert", "distilbert"),
    ("distilbert", "llama"),
    ("llama", "qwen2"),
    ("qwen2", "opt"),
    ("opt", "albert"),
]


def _flat(t: torch.Tensor, seq_first: bool) -> torch.Tensor:
    return (t.transpose(0, 1) if seq_first and t.dim() == 3 else t).flatten(1).double()


@pytest.mark.parametrize(("target_name", "guide_name"), CASES, ids=[f"{t}<-{g}" for t, g in CASES])
def test_every_reported_pair_matches_a_float64_reference(target_name: str, guide_name: str) -> None:
    torch.manual_seed(0)
    zoo = IMAGES if target_name in IMAGES else TOKENS
    target, guide = _no_dropout(zoo[target_name]()), _no_dropout(zoo[guide_name]())
    if zoo is IMAGES:
        x: torch.Tensor = torch.randn(N, 3, 32, 32)
    else:
        x = torch.randint(0, VOCAB, (N, T))
    adapter = _t5_inputs if guide_name == "t5" else "same"
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    guided = GuidedModel(target, guide, guide_inputs=adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF fallback-kernel notices
        guided(x)
        plan = guided.plan()
        reported = guided.last_alignment
        t_out = capture_outputs(target, {p.target.name for p in plan}, torch.no_grad()(lambda: target(x)), calls=True)
        g_call = _t5_inputs(x) if guide_name == "t5" else {}
        g_out = capture_outputs(
            guide,
            {p.guide.name for p in plan},
            torch.no_grad()(lambda: guide(**g_call) if g_call else guide(x)),
            calls=True,
        )
    assert len(plan) > 0
    assert set(reported) == {p.key for p in plan}, f"pairs not measured: {({p.key for p in plan}) - set(reported)}"
    seq_first = {"lstm_seq_first"}
    for pair in plan:
        a = _flat(t_out[pair.target.name], target_name in seq_first and pair.target.name.startswith("rnn"))
        b = _flat(g_out[pair.guide.name], guide_name in seq_first and pair.guide.name.startswith("rnn"))
        expected = linear_cka_textbook(a - a.mean(0), b - b.mean(0)).item()
        assert reported[pair.key] == pytest.approx(expected, abs=1e-4), f"{pair.key}\n{plan}"
    for key, value in guide.state_dict().items():
        assert torch.equal(value, before[key]), f"guide weight {key} changed"
    guided.close()
    assert sum(len(m._forward_hooks) for m in guide.modules()) == 0  # the guide's taps go with close()
