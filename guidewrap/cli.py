"""The ``guidewrap`` command line: ``demo``, ``plan`` and ``similarity``.

Examples:
    >>> main(["plan", "guidewrap.tasks:deep_mlp", "guidewrap.tasks:cnn1d",
    ...       "--target-args", "depth=2,width=8", "--guide-args", "depth=2,channels=4",
    ...       "--input-shape", "16,40"])  # doctest: +ELLIPSIS
    guidance plan: 2 pairs
    ...
    0
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


class CommandError(Exception):
    """A bad command-line argument (printed without a traceback)."""


# --------------------------------------------------------------------------- model arguments


def _load_model(spec: str, args: str | None) -> Any:
    """Build a model from ``module:callable`` with comma-separated integer/word arguments."""
    if ":" not in spec:
        raise CommandError(f"model {spec!r} must be written module:callable, e.g. torchvision.models:resnet18")
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise CommandError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    except AttributeError as exc:
        raise CommandError(f"module {module_name!r} has no attribute {attr!r}") from exc
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for item in filter(None, (args or "").split(",")):
        key, _, value = item.partition("=")
        parsed = _parse_value(value if _ else key)
        if _:
            keywords[key] = parsed
        else:
            positional.append(parsed)
    if module_name.startswith("torchvision.models") and "weights" not in keywords:
        keywords["weights"] = None  # never download weights
    try:
        return factory(*positional, **keywords)
    except TypeError as exc:
        raise CommandError(f"cannot build {spec} with ({args or ''}): {exc}") from exc


def _cmd_guidability(args: argparse.Namespace) -> int:
    import torch

    from . import lens
    from .errors import ConfigError

    if args.threads:
        torch.set_num_threads(args.threads)
    guides: list[Any] = list(args.guides)
    if args.ablate:
        guides += list(lens.ablations(args.ablate).values())
    if not guides:
        raise CommandError("give --guides, --ablate, or both")
    try:
        result = lens.guidability(
            args.targets, guides, args.task, args.steps, args.seeds, args.warmup, args.weight, args.align_steps,
            out=args.out, progress=not args.quiet,
        )  # fmt: skip
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    print(lens.format_table(result))
    out = Path(args.out)
    try:
        lens.save_png(result, out / "guidability.png")
    except ImportError:
        print("(matplotlib is not installed: no PNG)")
    print(f"{len(result['cells'])} cells x {len(args.seeds)} seeds in {result['seconds']:.0f} s; "
          f"wrote {out / 'guidability.json'} and {out / 'guidability.png'}")  # fmt: skip
    return 0


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


def _example_input(shape: str, dtype: str, high: int) -> Any:
    import torch

    try:
        dims = [int(d) for d in shape.split(",")]
    except ValueError as exc:
        raise CommandError(f"--input-shape must be comma-separated integers like 8,3,32,32, got {shape!r}") from exc
    if len(dims) < 1 or any(d < 1 for d in dims):
        raise CommandError(f"--input-shape needs positive sizes, got {shape!r}")
    if dtype == "long":
        return torch.randint(0, high, dims)
    return torch.randn(dims)


def _add_model_args(parser: argparse.ArgumentParser, a: str, b: str) -> None:
    parser.add_argument(a, help="module:callable building the first model, e.g. torchvision.models:resnet18")
    parser.add_argument(b, help="module:callable building the second model")
    parser.add_argument("--target-args", "--a-args", dest="a_args", help="arguments for the first, e.g. num_classes=10")
    parser.add_argument("--guide-args", "--b-args", dest="b_args", help="arguments for the second")
    parser.add_argument("--input-shape", default="8,3,32,32", help="example input shape (default 8,3,32,32)")
    parser.add_argument("--input-dtype", choices=["float", "long"], default="float", help="long for token ids")
    parser.add_argument("--vocab", type=int, default=100, help="token ids are drawn below this (with long)")


# --------------------------------------------------------------------------- commands


def _cmd_plan(args: argparse.Namespace) -> int:
    from .model import GuidedModel

    target, guide = _load_model(args.target, args.a_args), _load_model(args.guide, args.b_args)
    x = _example_input(args.input_shape, args.input_dtype, args.vocab)
    plan = GuidedModel(target, guide, layers=args.layers, exclude_output_layer=not args.keep_output_layer).plan(x)
    print(plan)
    return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
    from .analysis import similarity_matrix

    model_a, model_b = _load_model(args.model_a, args.a_args), _load_model(args.model_b, args.b_args)
    model_a.eval()
    model_b.eval()
    x = _example_input(args.input_shape, args.input_dtype, args.vocab)
    matrix = similarity_matrix(model_a, model_b, x, metric=args.metric)
    print(matrix)
    path = matrix.save_png(args.out, title=f"{args.metric}: {args.model_a} vs {args.model_b}", xlabel="B", ylabel="A")
    print(f"heatmap written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .tasks import DEMO_TRAIN_SAMPLES, DESCRIPTIONS, VARIANTS, load_mnist1d, train_variant

    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise CommandError("the demo needs the examples extra: pip install 'guidewrap[examples]'") from exc
    variants = args.variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise CommandError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.samples < 100 or not args.weight >= 0 or not args.clip >= 0:
        raise CommandError("--steps must be >= 1, --samples >= 100, --weight >= 0 and --clip >= 0")
    clip = args.clip or None  # 0: unclipped
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val_samples = min(1000, int(args.samples * 0.8) // 5)
    train_samples = args.train_samples or DEMO_TRAIN_SAMPLES
    data = load_mnist1d(num_samples=args.samples, val_samples=val_samples, train_samples=train_samples)
    print(
        f"MNIST-1D (generated locally): {len(data['x'])} training, {len(data['x_val'])} validation, "
        f"{len(data['x_test'])} test signals; deep MLP (8 x 256) vs an untrained 1-D CNN guide, "
        f"{args.steps} steps, gradient norm clipped at {clip or 'no limit'}, seeds {args.seeds}, "
        f"{torch_threads()} torch thread(s)"
    )
    results = []
    start = time.perf_counter()
    for seed in args.seeds:
        for variant in variants:
            with tqdm(total=args.steps, desc=f"seed {seed} {variant:<9}", leave=False, disable=args.quiet) as bar:
                settings = {"steps": args.steps, "weight": args.weight, "clip": clip}
                run = train_variant(variant, data, seed=seed, progress=bar.update, **settings)
                results.append(run)
    elapsed = time.perf_counter() - start
    table = _demo_table(results, variants, DESCRIPTIONS)
    print(table)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    png = _demo_plot(results, variants, out / "curves.png")
    print(f"{len(results)} runs in {elapsed:.0f} s; table in {out / 'results.md'}, curves in {png}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _demo_table(results: list[Any], variants: list[str], descriptions: dict[str, str]) -> str:
    import math
    import statistics

    def fmt(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"

    lines = [
        "| variant | what | train acc | test acc | gap (train - test) | test acc per seed | final train acc "
        "| final test acc | final test acc per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_variant = {v: {r.seed: r for r in results if r.variant == v} for v in variants}
    for variant in variants:
        rows = list(by_variant[variant].values())
        per_seed = " / ".join(f"{r.test_acc:.3f}" for r in rows)
        final_per_seed = " / ".join(f"{r.final_test_acc:.3f}" for r in rows)
        lines.append(
            f"| {variant} | {descriptions[variant]} | {fmt([r.train_acc for r in rows])} | "
            f"{fmt([r.test_acc for r in rows])} | {fmt([r.gap for r in rows])} | {per_seed} | "
            f"{fmt([r.final_train_acc for r in rows])} | {fmt([r.final_test_acc for r in rows])} | {final_per_seed} |"
        )
    seeds = sorted({r.seed for r in results})
    lines.append(
        f"\nseeds: {', '.join(map(str, seeds))}; mean +- std over seeds; each run scored at its best-validation "
        "evaluation (test accuracy there, never used to choose), and at its final step (the model you keep)"
    )
    if "baseline" in by_variant and "guided" in by_variant:
        base, guided = by_variant["baseline"], by_variant["guided"]

        def differences(score: str) -> list[float]:  # guided - baseline per seed, at one score
            return [getattr(guided[s], score) - getattr(base[s], score) for s in seeds if s in base and s in guided]

        diffs = differences("test_acc")
        if len(diffs) > 1:
            mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
            se = sd / math.sqrt(len(diffs))
            larger_sd = max(
                statistics.stdev(r.test_acc for r in base.values()),
                statistics.stdev(r.test_acc for r in guided.values()),
            )
            lines.append(
                f"paired guided - baseline (same seed, same batches): {mean:+.3f} (SE {se:.3f}); "
                f"per seed {' / '.join(f'{d:+.3f}' for d in diffs)}"
            )
            finals = differences("final_test_acc")
            lines.append(
                f"at the final step: {statistics.fmean(finals):+.3f} "
                f"(SE {statistics.stdev(finals) / math.sqrt(len(finals)):.3f}); "
                f"per seed {' / '.join(f'{d:+.3f}' for d in finals)}"
            )
            if mean > larger_sd:
                verdict = f"guidance helps: guided beats baseline by more than either's std ({larger_sd:.3f})"
            elif mean > 0:
                verdict = f"guided ahead, but within the spread of the runs (std {larger_sd:.3f}): not conclusive"
            else:
                verdict = "no gain from guidance on these seeds"
            if statistics.fmean(finals) <= 0 < mean:
                verdict += "; but not at the final step (runs fell after fitting: see the curves)"
            lines.append(f"verdict: {verdict}")
        elif diffs:
            lines.append(f"guided - baseline on seed {seeds[0]}: {diffs[0]:+.3f} (run 2+ seeds for a verdict)")
    return "\n".join(lines)


def _demo_plot(results: list[Any], variants: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in results:
        steps = [c[0] for c in r.curve]
        label = r.variant if r.seed == results[0].seed else None
        axes[0].plot(steps, [c[1] for c in r.curve], color=colors[r.variant], label=label, alpha=0.8)
        axes[1].plot(steps, [c[3] for c in r.curve], color=colors[r.variant], label=label, alpha=0.8)
        # the selected (best-validation) evaluation, so a later fall is visible beside what the table scores
        axes[1].plot([r.best_step], [r.test_acc], "o", color=colors[r.variant], markersize=4)
    for ax, title in zip(axes, ("train accuracy", "test accuracy (dots: selected step)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidewrap", description="Guidance for PyTorch training loops.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="deep MLP alone / guided / pre-aligned / distilled on MNIST-1D (offline)")
    # Literal defaults (guidewrap.tasks' DEMO_* constants; a test keeps them equal): the parser stays torch-free.
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    demo.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000)")
    demo.add_argument(
        "--samples", type=int, default=10_000, help="MNIST-1D samples generated, 80%% train (default 10000)"
    )
    demo.add_argument("--train-samples", type=int, help="training signals kept (default 2000; validation: 1000 others)")
    demo.add_argument("--variants", nargs="+", help="subset of: baseline guided pre_align distill")
    demo.add_argument("--weight", type=float, default=0.5, help="guidance weight (default 0.5)")
    demo.add_argument(
        "--clip", type=float, default=1.0, help="gradient-norm limit before each step (default 1; 0: unclipped)"
    )
    demo.add_argument("--out", default="guidewrap-demo", help="output folder for the table and PNG")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    lens = sub.add_parser("guidability", help="the architecture lens: how easily each guide guides each target")
    lens.add_argument("--targets", nargs="+", required=True, help="module:callable factories of the targets")
    lens.add_argument("--guides", nargs="*", default=[], help="module:callable factories of the guides")
    lens.add_argument("--ablate", choices=["resnet1d", "transformer1d"], help="add this guide and its ablations")
    lens.add_argument("--task", default="mnist1d", choices=["mnist1d"], help="built-in offline task")
    lens.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    lens.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lens.add_argument("--warmup", type=int, help="steps of the short guidance window (default steps // 5)")
    lens.add_argument("--weight", type=float, default=1.0, help="guidance weight, divided by the pairs of a cell")
    lens.add_argument("--align-steps", type=int, default=100, help="alignment-only steps for alignability")
    lens.add_argument("--out", default="lens", help="output folder (JSON, PNG, per-cell results)")
    lens.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    lens.add_argument("--quiet", action="store_true", help="no progress bar")
    lens.set_defaults(func=_cmd_guidability)

    plan = sub.add_parser("plan", help="print the layer pairs guidance would align for two models")
    _add_model_args(plan, "target", "guide")
    plan.add_argument("--keep-output-layer", action="store_true", help="also pair the output (logits) layers")
    plan.add_argument(
        "--layers",
        default="auto",
        choices=["auto", "blocks", "sublayers", "paper"],
        help="matching level (default: auto)",
    )
    plan.set_defaults(func=_cmd_plan)

    sim = sub.add_parser("similarity", help="CKA between every hookable layer of two models, as a heatmap PNG")
    _add_model_args(sim, "model_a", "model_b")
    sim.add_argument("--metric", default="cka", help="alignment measure (default cka)")
    sim.add_argument("--out", default="similarity.png", help="PNG path (default similarity.png)")
    sim.set_defaults(func=_cmd_similarity)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guidewrap`` console script.

    Examples:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        guidewrap ...
        0
    """
    from . import __version__
    from .errors import GuidewrapError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"guidewrap {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (CommandError, GuidewrapError) as exc:
        print(f"guidewrap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
