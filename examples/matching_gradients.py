"""How hard does the alignment term pull at initialisation? Gradient-norm ratios per matching setting.

For four real pairs, at initialisation (untrained target and guide, seeds 0 1 2), the norm of the
alignment term's gradient over the target's parameters divided by the task loss's gradient norm:
a ratio far above 1 means the term swamps the task (and, under the Trainer's default gradient
clipping at 1, shrinks the task's share of the step by about that factor).

- ``gpt2<-gpt2``: a 4-block GPT-2 LM (d 128) guided by a 4-block GPT-2 (d 64), CPython's docs as
  characters (windows of 64, batch 16);
- ``bert<-bert``: ``BertForSequenceClassification`` (4 layers, d 128) guided by a ``BertModel`` (d 64),
  random tokens and labels (batch 16, length 32);
- ``fcn<-resnet18``: an 8-layer MLP on 3 x 32 x 32 images guided by ResNet-18, random images
  (batch 32);
- ``lstm<-gpt2``: a 4-layer LSTM LM (hidden 128) guided by the 4-block GPT-2, the docs text;
- ``conv<-resnet18 (fashion)`` / ``fcn<-resnet18 (fashion)``: the image study's plain 20-layer ConvNet
  (no normalisation) and 16-layer FCN (BatchNorm) guided by the untrained one-channel ResNet-18, on 128
  real Fashion-MNIST training images (``make data``).

Run: python examples/matching_gradients.py [--seeds 0 1 2] [--cases ...]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from lab.language import CharCorpus, LSTMLanguageModel, python_docs_text, tiny_gpt2
from matching_study import SETTINGS
from torch import Tensor, nn

from guidewrap import GuidedModel
from guidewrap.errors import PlanError


def _lm_loss(out: Any, ids: Tensor) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _cases(seed: int) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], Any, Callable]]:
    from torchvision.models import resnet18
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    corpus = CharCorpus(python_docs_text(), seq_len=64)
    ids = corpus.batch(16, seed=seed)["input_ids"]
    v = corpus.vocab_size
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (16, 32), generator=gen)
    labels = torch.randint(0, 2, (16,), generator=gen)
    images = torch.randn(32, 3, 32, 32, generator=gen)
    classes = torch.randint(0, 10, (32,), generator=gen)

    def bert(width: int, head: bool) -> nn.Module:
        config = BertConfig(
            vocab_size=100, hidden_size=width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=2 * width
        )
        return BertForSequenceClassification(config) if head else BertModel(config)

    def fcn() -> nn.Module:
        blocks = [nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU()]
        for _ in range(7):
            blocks += [nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU())]
        return nn.Sequential(*blocks, nn.Linear(256, 10))

    cases = {
        "gpt2<-gpt2": (lambda: tiny_gpt2(v, 4, 128, 4, 64), lambda: tiny_gpt2(v, 4, 64, 4, 64), ids, _lm_loss),
        "bert<-bert": (
            lambda: bert(128, True),
            lambda: bert(64, False),
            tokens,
            lambda out, _: nn.functional.cross_entropy(out.logits, labels),
        ),
        "fcn<-resnet18": (
            fcn,
            lambda: resnet18(num_classes=10),
            images,
            lambda out, _: nn.functional.cross_entropy(out, classes),
        ),
        "lstm<-gpt2": (lambda: LSTMLanguageModel(v, 128, 4), lambda: tiny_gpt2(v, 4, 128, 4, 64), ids, _lm_loss),
    }
    return cases | _fashion_cases(seed)


def _fashion_cases(seed: int) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], Any, Callable]]:
    """The image study's nets on a batch of 128 real Fashion-MNIST images (examples/fashion_mnist.py):
    its plain 20-layer ConvNet (no normalisation) and its 16-layer FCN with BatchNorm, guided by the
    untrained one-channel ResNet-18."""
    import fashion_mnist

    data = fashion_mnist.load_fashion_mnist(None, train_samples=5000)
    rows = torch.randperm(len(data["x"]), generator=torch.Generator().manual_seed(seed))[:128]
    x, y = data["x"][rows], data["y"][rows]

    def loss(out: Tensor, _: Any) -> Tensor:
        return nn.functional.cross_entropy(out, y)

    return {
        "conv<-resnet18 (fashion)": (fashion_mnist.plain_convnet, fashion_mnist.resnet18_gray, x, loss),
        "fcn<-resnet18 (fashion)": (fashion_mnist.deep_fcn, fashion_mnist.resnet18_gray, x, loss),
    }


def _grad_norm(loss: Tensor, params: list[Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def ratio(case: str, setting: str, seed: int) -> tuple[float, int]:
    """Alignment-gradient norm over task-gradient norm at initialisation, and the number of pairs."""
    make_target, make_guide, x, loss_fn = _cases(seed)[case]
    torch.manual_seed(seed)
    target, guide = make_target(), make_guide()
    keys = SETTINGS[setting]
    guided = GuidedModel(target, guide, **keys).train()
    out = guided(x)
    task = loss_fn(out, x)
    params = [p for p in target.parameters() if p.requires_grad]
    value = _grad_norm(guided.alignment_loss, params) / _grad_norm(task, params)
    pairs = len(guided.plan(x))
    guided.close()
    return value, pairs


CASES = (
    "gpt2<-gpt2",
    "bert<-bert",
    "fcn<-resnet18",
    "lstm<-gpt2",
    "conv<-resnet18 (fashion)",
    "fcn<-resnet18 (fashion)",
)


def main(seeds: list[int], cases: tuple[str, ...] = CASES) -> None:
    print(f"alignment-gradient norm / task-gradient norm at initialisation, seeds {seeds} (mean, per seed)")
    print("| pair | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for case in cases:
        cells = []
        for setting in SETTINGS:
            try:
                runs = [ratio(case, setting, seed) for seed in seeds]
            except PlanError as error:
                cells.append(f"n/a ({str(error)[:40]}...)")
                continue
            values = [r for r, _ in runs]
            per_seed = " / ".join(f"{v:.2f}" for v in values)
            cells.append(f"{statistics.fmean(values):.2f} ({per_seed}; {runs[0][1]} pairs)")
        print(f"| {case} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    args = parser.parse_args()
    main(args.seeds, tuple(args.cases))
