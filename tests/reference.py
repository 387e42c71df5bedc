"""Textbook reference implementations, for tests and benchmarks only (and the official example
scripts' data steps the integration tests reproduce).

These follow the definitions literally (Gram recomputed for every HSIC, n x n centring
matrix ``H = I - 11^T / n``), the way the guidance paper's published code does, and are
deliberately slow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def hsic_textbook(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 - the textbook's name
    """Biased HSIC ``tr(K H L H) / (n - 1)^2`` with explicit centring-matrix products."""
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - torch.full((n, n), 1.0 / n, dtype=k.dtype, device=k.device)
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def linear_cka_textbook(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA as ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``, each Gram recomputed per HSIC."""
    hxy = hsic_textbook(x @ x.T, y @ y.T)
    hxx = hsic_textbook(x @ x.T, x @ x.T)
    hyy = hsic_textbook(y @ y.T, y @ y.T)
    return hxy / torch.sqrt(hxx * hyy)


def rbf_cka_textbook(x: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """RBF CKA with the median heuristic (Kornblith et al.'s reference code, in torch)."""

    def gram(z: Tensor) -> Tensor:
        sq = torch.cdist(z, z).square()
        return torch.exp(-sq / (2 * sigma**2 * torch.median(sq)))

    kx, ky = gram(x), gram(y)
    return hsic_textbook(kx, ky) / torch.sqrt(hsic_textbook(kx, kx) * hsic_textbook(ky, ky))


def debiased_cka_textbook(x: Tensor, y: Tensor) -> Tensor:
    """Debiased CKA from the unbiased HSIC U-statistic written out term by term."""

    def hsic_u(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
        n = k.shape[0]
        k = k - torch.diag(torch.diag(k))
        l = l - torch.diag(torch.diag(l))  # noqa: E741
        ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
        term1 = torch.trace(k @ l)
        term2 = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
        term3 = 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
        return ((term1 + term2 - term3) / (n * (n - 3))).squeeze()

    kx, ky = x @ x.T, y @ y.T
    return hsic_u(kx, ky) / torch.sqrt(hsic_u(kx, kx) * hsic_u(ky, ky))


def first_tensor_of(output: Any) -> Tensor:
    """The activation in a module's output: the output itself, or the first entry of a tuple
    (``nn.LSTM``'s ``(output, (h, c))``) or mapping (a Hugging Face ``ModelOutput``), recursively."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = [v for v in output.values() if isinstance(v, (Tensor, tuple, list, Mapping))]
    return first_tensor_of(output[0])


def capture_outputs(
    model: nn.Module,
    names: set[str] | list[str],
    call: Callable[[], Any],
    calls: bool = False,
    keep_graph: bool = False,
) -> dict[str, Tensor]:
    """Run ``call()`` with the test's own forward hooks on ``model``'s named layers and return each
    layer's activation (independent of guidewrap's capture), copied when the layer returns (an
    in-place op after it, ``nn.ReLU(inplace=True)``, does not change it); the hooks are always removed.
    ``calls``: a layer run several times gives its calls stacked after the batch axis (else the last).
    ``keep_graph``: the copies stay in the autograd graph (a loss on them trains the model), else detached."""
    out: dict[str, Tensor] = {}
    seen: dict[str, list[Tensor]] = {}

    def keep(name: str, output: Any) -> None:
        tensor = first_tensor_of(output)
        seen.setdefault(name, []).append((tensor if keep_graph else tensor.detach()).clone())
        out[name] = seen[name][0] if len(seen[name]) == 1 or not calls else torch.stack(seen[name], dim=1)

    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: keep(n, o)) for n in names]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return out


def run_clm_group_texts(block_size: int) -> Callable[[dict[str, list]], dict[str, list]]:
    """transformers' run_clm.py ``group_texts``: concatenate a batch of tokenized texts, cut it into
    ``block_size`` blocks (the remainder dropped) and set ``labels`` to the ``input_ids``."""

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        concatenated = {k: [token for row in rows for token in row] for k, rows in examples.items()}
        total_length = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return group_texts
