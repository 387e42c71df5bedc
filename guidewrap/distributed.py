"""Global-batch CKA under data parallelism: gather every process's samples of the planned layers.

CKA over a batch split across processes is not the mean of the per-process CKAs, so with
``distributed="global"`` each layer's features are concatenated across processes before the
metric. Communication is per step and side, not per layer: one small collective shares every
layer's shape, then the features travel in buckets of up to :data:`BUCKET_BYTES` (gathered), one
``all_gather`` each: two collectives per side for typical models, however many pairs.

The backward needs no communication: every process computes the same global CKA from the same
gathered features, so the gradient of the gathered features is the same on every process, and the
sum over processes that a differentiable all_gather would form with an all_reduce is the number of
processes times the local gradient. Each process keeps its own slice of it, times the world size;
DDP's averaging of parameter gradients then gives exactly the gradient of one process on the
concatenated batch.

Examples:
    >>> import torch
    >>> layers = {"fc": (torch.randn(4, 3), None)}
    >>> gathered = dict(gather_layers(["fc"], layers, mode="global"))  # one process: nothing to do
    >>> gathered["fc"][0] is layers["fc"][0]
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import BatchSizeMismatchError, ConfigError

__all__ = ["BUCKET_BYTES", "gather_layers", "mean_over_processes", "world_size"]

# Gathered bytes per collective: large enough that typical models need one, small enough that the
# guide's gathered features (reduced to Grams bucket by bucket) stay a bounded transient.
BUCKET_BYTES = 1 << 25
_MAX_DIMS = 4  # (n, D) features, (T, n, D) token-wise; the shape table has room for one more
_ALIGN = 8  # bytes: each tensor's segment of a bucket starts where any dtype may view it


def world_size(mode: str) -> int:
    """Processes whose samples a CKA covers: the process group's size for ``"global"``, else 1."""
    import torch.distributed as dist

    if mode != "global" or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def mean_over_processes(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
    """Gradients over ``params`` as data parallelism applies them: averaged over the processes (one
    ``all_reduce``), a missing one counting as zeros; unchanged in one process. With global-batch CKA
    a process's term gradient is its slice's times the world size, so the average is the gradient of
    one process on the concatenated batch, for the task loss and for the term alike.

    Examples:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> mean_over_processes([torch.tensor([1.0, 2.0])], [w])[0].tolist()  # one process
        [1.0, 2.0]
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not params:
        return list(grads)
    full = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params, strict=True)]
    flat = torch.cat([g.reshape(-1).float() for g in full])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, start = [], 0
    for g in full:
        out.append(flat[start : start + g.numel()].view_as(g).to(g.dtype))
        start += g.numel()
    return out


def gatherer(mode: str, left_padded: bool | None) -> Callable[..., Any] | None:
    """The bucketed gather of a side's layers under global-batch CKA with several processes (None in
    one process, where each guide layer is reduced in its hook)."""
    if world_size(mode) == 1:
        return None
    return functools.partial(gather_layers, mode=mode, left_padded=bool(left_padded))


def gather_layers(
    keys: Sequence[Hashable],
    layers: Mapping[Hashable, tuple[Tensor, Tensor | None]],
    mode: str,
    left_padded: bool = False,
) -> Iterator[tuple[Hashable, tuple[Tensor, Tensor | None]]]:
    """Yield ``(key, (x, w))`` with every process's samples of each layer concatenated on dim -2.

    ``keys`` lists every layer this side may send, in an order all processes share (the plan's);
    ``layers`` holds those this process has (``x``: features with samples on dim -2, ``w``: sample
    weights ``x.shape[:-1]`` or None). A layer missing on any process (its module did not run
    there) is left out on every process, so the collectives stay matched instead of hanging.
    Features that require grad stay differentiable.

    Processes may differ in everything but the sample count: with dynamic padding each pads its
    batch to its own longest sequence, so a flattened layer is ``(n, T_rank * d)`` wide and a
    token-wise one has ``T_rank`` positions. Every layer is padded with zeros to the largest shape:
    zero features are exactly what padded positions carry in ``"flatten"`` mode with a mask (right
    padding), and padded token-wise positions get weight 0, so the CKA equals one process padding the
    whole global batch to its longest sequence. With left padding positions would not line up across
    processes, so ``left_padded`` makes unequal widths an error that names the fix.
    """
    world = world_size(mode)
    if world == 1:
        yield from ((key, layers[key]) for key in keys if key in layers)
        return
    import torch.distributed as dist

    tables = _share_shapes(keys, layers, world)
    bucket: list[tuple[Hashable, Tensor, Tensor | None]] = []
    size = 0
    for i, key in enumerate(keys):
        if bool((tables[:, i, 0] == 0).any()):  # absent on some process
            continue
        x, w = _padded(key, layers[key], tables[:, i], left_padded)
        bytes_ = world * (x.numel() * x.element_size() + (0 if w is None else w.numel()))
        if bucket and size + bytes_ > BUCKET_BYTES:
            yield from _gather_bucket(bucket, dist.get_rank(), world)
            bucket, size = [], 0
        bucket.append((key, x, w))
        size += bytes_
    if bucket:
        yield from _gather_bucket(bucket, dist.get_rank(), world)


def _share_shapes(
    keys: Sequence[Hashable], layers: Mapping[Hashable, tuple[Tensor, Tensor | None]], world: int
) -> Tensor:
    """``(world, len(keys), 2 + _MAX_DIMS)``: per process and layer ``[dim (0: absent), has weights,
    *shape]``, in one collective (so mismatched sizes can neither crash gloo nor hang NCCL)."""
    import torch.distributed as dist

    table = torch.zeros(len(keys), 2 + _MAX_DIMS, dtype=torch.int64)
    for i, key in enumerate(keys):
        if key in layers:
            x, w = layers[key]
            if x.dim() > _MAX_DIMS:
                raise BatchSizeMismatchError(f"layer {key!r}: features of {x.dim()} dimensions cannot be gathered")
            table[i, 0], table[i, 1] = x.dim(), w is not None
            table[i, 2 : 2 + x.dim()] = torch.tensor(x.shape)
    # on the layers' device; with none here, NCCL only talks through the current GPU, gloo takes the CPU
    fallback = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    local = table.to(next((x.device for x, _ in layers.values()), fallback or torch.device("cpu")))
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu()


def _padded(
    key: Hashable, layer: tuple[Tensor, Tensor | None], table: Tensor, left_padded: bool
) -> tuple[Tensor, Tensor | None]:
    """One layer padded to the largest shape over processes (``table``: that layer's rows)."""
    x, w = layer
    dims = {int(d) for d in table[:, 0]}
    if len(dims) != 1:
        raise BatchSizeMismatchError(f"layer {key!r} has {sorted(dims)} dimensions on different processes")
    sizes = table[:, 2 : 2 + x.dim()]
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
    if w is None and (bool(table[:, 1].any()) or (uneven and x.dim() == 3)):
        # another process sends weights, or token-wise positions some process lacks get weight 0
        w = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if list(x.shape) != largest:
        x = _pad_to(x, largest)
    if w is not None:
        w = _pad_to(w.to(torch.uint8), largest[:-1])
    return x, w


def _gather_bucket(
    bucket: list[tuple[Hashable, Tensor, Tensor | None]], rank: int, world: int
) -> Iterator[tuple[Hashable, tuple[Tensor, Tensor | None]]]:
    features = [x for _, x, _ in bucket]
    weights = [w for _, _, w in bucket if w is not None]
    outputs = _GatherBucket.apply(rank, world, len(features), *features, *weights)
    gathered, gathered_weights = iter(outputs[: len(features)]), iter(outputs[len(features) :])
    for key, _, w in bucket:
        yield key, (next(gathered), None if w is None else next(gathered_weights).bool())


class _GatherBucket(torch.autograd.Function):
    """Features (the first ``count`` inputs) and uint8 weights, every process's concatenated on
    dim -2 (weights: -1), all sent as the bytes of one buffer in one ``all_gather``.

    Backward: each process's slice of the gradient, times the world size (see the module docstring:
    the gradient of the gathered features is the same on every process).
    """

    @staticmethod
    def forward(ctx: Any, rank: int, world: int, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        import torch.distributed as dist

        raws = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        layout, offset = [], 0
        for raw in raws:
            layout.append((offset, raw.numel()))
            offset += raw.numel() + (-raw.numel() % _ALIGN)
        flat = raws[0].new_zeros(offset)  # each tensor copied in once, at an aligned offset
        for raw, (start, length) in zip(raws, layout, strict=True):
            flat[start : start + length] = raw
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        outputs = []
        for i, (t, (start, length)) in enumerate(zip(tensors, layout, strict=True)):
            pieces = [part[start : start + length].view(t.dtype).view(t.shape) for part in parts]
            outputs.append(torch.cat(pieces, dim=-2 if i < count else -1))
        ctx.rank, ctx.world, ctx.count = rank, world, count
        ctx.samples = [t.shape[-2] for t in tensors[:count]]
        ctx.mark_non_differentiable(*outputs[count:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        out: list[Tensor | None] = [None, None, None]
        for grad, n in zip(grads[: ctx.count], ctx.samples, strict=True):
            out.append(None if grad is None else grad.narrow(-2, ctx.rank * n, n) * ctx.world)
        return (*out, *([None] * (len(grads) - ctx.count)))


def _pad_to(t: Tensor, shape: list[int]) -> Tensor:
    """Zero-pad ``t`` at the end of each dimension up to ``shape`` (differentiable)."""
    pad: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad) if any(pad) else t
