"""The strength study: how strong should the alignment's pull be, on every task of docs/results.md?

Each task is trained alone and with each guidance setting, every setting of a seed from the same
initial weights on the same batches:

- ``default``: the library's default weighting, weight 1 on the mean over pairs;
- ``paper``: weight 1 on the sum over pairs (the paper's loss);
- ``strength=R``: the weight set from the gradients so that the term's pull is R times the task's
  (on the mean over pairs; docs/concepts/strength.md);
- ``cap=C@K``: the default weighting with the term's pull capped at C in every trainable tensor from
  guided step K on (``tensor_cap=C, tensor_cap_after=K``; docs/concepts/strength.md).

Tasks (the guide untrained unless the name says ``trained``): ``demo`` (the demo's MLP <- 1-D CNN on
MNIST-1D over the demo's six pairs, scored like the demo), ``copy`` / ``copy-trained`` (4-layer tanh RNN
<- 4-layer Transformer, 500 steps), ``lm`` / ``lm-trained`` (the character LM, 1,000 steps), ``fcn`` /
``fcn-trained`` / ``fcn-init`` (Fashion-MNIST deep FCN <- ResNet-18, 800 steps; ``init``: 300 steps of
noise alignment, then alone), ``conv`` / ``conv-trained`` (the plain 20-layer ConvNet, 600 steps),
``nores`` / ``nores-trained`` (the paper's deep ConvNet at this scale: ResNet-18 without its residual
additions, BatchNorm kept, guided by ResNet-18, 400 steps), ``parity`` (``--features last``: one pair,
so ``default`` and ``paper`` are one run), ``lstm<-gpt2`` / ``gpt2<-lstm`` (300 steps) and
``lstm<-minilm`` (the pretrained MiniLM, 300 steps).

Every run is saved as JSON when it finishes (an interrupted study resumes), with its final score, its
checkpoint-selected score where the task selects one, and its training curve (training accuracy per
evaluation, or the mean training loss over each 10 steps), from which ``--report`` also checks for a
late collapse: a training accuracy more than 0.2 below the best reached, or a training loss more than
20% above its running minimum, after the run first came within 0.05 (accuracy) of its best.

    python examples/strength_study.py --tasks demo copy --threads 1 --out docs/data/strength
    python examples/strength_study.py --report --out docs/data/strength
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_study import cpu_model  # noqa: E402
from lab.common import batch_stream, fit, seeded  # noqa: E402
from lab.copy_paste import CausalTransformer, CopyPasteTask, StackedRNN, held_out_accuracy, task_batches  # noqa: E402
from lab.copy_paste import task_loss as copy_loss  # noqa: E402
from lab.language import CharCorpus, LSTMLanguageModel, perplexity, python_docs_text, text_models  # noqa: E402

from guidewrap.tasks import DEMO_TRAIN_SAMPLES, load_mnist1d, train_variant  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"reduction": "mean", "weight": 1.0},
    "paper": {"reduction": "sum", "weight": 1.0},
}
TASKS = (
    "demo", "copy", "copy-trained", "lm", "lm-trained", "fcn", "fcn-trained", "fcn-init", "conv", "conv-trained",
    "nores", "nores-trained", "parity", "lstm<-gpt2", "gpt2<-lstm", "lstm<-minilm",
)  # fmt: skip
HIGHER_IS_BETTER = {t: not (t.startswith(("lm", "lstm", "gpt2"))) for t in TASKS}
# Tasks whose target alone is another task's (same target, same batches): "alone" is run once, there.
ALONE_OF = {"copy-trained": "copy", "lm-trained": "lm", "fcn-trained": "fcn", "fcn-init": "fcn", "conv-trained": "conv",
            "nores-trained": "nores"}  # fmt: skip
# Guidance settings passed through to the library beside the weighting (strength, the per-tensor cap).
PASSED = ("strength", "tensor_cap", "tensor_cap_after")
NORES_STEPS = 400  # about ten CPU-minutes a run on one thread
DEMO_SEEDS = (0, 1, 2, 3, 4)
GUIDES = Path("runs/strength-guides")  # trained guides, trained once per seed (large: kept out of --out)


def _windows(losses: list[float], every: int = 10) -> list[tuple[int, float]]:
    """The mean training loss over each ``every`` steps, keyed by the window's last step."""
    return [(i + every, statistics.fmean(losses[i : i + every])) for i in range(0, len(losses), every)]


def _lm_loss(out: Any, ids: Tensor) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _cached_guide(out: Path, name: str, build: Any, train: Any) -> nn.Module:
    """A trained guide, trained once and kept in ``out`` (every setting of a seed uses the same one)."""
    path = GUIDES / f"{name}.pt"
    guide = build()
    if path.exists():
        guide.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        train(guide)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(guide.state_dict(), path)
    return guide.eval()


def _demo(setting: dict | None, seed: int, out: Path) -> dict:
    data = load_mnist1d(train_samples=DEMO_TRAIN_SAMPLES)
    clip = (setting or {}).get("clip")
    if setting is None or "reduction" not in setting:
        r = train_variant("baseline", data, seed=seed, clip=clip)
    else:
        keys = {"weight": setting.get("weight", 1.0), "reduction": setting["reduction"]}
        keys |= {k: setting[k] for k in PASSED if k in setting}
        r = train_variant("guided", data, seed=seed, clip=clip, **keys)
    final = r.curve[-1]
    return {"score": final[3], "selected": r.test_acc, "selected_step": r.best_step,
            "curve": [(s, tr) for s, tr, _, _ in r.curve], "curve_kind": "train_acc"}  # fmt: skip


def _copy(setting: dict | None, seed: int, out: Path, trained: bool) -> dict:
    task = CopyPasteTask(min_len=10, max_len=20, symbols=10)
    target = seeded(seed, lambda: StackedRNN(task.vocab))
    guide = CausalTransformer(task.vocab)  # built right after the target, under the same seed (copy_paste.py)
    if trained:  # copy_paste.py's trained guide: seed + 1, 500 steps alone on the same batches
        guide = _cached_guide(
            out, f"copy-transformer-{seed}", lambda: seeded(seed + 1, lambda: CausalTransformer(task.vocab)),
            lambda g: fit(g, task_batches(task, 64, seed), copy_loss, 500, mode="none"),
        )  # fmt: skip
    mode = "none" if setting is None else "guided"
    losses = fit(target, task_batches(task, 64, seed), copy_loss, 500, guide=guide, mode=mode, layers="sublayers",
                 **(setting or {}))  # fmt: skip
    return {"score": held_out_accuracy(target, task, seed, 4), "curve": _windows(losses), "curve_kind": "train_loss"}


def _text_task(task: str, setting: dict | None, seed: int, out: Path) -> dict:
    corpus = CharCorpus(python_docs_text(), seq_len=50)
    test = torch.stack([row["input_ids"] for row in corpus.dataset("test")])
    v, d = corpus.vocab_size, 128

    def draw(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = corpus.batch(32, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))["input_ids"]
        return ids, ids

    steps = 1000 if task.startswith("lm") else 300
    m = text_models(v, d)
    roles = {"lm": ("rnn", "transformer"), "lm-trained": ("rnn", "transformer"), "gpt2<-lstm": ("gpt2", "lstm"),
             "lstm<-gpt2": ("lstm", "gpt2")}  # fmt: skip
    make_target, make_guide = (m[name] for name in roles[task])
    transformer = m["transformer"]
    target = seeded(seed, make_target)
    if task == "lm-trained":  # language_modelling.py's trained guide: the Transformer of the seed, 1,000 steps
        guide = _cached_guide(out, f"lm-transformer-{seed}", lambda: seeded(seed, transformer),
                              lambda g: fit(g, batch_stream(seed, draw), _lm_loss, steps, mode="none"))  # fmt: skip
    else:
        guide = seeded(seed + 1, make_guide)
    mode = "none" if setting is None else "guided"
    losses = fit(target, batch_stream(seed, draw), _lm_loss, steps, guide=guide, mode=mode, layers="sublayers",
                 **(setting or {}))  # fmt: skip
    with torch.no_grad():
        score = perplexity(_lm_loss(target(test), test).item())
    return {"score": score, "curve": _windows(losses), "curve_kind": "train_loss"}


def _fashion(task: str, setting: dict | None, seed: int, out: Path) -> dict:
    import fashion_mnist

    cfg = fashion_mnist.defaults()
    data = fashion_mnist.load_fashion_mnist(None, cfg.train_samples)
    GUIDES.mkdir(parents=True, exist_ok=True)
    trained = fashion_mnist.trained_guide(data, GUIDES, cfg.guide_steps, cfg.batch)
    family = "conv_" if task.startswith("conv") else "nores_" if task.startswith("nores") else ""
    if setting is None:
        variant = family + "alone"
    elif task == "fcn-init":
        variant = "init_noise"
    else:
        variant = family + "guided" + ("_trained" if task.endswith("trained") else "_untrained")
    cfg.conv_steps = NORES_STEPS if family == "nores_" else cfg.conv_steps
    cfg.weight = (setting or SETTINGS["paper"]).get("weight", 1.0)
    cfg.reduction = (setting or SETTINGS["paper"])["reduction"]
    cfg.guidance = {k: (setting or {})[k] for k in PASSED if k in (setting or {})}
    r = fashion_mnist.run_one(variant, seed, data, trained, cfg)
    return {"score": r["test_acc"], "curve": [(c["step"], c["train_acc"]) for c in r["curve"]],
            "curve_kind": "train_acc"}  # fmt: skip


def _parity(setting: dict | None, seed: int, out: Path) -> dict:
    from lab.parity import ParityRNN, ParityTask, ParityTransformer

    task = ParityTask(min_len=2, max_len=50)

    def draw(gen: torch.Generator) -> tuple[dict, Tensor]:
        b = task.sample(128, generator=gen)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]

    held_out = [task.sample(512, seed=10_000 + seed + i) for i in range(2)]
    model = seeded(seed, lambda: ParityTransformer(d_model=64, heads=4))
    guide = seeded(seed + 1, lambda: ParityRNN(hidden=64))  # parity.py's untrained guide
    mode = "none" if setting is None else "guided"
    losses = fit(model, batch_stream(seed, draw), nn.functional.cross_entropy, 2000, guide=guide, mode=mode,
                 layers=[("pool", "readout")], **(setting or {}))  # fmt: skip
    with torch.no_grad():
        hits = [float((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).float().mean())
                for b in held_out]  # fmt: skip
    return {"score": sum(hits) / len(hits), "curve": _windows(losses), "curve_kind": "train_loss"}


def _minilm(setting: dict | None, seed: int, out: Path) -> dict:
    from lstm_guided_by_minilm import PAIRS, minilm

    guide, tokenizer = minilm(pretrained=True)
    ids = torch.tensor(tokenizer(python_docs_text(), add_special_tokens=False, verbose=False)["input_ids"])
    used, compact = torch.unique(ids, return_inverse=True)  # as lstm_guided_by_minilm.py: the text's tokens
    windows = compact[: len(ids) // 32 * 32].view(-1, 32)
    split = max(1, len(windows) // 10)
    train, test = windows[:-split], windows[-split:]

    def draw(gen: torch.Generator) -> tuple[dict, Tensor]:
        rows = train[torch.randint(0, len(train), (32,), generator=gen)]
        return {"input_ids": rows}, rows

    def to_guide(input_ids: Tensor) -> dict[str, Tensor]:
        return {"input_ids": used[input_ids], "attention_mask": torch.ones_like(input_ids)}

    lstm = seeded(seed, lambda: LSTMLanguageModel(len(used), hidden=128))
    mode = "none" if setting is None else "guided"
    losses = fit(lstm, batch_stream(seed, draw), _lm_loss, 300, guide=guide, mode=mode, lr=2e-3, layers=PAIRS,
                 guide_inputs=to_guide, **(setting or {}))  # fmt: skip
    with torch.no_grad():
        score = perplexity(_lm_loss(lstm(test), test).item())
    return {"score": score, "curve": _windows(losses), "curve_kind": "train_loss"}


def setting_of(name: str) -> dict[str, Any] | None:
    """A setting's guidance keywords: ``alone`` (None), a fixed one of SETTINGS, or ``strength=R``
    (the weight set from the gradients, on the mean over pairs). A ``+clip=C`` suffix (the demo only)
    clips the gradient norm at C before each step (``alone+clip=1``: ``{"clip": 1.0}`` alone)."""
    name, _, clip = name.partition("+clip=")
    extra = {"clip": float(clip)} if clip else {}
    if name == "alone":
        return extra or None
    if name.startswith("strength="):
        return {"strength": float(name.removeprefix("strength=")), "reduction": "mean"} | extra
    if name.startswith("cap="):
        cap, _, after = name.removeprefix("cap=").partition("@")
        return SETTINGS["default"] | {"tensor_cap": float(cap), "tensor_cap_after": int(after or 100)} | extra
    return SETTINGS[name] | extra


def run_one(task: str, setting_name: str, seed: int, out: Path) -> dict:
    """Train one (task, setting, seed); its record (score, curve, seconds, machine)."""
    setting = setting_of(setting_name)
    start = time.perf_counter()
    if task == "demo":
        row = _demo(setting, seed, out)
    elif task.startswith("copy"):
        row = _copy(setting, seed, out, trained=task == "copy-trained")
    elif task.startswith(("lm", "gpt2")) or task == "lstm<-gpt2":
        row = _text_task(task, setting, seed, out)
    elif task.startswith(("fcn", "conv", "nores")):
        row = _fashion(task, setting, seed, out)
    elif task == "parity":
        row = _parity(setting, seed, out)
    else:
        row = _minilm(setting, seed, out)
    return {"task": task, "setting": setting_name, "seed": seed, **row,
            "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "torch": torch.__version__}  # fmt: skip


def _path(out: Path, task: str, setting: str, seed: int) -> Path:
    return out / f"{task.replace('<-', '_from_')}__{setting}__{seed}.json"


def collapse(row: dict) -> str | None:
    """The first late collapse in a run's training curve (see the module docstring), or None."""
    values = [v for _, v in row["curve"]]
    if row["curve_kind"] == "train_acc":
        best = max(values)
        reached = next(i for i, v in enumerate(values) if v >= best - 0.05)
        for (step, v), peak in zip(row["curve"][reached:], _running(values[reached:], max), strict=True):
            if v < peak - 0.2:
                return f"train acc {v:.2f} at step {step} (best so far {peak:.2f})"
        return None
    for (step, v), low in zip(row["curve"], _running(values, min), strict=True):
        if v > 1.2 * low:
            return f"train loss {v:.3f} at step {step} (running min {low:.3f})"
    return None


def _running(values: list[float], pick: Any) -> list[float]:
    out, best = [], values[0]
    for v in values:
        best = pick(best, v)
        out.append(best)
    return out


def report(out: Path, settings: list[str], tasks: Collection[str] = TASKS, also: Collection[Path] = ()) -> str:
    """The Strength table: per task (of ``tasks``) and setting, score per seed, the paired difference vs
    alone with its standard error and seeds better, and the runs that collapsed late. Runs saved in the
    ``also`` folders count too, where ``out`` has no run of the same task, setting and seed."""
    found: dict[str, dict] = {}
    for folder in (*also, out):  # out last: its runs replace the others'
        found |= {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}
    rows = [found[name] for name in sorted(found)]
    header = (
        "| task | setting | score (final step) | per seed | vs alone | SE | seeds better | selected (mean) "
        "| late collapse |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for task in (t for t in TASKS if t in tasks):
        base = ALONE_OF.get(task, task)
        for setting in dict.fromkeys(("alone", *settings)):
            # a "+clip=C" setting is paired with the target alone under the same clipping
            _, sep, clip = setting.partition("+clip=")
            reference = "alone" + sep + clip
            alone = {r["seed"]: r["score"] for r in rows if r["task"] == base and r["setting"] == reference}
            runs = sorted((r for r in rows if r["task"] == task and r["setting"] == setting), key=lambda r: r["seed"])
            if not runs:
                continue
            scores = [r["score"] for r in runs]
            spread = f" +- {statistics.stdev(scores):.3f}" if len(scores) > 1 else ""
            diffs = [r["score"] - alone[r["seed"]] for r in runs if r["seed"] in alone]
            selected = [r["selected"] for r in runs if r.get("selected") is not None]
            picked = f"{statistics.fmean(selected):.3f}" if selected else ""
            vs = se = better = ""
            if setting != reference and diffs:
                vs = f"{statistics.fmean(diffs):+.3f}"
                se = f"{statistics.stdev(diffs) / len(diffs) ** 0.5:.3f}" if len(diffs) > 1 else ""
                better = f"{sum((d > 0) == HIGHER_IS_BETTER[task] and d != 0 for d in diffs)} / {len(diffs)}"
            fell = [f"seed {r['seed']}: {c}" for r in runs if (c := collapse(r))]
            lines.append(f"| {task} | {setting} | {statistics.fmean(scores):.3f}{spread} | "
                         f"{' / '.join(f'{s:.3f}' for s in scores)} | {vs} | {se} | {better} | {picked} | "
                         f"{'; '.join(fell) or 'none'} |")  # fmt: skip
    return "\n".join(lines)


def main(tasks: list[str], settings: list[str], seeds: list[int] | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for seed in seeds or (DEMO_SEEDS if task == "demo" else (0, 1, 2)):
            for setting in settings:
                if task == "parity" and setting == "paper":
                    continue  # one pair: the mean is the sum, the same run as "default"
                if setting == "alone" and task in ALONE_OF:
                    continue  # the same run as ALONE_OF[task]'s
                path = _path(out, task, setting, seed)
                if path.exists():  # resume: a finished run is not repeated
                    continue
                row = run_one(task, setting, seed, out)
                path.write_text(json.dumps(row) + "\n", encoding="utf-8")
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--settings", nargs="+", default=["alone", *SETTINGS], help="alone, default, paper, strength=R, cap=C@K"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0-2 (the demo: 0-4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/strength"))
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="with --report: runs of other studies too")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    if a.report:
        print(report(a.out, [s for s in a.settings if s != "alone"], a.tasks, a.also))
    else:
        main(a.tasks, a.settings, a.seeds, a.out)
