"""The architecture lens: how easily does one network guide another, and which components carry the bias.

For every (target, guide) cell and seed, on identical batches:

* **alignability** - a fresh target trained on the alignment term alone for ``align_steps`` steps on
  the task's inputs: the mean CKA over the planned pairs at the end (``align_final``), its mean over
  the steps (``align_auc``, the area under the curve divided by its length) and at the start
  (``align_start``);
* **guidance gain** - the task metric (test accuracy at the best validation evaluation, as in
  ``guidewrap.tasks``) of the guided target minus that of the same target alone, same seed, same
  batches; for full guidance (``gain_full``) and for a warm-up window of ``warmup`` steps
  (``gain_warmup``);
* **error consistency** (:func:`~guidewrap.analysis.error_consistency`) of the target with the guide,
  unguided and fully guided, on the test set.

The guidance weight is ``weight`` divided by the number of planned pairs (the mean over pairs), so
cells with many pairs are not weighted more.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> task = Task.random(classes=3, features=6, train=96, seed=0)
    >>> cell = guidability([lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))],
    ...                    [lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))],
    ...                    task, steps=4, seeds=[0], align_steps=2, eval_every=2, progress=False)["cells"][0]
    >>> [key for key in cell["summary"] if key.startswith("gain")]
    ['gain_full', 'gain_warmup']
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .analysis import error_consistency
from .errors import ConfigError
from .model import GuidedModel
from .tasks import RunResult, accuracy, fit, random_batches

# The lens measured its matrix at this level, as a plain sum divided by the pairs itself: pinned so
# a change of library defaults cannot move docs/lens.md.
MATCHING = {"layers": "sublayers", "reduction": "sum"}

__all__ = ["Task", "ablations", "guidability", "load_factory", "format_table", "save_png", "symmetric_alignability"]

Factory = Callable[[], nn.Module]


@dataclass
class Task:
    """A classification task: training rows, a validation and a test split (scored by accuracy), the
    batch size, the learning rate, the task ``loss(output, labels)`` and, optionally, ``batches``: a
    factory ``seed -> batches(step)`` of your own (any iterator of ``(inputs, labels)``; it must give
    the same batches for the same seed).

    Examples:
        >>> Task.random(classes=2, features=3, train=8).x.shape
        torch.Size([8, 3])
    """

    name: str
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    batch: int = 128
    lr: float = 1e-3
    loss: Callable[[Any, Tensor], Tensor] = nn.functional.cross_entropy
    batches: Callable[[int], Callable[[int], tuple[Any, Tensor]]] | None = None

    def stream(self, seed: int) -> Callable[[int], tuple[Any, Tensor]]:
        """``batches(step)`` for one seed: the task's own iterator factory if it has one, else random
        rows of ``x``/``y``. The same seed always gives the same batches (paired runs)."""
        return self.batches(seed) if self.batches is not None else random_batches(self.x, self.y, self.batch, seed)

    @classmethod
    def mnist1d(cls, train_samples: int = 2000, batch: int = 128) -> Task:
        """MNIST-1D, generated locally (the demo's data: 2,000 training, 1,000 validation signals)."""
        from .tasks import load_mnist1d

        d = load_mnist1d(train_samples=train_samples)
        return cls("mnist1d", d["x"], d["y"], d["x_val"], d["y_val"], d["x_test"], d["y_test"], batch)

    @classmethod
    def random(cls, classes: int = 3, features: int = 6, train: int = 256, seed: int = 0) -> Task:
        """A tiny deterministic toy: labels from a random linear map of Gaussian inputs (for tests)."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(features, classes, generator=g)

        def split(n: int) -> tuple[Tensor, Tensor]:
            x = torch.randn(n, features, generator=g)
            return x, (x @ w).argmax(1)

        (x, y), (xv, yv), (xt, yt) = split(train), split(max(train // 4, 8)), split(max(train // 4, 8))
        return cls("random", x, y, xv, yv, xt, yt, batch=min(32, train))


def load_factory(spec: str | Factory) -> Factory:
    """A model factory from a callable or a ``module:callable`` string; bad ones fail at once.

    Examples:
        >>> load_factory("guidewrap.tasks:deep_mlp")().__class__.__name__
        'Sequential'
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"a model factory must be a callable or 'module:callable', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load factory {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{spec!r} is not callable")
    return factory


def ablations(base: str) -> dict[str, Factory]:
    """The built-in guide and its variants that each lack one component (for MNIST-1D).

    ``"resnet1d"``: without skip connections, without BatchNorm, with 1-wide kernels (no spatial
    mixing), without the global pooling. ``"transformer1d"``: without the positional embedding,
    without self-attention.

    Examples:
        >>> sorted(ablations("transformer1d"))
        ['transformer1d', 'transformer1d-no_attention', 'transformer1d-no_positional']
    """
    from functools import partial

    from .tasks import resnet1d, transformer1d

    switches = {
        "resnet1d": (resnet1d, {"no_skip": {"skip": False}, "no_norm": {"norm": False}, "kernel1": {"kernel": 1},
                                "no_pool": {"pool": False}}),
        "transformer1d": (transformer1d, {"no_positional": {"positional": False},
                                          "no_attention": {"attention": False}}),
    }  # fmt: skip
    if base not in switches:
        raise ConfigError(f"ablations exist for {sorted(switches)}, not {base!r}")
    factory, variants = switches[base]
    out: dict[str, Factory] = {base: partial(factory)}
    for name, change in variants.items():
        out[f"{base}-{name}"] = partial(factory, **change)
    for name, made in out.items():
        made.__name__ = name  # type: ignore[attr-defined]
    return out


def _build(factory: Factory, name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _name(spec: str | Factory, index: int) -> str:
    if isinstance(spec, str):
        return spec.partition(":")[2] or spec
    return getattr(spec, "__name__", f"model{index}").replace("<lambda>", f"model{index}")


def _train(task: Task, target: nn.Module, guide: nn.Module | None, seed: int, steps: int, eval_every: int,
           **guidance: Any) -> tuple[RunResult, Tensor]:  # fmt: skip
    curve: list[tuple[int, float, float, float]] = []

    def evaluate(step: int) -> None:
        if step % eval_every == 0 or step == steps:
            accs = [accuracy(target, x, y) for x, y in ((task.x, task.y), (task.x_val, task.y_val),
                                                        (task.x_test, task.y_test))]  # fmt: skip
            curve.append((step, *accs))  # type: ignore[arg-type]

    mode = "none" if guide is None else "guided"
    fit(target, task.stream(seed), task.loss, steps, guide, mode, lr=task.lr, clip=None, callback=evaluate,
        **guidance)  # fmt: skip
    with torch.no_grad():
        predictions = target.eval()(task.x_test).argmax(1)
    return RunResult.from_curve(mode, seed, curve), predictions


def _alignability(task: Task, target: nn.Module, guide: nn.Module, seed: int, steps: int) -> dict[str, float]:
    """Alignment-only training on the task's inputs: mean CKA at the start, the end, and on average."""
    guided = GuidedModel(target, guide, **MATCHING)
    batches = task.stream(seed)
    opt = torch.optim.Adam(target.parameters(), lr=task.lr)
    target.train()
    curve = []
    for step in range(steps + 1):
        x, _ = batches(step)
        guided(x)
        curve.append(statistics.fmean(guided.last_alignment.values()) if guided.last_alignment else 0.0)
        if step == steps:
            break
        opt.zero_grad()
        guided.alignment_loss.backward()
        opt.step()
    guided.close()
    return {"align_start": curve[0], "align_final": curve[-1], "align_auc": statistics.fmean(curve)}


def _cell_seed(
    task: Task,
    target: tuple[str, Factory],
    guide_spec: tuple[str, Factory],
    seed: int,
    baseline: tuple[RunResult, Tensor],
    pairs: int | None,
    settings: dict[str, Any],
    bar: Callable[[int], Any],
) -> dict[str, Any]:
    """One seed of one cell: the target guided for the whole run and for the warm-up, its
    alignability, and the error consistency of alone and guided with the guide."""
    (t_name, t_factory), (g_name, g_factory) = target, guide_spec
    steps, eval_every = settings["steps"], settings["eval_every"]
    alone, alone_pred = baseline
    guide = _build(g_factory, g_name, 10_000 + seed).eval()
    with torch.no_grad():
        guide_pred = guide(task.x_test).argmax(1)
    n_pairs = pairs or len(GuidedModel(_build(t_factory, t_name, seed), guide, **MATCHING).plan(task.x[: task.batch]))
    runs = {}
    for label, window in (("full", None), ("warmup", settings["warmup"])):
        runs[label] = _train(task, _build(t_factory, t_name, seed), guide, seed, steps, eval_every,
                             weight=settings["weight"] / n_pairs, until_step=window, **MATCHING)  # fmt: skip
        bar(1)
    align = _alignability(task, _build(t_factory, t_name, seed), guide, seed, settings["align_steps"])
    bar(1)
    return {
        "seed": seed, "pairs": n_pairs, **align,
        "acc_alone": alone.test_acc, "acc_full": runs["full"][0].test_acc,
        "acc_warmup": runs["warmup"][0].test_acc,
        "gain_full": runs["full"][0].test_acc - alone.test_acc,
        "gain_warmup": runs["warmup"][0].test_acc - alone.test_acc,
        "ec_alone": _kappa(alone_pred, guide_pred, task.y_test),
        "ec_full": _kappa(runs["full"][1], guide_pred, task.y_test),
    }  # fmt: skip


def _checked(targets: Sequence[Any], guides: Sequence[Any], task: Task | str, steps: int, seeds: Sequence[int]) -> Task:
    """The task of a guidability run, after its arguments are checked."""
    if not targets or not guides:
        raise ConfigError("guidability needs at least one target and one guide factory")
    if not isinstance(steps, int) or steps < 1 or not seeds:
        raise ConfigError(f"steps must be a positive integer and seeds non-empty, got {steps!r} and {seeds!r}")
    task = Task.mnist1d() if task == "mnist1d" else task
    if not isinstance(task, Task):
        raise ConfigError(f"task must be a guidewrap.lens.Task or 'mnist1d', got {task!r}")
    return task


def guidability(
    targets: Sequence[str | Factory],
    guides: Sequence[str | Factory],
    task: Task | str = "mnist1d",
    steps: int = 300,
    seeds: Sequence[int] = (0, 1, 2),
    warmup: int | None = None,
    weight: float = 1.0,
    align_steps: int = 100,
    eval_every: int = 25,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every (target, guide) cell over ``seeds``; see the module docstring for the measures.

    ``targets``/``guides`` are factories (callables or ``"module:callable"``) building fresh,
    untrained models; ``task`` is a :class:`Task` or ``"mnist1d"``. ``warmup`` (default ``steps // 5``)
    is the short window. With ``out``, each cell is saved to ``out/cells/`` as it finishes (an
    interrupted run resumes) and ``guidability.json`` is written at the end. Returns that dict:
    settings, runtime (``seconds``: this call, in which ``resumed_cells`` cells were read from ``out``
    rather than measured) and per cell its per-seed values plus mean and std of each measure.
    """
    task = _checked(targets, guides, task, steps, seeds)
    warmup = max(1, steps // 5) if warmup is None else warmup
    t_specs = [(_name(s, i), load_factory(s)) for i, s in enumerate(targets)]
    g_specs = [(_name(s, i), load_factory(s)) for i, s in enumerate(guides)]
    cells_dir = Path(out) / "cells" if out is not None else None
    if cells_dir is not None:
        cells_dir.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(t_specs) * len(seeds) * (1 + 3 * len(g_specs)), progress)
    start = time.perf_counter()
    baselines: dict[tuple[str, int], tuple[RunResult, Tensor]] = {}
    cells, resumed = [], 0
    for t_name, t_factory in t_specs:
        for g_name, g_factory in g_specs:
            saved = cells_dir / f"{t_name}__{g_name}.json" if cells_dir is not None else None
            if saved is not None and saved.exists():
                cells.append(json.loads(saved.read_text()))
                resumed += 1
                bar(3 * len(seeds))
                continue
            per_seed: list[dict[str, Any]] = []
            for seed in seeds:
                if (t_name, seed) not in baselines:
                    baselines[(t_name, seed)] = _train(task, _build(t_factory, t_name, seed), None, seed, steps,
                                                       eval_every)  # fmt: skip
                    bar(1)
                settings = {"steps": steps, "eval_every": eval_every, "warmup": warmup, "weight": weight,
                            "align_steps": align_steps}  # fmt: skip
                # The plan depends on the two architectures only: its pairs are counted on the first seed.
                pairs = per_seed[0]["pairs"] if per_seed else None
                per_seed.append(_cell_seed(task, (t_name, t_factory), (g_name, g_factory), seed,
                                           baselines[(t_name, seed)], pairs, settings, bar))  # fmt: skip
            cell = {"target": t_name, "guide": g_name, "seeds": per_seed, "summary": _summary(per_seed)}
            if saved is not None:
                saved.write_text(json.dumps(cell, indent=1))
            cells.append(cell)
    result = {
        "task": task.name, "steps": steps, "seeds": list(seeds), "warmup": warmup, "weight": weight,
        "weight_rule": "weight / pairs per cell", "align_steps": align_steps, "eval_every": eval_every,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1), "resumed_cells": resumed, "cells": cells,
    }  # fmt: skip
    result["symmetric"] = symmetric_alignability(result)
    if out is not None:
        (Path(out) / "guidability.json").write_text(json.dumps(result, indent=1))
    return result


def symmetric_alignability(result: dict[str, Any]) -> list[dict[str, Any]]:
    """For each pair of models measured in both directions (A guiding B and B guiding A), the mean
    of the two final alignabilities, and each direction's value.

    Examples:
        >>> cell = lambda t, g, v: {"target": t, "guide": g, "summary": {"align_final": [v, 0.0]}}
        >>> symmetric_alignability({"cells": [cell("a", "b", 0.9), cell("b", "a", 0.7), cell("a", "a", 1.0)]})
        [{'models': ['a', 'b'], 'align_final': 0.8, 'a_guides_b': 0.7, 'b_guides_a': 0.9}]
    """
    final = {(c["target"], c["guide"]): c["summary"]["align_final"][0] for c in result["cells"]}
    out = []
    for (t, g), value in final.items():
        if t < g and (g, t) in final:
            back = final[(g, t)]
            out.append({"models": [t, g], "align_final": round((value + back) / 2, 6),
                        f"{t}_guides_{g}": back, f"{g}_guides_{t}": value})  # fmt: skip
    return out


def _kappa(a: Tensor, b: Tensor, labels: Tensor) -> float:
    try:
        return error_consistency(a, b, labels)
    except ConfigError:
        return math.nan  # both always right or always wrong: undefined


def _summary(per_seed: list[dict[str, float]]) -> dict[str, list[float]]:
    keys = [k for k in per_seed[0] if k not in ("seed", "pairs")]
    out = {}
    for key in keys:
        values = [row[key] for row in per_seed if not math.isnan(row[key])]
        out[key] = [
            statistics.fmean(values) if values else math.nan,
            statistics.stdev(values) if len(values) > 1 else 0.0,
        ]
    return out


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    if not enabled:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, desc="guidability", unit="run")
    return bar.update


COLUMNS = ("gain_full", "gain_warmup", "align_final", "align_auc", "ec_alone", "ec_full")


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one row per cell, mean +- std over seeds of each measure.

    Examples:
        >>> cell = {"target": "a", "guide": "b", "summary": {k: [0.5, 0.1] for k in COLUMNS}}
        >>> print(format_table({"cells": [cell], "seeds": [0, 1]}).splitlines()[2][:27])
        | a | b | +0.500 +- 0.100 |
    """
    head = "| target | guide | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for cell in result["cells"]:
        values = " | ".join(f"{cell['summary'][k][0]:+.3f} +- {cell['summary'][k][1]:.3f}" for k in COLUMNS)
        lines.append(f"| {cell['target']} | {cell['guide']} | {values} |")
    return "\n".join(lines)


def save_png(result: dict[str, Any], path: str | Path) -> None:
    """Heatmaps (targets x guides) of the full-guidance gain and of alignability (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(c["target"] for c in result["cells"]))
    guides = list(dict.fromkeys(c["guide"] for c in result["cells"]))
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.2 * len(guides) * 2, 1.5 + 0.8 * len(targets)))
    for ax, key, title, cmap in ((axes[0], "gain_full", "guidance gain (test acc)", "RdBu"),
                                 (axes[1], "align_final", "alignability (mean CKA)", "viridis")):  # fmt: skip
        grid = torch.full((len(targets), len(guides)), math.nan)
        for c in result["cells"]:
            grid[targets.index(c["target"]), guides.index(c["guide"])] = c["summary"][key][0]
        limit = float(grid.nan_to_num().abs().max()) or 1.0
        kwargs = {"vmin": -limit, "vmax": limit} if key.startswith("gain") else {"vmin": 0, "vmax": 1}
        image = ax.imshow(grid.numpy(), cmap=cmap, **kwargs)
        for i in range(len(targets)):
            for j in range(len(guides)):
                ax.text(j, i, f"{grid[i, j]:+.3f}" if key.startswith("gain") else f"{grid[i, j]:.2f}",
                        ha="center", va="center", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(guides)), guides, rotation=30, ha="right")
        ax.set_yticks(range(len(targets)), targets)
        ax.set_xlabel("guide")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    axes[0].set_ylabel("target")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
