"""Tiny models built from configs, shared by the tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the same examples on every run, so a rare edge
# case found by random exploration cannot fail CI for everyone; local runs keep exploring at random.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The examples' shared lab code (tasks and models of the paper's experiments) lives outside the
# installed package, in examples/lab; the tests import it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def mlp(d_in: int = 8, width: int = 16, depth: int = 3, d_out: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def tanh_target_relu_guide(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A tanh MLP target and a ReLU MLP guide over 8 features, 4 classes (the strength and cap tests)."""
    torch.manual_seed(seed)
    target = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    guide = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return target, guide


def class_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of 32 samples of 8 features and their 4-class labels, the same on every call."""
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def train_on_class_batches(guided: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    """A plain guided loop over ``class_batch(step)``: cross-entropy through ``guided.total_loss``."""
    for step in steps:
        x, y = class_batch(step)
        loss = guided.total_loss(nn.functional.cross_entropy(guided(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()


def tiny_bart_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Two one-layer BART models (d 16, no dropout) built from a config: an encoder-decoder pair."""
    import transformers

    cfg = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BartModel(cfg), transformers.BartModel(cfg)


def small_cnn(channels: int = 4, d_out: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * channels, d_out),
    )


class RNNLM(nn.Module):
    """Embedding -> stacked RNN -> head, returning {"loss", "logits"} when labels are given."""

    def __init__(self, vocab: int = 20, hidden: int = 16, kind: type[nn.RNNBase] = nn.RNN, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = kind(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.rnn(self.emb(input_ids))[0])
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


def transformer_lm(vocab: int = 20, d: int = 16, layers: int = 2) -> nn.Sequential:
    layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Embedding(vocab, d), nn.TransformerEncoder(layer, layers), nn.Linear(d, vocab))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_metric_registry() -> Iterator[None]:
    """Metrics a test registers do not leak into the next test."""
    from guidewrap.metrics import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
