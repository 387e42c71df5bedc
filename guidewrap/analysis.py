"""Layer-by-layer similarity between two networks: the picture the paper uses to show what
guidance does (a guided target's layers line up with its guide's).

Examples:
    >>> import torch
    >>> a = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    >>> sim = similarity_matrix(a, b, torch.randn(32, 6))
    >>> sim.rows, sim.cols, tuple(sim.values.shape)
    (['0', '2'], ['0', '2'], (2, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .capture import extract, features
from .discovery import DEFAULT_LAYER_TYPES, _is_candidate
from .errors import ConfigError, PlanError
from .inputs import first_tensor, normalize_call
from .metrics import get_metric
from .probing import _no_side_effects, describe
from .utils import unwrap_model

__all__ = ["SimilarityMatrix", "similarity_matrix", "error_consistency"]


@dataclass
class SimilarityMatrix:
    """Similarity of every measured layer of model A (rows) with every one of model B (columns).

    Examples:
        >>> import torch
        >>> m = SimilarityMatrix(["a"], ["b", "c"], torch.tensor([[0.5, 1.0]]))
        >>> print(m)  # doctest: +NORMALIZE_WHITESPACE
              b      c
        a  0.500  1.000
    """

    rows: list[str]
    cols: list[str]
    values: Tensor

    def __str__(self) -> str:
        width = max([len(r) for r in self.rows] + [1])
        cw = max([len(c) for c in self.cols] + [5]) + 2
        lines = [" " * width + "".join(c.rjust(cw) for c in self.cols)]
        for name, row in zip(self.rows, self.values.tolist(), strict=True):
            lines.append(name.ljust(width) + "".join(f"{v:.3f}".rjust(cw) for v in row))
        return "\n".join(lines)

    def save_png(self, path: str | Path, title: str = "CKA", xlabel: str = "B", ylabel: str = "A") -> Path:
        """Write the matrix as a heatmap PNG (needs matplotlib: ``pip install 'guidewrap[examples]'``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise ImportError("heatmaps need matplotlib: pip install 'guidewrap[examples]'") from exc
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(self.cols), 1.2 + 0.4 * len(self.rows)))
        image = ax.imshow(self.values.numpy(), vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(self.cols)), self.cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(self.rows)), self.rows, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _capture(model: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]], layer_types: Sequence[Any]) -> dict:
    args, kwargs = call
    tensor = first_tensor(args, kwargs)
    if tensor is None:
        raise PlanError("similarity_matrix needs at least one tensor input")
    n = tensor.shape[0]
    out: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if not name or not _is_candidate(module, layer_types):
            continue

        def hook(_m: nn.Module, _i: Any, output: Any, name: str = name, module: nn.Module = module) -> None:
            if name in out:
                return
            info = describe(model, name, module, output, n)
            if info.batch_dim is None:
                return
            tensor, _ = extract(output)
            out[name] = features(tensor, info.batch_dim, "flatten", None, info.channels_first)[0].detach()

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), _no_side_effects(model):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out


def similarity_matrix(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Any,
    metric: str = "cka",
    layer_types: Sequence[Any] = DEFAULT_LAYER_TYPES,
    inputs_b: Any = None,
) -> SimilarityMatrix:
    """Similarity (``1 - distance`` of ``metric``) between all hookable layers of two models.

    Both models see ``inputs`` (a tensor, tuple or dict of keyword arguments), or model B sees
    ``inputs_b`` when given (same samples, e.g. another tokenizer). Layers are those
    ``guidewrap`` would hook (the same default types); outputs without a batch dimension are
    left out. Neither model's state changes.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> m = similarity_matrix(net, net, torch.randn(50, 4))
        >>> round(float(m.values[0, 0]), 4), round(float(m.values[1, 1]), 4)
        (1.0, 1.0)
    """
    a, b = unwrap_model(model_a), unwrap_model(model_b)
    feats_a = _capture(a, normalize_call(inputs), layer_types)
    feats_b = _capture(b, normalize_call(inputs if inputs_b is None else inputs_b), layer_types)
    if not feats_a or not feats_b:
        side = "A" if not feats_a else "B"
        raise PlanError(f"model {side} has no hookable layer with a batch dimension (layer_types={layer_types})")
    measure = get_metric(metric)
    values = torch.zeros(len(feats_a), len(feats_b))
    with torch.no_grad():
        for i, x in enumerate(feats_a.values()):
            for j, y in enumerate(feats_b.values()):
                values[i, j] = 1.0 - measure.distance(x.float(), y.float())
    return SimilarityMatrix(list(feats_a), list(feats_b), values)


def error_consistency(
    pred_a: Sequence[int] | Tensor, pred_b: Sequence[int] | Tensor, labels: Sequence[int] | Tensor
) -> float:
    """Error consistency of two classifiers (Geirhos et al., 2020): Cohen's kappa of their
    trial-by-trial agreement on being right or wrong, beyond what their accuracies alone predict.

    ``c_obs`` is the fraction of trials where both are right or both are wrong; two independent
    classifiers with accuracies ``p_a`` and ``p_b`` would agree on ``c_exp = p_a p_b + (1 - p_a)(1 - p_b)``
    of them; the result is ``(c_obs - c_exp) / (1 - c_exp)``: 1 when they err on exactly the same
    trials, about 0 for independent errors, negative when one tends to be wrong where the other is
    right. The paper uses it to show that guided networks inherit their guide's errors.

    Raises :class:`~guidewrap.errors.ConfigError` for inputs of different lengths, empty inputs,
    or when ``c_exp`` is 1 (both always right, or both always wrong: kappa is undefined).

    Examples:
        >>> labels = [0, 0, 0, 0]
        >>> error_consistency([0, 0, 1, 1], [0, 0, 1, 1], labels)  # the same errors
        1.0
        >>> error_consistency([0, 0, 1, 1], [1, 1, 0, 0], labels)  # opposite errors
        -1.0
        >>> error_consistency([0, 1, 0, 1], [0, 0, 1, 1], labels)  # independent errors
        0.0
    """
    a, b, y = (torch.as_tensor(v).reshape(-1) for v in (pred_a, pred_b, labels))
    if not (len(a) == len(b) == len(y)):
        raise ConfigError(f"error_consistency needs equally long inputs, got {len(a)}, {len(b)} and {len(y)}")
    if len(y) == 0:
        raise ConfigError("error_consistency needs at least one trial")
    right_a, right_b = (a == y).double(), (b == y).double()
    p_a, p_b = float(right_a.mean()), float(right_b.mean())
    c_obs = float((right_a == right_b).double().mean())
    c_exp = p_a * p_b + (1 - p_a) * (1 - p_b)
    if c_exp >= 1.0:
        raise ConfigError(
            f"error consistency is undefined when both classifiers are always right or always wrong "
            f"(accuracies {p_a:.3f} and {p_b:.3f})"
        )
    return (c_obs - c_exp) / (1 - c_exp)
