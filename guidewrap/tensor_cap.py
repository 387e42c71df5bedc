"""The term's pull tensor by tensor: a cap that keeps the term from owning a tensor's step, and the
warning that says when it does.

Adam (like every per-parameter adaptive optimizer) scales each tensor's step by that tensor's own
gradient history, so in a tensor where the task's gradient is tiny the alignment term sets the whole
step however small its share of the global gradient. The *tensor pull* of a trainable tensor is the
norm of the term's gradient in it over the norm of the task loss's gradient in it.

With ``tensor_cap=c`` the term's gradient in every trainable tensor of the target is scaled so that
its tensor pull is at most ``c``, from the ``tensor_cap_after``-th guided step on (before it the term
acts uncapped: the early, strong pull is where guidance makes its gains). When the cap first binds on
a tensor, that tensor's optimizer state (Adam's moments, SGD's momentum) is cleared: it remembers the
term's large gradients for about ``1 / (1 - beta2)`` steps and would keep shrinking the task's steps.
On a capped step both gradients are taken apart (``torch.autograd.grad`` of the task loss and of the
term, over every leaf they reach) and the loss returned carries their capped sum as its gradient, so
any loop that calls ``loss.backward()`` trains on it.

Without a cap, the tensor pulls are measured once, after ``tensor_cap_after`` guided steps (default
100), and a term that still exceeds the task's gradient by over 100 times in some tensor warns, naming
those tensors: the first steps may be dominated (the demo's are), a domination that persists is what
holds a network in its vanishing-gradient regime.

Examples:
    >>> import torch
    >>> layer = torch.nn.Linear(3, 1)
    >>> x = torch.randn(8, 3)
    >>> task, term = layer(x).mean(), 50 * layer(x).pow(2).mean()
    >>> cap = TensorCap(cap=0.5, after=0)
    >>> total = cap.total(task, term, layer, [])
    >>> w = torch.autograd.grad(total, layer.weight)[0]
    >>> g_task = torch.autograd.grad(task, layer.weight, retain_graph=True)[0]
    >>> round(float((w - g_task).norm() / g_task.norm()), 4)  # the term's share held at 0.5
    0.5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import mean_over_processes
from .errors import ConfigError, GuidewrapWarning

__all__ = ["TensorCap", "PERSISTENT_PULL"]

# A tensor pull this far above 1 after the first steps means the term owns the tensor's step.
PERSISTENT_PULL = 100.0


class TensorCap:
    """Per-tensor pulls of the alignment term: measured, capped at ``cap`` from guided step ``after``
    on (``cap=None``: measured once at step ``after``, and warned about when over
    :data:`PERSISTENT_PULL`).

    ``steps`` counts guided steps whose task loss was known; ``capped`` and ``largest`` are the number
    of tensors the cap bound and the largest tensor pull (before the cap) on the last measured step;
    ``cleared`` names the tensors whose optimizer state was cleared when the cap first bound on them.
    """

    def __init__(self, cap: float | None, after: int) -> None:
        self.cap, self.after = cap, after
        self.steps = 0
        self.capped: int | None = None
        self.largest: float | None = None
        self.cleared: list[str] = []
        self.factors: dict[str, float] = {}  # the last capped step's scale of the term, by tensor (1: uncapped)
        self.checked = False  # without a cap: the one persistence check is done
        self._warned_no_optimizer = False

    def capping(self) -> bool:
        """Whether the next step with a task loss is capped."""
        return self.cap is not None and self.steps >= self.after

    def total(self, task_loss: Tensor, term: Tensor, target: nn.Module, optimizers: Sequence[Any]) -> Tensor:
        """``task_loss + term``, with the term's gradient capped per tensor when the cap is in force
        (``optimizers``: whose state of a newly capped tensor is cleared). Counts one guided step."""
        if torch.compiler.is_compiling():
            if self.cap is not None:
                raise ConfigError(
                    "tensor_cap takes the task's and the term's gradients apart, which cannot happen inside a compiled "
                    "forward: pass add_to_output_loss=False and give the loss to guided.total_loss(outputs.loss) "
                    "outside the compiled model"
                )
            return task_loss + term
        if not (task_loss.requires_grad and term.requires_grad):
            return task_loss + term  # a forward without gradients (no_grad, eval) is not a step
        capping = self.capping()
        self.steps += 1
        if not capping:
            if self.cap is None and not self.checked and self.steps == self.after + 1:
                self.checked = True
                named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
                self._warn_if_persistent(named, *_tensor_norms(task_loss, term, [p for _, p in named]))
            return task_loss + term
        named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
        leaves = _leaves(task_loss, term)
        g_task, g_term = _gradients(task_loss, term, leaves)
        where = {id(p): i for i, p in enumerate(leaves)}
        rows = [where.get(id(p)) for _, p in named]
        task_norms, term_norms = (
            _norms([g_task[i] if i is not None else None for i in rows]),
            _norms([g_term[i] if i is not None else None for i in rows]),
        )
        factors = [1.0] * len(leaves)
        pulls = []
        for (name, param), i, task_norm, term_norm in zip(named, rows, task_norms, term_norms, strict=True):
            if i is None or term_norm == 0:
                continue
            pull = term_norm / task_norm if task_norm > 0 else math.inf
            pulls.append(pull)
            if pull > self.cap:
                factors[i] = self.cap / pull  # 0 where the task has no gradient at all
                if name not in self.cleared:
                    self.cleared.append(name)
                    self._clear(param, optimizers)
        self.factors = {name: factors[i] for (name, _), i in zip(named, rows, strict=True) if i is not None}
        self.capped = sum(f < 1 for f in factors)
        self.largest = max(pulls, default=0.0)
        return _WithGradients.apply((task_loss + term).detach(), _capped_sums(g_task, g_term, factors), *leaves)

    def _clear(self, param: Tensor, optimizers: Sequence[Any]) -> None:
        """Forget the optimizer state of a tensor the cap now binds on (its moments remember the term's
        gradients); without an optimizer to clear, say so once."""
        for opt in optimizers:
            opt.state.pop(param, None)
        if not optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            warnings.warn(
                "tensor_cap binds on a tensor whose optimizer state should be cleared (Adam's moments remember the "
                "term's gradients and keep shrinking the task's steps), but guidance knows no optimizer: pass "
                "optimizer=your_optimizer to GuidedModel / Guidance",
                GuidewrapWarning,
                stacklevel=4,
            )

    def values(self) -> dict[str, float]:
        """What to log: tensors capped on the last measured step and the largest tensor pull before the cap."""
        out = {} if self.capped is None else {"guidance_tensors_capped": float(self.capped)}
        return out | ({} if self.largest is None else {"guidance_max_tensor_pull": self.largest})

    def _warn_if_persistent(self, named: list[tuple[str, Tensor]], task: list[float], term: list[float]) -> None:
        names = [n for n, _ in named]
        pulls = [(t / k if k > 0 else math.inf, n) for n, k, t in zip(names, task, term, strict=True) if t > 0]
        self.largest = max((p for p, _ in pulls), default=0.0)
        held = sorted((p for p in pulls if p[0] > PERSISTENT_PULL), reverse=True)
        if not held:
            return
        worst, name = held[0]
        warnings.warn(
            f"after {self.after} guided steps the alignment term's gradient is still over {PERSISTENT_PULL:g} times "
            f"the task loss's in {len(held)} of {len(pulls)} trainable tensors (worst: {name!r}, {worst:.3g} times): "
            "there the term sets the optimizer's step and the task's own gradient cannot grow (measured: a plain "
            "ConvNet held at chance; docs/results.md 'Per-tensor pull'). Pass tensor_cap=1 to cap the term's "
            "gradient in each tensor at the task's after the first steps, or compare with a run without guidance",
            GuidewrapWarning,
            stacklevel=2,
        )

    def state_dict(self) -> dict[str, Any]:
        """The cap's state (a resumed run continues it exactly)."""
        return {"steps": self.steps, "cleared": list(self.cleared), "checked": self.checked,
                "capped": self.capped, "largest": self.largest}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.steps, self.cleared = int(state["steps"]), list(state["cleared"])
        self.checked, self.capped, self.largest = bool(state["checked"]), state.get("capped"), state.get("largest")


class _WithGradients(torch.autograd.Function):
    """A loss whose value is given and whose gradient is given, leaf by leaf (times the incoming
    gradient, so loss scaling and accumulation divisors apply as to any loss)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: list[Tensor | None], *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if grad.device.type == "cpu" and float(grad) == 1.0:  # loss.backward() itself: no pass over the grads
            return (None, None, *ctx.grads)
        return (None, None, *(None if g is None else g * grad.to(g.dtype) for g in ctx.grads))


def _capped_sums(task: Sequence[Tensor | None], term: Sequence[Tensor | None], factors: Sequence[float]) -> list:
    """``task + factor * term`` per leaf (the term scaled first, then added: the study's arithmetic)."""
    out = []
    for a, b, factor in zip(task, term, factors, strict=True):
        if b is None or factor == 0:
            out.append(a)
            continue
        b = b if factor == 1 else b * factor
        out.append(b if a is None else a + b)
    return out


def _norms(grads: Sequence[Tensor | None]) -> list[float]:
    """Each gradient's norm (0 for none), computed in float64."""
    return [0.0 if g is None else float(g.detach().double().norm()) for g in grads]


def _leaves(*losses: Tensor) -> list[Tensor]:
    """Every leaf tensor requiring grad that ``losses`` depend on (the target's parameters and any other
    leaf of the user's loss), in a fixed order."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [loss.grad_fn for loss in reversed(losses) if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.setdefault(id(variable), variable)
            continue
        stack.extend(child for child, _ in reversed(node.next_functions))
    return list(found.values())


def _gradients(task_loss: Tensor, term: Tensor, leaves: Sequence[Tensor]) -> tuple[list[Any], list[Any]]:
    """Both losses' gradients over ``leaves``; in a data-parallel run, as applied (averaged over the
    processes), so every process caps alike and as one process would on the global batch."""
    return applied_gradient(task_loss, leaves), applied_gradient(term, leaves)


def applied_gradient(loss: Tensor, leaves: Sequence[Tensor]) -> list[Any]:
    """``loss``'s gradient over ``leaves`` (None where unused; the graph kept), averaged over the processes
    of a data-parallel run as DDP applies it."""
    return mean_over_processes(torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True), leaves)


def _tensor_norms(task_loss: Tensor, term: Tensor, params: Sequence[Tensor]) -> tuple[list[float], list[float]]:
    """Each tensor's gradient norm from the task loss and from the term (as applied, see _gradients)."""
    g_task, g_term = _gradients(task_loss, term, params)
    return _norms(g_task), _norms(g_term)
