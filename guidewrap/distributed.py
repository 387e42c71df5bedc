"""Global-batch CKA under data parallelism: gather every process's samples of a layer.

CKA over a batch split across processes is not the mean of the per-process CKAs, so with
``distributed="global"`` each layer's features are concatenated across processes before the
metric. The target side is gathered with ``torch.distributed.nn``'s differentiable all_gather, so
each process's gradient flows back to its own slice; the guide side needs no gradient.

Examples:
    >>> import torch
    >>> x = torch.randn(4, 3)
    >>> gather(x, None, differentiable=True, mode="global")[0] is x  # one process: nothing to do
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import BatchSizeMismatchError, ConfigError

__all__ = ["world_size", "gather"]


def world_size(mode: str) -> int:
    """Processes whose samples a CKA covers: the process group's size for ``"global"``, else 1."""
    import torch.distributed as dist

    if mode != "global" or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def gather(
    x: Tensor, w: Tensor | None, differentiable: bool, mode: str, left_padded: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Concatenate ``x`` (samples on dim -2) and its sample weights ``w`` from every process.

    Processes may differ in everything but the sample count: with dynamic padding each pads its
    batch to its own longest sequence, so a flattened layer is ``(n, T_rank * d)`` wide and a
    token-wise one has ``T_rank`` positions. Every process first shares its shape (one small
    collective, so mismatched sizes can neither crash nor hang the feature gather), then pads to the
    largest with zeros: zero features are exactly what padded positions carry in ``"flatten"`` mode
    with a mask (right padding), and padded token-wise positions get weight 0, so the CKA equals one
    process padding the whole global batch to its longest sequence. With left padding positions would
    not line up across processes, so ``left_padded`` makes unequal widths an error that names the fix.
    """
    world = world_size(mode)
    if world == 1:
        return x, w
    import torch.distributed as dist

    shape = torch.tensor([x.dim(), *x.shape, *([0] * (4 - x.dim()))], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    dims = {int(s[0]) for s in shapes}
    if len(dims) != 1:
        raise BatchSizeMismatchError(f"a layer has {sorted(dims)} dimensions on different processes")
    sizes = torch.stack(shapes)[:, 1 : x.dim() + 1]
    n_axis = x.dim() - 2
    if len({int(n) for n in sizes[:, n_axis]}) != 1:
        raise BatchSizeMismatchError(
            f"global-batch CKA needs the same batch size on every process, got {sizes[:, n_axis].tolist()}; "
            "use drop_last=True or distributed='local'"
        )
    largest = [int(v) for v in sizes.max(0).values]
    uneven = any(list(s) != largest for s in sizes.tolist())
    if left_padded and uneven:
        raise ConfigError(
            "dynamic padding on the left with a different length on each process: token positions do not line "
            "up across processes, so global-batch CKA cannot compare them. Pad on the right (tokenizer.padding_side "
            "= 'right'), pad every batch to one length, use sequence='mean', or distributed='local'"
        )
    if uneven and x.dim() == 3 and w is None:
        # Token-wise positions some process lacks get weight 0: every process then sends weights.
        w = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if list(x.shape) != largest:
        x, w = _pad_to(x, largest), (None if w is None else _pad_to(w.to(torch.uint8), largest[: w.dim()]).bool())
    if differentiable:
        gathered = _GatherSamples.apply(x.contiguous())
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        gathered = torch.cat(parts, dim=-2)
    if w is None:
        return gathered, None
    w_parts = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(w_parts, w.contiguous())
    return gathered, torch.cat(w_parts, dim=-1)


class _GatherSamples(torch.autograd.Function):
    """All processes' samples concatenated on dim -2; the backward hands each process the sum over
    processes of the gradient of its own slice (every process computes the same global term)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n, ctx.rank = x.shape[-2], dist.get_rank()
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(-2, ctx.rank * ctx.n, ctx.n)


def _pad_to(t: Tensor, shape: list[int]) -> Tensor:
    """Zero-pad ``t`` at the end of each dimension up to ``shape`` (differentiable)."""
    pad: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad) if any(pad) else t
