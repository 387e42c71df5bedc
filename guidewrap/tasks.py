"""The built-in offline task behind ``guidewrap demo``: a deep fully connected net on MNIST-1D, alone,
guided by an untrained 1-D CNN, with guidance only as noise pre-alignment, and distilled from the same
untrained CNN's logits; plus the small training loop (:func:`fit`) it runs on.

Studies and the paper's other tasks live in the repository's ``examples/`` (``examples/lab``), not
in the installed package.

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package: 1-D signals of
40 points whose class is a shifted, scaled, noisy template, built so that spatial inductive
bias matters. A deep MLP overfits it; a CNN does not.

How a run is scored (fixed before any result was looked at, the same for every variant): the
training split is divided into training rows and a validation slice; accuracy on train, validation
and test is recorded every ``eval_every`` steps, and a run reports the *test* accuracy at the
evaluation with the best *validation* accuracy (the earliest on ties), i.e. early stopping on a
held-out split. One noisy checkpoint therefore cannot decide the comparison, and the test set is
never used to choose anything.

Examples:
    >>> data = load_mnist1d(num_samples=200, val_samples=20)
    >>> tuple(data["x"].shape), tuple(data["x_val"].shape), tuple(data["x_test"].shape)
    ((140, 40), (20, 40), (40, 40))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .model import GuidedModel
from .training import MODES, accuracy, batch_stream, distillation_loss, fit, random_batches

__all__ = [
    "Transformer1d",
    "resnet1d",
    "transformer1d",
    "VARIANTS",
    "DEMO_PAIRS",
    "DEMO_WEIGHT",
    "DEMO_TRAIN_SAMPLES",
    "DEMO_STEPS",
    "load_mnist1d",
    "deep_mlp",
    "cnn1d",
    "RunResult",
    "train_variant",
    "MODES",
    "fit",
    "distillation_loss",
    "batch_stream",
    "random_batches",
    "accuracy",
]


VARIANTS = ("baseline", "guided", "pre_align", "distill")
DESCRIPTIONS = {
    "baseline": "deep MLP alone",
    "guided": "guided by an untrained 1-D CNN",
    "pre_align": "noise pre-alignment only, then alone",
    "distill": "logit distillation from the untrained CNN",
}

# The demo pins its guidance settings so that a change of library defaults cannot change it:
# these are the pairs the paper's depth-spreading rule gives for deep_mlp() <- cnn1d() (the six
# hidden Linear layers of the MLP that the six Conv1d layers land on; logits left out), and the
# weight over their sum. Weight 0.5 was chosen on seed 0 of the earlier 2,000-step demo
# (0.25 / 0.5 / 1 / 2 gave 0.737 / 0.771 / 0.733 / 0.716 test accuracy).
DEMO_PAIRS = [("0", "1"), ("2", "3"), ("6", "5"), ("8", "7"), ("12", "9"), ("14", "11")]
DEMO_WEIGHT = 0.5
# The demo trains on 2,000 of MNIST-1D's signals (validation: 1,000 others; test: the package's 2,000):
# with little data the MLP overfits hard, which is the regime where an architectural prior matters.
DEMO_TRAIN_SAMPLES = 2000
DEMO_STEPS = 1000
# The demo clips the gradient norm at 1 before each Adam step (as guidewrap.tasks.fit does by default).
# Unclipped, Adam's steps spike once the training set is fitted and the loss is near zero, and guided
# runs, which fit it fully, fell late on every seed (docs/results.md, "Strength"); clipped, none did.
DEMO_CLIP = 1.0


def load_mnist1d(
    num_samples: int = 10_000, seed: int = 42, val_samples: int = 1000, train_samples: int | None = None
) -> dict[str, Tensor]:
    """Generate MNIST-1D locally (no download): ``x_test``/``y_test`` (the package's 20%), and its 80%
    training split as ``x``/``y`` plus a validation slice ``x_val``/``y_val`` (its last ``val_samples`` rows).
    ``train_samples`` keeps only the first that many training rows (a smaller training set).

    Examples:
        >>> d = load_mnist1d(num_samples=100, val_samples=10)
        >>> int(d["y"].max()) <= 9, len(d["x"]), len(d["x_val"])
        (True, 70, 10)
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs mnist1d: pip install 'guidewrap[examples]'") from exc
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = make_dataset(args)
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"], dtype=torch.long)
    if not 0 < val_samples < len(x):
        raise ValueError(f"val_samples must be between 1 and {len(x) - 1} for {num_samples} samples, got {val_samples}")
    keep = len(x) - val_samples if train_samples is None else min(train_samples, len(x) - val_samples)
    return {
        "x": x[:keep],
        "y": y[:keep],
        "x_val": x[-val_samples:],
        "y_val": y[-val_samples:],
        "x_test": torch.tensor(data["x_test"], dtype=torch.float32),
        "y_test": torch.tensor(data["y_test"], dtype=torch.long),
    }


def deep_mlp(depth: int = 8, width: int = 256, d_in: int = 40, classes: int = 10) -> nn.Sequential:
    """``depth`` Linear+ReLU layers of ``width`` units, then a linear classifier.

    Examples:
        >>> deep_mlp(depth=2, width=8)(torch.randn(3, 40)).shape
        torch.Size([3, 10])
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class _Unsqueeze(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)  # (n, 40) signals -> (n, 1, 40) for Conv1d


def cnn1d(depth: int = 6, channels: int = 32, length: int = 40, classes: int = 10) -> nn.Sequential:
    """A 1-D CNN: ``depth`` Conv1d+ReLU layers (stride 2 every other layer), then a classifier.

    Examples:
        >>> cnn1d(depth=2, channels=4)(torch.randn(3, 40)).shape
        torch.Size([3, 10])
    """
    layers: list[nn.Module] = [_Unsqueeze()]
    for i in range(depth):
        stride = 2 if i % 2 == 1 else 1
        layers += [nn.Conv1d(1 if i == 0 else channels, channels, 3, stride=stride, padding=1), nn.ReLU()]
        length = (length - 1) // stride + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * length, classes))


class _Block1d(nn.Module):
    """Conv-(BN)-ReLU-Conv-(BN) with an optional identity shortcut (a ResNet basic block in 1-D)."""

    def __init__(self, channels: int, kernel: int, norm: bool, skip: bool) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(channels, channels, kernel, padding=pad)
        self.bn1 = nn.BatchNorm1d(channels) if norm else nn.Identity()
        self.conv2 = nn.Conv1d(channels, channels, kernel, padding=pad)
        self.bn2 = nn.BatchNorm1d(channels) if norm else nn.Identity()
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(h + x if self.skip else h)


def resnet1d(
    blocks: int = 3,
    channels: int = 32,
    classes: int = 10,
    skip: bool = True,
    norm: bool = True,
    kernel: int = 3,
    pool: bool = True,
) -> nn.Sequential:
    """A small 1-D ResNet for MNIST-1D whose components can be switched off one at a time (the
    architecture lens's ablations): ``skip`` connections, BatchNorm (``norm``), the ``kernel`` size
    (1: no spatial mixing) and the global average ``pool`` (off: the classifier reads every position).

    Examples:
        >>> resnet1d(blocks=1, channels=4)(torch.randn(3, 40)).shape
        torch.Size([3, 10])
        >>> resnet1d(blocks=1, channels=4, pool=False)(torch.randn(3, 40)).shape
        torch.Size([3, 10])
    """
    stem = [nn.Conv1d(1, channels, kernel, padding=kernel // 2), nn.BatchNorm1d(channels) if norm else nn.Identity()]
    body = [_Block1d(channels, kernel, norm, skip) for _ in range(blocks)]
    head = [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, classes)] if pool else [
        nn.Flatten(), nn.Linear(channels * 40, classes)]  # fmt: skip
    return nn.Sequential(_Unsqueeze(), *stem, nn.ReLU(), *body, *head)


class _TransformerBlock(nn.Module):
    """Pre-norm self-attention (optional) and MLP, batch first."""

    def __init__(self, d: int, heads: int, attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True) if attention else None
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        if self.attn is not None:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Transformer1d(nn.Module):
    """A small Transformer over the 40 points of an MNIST-1D signal (one token each), mean-pooled.
    ``positional=False`` drops the learned positional embedding, ``attention=False`` the
    self-attention (leaving per-token MLPs): the lens's Transformer ablations."""

    def __init__(
        self, layers: int = 2, d: int = 32, heads: int = 4, classes: int = 10, positional: bool = True,
        attention: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(1, d)
        self.position = nn.Parameter(torch.randn(40, d) * 0.02) if positional else None
        self.blocks = nn.ModuleList(_TransformerBlock(d, heads, attention) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.unsqueeze(-1))
        if self.position is not None:
            h = h + self.position[: h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def transformer1d(**settings: Any) -> Transformer1d:
    """:class:`Transformer1d` with the given settings.

    Examples:
        >>> transformer1d(layers=1, d=8, heads=2)(torch.randn(3, 40)).shape
        torch.Size([3, 10])
    """
    return Transformer1d(**settings)


@dataclass
class RunResult:
    """One trained variant: accuracies at the selected evaluation (best validation accuracy, the
    earliest on ties), that evaluation's step, and the curves ``(step, train acc, val acc, test acc)``."""

    variant: str
    seed: int
    train_acc: float
    test_acc: float
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    best_step: int = 0

    @classmethod
    def from_curve(cls, variant: str, seed: int, curve: list[tuple[int, float, float, float]]) -> RunResult:
        """Score a run by the module's rule: the evaluation with the best validation accuracy.

        Examples:
            >>> RunResult.from_curve("baseline", 0, [(1, 0.5, 0.4, 0.3), (2, 0.9, 0.6, 0.5), (3, 1.0, 0.6, 0.7)])
            RunResult(variant='baseline', seed=0, train_acc=0.9, test_acc=0.5, curve=[...], best_step=2)
        """
        if not curve:
            raise ValueError("a run needs at least one evaluation to be scored")
        best = max(range(len(curve)), key=lambda i: (curve[i][2], -i))  # best validation, earliest on ties
        step, train_acc, _, test_acc = curve[best]
        return cls(variant, seed, train_acc, test_acc, curve, step)

    def __repr__(self) -> str:
        return (
            f"RunResult(variant={self.variant!r}, seed={self.seed}, train_acc={self.train_acc}, "
            f"test_acc={self.test_acc}, curve=[...], best_step={self.best_step})"
        )

    @property
    def gap(self) -> float:
        """Generalisation gap: train accuracy minus test accuracy."""
        return self.train_acc - self.test_acc

    @property
    def final_test_acc(self) -> float:
        """Test accuracy at the last evaluation: the model a user who keeps the final weights gets."""
        return self.curve[-1][3]

    @property
    def final_train_acc(self) -> float:
        """Training accuracy at the last evaluation."""
        return self.curve[-1][1]


def train_variant(
    variant: str,
    data: dict[str, Tensor],
    seed: int = 0,
    steps: int = DEMO_STEPS,
    batch: int = 256,
    lr: float = 1e-3,
    pre_align_steps: int = 300,
    eval_every: int = 50,
    progress: Callable[[int], Any] | None = None,
    weight: float = DEMO_WEIGHT,
    guide_factory: Callable[[], nn.Module] | None = None,
    layers: Any = None,
    reduction: str = "sum",
    strength: float | None = None,
    clip: float | None = DEMO_CLIP,
    tensor_cap: float | None = None,
    tensor_cap_after: int = 100,
) -> RunResult:
    """Train one variant of the demo; its scored result (the module's rule) and curves.

    ``baseline``: the MLP alone; ``guided``: plus ``weight * sum(1 - CKA)`` to an untrained CNN over
    ``layers`` (default :data:`DEMO_PAIRS`; ``reduction="mean"`` divides by the pairs; ``strength``
    sets the weight from the gradients instead of ``weight``; ``tensor_cap`` / ``tensor_cap_after`` cap
    the term's pull per tensor, see :class:`~guidewrap.GuidanceConfig`; ``clip``: a gradient-norm limit before
    each step, :data:`DEMO_CLIP` by default; ``None``: unclipped, as the demo before 0.3); ``pre_align``:
    ``pre_align_steps`` of alignment on noise, then alone; ``distill``: plus logit distillation from
    the same CNN. Variants of a seed start from the same weights and see the same batches.

    Examples:
        >>> d = load_mnist1d(num_samples=200, val_samples=20)
        >>> r = train_variant("guided", d, steps=2, batch=32, eval_every=1)
        >>> 0.0 <= r.test_acc <= 1.0 and len(r.curve) == 2 and r.best_step in (1, 2)
        True
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    target = deep_mlp()
    guide = (guide_factory or cnn1d)()  # the guide is untrained: its architecture is the prior
    guide.eval()
    pairs = DEMO_PAIRS if layers is None else layers
    if variant == "pre_align":
        noise_shaped = data["x"][:batch]
        GuidedModel(target, guide, layers=pairs, reduction="sum", guide_inputs="noise", weight=weight).pre_align(
            noise_shaped, steps=pre_align_steps
        )
    curve: list[tuple[int, float, float, float]] = []

    def evaluate(step: int) -> None:
        if step % eval_every == 0 or step == steps:
            accs = [accuracy(target, data[f"x{s}"], data[f"y{s}"]) for s in ("", "_val", "_test")]
            curve.append((step, accs[0], accs[1], accs[2]))

    mode = {"guided": "guided", "distill": "distill"}.get(variant, "none")
    batches = random_batches(data["x"], data["y"], batch, seed)
    loop = {"lr": lr, "clip": clip, "progress": progress, "callback": evaluate}
    pinned = {"weight": weight, "layers": pairs, "reduction": reduction}  # pinned: library defaults cannot move it
    pinned |= {"tensor_cap": tensor_cap, "tensor_cap_after": tensor_cap_after}
    if strength is not None:  # the weight set from the gradients instead (docs/concepts/strength.md)
        pinned |= {"weight": 1.0, "strength": strength}
    fit(target, batches, nn.functional.cross_entropy, steps, guide, mode, **loop, **pinned)
    return RunResult.from_curve(variant, seed, curve)
