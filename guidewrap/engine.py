"""The guidance engine shared by :class:`~guidewrap.GuidedModel` and :class:`~guidewrap.Guidance`.

Per guided forward: the frozen guide runs once under ``torch.inference_mode``; a hook on each
planned guide layer reduces its activation to what the metric needs (a centred Gram or
centred features for CKA) and keeps nothing else. The target runs once, normally; hooks on
its planned layers keep a reference to their outputs; after the forward the per-pair
distances are summed into the weighted alignment term. Outside the guidance window the guide
is not run and, once the window is over, the target's hooks are removed.

Examples:
    >>> import torch
    >>> from guidewrap.config import GuidanceConfig
    >>> target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> guide = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    >>> engine = GuidanceEngine(target, guide, GuidanceConfig())
    >>> x = torch.randn(16, 4)
    >>> engine.begin((x,), {})
    True
    >>> out = engine.end(target(x), {})
    >>> sorted(engine.last_alignment)
    ['0<-0']
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .capture import extract, features, lengths_to_mask
from .config import GuidanceConfig
from .errors import (
    BatchSizeMismatchError,
    ConfigError,
    GuideRequiresGradError,
    LayerNotFoundError,
    MetricError,
    PlanNotReadyError,
    SkippedPairWarning,
)
from .inputs import first_tensor, fit_call, make_noise, normalize_call, vocab_size_of
from .layers import DEFAULT_LAYER_TYPES, LayerPlan, build_plan, probe, resolve_names
from .utils import unwrap_model

__all__ = ["GuidanceEngine"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


class GuidanceEngine:
    """Hooks, guide forward, alignment maths and step counting for one target/guide pair.

    Users normally reach it through :class:`~guidewrap.GuidedModel` or
    :class:`~guidewrap.Guidance`; integrations drive it directly.

    Examples:
        >>> import torch
        >>> from guidewrap.config import GuidanceConfig
        >>> t, g = torch.nn.Linear(3, 3), torch.nn.Linear(3, 5)
        >>> engine = GuidanceEngine(t, g, GuidanceConfig(exclude_output_layer=False, until_step=1))
        >>> engine.step(); engine.step_count
        1
    """

    def __init__(self, target: nn.Module, guide: nn.Module, config: GuidanceConfig, optimizer: Any = None) -> None:
        for role, model in (("target", target), ("guide", guide)):
            if not isinstance(model, nn.Module):
                raise ConfigError(f"the {role} must be a torch.nn.Module, got {type(model).__name__}")
        self.target = unwrap_model(target)
        self.guide = unwrap_model(guide)
        if self.target is self.guide:
            raise ConfigError("the guide must be a separate network from the target (pass a copy to self-guide)")
        self.config = config
        self.metric = config.metric
        self.schedule = config.schedule()
        self.layer_types = tuple(config.layer_types) if config.layer_types is not None else DEFAULT_LAYER_TYPES
        self._freeze_guide()
        self._names = self._validate_names()
        self.step_count = 0
        self.on_step: Callable[[int], None] | None = None
        self.output_loss_scale: Callable[[Mapping[str, Any]], float] | None = None
        self._plan: LayerPlan | None = None
        self._layer_hooks: list[RemovableHandle] = []
        self._optimizer_hooks: list[RemovableHandle] = []
        self._capturing = False
        self.busy = False  # set while the engine itself runs the target (probe, noise pass)
        self._target_out: dict[str, Any] = {}
        self._feature_subsets: dict[tuple[str, str, int], Tensor] = {}
        self._prepared: dict[tuple[str, str], Any] = {}
        self._mask: Tensor | None = None
        self._pending: Call | None = None
        self._loss: Tensor | None = None
        self.last_alignment: dict[str, float] = {}
        self.counters = {"guided_forwards": 0, "guide_forwards": 0, "skipped_pairs": 0}
        self.closed = False
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ set-up

    def _freeze_guide(self) -> None:
        trainable = [name for name, p in self.guide.named_parameters() if p.requires_grad]
        if trainable and self.config.strict_guide:
            raise GuideRequiresGradError(
                f"the guide has {len(trainable)} parameters that require gradients (e.g. {trainable[0]!r}) and "
                "strict_guide=True; call guide.requires_grad_(False) first or drop strict_guide"
            )
        self.guide.requires_grad_(False)
        self.guide.eval()

    def _validate_names(self) -> dict[str, list[str] | None]:
        """Resolve explicit names/patterns now, so a typo fails before any training."""
        layers = self.config.layers
        if layers == "auto":
            return {"target": None, "guide": None}
        if isinstance(layers, list):
            out: dict[str, list[str] | None] = {}
            for side, model, names in (
                ("target", self.target, [t for t, _ in layers]),
                ("guide", self.guide, [g for _, g in layers]),
            ):
                valid = {name for name, _ in model.named_modules() if name}
                for name in names:
                    if name not in valid:
                        resolve_names(model, [name], side)  # raises with close matches
                        raise LayerNotFoundError(f"{side} layer {name!r} must be an exact name, not a pattern")
                out[side] = list(dict.fromkeys(names))
            return out
        return {
            side: None if layers[side] == "auto" else resolve_names(model, layers[side], side)
            for side, model in (("target", self.target), ("guide", self.guide))
        }

    def attach_optimizer(self, optimizer: Any) -> None:
        """Count guidance steps from ``optimizer.step()`` calls (via its step post-hook).

        Wrappers such as Accelerate's ``AcceleratedOptimizer`` are unwrapped, so steps skipped
        during gradient accumulation are not counted.
        """
        opt = optimizer
        while not isinstance(opt, torch.optim.Optimizer) and isinstance(getattr(opt, "optimizer", None), object):
            inner = getattr(opt, "optimizer", None)
            if inner is None or inner is opt:
                break
            opt = inner
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}"
            )
        self._optimizer_hooks.append(opt.register_step_post_hook(lambda *_: self.step()))

    # ------------------------------------------------------------------ steps and state

    def step(self) -> None:
        """Advance the optimizer-step counter that drives the window and the decay."""
        self.step_count += 1
        if self.on_step is not None:
            self.on_step(self.step_count)
        if self.schedule.is_finished(self.step_count):
            self._remove_layer_hooks()

    def set_step(self, step: int) -> None:
        """Set the counter, e.g. when resuming (hooks of a finished window are dropped)."""
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}")
        self.step_count = step
        if self.schedule.is_finished(step):
            self._remove_layer_hooks()

    def state_dict(self) -> dict[str, Any]:
        """Resumable state: the step counter and counters."""
        return {"step": self.step_count, "counters": dict(self.counters)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.set_step(int(state["step"]))
        self.counters.update(state.get("counters", {}))

    @property
    def weight(self) -> float:
        """Current weight of the alignment term (0 outside the window)."""
        return self.schedule.weight_at(self.step_count)

    @property
    def alignment_loss(self) -> Tensor:
        """Weighted alignment term of the last forward (0 when guidance was off)."""
        return self._loss if self._loss is not None else torch.zeros(())

    @property
    def has_term(self) -> bool:
        """Whether the last forward was guided (its alignment term is available)."""
        return self._loss is not None

    @property
    def hook_count(self) -> int:
        """Hooks this engine holds on the target's layers and on optimizers."""
        return len(self._layer_hooks) + len(self._optimizer_hooks)

    def metrics(self) -> dict[str, float]:
        """Values to log: loss, weight, skipped pairs and per-pair alignment of the last forward."""
        out = {
            "guidance_loss": float(self.alignment_loss.detach()),
            "guidance_weight": self.weight,
            "guidance_skipped_pairs": float(self.counters["skipped_pairs"]),
        }
        out.update({f"guidance_align/{key}": value for key, value in self.last_alignment.items()})
        return out

    # ------------------------------------------------------------------ forward protocol

    def is_active(self) -> bool:
        """Whether the next forward is guided (training mode, inside the window)."""
        return not self.closed and self.target.training and self.schedule.is_active(self.step_count)

    def begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        """Call before the target's forward. Runs the guide; returns whether this forward is guided."""
        if self.busy:
            return False
        self._reset()
        if not self.is_active():
            if self.schedule.is_finished(self.step_count):
                self._remove_layer_hooks()
            return False
        kwargs = dict(kwargs)
        if self.config.guide_inputs == "noise":
            self._pending = (tuple(args), kwargs)
            return True
        self._prepare_guide(tuple(args), kwargs)
        self._capturing = True
        return True

    def end(self, output: Any, kwargs: Mapping[str, Any]) -> Any:
        """Call after the target's forward with its output; adds the term to ``output.loss``."""
        if self.busy:
            return output
        self._capturing = False
        if self._pending is not None:
            args, pkwargs = self._pending
            self._pending = None
            noise = self._noise_call(args, pkwargs)
            self._loss = self._aligned_forward(*noise, weight=self.weight)
        elif self._prepared:
            self._loss = self._compute(self.weight)
            self.counters["guided_forwards"] += 1
        else:
            return output
        if self.config.add_to_output_loss:
            scale = self.output_loss_scale(kwargs) if self.output_loss_scale is not None else 1.0
            output = _add_to_loss(output, self._loss * scale)
        return output

    def abort(self) -> None:
        """Forget a forward that raised."""
        self._reset()

    def _reset(self) -> None:
        self._capturing = False
        self._pending = None
        self._loss = None
        self._target_out.clear()
        self._prepared.clear()
        self._mask = None

    # ------------------------------------------------------------------ plan

    def plan(self, args: tuple[Any, ...] | None = None, kwargs: Mapping[str, Any] | None = None) -> LayerPlan:
        """The layer plan; resolved from an example input if one is given."""
        if args or kwargs:
            self._resolve_plan(tuple(args or ()), dict(kwargs or {}))
        if self._plan is None:
            raise PlanNotReadyError(
                "the layer plan is resolved from a forward pass: call plan(example_input) (the same arguments "
                "you pass to the target), or run one training forward first"
            )
        return self._plan

    def _resolve_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = self._batch_size(args, kwargs)
        g_args, g_kwargs = self._guide_call(args, kwargs, n)
        self._ensure_guide_device(args, kwargs)
        self.busy = True
        try:
            with torch.no_grad():
                t_layers = probe(
                    self.target, lambda: self.target(*args, **kwargs), n, self._names["target"], self.layer_types
                )
            with torch.inference_mode():
                g_layers = probe(
                    self.guide, lambda: self.guide(*g_args, **g_kwargs), n, self._names["guide"], self.layer_types
                )
        finally:
            self.busy = False
        for side, infos in (("target", t_layers), ("guide", g_layers)):
            wanted = self._names[side]
            if wanted is not None:  # keep the user's order for explicit lists, firing order otherwise
                missing = [w for w in wanted if w not in {i.name for i in infos}]
                if missing and isinstance(self.config.layers, list):
                    from .errors import NoBatchDimensionError

                    raise NoBatchDimensionError(f"{side} layer {missing[0]!r} did not run during the forward pass")
        self._plan = build_plan(
            t_layers, g_layers, self.config.layers, self.config.sequence, self.config.exclude_output_layer
        )
        self._remove_layer_hooks()

    # ------------------------------------------------------------------ guide side

    def _batch_size(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
        tensor = first_tensor(args, kwargs)
        if tensor is None:
            raise ConfigError("guidance needs a tensor input to find the batch size, but the forward got none")
        if tensor.dim() <= self.config.input_batch_dim:
            raise ConfigError(
                f"input_batch_dim={self.config.input_batch_dim} but the first input has shape {tuple(tensor.shape)}"
            )
        return int(tensor.shape[self.config.input_batch_dim])

    def _guide_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], n: int) -> Call:
        adapter = self.config.guide_inputs
        if callable(adapter):
            g_args, g_kwargs = normalize_call(adapter(*args, **kwargs))
        else:
            g_args, g_kwargs = args, dict(kwargs)
        g_n = self._batch_size(g_args, g_kwargs)
        if g_n != n:
            raise BatchSizeMismatchError(
                f"the guide's input has {g_n} samples but the target's has {n}; CKA compares the same samples, "
                "so a guide_inputs adapter must keep the batch size"
            )
        return fit_call(self.guide.forward, tuple(g_args), g_kwargs)

    def _noise_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Call:
        sizes = [s for s in (vocab_size_of(self.target), vocab_size_of(self.guide)) if s is not None]
        vocab = min(sizes) if sizes else None
        return make_noise(tuple(args), vocab), make_noise(dict(kwargs), vocab)

    def _ensure_guide_device(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        tensor = first_tensor(args, kwargs)
        ref = next(iter(self.guide.parameters()), None)
        if ref is None:
            ref = next(iter(self.guide.buffers()), None)
        if tensor is not None and ref is not None and ref.device != tensor.device:
            self.guide.to(tensor.device)  # the guide follows the data, like the target

    def _prepare_guide(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the guide once and keep, per planned guide layer, only the metric's reduced form."""
        if self._plan is None:
            self._resolve_plan(args, kwargs)
        plan = self._plan
        if plan is None:  # for type checkers; _resolve_plan sets it or raises
            raise PlanNotReadyError("layer plan could not be resolved")
        self._install_layer_hooks()
        n = self._batch_size(args, kwargs)
        mask = kwargs.get(self.config.mask_key)
        self._mask = mask if isinstance(mask, Tensor) else None
        g_args, g_kwargs = self._guide_call(args, kwargs, n)
        g_mask = g_kwargs.get(self.config.mask_key, self._mask)
        g_mask = g_mask if isinstance(g_mask, Tensor) else None
        wanted: dict[str, set[str]] = {}
        for pair in plan:
            wanted.setdefault(pair.guide.name, set()).add(pair.mode)
        modules = dict(self.guide.named_modules())
        infos = {p.guide.name: p.guide for p in plan}
        prepared: dict[tuple[str, str], Any] = {}

        def make_hook(name: str) -> Callable[..., None]:
            info = infos[name]

            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                tensor, lengths = extract(output)
                if tensor is None or info.batch_dim is None:
                    return
                if tensor.shape[info.batch_dim] != n:
                    raise BatchSizeMismatchError(
                        f"guide layer {name!r} produced {tensor.shape[info.batch_dim]} samples for a batch of {n}"
                    )
                layer_mask = g_mask if lengths is None else lengths_to_mask(lengths, tensor.shape[1], tensor.device)
                for mode in wanted[name]:
                    x, w = features(tensor, info.batch_dim, mode, layer_mask, info.channels_first)
                    x = self._subsample(x, ("guide", name))
                    x, w = self._gather(x, w, differentiable=False)
                    prepared[(name, mode)] = self.metric.prepare(x, w)

            return hook

        self._ensure_guide_device(g_args, g_kwargs)
        if self.guide.training:
            self.guide.eval()  # the guide stays in eval mode whatever the caller did
        handles = [modules[name].register_forward_hook(make_hook(name)) for name in wanted]
        try:
            with torch.inference_mode():
                self.guide(*g_args, **g_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        self.counters["guide_forwards"] += 1
        # Out of inference mode: autograd may save these for the target's backward.
        self._prepared = {key: self.metric.clone_prepared(value) for key, value in prepared.items()}

    # ------------------------------------------------------------------ target side

    def _install_layer_hooks(self) -> None:
        if self._layer_hooks or self._plan is None:
            return
        modules = dict(self.target.named_modules())
        names = list(dict.fromkeys(p.target.name for p in self._plan))

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                # Only while this engine captures: recomputation under activation checkpointing
                # runs during backward, after capture has ended, and is not counted twice.
                if self._capturing:
                    self._target_out[name] = output

            return hook

        self._layer_hooks = [modules[name].register_forward_hook(make_hook(name)) for name in names]

    def _remove_layer_hooks(self) -> None:
        for handle in self._layer_hooks:
            handle.remove()
        self._layer_hooks = []

    def _aligned_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], weight: float) -> Tensor:
        """Guide + captured target forward on given inputs; returns the weighted term."""
        self._reset()
        self._prepare_guide(args, kwargs)
        self.busy = True
        self._capturing = True
        try:
            self.target(*args, **kwargs)
        finally:
            self._capturing = False
            self.busy = False
        loss = self._compute(weight)
        if not self.schedule.is_active(self.step_count):
            self._remove_layer_hooks()  # no hook may stay outside the window
        return loss

    def _compute(self, weight: float) -> Tensor:
        assert self._plan is not None  # noqa: S101 - internal invariant, set by _prepare_guide
        plan = list(self._plan)
        results: list[tuple[Tensor, Tensor] | None] = [None] * len(plan)
        missing: set[str] = set()
        shaped: dict[tuple[str, str], tuple[Tensor, Tensor | None]] = {}  # target features, once per layer
        groups: dict[Any, list[int]] = {}
        for i, pair in enumerate(plan):
            raw = self._target_out.get(pair.target.name)
            prepared = self._prepared.get((pair.guide.name, pair.mode))
            tensor, lengths = extract(raw) if raw is not None else (None, None)
            if tensor is None or prepared is None or pair.target.batch_dim is None:
                missing.add(pair.key)
                results[i] = (torch.ones(()), torch.zeros((), dtype=torch.bool))
                continue
            key = (pair.target.name, pair.mode)
            if key not in shaped:
                mask = self._mask if lengths is None else lengths_to_mask(lengths, tensor.shape[1], tensor.device)
                x, w = features(tensor, pair.target.batch_dim, pair.mode, mask, pair.target.channels_first)
                shaped[key] = self._gather(self._subsample(x, ("target", pair.target.name)), w, differentiable=True)
            x, w = shaped[key]
            batch_key = self.metric.batch_key(prepared) if w is None else None
            group = (tuple(x.shape), x.dtype, x.device, batch_key) if batch_key is not None else i
            groups.setdefault(group, []).append(i)
        target_sides: dict[tuple[str, str], Any] = {}  # each target layer is reduced once per forward
        for members in groups.values():
            if len(members) > 1:  # same shapes: one batched problem, n x n work in few kernels
                pairs = [plan[i] for i in members]
                keys = [(p.target.name, p.mode) for p in pairs]
                unique = list(dict.fromkeys(keys))  # a target layer paired with several guide layers
                side = self.metric.prepare_target_many([shaped[k][0] for k in unique])
                if len(unique) < len(keys):
                    positions = {k: i for i, k in enumerate(unique)}
                    index = torch.tensor([positions[k] for k in keys], device=shaped[keys[0]][0].device)
                    side = self.metric.select_target(side, index)
                prepared = self.metric.stack_prepared([self._prepared[(p.guide.name, p.mode)] for p in pairs])
                distance, ok = self.metric.compare(side, prepared, None)
                x = shaped[(pairs[0].target.name, pairs[0].mode)][0]
                self._check_distance(distance, (len(members), *x.shape[:-2]), pairs[0].key)
                for j, i in enumerate(members):
                    results[i] = self._reduce_positions(distance[j], ok[j])
                continue
            pair = plan[members[0]]
            key = (pair.target.name, pair.mode)
            x, w = shaped[key]
            if key not in target_sides:
                target_sides[key] = self.metric.prepare_target(x, w)
            distance, ok = self.metric.compare(target_sides[key], self._prepared[(pair.guide.name, pair.mode)], w)
            self._check_distance(distance, tuple(x.shape[:-2]), pair.key)
            results[members[0]] = self._reduce_positions(distance, ok)
        distances = [r[0] for r in results if r is not None]
        oks = [r[1] for r in results if r is not None]
        device = next((d.device for d in distances if d.requires_grad), distances[0].device)
        stacked = torch.stack([d.to(device) for d in distances])
        ok_all = torch.stack([o.to(device) for o in oks]) & torch.isfinite(stacked.detach())
        loss = weight * torch.where(ok_all, stacked, torch.zeros_like(stacked)).sum()
        values, flags = torch.stack([stacked.detach(), ok_all.to(stacked.dtype)]).cpu().tolist()  # one host sync
        self.last_alignment = {}
        for pair, value, flag in zip(plan, values, flags, strict=True):
            if flag:
                self.last_alignment[pair.key] = 1.0 - value
            else:
                self.counters["skipped_pairs"] += 1
                why = "its target layer did not run" if pair.key in missing else "degenerate or non-finite features"
                warnings.warn(
                    f"guidance pair {pair.key} skipped this step ({why}); it adds nothing to the loss",
                    SkippedPairWarning,
                    stacklevel=4,
                )
        # The autograd graph keeps what the backward needs; holding the captures here would keep a
        # step's activations and guide Grams alive until the next forward (per live wrapper).
        self._target_out.clear()
        self._prepared.clear()
        return loss

    def _subsample(self, x: Tensor, layer: tuple[str, str]) -> Tensor:
        """``max_features`` approximation: keep a fixed random subset of a wide layer's features."""
        limit = self.config.max_features
        if limit is None or x.shape[-1] <= limit:
            return x
        key = (*layer, x.shape[-1])
        index = self._feature_subsets.get(key)
        if index is None or index.device != x.device:
            # Seeded by the layer's name: the same subset every step, on every process.
            seed = zlib.crc32("/".join(map(str, key)).encode())
            gen = torch.Generator().manual_seed(seed)
            index = torch.randperm(x.shape[-1], generator=gen)[:limit].sort().values.to(x.device)
            self._feature_subsets[key] = index
        return x.index_select(-1, index)

    def _check_distance(self, distance: Any, expected: tuple[int, ...], key: str) -> None:
        if not isinstance(distance, Tensor) or tuple(distance.shape) != expected:
            shape = tuple(distance.shape) if isinstance(distance, Tensor) else type(distance).__name__
            raise MetricError(f"metric {self.metric.name!r} returned {shape} for pair {key}; expected a 0-dim tensor")

    @staticmethod
    def _reduce_positions(distance: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        if distance.dim():  # token-wise: mean over the positions that could be measured
            okf = ok.to(distance.dtype)
            distance = torch.where(ok, distance, torch.zeros_like(distance)).sum() / okf.sum().clamp_min(1.0)
            ok = ok.any()
        return distance.float(), ok

    # ------------------------------------------------------------------ distributed

    def _world_size(self) -> int:
        import torch.distributed as dist

        if self.config.distributed != "global" or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size()

    def _gather(self, x: Tensor, w: Tensor | None, differentiable: bool) -> tuple[Tensor, Tensor | None]:
        """Concatenate samples from every process (global-batch CKA); gradients flow back to
        each process's own slice through ``torch.distributed.nn``'s all_gather."""
        world = self._world_size()
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

    # ------------------------------------------------------------------ pre-alignment and evaluation

    def pre_align(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        steps: int,
        lr: float,
        optimizer: torch.optim.Optimizer | None,
    ) -> list[float]:
        """Train the target on the alignment loss alone, on fresh noise shaped like the example."""
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        params = [p for p in self.target.parameters() if p.requires_grad]
        opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
        was_training = self.target.training
        self.target.train()
        history = []
        try:
            for _ in range(steps):
                loss = self._aligned_forward(*self._noise_call(args, kwargs), weight=1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
        finally:
            self.target.train(was_training)
            self._reset()
            self._remove_layer_hooks()  # re-attached by the next guided forward, if any
        return history

    def evaluate(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        """Unweighted sum of pair distances on given inputs, without gradients."""
        try:
            with torch.no_grad():
                value = float(self._aligned_forward(tuple(args), dict(kwargs), weight=1.0))
        finally:
            self._reset()
            self._remove_layer_hooks()  # re-attached by the next guided forward, if any
        return value

    def close(self) -> None:
        """Remove every hook this engine holds."""
        self._remove_layer_hooks()
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []
        self._reset()
        self.closed = True


def _add_to_loss(output: Any, term: Tensor) -> Any:
    """Add ``term`` to ``output.loss`` / ``output["loss"]`` when the output carries a loss."""
    if isinstance(output, Mapping) and output.get("loss") is not None:
        loss = output["loss"]
        output["loss"] = loss + term.to(loss.device, loss.dtype) if isinstance(loss, Tensor) else loss + term  # type: ignore[index]
    return output
