"""The demo's effect, checked across seeds and float orders: paired guided - baseline differences.

Runs the demo's variants (``guidewrap demo``'s exact training: same data, pinned pairs and weight,
same scoring rule) for several seeds under a fixed number of torch threads, saving each run as a JSON
file the moment it finishes, so an interrupted study resumes where it stopped. Different thread
counts change the order of floating-point reductions, which stands in for another machine.

    python examples/demo_study.py --seeds 0 1 2 3 4 --threads 1 --out runs/demo-study
    python examples/demo_study.py --seeds 0 1 2 3 4 --threads 2 --out runs/demo-study
    python examples/demo_study.py --report --out runs/demo-study --png docs/img/demo-paired.png

``--clip 0`` trains unclipped (the demo before 0.3). The report gives every variant's final-step test
accuracy and paired difference beside the selected (best-validation) ones.

``--report`` reads every saved run and prints, per thread count, each variant's mean +- std, the
per-seed values and the paired difference guided - baseline with its standard error (the std of
the per-seed differences over sqrt(seeds)); ``--png`` draws the paired differences.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from guidewrap.tasks import DEMO_CLIP, DEMO_STEPS, DEMO_TRAIN_SAMPLES, VARIANTS, load_mnist1d, train_variant


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), for the record of every run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_study(
    seeds: list[int], variants: list[str], threads: int, out: Path, steps: int, clip: float | None = DEMO_CLIP
) -> None:
    torch.set_num_threads(threads)
    folder = out / f"threads{threads}"
    folder.mkdir(parents=True, exist_ok=True)
    data = None
    for seed in seeds:
        for variant in variants:
            path = folder / f"seed{seed}_{variant}.json"
            if path.exists():
                continue  # resume: this run finished in an earlier session
            data = data or load_mnist1d(train_samples=DEMO_TRAIN_SAMPLES)
            start = time.perf_counter()
            r = train_variant(variant, data, seed=seed, steps=steps, clip=clip)
            record = {
                "variant": variant,
                "seed": seed,
                "threads": threads,
                "steps": steps,
                "clip": clip,
                "train_acc": r.train_acc,
                "test_acc": r.test_acc,
                "best_step": r.best_step,
                "final_test_acc": r.curve[-1][3],
                "curve": r.curve,
                "seconds": round(time.perf_counter() - start, 1),
                "cpu": cpu_model(),
                "torch": torch.__version__,
            }
            path.write_text(json.dumps(record) + "\n", encoding="utf-8")
            print(f"threads {threads} seed {seed} {variant:<9} test {r.test_acc:.3f} (step {r.best_step})", flush=True)


def load_runs(out: Path) -> dict[int, dict[str, dict[int, dict]]]:
    """``runs[threads][variant][seed]`` from every saved JSON file under ``out``."""
    runs: dict[int, dict[str, dict[int, dict]]] = {}
    for path in sorted(out.glob("threads*/seed*_*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        runs.setdefault(r["threads"], {}).setdefault(r["variant"], {})[r["seed"]] = r
    return runs


def paired(a: dict[int, dict], b: dict[int, dict], key: str = "test_acc") -> tuple[list[int], list[float]]:
    """Seeds present in both and the per-seed differences ``a - b``."""
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s][key] - b[s][key] for s in seeds]


def _paired_summary(diffs: list[float], ratio: bool = False) -> str:
    """Mean paired difference, its SE (and the mean in SEs), per seed, and the seeds positive."""
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    in_se = f", {mean / se if se > 0 else math.inf:.1f} SE" if ratio else ""
    per_seed = " / ".join(f"{d:+.3f}" for d in diffs)
    positive = f"{sum(d > 0 for d in diffs)}/{len(diffs)} seeds positive"
    return f"{mean:+.4f} (SE {se:.4f}{in_se}); per seed {per_seed}; {positive}"


def report(out: Path, png: Path | None) -> str:
    runs = load_runs(out)
    lines = []
    for threads, by_variant in sorted(runs.items()):
        any_run = next(iter(next(iter(by_variant.values())).values()))
        lines.append(f"### {threads} thread(s), {any_run['cpu']}, torch {any_run['torch']}, {any_run['steps']} steps")
        lines.append("")
        lines.append(
            "| variant | test acc (mean +- std) | per seed | best step per seed | final-step test acc | per seed |"
        )
        lines.append("|---|---|---|---|---|---|")
        for variant in [v for v in VARIANTS if v in by_variant]:
            rows = by_variant[variant]
            cells = []
            for key in ("test_acc", "final_test_acc"):
                values = [rows[s][key] for s in sorted(rows)]
                spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.3f}{spread}")
                cells.append(" / ".join(f"{s}: {rows[s][key]:.3f}" for s in sorted(rows)))
            steps = " / ".join(str(rows[s]["best_step"]) for s in sorted(rows))
            lines.append(f"| {variant} | {cells[0]} | {cells[1]} | {steps} | {cells[2]} | {cells[3]} |")
        for variant in [v for v in VARIANTS if v in by_variant and v != "baseline"]:
            if "baseline" not in by_variant:
                break
            seeds, diffs = paired(by_variant[variant], by_variant["baseline"])
            if len(diffs) < 2:
                continue
            _, finals = paired(by_variant[variant], by_variant["baseline"], "final_test_acc")
            lines.append("")
            lines.append(f"{variant} - baseline, paired over seeds {seeds}: {_paired_summary(diffs, ratio=True)}")
            lines.append(f"at the final step: {_paired_summary(finals)}")
        lines.append("")
    text = "\n".join(lines)
    if png is not None:
        _plot(runs, png)
    return text


def _plot(runs: dict[int, dict[str, dict[int, dict]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for i, (_threads, by_variant) in enumerate(sorted(runs.items())):
        seeds, diffs = paired(by_variant.get("guided", {}), by_variant.get("baseline", {}))
        if not diffs:
            continue
        xs = [i + 0.08 * (j - (len(diffs) - 1) / 2) for j in range(len(diffs))]
        ax.scatter(xs, diffs, color="C0", zorder=3, label="per seed" if i == 0 else None)
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        ax.errorbar(
            [i + 0.35], [mean], yerr=[3 * se], fmt="s", color="C3", capsize=4, label="mean +- 3 SE" if i == 0 else None
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(runs)), [f"{t} thread(s)" for t in sorted(runs)])
    ax.set_ylabel("test acc: guided - baseline")
    ax.set_title("MNIST-1D demo, paired by seed (same batches)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=["baseline", "guided"], choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--clip", type=float, default=DEMO_CLIP, help="gradient-norm limit (the demo's; 0: unclipped)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-study"))
    parser.add_argument("--report", action="store_true", help="summarise the saved runs instead of training")
    parser.add_argument("--png", type=Path, help="with --report: draw the paired differences here")
    args = parser.parse_args()
    if args.report:
        print(report(args.out, args.png))
    else:
        run_study(args.seeds, args.variants, args.threads, args.out, args.steps, args.clip or None)


if __name__ == "__main__":
    main()
