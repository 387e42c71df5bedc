"""The matching study: which layer level and pair reduction should be the default?

Five tasks, each trained alone and with four matching settings (3 seeds, every run of a seed on the
same batches from the same initial weights, guides untrained):

- ``demo``: the demo's 8 x 256 MLP guided by the untrained 1-D CNN on MNIST-1D (1,000 steps,
  scored like the demo: test accuracy at the best validation evaluation);
- ``copy``: copy-paste, a 4-layer tanh RNN guided by a 4-layer Transformer (500 steps, held-out
  token accuracy);
- ``lm``: the character LM on CPython's docs, a 4-layer tanh RNN guided by a 4-layer Transformer
  (500 steps, held-out perplexity, lower is better);
- ``gpt2<-lstm`` and ``lstm<-gpt2``: a 4-block GPT-2 (d 128) and a 4-layer LSTM LM (hidden 128)
  guiding each other on the same text (300 steps, held-out perplexity).

Settings: ``blocks/mean`` (repeated blocks, weight 1 on the mean over pairs), ``sublayers/mean``,
``sublayers/sum`` (every sub-layer, weight 1 on the sum: the library's earlier default) and ``paper``
(the published rule). Every run is saved as JSON when it finishes (``--out``), so an interrupted
study resumes; ``--report`` prints the table of docs/results.md ("Matching").

Run: python examples/matching_study.py --tasks demo copy --seeds 0 1 2 --threads 1 --out runs/matching
     python examples/matching_study.py --report --out runs/matching
     python examples/matching_study.py --smoke      (tiny, one seed; used by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lab.common import fit, seeded
from lab.copy_paste import CausalTransformer, CopyPasteTask, StackedRNN, held_out_accuracy, task_batches, task_loss
from lab.language import CharCorpus, perplexity, python_docs_text, text_models
from torch import Tensor, nn

import guidewrap
from guidewrap.errors import PlanError
from guidewrap.tasks import DEMO_TRAIN_SAMPLES, batch_stream, load_mnist1d, train_variant

SETTINGS: dict[str, dict[str, Any]] = {
    "blocks/mean": {"layers": "blocks", "reduction": "mean", "weight": 1.0},
    "sublayers/mean": {"layers": "sublayers", "reduction": "mean", "weight": 1.0},
    "sublayers/sum": {"layers": "sublayers", "reduction": "sum", "weight": 1.0},
    "paper": {"layers": "paper", "reduction": "sum", "weight": 1.0},
}
TASKS = ("demo", "copy", "lm", "gpt2<-lstm", "lstm<-gpt2")
HIGHER_IS_BETTER = {"demo": True, "copy": True, "lm": False, "gpt2<-lstm": False, "lstm<-gpt2": False}


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def _lm_loss(out: Any, ids: Tensor) -> Tensor:
    logits = _logits(out)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _pairs(target: nn.Module, guide: nn.Module, example: Any, setting: dict[str, Any] | None) -> int:
    if setting is None:
        return 0
    keys = {k: v for k, v in setting.items() if k in ("layers", "reduction")}
    return len(guidewrap.GuidedModel(target, guide, **keys).plan(example))


_DATA: dict[bool, dict[str, Tensor]] = {}


def _demo_data(smoke: bool) -> dict[str, Tensor]:
    if smoke not in _DATA:
        small = {"num_samples": 400, "val_samples": 50}
        _DATA[smoke] = load_mnist1d(**small) if smoke else load_mnist1d(train_samples=DEMO_TRAIN_SAMPLES)
    return _DATA[smoke]


def run_one(task: str, setting: str, seed: int, smoke: bool = False) -> dict[str, Any]:
    """Train one (task, setting, seed); returns its score, pairs and seconds per step."""
    guidance = None if setting == "alone" else SETTINGS[setting]
    if task == "demo":
        data = _demo_data(smoke)
        steps = 3 if smoke else 1000
        start = time.perf_counter()
        variant = "baseline" if guidance is None else "guided"
        kw = {} if guidance is None else {"layers": guidance["layers"], "reduction": guidance["reduction"]}
        r = train_variant(
            variant, data, seed=seed, steps=steps, batch=32 if smoke else 256, weight=1.0, clip=None, **kw
        )  # unclipped, as its published rows
        seconds = time.perf_counter() - start
        score, pairs = r.test_acc, 0
        if guidance is not None:
            from guidewrap.tasks import cnn1d, deep_mlp

            pairs = _pairs(deep_mlp(), cnn1d(), data["x"][:16], guidance)
    elif task == "copy":
        cp = CopyPasteTask(3, 5, 5) if smoke else CopyPasteTask(10, 20, 10)
        steps = 3 if smoke else 500
        torch.manual_seed(seed)
        target = StackedRNN(cp.vocab)
        guide = CausalTransformer(cp.vocab)  # built right after the target, under the same seed
        mode = "none" if guidance is None else "guided"
        start = time.perf_counter()
        fit(target, task_batches(cp, 64, seed), task_loss, steps, guide=guide, mode=mode, **(guidance or {}))
        seconds = time.perf_counter() - start
        score = held_out_accuracy(target, cp, seed, 1 if smoke else 4)
        pairs = _pairs(StackedRNN(cp.vocab), guide, cp.sample(8, seed=0)["input_ids"], guidance)
    else:
        corpus = CharCorpus(python_docs_text()[: 20_000 if smoke else None], seq_len=50)
        test = torch.stack([row["input_ids"] for row in corpus.dataset("test")])[: 64 if smoke else None]
        steps = 3 if smoke else (500 if task == "lm" else 300)
        d = 16 if smoke else 128
        v = corpus.vocab_size

        m = text_models(v, d)
        roles = {"lm": ("rnn", "transformer"), "gpt2<-lstm": ("gpt2", "lstm"), "lstm<-gpt2": ("lstm", "gpt2")}
        make_target, make_guide = (m[name] for name in roles[task])
        target = seeded(seed, make_target)
        guide = seeded(seed + 1, make_guide)

        def draw(gen: torch.Generator) -> tuple[Tensor, Tensor]:
            ids = corpus.batch(32, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))["input_ids"]
            return ids, ids

        mode = "none" if guidance is None else "guided"
        start = time.perf_counter()
        fit(target, batch_stream(seed, draw), _lm_loss, steps, guide=guide, mode=mode, **(guidance or {}))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            score = perplexity(_lm_loss(target(test), test).item())
        pairs = _pairs(seeded(seed, make_target), guide, test[:8], guidance)
    return {
        "task": task,
        "setting": setting,
        "seed": seed,
        "score": score,
        "pairs": pairs,
        "seconds_per_step": seconds / steps,  # the training loop only (with the demo's evaluations)
        "threads": torch.get_num_threads(),
    }


def _path(out: Path, task: str, setting: str, seed: int) -> Path:
    safe = task.replace("<-", "_from_")
    return out / f"{safe}__{setting.replace('/', '_')}__{seed}.json"


def report(out: Path) -> str:
    """The Matching table: per task and setting, the score (mean +- sd, per seed), the paired
    difference from the target alone, the pairs, and the step time over the unguided step's."""
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*.json"))]
    lines = [
        "| task | setting | pairs | score | per seed | vs alone (paired, mean) | seeds better | step time / alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        alone = {r["seed"]: r for r in rows if r["task"] == task and r["setting"] == "alone"}
        for setting in ("alone", *SETTINGS):
            runs = sorted((r for r in rows if r["task"] == task and r["setting"] == setting), key=lambda r: r["seed"])
            if not runs:
                continue
            if runs[0]["score"] is None:
                why = "no layer of the paper's types" if "paper's types" in runs[0]["why"] else runs[0]["why"][:90]
                lines.append(f"| {task} | {setting} | 0 | not applicable: {why} | | | | |")
                continue
            scores = [r["score"] for r in runs]
            spread = f" +- {statistics.stdev(scores):.3f}" if len(scores) > 1 else ""
            per_seed = " / ".join(f"{s:.3f}" for s in scores)
            diffs = [r["score"] - alone[r["seed"]]["score"] for r in runs if r["seed"] in alone]
            better = sum((d > 0) == HIGHER_IS_BETTER[task] and d != 0 for d in diffs)
            base_time = statistics.fmean(a["seconds_per_step"] for a in alone.values()) if alone else math.nan
            cost = statistics.fmean(r["seconds_per_step"] for r in runs) / base_time
            vs = "" if setting == "alone" or not diffs else f"{statistics.fmean(diffs):+.3f}"
            seeds = "" if setting == "alone" else f"{better} / {len(diffs)}"
            lines.append(
                f"| {task} | {setting} | {runs[0]['pairs'] or '-'} | {statistics.fmean(scores):.3f}{spread} | "
                f"{per_seed} | {vs} | {seeds} | {cost:.2f} |"
            )
    return "\n".join(lines)


def main(tasks: list[str], settings: list[str], seeds: list[int], out: Path, smoke: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:
        for seed in seeds:
            for setting in settings:
                path = _path(out, task, setting, seed)
                if path.exists():  # resume: a finished run is not repeated
                    results.append(json.loads(path.read_text(encoding="utf-8")))
                    continue
                try:
                    row = run_one(task, setting, seed, smoke)
                except PlanError as error:  # e.g. the paper's type list has no Conv1d: nothing to align
                    row = {"task": task, "setting": setting, "seed": seed, "score": None, "why": str(error)}
                path.write_text(json.dumps(row), encoding="utf-8")
                print(json.dumps(row), flush=True)
                results.append(row)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--settings", nargs="+", default=["alone", *SETTINGS], choices=["alone", *SETTINGS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/matching"))
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    if a.report:
        print(report(a.out))
    else:
        main(a.tasks, a.settings, [0] if a.smoke else a.seeds, a.out, a.smoke)
