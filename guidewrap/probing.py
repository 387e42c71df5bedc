"""Probing: one forward of a network, recording which candidate layers run and how.

Discovery runs one probe forward and records which candidate modules actually fire, in forward
order, with their output shapes and batch axes; modules that never run (a fused fast path, an
unused branch) are therefore never planned. The probe also finds each layer's facts that matching
and capture need: a real output head, an output that another layer returns too, an output the
network changes in place afterwards, a layer with no trainable parameter upstream, another axis
folded into the batch, a decoder layer of an encoder-decoder. It changes no buffer and no RNG state.

Examples:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
    >>> x = torch.randn(6, 4)
    >>> [(i.name, i.in_place, i.head) for i in probe(net, lambda: net(x), 6, None, (torch.nn.Linear,))]
    [('0', True, False), ('2', False, True)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .capture import extract, find_batch_dim, is_channels_first
from .discovery import _LINEAR_LIKE, LayerInfo, _batch_first_hint, _is_candidate, base_layer, layer_type
from .errors import PlanError

__all__ = ["describe", "probe"]


@contextlib.contextmanager
def _no_side_effects(model: nn.Module) -> Iterator[None]:
    """Run a probe forward without changing buffers (BatchNorm stats, quantization observers) or the
    global RNG. A buffer that changes shape in the forward (an observer's per-channel range starts
    empty) is resized back; a lazy module's buffers are kept as its first forward initialised them."""
    saved: list[tuple[Tensor, Tensor]] = []
    lazy = []
    for module in model.modules():
        if any(nn.parameter.is_lazy(b) for b in module._buffers.values() if b is not None):
            # materialised by the module's own pre-hook: kept as initialised, before its forward uses them
            lazy.append(module.register_forward_pre_hook(_keep_initialised(saved), prepend=False))
        saved += [
            (b, b.detach().clone()) for b in module._buffers.values() if b is not None and not nn.parameter.is_lazy(b)
        ]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for handle in lazy:
            handle.remove()
        with torch.no_grad():
            for buffer, value in saved:
                if buffer.shape != value.shape:
                    buffer.resize_(value.shape)
                buffer.copy_(value)


def _keep_initialised(saved: list[tuple[Tensor, Tensor]]) -> Callable[..., None]:
    def snapshot(module: nn.Module, _args: Any) -> None:
        known = {id(b) for b, _ in saved}
        saved.extend((b, b.detach().clone()) for b in module._buffers.values() if b is not None and id(b) not in known)

    return snapshot


def probe(
    model: nn.Module,
    run: Callable[[], Any],
    n: int,
    names: Sequence[str] | None,
    layer_types: Sequence[type[nn.Module] | str],
    input_axis: int = 0,
) -> list[LayerInfo]:
    """Record, in firing order, the layers of ``model`` that run during ``run()``.

    ``names`` restricts the candidates to those modules; otherwise every module of a type in
    ``layer_types`` is a candidate. ``input_axis`` (the input's batch axis) breaks ties between
    output dimensions of size ``n``. Also marks each layer that is a real output head (a
    linear layer whose output the model returns) and skips a layer whose output is the very
    tensor a later-finishing layer returns (a post-norm block and its final norm). Hooks are
    always removed.
    """
    candidates = _candidates(model, names, layer_types)
    record = _Recorder(model, n, input_axis)
    handles = [m.register_forward_hook(record.hook(name, m)) for name, m in candidates.items()]
    handles.append(nn.modules.module.register_module_forward_hook(record.on_any_forward))
    try:
        with _no_side_effects(model):
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    if not record.seen and names is None and "" not in candidates:
        if _is_candidate(model, layer_types):  # a bare MultiheadAttention computes without its out_proj module
            return probe(model, run, n, [""], layer_types, input_axis)
        raise PlanError(_none_ran(model, run, candidates))
    return record.finish(result)


def _candidates(
    model: nn.Module, names: Sequence[str] | None, layer_types: Sequence[type[nn.Module] | str]
) -> dict[str, nn.Module]:
    """The modules a probe hooks: the named ones, or every module of ``layer_types`` (an adapter
    wrapper as its base layer, nothing inside it), or a bare layer that is the whole model."""
    modules = dict(model.named_modules())
    if names is not None:
        return {name: modules[name] for name in names}
    candidates = {name: m for name, m in modules.items() if name and _is_candidate(m, layer_types)}
    wrappers = [name for name in candidates if base_layer(modules[name]) is not modules[name]]
    candidates = {
        name: m for name, m in candidates.items() if not any(name.startswith(w + ".") for w in wrappers)
    }  # inside an adapter: its base layer alone, or the adapter's rank-r parts, are not the adapted layer
    if not candidates and _is_candidate(model, layer_types):
        candidates = {"": model}  # a bare layer as the whole model (nn.LSTM, nn.Linear): itself
    return candidates


class _Recorder:
    """What one probe forward saw: each layer's description, its latest output tensor, the order in
    which layers returned, and each output's version counter when it returned."""

    def __init__(self, model: nn.Module, n: int, input_axis: int) -> None:
        self.model, self.n, self.input_axis = model, n, input_axis
        self.seen: dict[str, LayerInfo] = {}
        self.last: dict[str, Tensor] = {}  # each layer's latest output tensor, for the identity checks
        self.finished: dict[str, None] = {}  # names in the order their (last) call returned
        self.versions: list[tuple[str, Tensor, int]] = []
        # Whether a module owning a trainable parameter has returned yet (forward order): a layer is
        # trainable when one has, at or before it. Read from the order, not from requires_grad, so that
        # activation checkpointing (a region run without gradients) and an input made to require grad
        # (transformers' enable_input_require_grads) do not change the plan.
        self.owners = {id(m) for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
        self.trainable_seen = False
        self.judges_trainable = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        # An encoder-decoder's encoder, its outputs, and each layer's first input: a decoder layer that
        # reads the encoder's output (cross-attention keys and values) runs over the source positions.
        modules = dict(model.named_modules())
        self.encoders = {id(m) for name, m in modules.items() if _sibling(name, "encoder", "decoder") in modules}
        self.encoder_outputs: list[Tensor] = []
        self.inputs: dict[str, tuple[int, int] | None] = {}

    def on_any_forward(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        if id(module) in self.owners:
            self.trainable_seen = True
        if id(module) in self.encoders:
            self.encoder_outputs.extend(_float_tensors(output))

    def hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        def on_output(_module: nn.Module, inputs: Any, output: Any) -> None:
            if name not in self.inputs:
                self.inputs[name] = next((_storage_key(t) for t in _float_tensors(inputs)), None)
            self.record(name, module, output)

        return on_output

    def record(self, name: str, module: nn.Module, output: Any) -> None:
        tensor = extract(output)[0]
        if tensor is not None:
            self.last[name] = tensor
            if not tensor.is_inference():  # inference tensors (the guide's probe) have no counter
                self.versions.append((name, tensor, tensor._version))
        self.finished.pop(name, None)
        self.finished[name] = None
        info = describe(self.model, name, module, output, self.n, self.input_axis)
        if name not in self.seen:
            if self.judges_trainable:
                info.trainable = self.trainable_seen  # a trainable parameter ran at or before it, or not
            self.seen[name] = info
            return
        first = self.seen[name]
        first.calls += 1
        if first.skip_reason is None and (info.shape, info.batch_dim) != (first.shape, first.batch_dim):
            # Calls are stacked as a sequence (alignment.stack_calls): that needs one layout for all.
            first.skip_reason = (
                f"runs {first.calls}+ times per forward with different output layouts ({first.shape}, batch axis "
                f"{first.batch_dim}, then {info.shape}, batch axis {info.batch_dim}); align a module that runs "
                "once per forward, or wrap each call in its own module"
            )

    def finish(self, result: Any) -> list[LayerInfo]:
        """The layers in firing order, with the facts only the whole forward shows."""
        modules = dict(self.model.named_modules())
        returned = {_storage_key(t) for t in _float_tensors(result)}
        changed = {name for name, tensor, version in self.versions if tensor._version != version}
        encoder_decoder = _is_encoder_decoder(self.model)
        from_encoder = {_storage_key(t) for t in self.encoder_outputs}
        infos = list(self.seen.values())
        for info in infos:
            tensor = self.last.get(info.name)
            info.in_place = info.name in changed
            over_source = self.inputs.get(info.name) in from_encoder  # cross-attention keys / values
            info.decoder = encoder_decoder and "decoder" in info.name.split(".") and not over_source
            info.head = (
                tensor is not None
                and info.calls == 1
                and _is_candidate(modules[info.name], _LINEAR_LIKE)
                and _storage_key(tensor) in returned
            )
            if info.calls > 1 and info.skip_reason is None and info.shape is not None:
                info.shape = (info.shape[0], info.calls, *info.shape[1:])  # the calls, stacked as a sequence
                info.channels_first = False
        _skip_same_tensor(infos, self.last, self.finished)
        return _agree(infos)


def _none_ran(model: nn.Module, run: Callable[[], Any], candidates: Mapping[str, nn.Module]) -> str:
    """Why no layer can be planned when no candidate ran: the candidates, and what ran instead."""
    ran: dict[str, None] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            ran[name] = None

        return hook

    leaves = {name: m for name, m in model.named_modules() if next(m.children(), None) is None}
    handles = [m.register_forward_hook(record(name)) for name, m in leaves.items()]
    try:
        with _no_side_effects(model):
            run()
    finally:
        for handle in handles:
            handle.remove()
    listed = ", ".join(f"{name or '(the model)'} ({layer_type(leaves[name])})" for name in list(ran)[:6])
    where = (
        f"{len(candidates)} modules of those types exist ({', '.join(list(candidates)[:3])}) but none ran"
        if candidates
        else "it has none"
    )
    return (
        f"nothing to align: no layer of the types guidance aligns ran in the forward of {type(model).__name__} "
        f"({where}). The modules "
        f"that ran: {listed or 'none'}. Choose its layers by name, layers={{'target': [...], 'guide': [...]}}, or "
        "by type, layer_types=(nn.Embedding, ...)"
    )


def _is_encoder_decoder(model: nn.Module) -> bool:
    """A Hugging Face encoder-decoder (``config.is_encoder_decoder``), or a model with an ``encoder``
    and a ``decoder`` of its own."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return True
    children = dict(model.named_children())
    return isinstance(children.get("encoder"), nn.Module) and isinstance(children.get("decoder"), nn.Module)


def _sibling(name: str, last: str, sibling: str) -> str | None:
    """``a.b.sibling`` for ``a.b.last`` (None when ``name`` does not end in ``last``)."""
    head, _, tail = name.rpartition(".")
    if tail != last:
        return None
    return f"{head}.{sibling}" if head else sibling


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.dtype.itemsize)
    except (RuntimeError, NotImplementedError):  # tensors without storage (functional wrappers)
        return (id(tensor), 0)


def _float_tensors(value: Any) -> Iterator[Tensor]:
    """Every floating-point tensor in a (nested) model output."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _float_tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_tensors(item)


def _skip_same_tensor(infos: list[LayerInfo], last: dict[str, Tensor], finished: dict[str, None]) -> None:
    """Of layers whose outputs are one and the same tensor (a post-norm ``TransformerEncoderLayer``
    returns its ``norm2``'s output), keep the one that returns last (the outer module)."""
    order = {name: i for i, name in enumerate(finished)}
    groups: dict[tuple[Any, ...], list[LayerInfo]] = {}
    for info in infos:
        tensor = last.get(info.name)
        if tensor is None or info.skip_reason is not None:
            continue
        key = (*_storage_key(tensor), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), info.calls)
        groups.setdefault(key, []).append(info)
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda i: order.get(i.name, -1))
        keep = group[-1]
        for info in group[:-1]:
            info.skip_reason = f"its output is the same tensor as {keep.name!r}'s, which is planned instead"


def _agree(infos: list[LayerInfo]) -> list[LayerInfo]:
    """Agreement across layers: a 3-D output whose batch axis is ambiguous (sequence length equal
    to the batch size, no declared layout) takes the axis that the model's declaring layers use
    (the input projection of a sequence-first transformer is (T, n, d) like its layers)."""
    declared = {i.declared[0] for i in infos if i.declared is not None}
    if len(declared) != 1:
        return infos
    axis = declared.pop()
    for info in infos:
        if info.folded is not None and info.folded == axis and info.shape is not None:
            # A sequence-first model ((T, n, d) with T a multiple of n): the declared layout, not a fold.
            shape = list(info.shape)
            shape.insert(0, shape.pop(axis))
            info.shape, info.batch_dim, info.skip_reason, info.folded = tuple(shape), axis, None, None
    for info in infos:
        if info.ambiguous and info.batch_dim != axis and info.shape is not None and len(info.shape) == 3:
            info.batch_dim = axis  # the sizes are equal, so the batch-first shape is unchanged
    return infos


def _folded(tensor: Tensor, n: int, input_axis: int) -> bool:
    """Whether the input's batch axis holds a multiple of the batch in this output: samples times
    frames (video folded into the batch) or times windows (Swin's attention), sample-major or not."""
    if tensor.dim() <= input_axis or n < 1:
        return False
    rows = int(tensor.shape[input_axis])
    return rows > n and rows % n == 0


def describe(model: nn.Module, name: str, module: nn.Module, output: Any, n: int, input_axis: int = 0) -> LayerInfo:
    """LayerInfo for one output of ``module`` given a batch of ``n`` samples."""
    kind = layer_type(base_layer(module))
    tensor, lengths = extract(output)
    if tensor is None:
        return LayerInfo(name, kind, None, skip_reason=f"output of type {type(output).__name__} holds no float tensor")
    hint = True if lengths is not None else _batch_first_hint(model, name)
    declared = None
    if hint is not None and lengths is None and tensor.dim() == 3:
        axis = 0 if hint else 1
        declared = (axis, int(tensor.shape[axis]))
    batch_dim = find_batch_dim(tensor, n, hint, input_axis)
    if hint is None and _folded(tensor, n, input_axis):
        k = tensor.shape[input_axis] // n
        return LayerInfo(
            name, kind, tuple(tensor.shape), skip_reason=f"its output {tuple(tensor.shape)} holds {k} x {n} rows on "
            f"the batch axis {input_axis}: another axis (frames, windows, crops) is folded into the batch, so a size "
            f"{n} elsewhere is a coincidence, not the batch; align a layer where the fold is undone (layers=...)",
            folded=batch_dim,
        )  # fmt: skip
    if batch_dim is None:
        return LayerInfo(
            name, kind, tuple(tensor.shape), skip_reason=f"no batch dimension of size {n} in output shape "
            f"{tuple(tensor.shape)}", declared=declared
        )  # fmt: skip
    if tensor.dim() < 2:
        return LayerInfo(
            name, kind, tuple(tensor.shape), skip_reason=f"1-D output {tuple(tensor.shape)}: no per-sample "
            "features (is the input batched? guidance needs (n, ...) inputs)"
        )  # fmt: skip
    shape = tuple(tensor.movedim(batch_dim, 0).shape)
    channels_first = is_channels_first(module)
    ambiguous = hint is None and sum(size == n for size in tensor.shape) > 1
    return LayerInfo(
        name, kind, shape, batch_dim=batch_dim, channels_first=channels_first, declared=declared, ambiguous=ambiguous
    )
