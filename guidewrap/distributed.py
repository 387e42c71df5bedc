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

import torch
from torch import Tensor

from .errors import BatchSizeMismatchError

__all__ = ["world_size", "gather"]


def world_size(mode: str) -> int:
    """Processes whose samples a CKA covers: the process group's size for ``"global"``, else 1."""
    import torch.distributed as dist

    if mode != "global" or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def gather(x: Tensor, w: Tensor | None, differentiable: bool, mode: str) -> tuple[Tensor, Tensor | None]:
    """Concatenate ``x`` (samples on dim -2) and its sample weights ``w`` from every process."""
    world = world_size(mode)
    if world == 1:
        return x, w
    import torch.distributed as dist

    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(x.shape[-2], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise BatchSizeMismatchError(
            f"global-batch CKA needs the same batch size on every process, got {[int(s) for s in sizes]}; "
            "use drop_last=True or distributed='local'"
        )
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(x.contiguous()))
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
    gathered = torch.cat(parts, dim=-2)
    if w is None:
        return gathered, None
    w_parts = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(w_parts, w.contiguous())
    return gathered, torch.cat(w_parts, dim=-1)
