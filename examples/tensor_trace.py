"""Who owns each tensor's step: the task's and the term's gradients taken apart, tensor by tensor.

Trains one task at one setting and records, at every step and for every trainable tensor of the
target, the norm of the task loss's gradient and of the weighted alignment term's (each from its own
``torch.autograd.grad``), and the norm of the optimizer's update; every ``--stats-every`` steps, for
every aligned target layer, the activations' scale (root mean square) and how many of its channels are
dead (never positive over the batch: zero after the ReLU that follows) or constant (the same value for
every sample). The step itself is the one the setting prescribes (the task's gradient plus the term's,
or plus the per-tensor-capped term's), so a traced run is the run, not a side measurement.

Tasks: ``conv`` / ``conv-trained`` (the image study's plain 20-layer ConvNet guided by the untrained /
trained one-channel ResNet-18, Fashion-MNIST, batch 128, Adam 1e-3, unclipped), ``lstm<-gpt2`` (the
strength study's 4-layer LSTM guided by a 4-block GPT-2, clipped at 1) and ``demo`` (the demo's MLP <-
1-D CNN over its six pairs at the demo's weight, clipped at 1).

Settings: ``alone`` (the term computed, not applied), ``default`` (weight 1 on the mean over pairs),
``paper`` (weight 1 on the sum), ``demo`` (the demo's 0.5 on the sum), ``strength=R``, and the library's
per-tensor settings ``BASE/tensor_pull=C`` (e.g. ``default/tensor_pull=1``: see
docs/concepts/strength.md). ``--optimizer sgd`` uses SGD with momentum 0.9 at lr 0.01.

    python examples/tensor_trace.py --task conv --setting default --seed 0 --steps 300 --out runs/trace.json
    python examples/tensor_trace.py --report runs/trace.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_study import cpu_model  # noqa: E402
from lab.common import batch_stream, seeded  # noqa: E402
from lab.language import CharCorpus, perplexity, python_docs_text, text_models  # noqa: E402

from guidewrap import GuidedModel  # noqa: E402
from guidewrap.tasks import DEMO_PAIRS, DEMO_TRAIN_SAMPLES, cnn1d, deep_mlp, load_mnist1d, random_batches  # noqa: E402

BASES: dict[str, dict[str, Any]] = {
    "default": {"weight": 1.0, "reduction": "mean"},
    "paper": {"weight": 1.0, "reduction": "sum"},
    "demo": {"weight": 0.5, "reduction": "sum"},
}


def setting_of(name: str) -> dict[str, Any] | None:
    """Guidance keywords of a setting name (``None``: alone). ``BASE/key=value`` adds a setting."""
    base, *extra = name.split("/")
    if base == "alone":
        return None
    out = {"strength": float(base.removeprefix("strength=")), "reduction": "mean"} if base.startswith(
        "strength=") else dict(BASES[base])  # fmt: skip
    for item in extra:
        key, _, value = item.partition("=")
        out[key] = float(value) if "." in value or "e" in value else int(value)
    return out


class Task:
    """A target, its guide, batches, the task loss, the guidance keywords the study pins, the optimizer
    settings and a final score."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed
        self.clip: float | None = 1.0
        self.lr = 1e-3
        if name.startswith("conv"):
            self._conv(name.endswith("trained"))
        elif name == "lstm<-gpt2":
            self._text("lstm", "gpt2")
        elif name == "copy":
            self._copy()
        elif name == "lm":
            self._text("rnn", "transformer")
        elif name == "demo":
            self._demo()
        else:
            raise ValueError(f"unknown task {name!r}")

    def _conv(self, trained: bool) -> None:
        import fashion_mnist

        cfg = fashion_mnist.defaults()
        data = fashion_mnist.load_fashion_mnist(None, cfg.train_samples)
        self.target = seeded(self.seed, lambda: fashion_mnist.plain_convnet(cfg.conv_depth, cfg.conv_channels))
        guides = Path("runs/strength-guides")
        guides.mkdir(parents=True, exist_ok=True)
        self.guide = (
            fashion_mnist.trained_guide(data, guides, cfg.guide_steps, cfg.batch)
            if trained
            else seeded(10_000 + self.seed, fashion_mnist.resnet18_gray).eval()
        )
        self.batches = random_batches(data["x"], data["y"], cfg.batch, self.seed)
        self.loss = nn.functional.cross_entropy
        self.pins = {"layers": "sublayers"}
        self.clip = None  # the image study trains unclipped
        self.test = (data["x_test"], data["y_test"])

    def _copy(self) -> None:
        from lab.copy_paste import CausalTransformer, CopyPasteTask, StackedRNN, held_out_accuracy, task_batches
        from lab.copy_paste import task_loss as copy_loss

        task = CopyPasteTask(min_len=10, max_len=20, symbols=10)
        self.target = seeded(self.seed, lambda: StackedRNN(task.vocab))
        self.guide = CausalTransformer(task.vocab)  # right after the target, under its seed (the studies')
        self.batches, self.loss = task_batches(task, 64, self.seed), copy_loss
        self.pins = {"layers": "sublayers"}
        self.test = lambda: held_out_accuracy(self.target, task, self.seed, 4)

    def _text(self, target: str, guide: str) -> None:
        """A language model on CPython's docs as characters (the strength study's text tasks)."""
        corpus = CharCorpus(python_docs_text(), seq_len=50)
        self.test = torch.stack([row["input_ids"] for row in corpus.dataset("test")])

        def draw(gen: torch.Generator) -> tuple[Tensor, Tensor]:
            ids = corpus.batch(32, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))["input_ids"]
            return ids, ids

        models = text_models(corpus.vocab_size, 128)
        self.target = seeded(self.seed, models[target])
        self.guide = seeded(self.seed + 1, models[guide])
        self.batches, self.loss = batch_stream(self.seed, draw), _lm_loss
        self.pins = {"layers": "sublayers"}

    def _demo(self) -> None:
        data = load_mnist1d(train_samples=DEMO_TRAIN_SAMPLES)
        torch.manual_seed(self.seed)
        self.target = deep_mlp()
        self.guide = cnn1d().eval()
        self.batches = random_batches(data["x"], data["y"], 256, self.seed)
        self.loss = nn.functional.cross_entropy
        self.pins = {"layers": DEMO_PAIRS}
        self.test = (data["x_test"], data["y_test"])

    @torch.no_grad()
    def score(self, limit: int | None = None) -> float:
        """Test accuracy (images, MNIST-1D) or test perplexity (the language model), in eval mode."""
        was = self.target.training
        self.target.eval()
        try:
            if self.name in ("lstm<-gpt2", "lm"):
                return perplexity(_lm_loss(self.target(self.test), self.test).item())
            if self.name == "copy":
                return self.test()
            x, y = self.test
            x, y = x[:limit], y[:limit]
            chunks = range(0, len(x), 1000)
            hits = sum(int((self.target(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in chunks)
            return hits / len(x)
        finally:
            self.target.train(was)


def _lm_loss(out: Any, ids: Tensor) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _norms(loss: Tensor, params: list[Tensor]) -> list[float]:
    if not loss.requires_grad:
        return [0.0] * len(params)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else float(g.double().norm()) for g in grads]


def _channel_stats(output: Any) -> dict[str, float]:
    """A layer output's scale and its dead and constant channels (channels: dim 1 of (n, C, ...), the
    last dim of (n, T, D) sequences)."""
    x = output[0] if isinstance(output, tuple) else output
    x = x.detach().double()
    channels = x.movedim(-1, 1) if x.dim() == 3 else x  # (n, T, D): features are the channels
    flat = channels.movedim(1, 0).reshape(channels.shape[1], -1)
    rms = float(x.pow(2).mean().sqrt())
    spread = flat.std(dim=1)
    return {
        "rms": rms,
        "channels": flat.shape[0],
        "dead": int((flat.max(dim=1).values <= 0).sum()),
        "constant": int((spread <= 1e-6 * max(rms, 1e-30)).sum()),
    }


def trace(task_name: str, setting_name: str, seed: int, steps: int, optimizer: str = "adam",
          stats_every: int = 10, score_every: int = 100) -> dict:  # fmt: skip
    """The per-step record of one run (see the module docstring)."""
    task = Task(task_name, seed)
    setting = setting_of(setting_name)
    target = task.target
    params = [p for p in target.parameters() if p.requires_grad]
    names = [n for n, p in target.named_parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=task.lr)
    guidance = setting or BASES["default"]  # alone: the term measured at the default, not applied
    guided = GuidedModel(target, task.guide, optimizer=opt, **task.pins, **guidance)
    modules = dict(target.named_modules())
    outputs: dict[str, Any] = {}
    layers: list[str] = []
    hooks = []
    rows, scores = [], []
    target.train()
    start = time.perf_counter()
    try:
        for step in range(steps):
            x, y = task.batches(step)  # the study's batches, in its order
            if step == 0:
                layers = [p.target.name for p in guided.plan(x)]
                hooks = [
                    modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in layers
                ]
            out = guided(x)
            task_loss = task.loss(out, y)
            loss = guided.total_loss(task_loss)
            term = guided.alignment_loss  # the term at the weight in force (before a per-tensor cap)
            g_task, g_term = _norms(task_loss, params), _norms(term, params)
            capped = setting is not None and setting.get("tensor_cap") is not None
            g_applied = _norms(loss - task_loss, params) if capped else None
            applied = task_loss if setting is None else loss
            before = [p.detach().clone() for p in params]
            opt.zero_grad()
            applied.backward()
            if task.clip is not None:
                nn.utils.clip_grad_norm_(params, task.clip)
            opt.step()
            row = {
                "step": step + 1, "task_loss": float(task_loss.detach()), "term": float(term.detach()),
                "grad_task": g_task, "grad_term": g_term, "grad_applied": g_applied,
                "update": [float((p.detach() - b).double().norm()) for p, b in zip(params, before, strict=True)],
                "cka": dict(guided.last_alignment),
                "metrics": {k: v for k, v in guided.guidance_metrics().items() if not k.startswith("guidance_align")},
            }  # fmt: skip
            if step == 0 or (step + 1) % stats_every == 0 or step == steps - 1:
                row["layers"] = {n: _channel_stats(outputs[n]) for n in layers if n in outputs}
            rows.append(row)
            if (step + 1) % score_every == 0 and step + 1 < steps:
                scores.append((step + 1, task.score(limit=2000)))
    finally:
        for h in hooks:
            h.remove()
        guided.close()
    final = task.score()
    return {"task": task_name, "setting": setting_name, "seed": seed, "optimizer": optimizer, "steps": steps,
            "tensors": names, "layers": layers, "rows": rows, "scores": scores, "final": final,
            "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "torch": torch.__version__}  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def report(record: dict, at: tuple[int, ...] = (1, 10, 40, 100, 200, 300, 600)) -> str:
    """The trace at a few steps: the ratios per tensor (first, middle, last weight tensor), how many
    tensors the term dominates (over 1x) and holds (over 100x), the task's gradient into the first
    tensor, dead/constant channels, and the scores."""
    names = record["tensors"]
    weights = [i for i, n in enumerate(names) if n.endswith("weight") or "weight" in n.split(".")[-1]]
    aligned = [i for i in weights if record["rows"][0]["grad_term"][i] > 0] or weights
    picks = [aligned[0], aligned[len(aligned) // 2], aligned[-1]]
    lines = [
        f"{record['task']} / {record['setting']} / seed {record['seed']} / {record['optimizer']}: final score "
        f"{record['final']:.4g}; {record['threads']} thread(s), {record['cpu']}",
        "",
        f"| step | task loss | term | term/task: {' | '.join(names[i] for i in picks)} | dominated (>1x) "
        "| held (>100x) | task grad, first tensor | dead / constant channels |",
        "|---|---|---|" + "---|" * len(picks) + "---|---|---|---|",
    ]
    rows = record["rows"]
    by_step = {r["step"]: r for r in rows}
    for step in (s for s in at if s in by_step):
        r = by_step[step]
        ratios = [_ratio(t, k) for t, k in zip(r["grad_term"], r["grad_task"], strict=True)]
        stats = _stats_at(rows, step)
        dead = sum(s["dead"] for s in stats.values())
        const = sum(s["constant"] for s in stats.values())
        total = sum(s["channels"] for s in stats.values())
        lines.append(
            f"| {step} | {r['task_loss']:.4f} | {r['term']:.4f} | "
            + " | ".join(f"{ratios[i]:.3g}" for i in picks)
            + f" | {sum(q > 1 for q in ratios)} of {len(ratios)} | {sum(q > 100 for q in ratios)} of {len(ratios)} | "
            f"{r['grad_task'][weights[0]]:.2g} | {dead} / {const} of {total} |"
        )
    lines.append("")
    scores = ", ".join(f"step {s}: {v:.4g}" for s, v in record["scores"])
    lines.append(f"scores: {scores}, final: {record['final']:.4g}")
    return "\n".join(lines)


def _stats_at(rows: list[dict], step: int) -> dict:
    """The aligned layers' channel statistics recorded last at or before ``step``."""
    return next((r["layers"] for r in reversed(rows) if r["step"] <= step and "layers" in r), {})


def thin(record: dict, every: int = 10) -> dict:
    """The record with the first step's, every ``every``-th step's and the layer statistics' rows only
    (what docs/data keeps)."""
    keep = [r for r in record["rows"] if r["step"] == 1 or r["step"] % every == 0 or "layers" in r]
    return record | {"rows": keep}


def compare(records: list[dict], at: tuple[int, ...] = (1, 40, 100, 300)) -> str:
    """Several traces side by side at a few steps: tensors the term dominates (over 1x) and holds (over
    100x), the first weight tensor's pull and task gradient, dead channels of the aligned layers, and
    each run's final score."""
    lines = [
        "| run | step | dominated (>1x) | held (>100x) | first tensor: term/task | first tensor: task grad "
        "| dead channels (last measured) | final score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        names, rows = record["tensors"], record["rows"]
        by_step = {r["step"]: r for r in rows}
        first = next(i for i, n in enumerate(names) if "weight" in n.rsplit(".", 1)[-1])
        label = f"{record['task']} {record['setting']} ({record['optimizer']})"
        for step in (s for s in at if s in by_step):
            r = by_step[step]
            ratios = [_ratio(t, k) for t, k in zip(r["grad_term"], r["grad_task"], strict=True)]
            stats = _stats_at(rows, step)
            dead = f"{sum(v['dead'] for v in stats.values())} of {sum(v['channels'] for v in stats.values())}"
            score = f"{record['final']:.4g}" if step == at[-1] or step == rows[-1]["step"] else ""
            lines.append(
                f"| {label} | {step} | {sum(q > 1 for q in ratios)} of {len(ratios)} | "
                f"{sum(q > 100 for q in ratios)} of {len(ratios)} | {ratios[first]:.3g} | "
                f"{r['grad_task'][first]:.2g} | {dead} | {score} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="conv", choices=["conv", "conv-trained", "lstm<-gpt2", "demo", "copy", "lm"])
    parser.add_argument("--setting", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/trace.json"))
    parser.add_argument("--report", type=Path, help="print the trace saved here")
    parser.add_argument("--compare", type=Path, nargs="+", help="print these saved traces side by side")
    parser.add_argument("--thin", type=Path, help="also write the trace with every 10th step's row only here")
    parser.add_argument(
        "--record", type=Path, help="also write the tensor pulls after --after guided steps here (the warning's check)"
    )
    parser.add_argument("--after", type=int, default=100, help="with --record: guided steps before the check")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    if a.report:
        print(report(json.loads(a.report.read_text(encoding="utf-8"))))
        return
    if a.compare:
        print(compare([json.loads(p.read_text(encoding="utf-8")) for p in a.compare]))
        return
    record = trace(a.task, a.setting, a.seed, a.steps, a.optimizer)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record), encoding="utf-8")
    if a.thin:
        a.thin.parent.mkdir(parents=True, exist_ok=True)
        a.thin.write_text(json.dumps(thin(record)), encoding="utf-8")
    print(report(record))
    if a.record:
        row = record["rows"][a.after]  # the step the check measures: after `after` guided steps
        kept = {k: record[k] for k in ("task", "setting", "seed", "tensors", "threads", "cpu", "torch")}
        pulls = {"after": a.after, "step": row["step"], "grad_task": row["grad_task"], "grad_term": row["grad_term"]}
        a.record.mkdir(parents=True, exist_ok=True)
        name = f"{a.task}__{a.setting.replace('/', '_')}__{a.seed}.json"
        (a.record / name).write_text(json.dumps(kept | pulls) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
