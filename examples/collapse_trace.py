"""Why a guided demo run collapses late: a per-step trace of one run.

Trains the demo's MLP guided by the untrained 1-D CNN (``guidewrap demo``'s data, pairs and batches)
at a chosen setting and records, every step: the task loss, the term, the norms of the task's and the
term's gradients over the MLP's parameters (their ratio is the term's pull), each pair's CKA, the
Adam update's norm, the smallest singular value over the largest (the conditioning) of each aligned
target layer's centred features, and the training accuracy of the batch. Saved as JSON; ``--report``
prints the steps around the largest fall of the batch accuracy.

    python examples/collapse_trace.py --setting default --seed 0 --out runs/collapse-default-0.json
    python examples/collapse_trace.py --setting default --seed 0 --clip 1 --out runs/collapse-clip-0.json
    python examples/collapse_trace.py --report runs/collapse-default-0.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from guidewrap import GuidedModel
from guidewrap.tasks import DEMO_PAIRS, DEMO_TRAIN_SAMPLES, cnn1d, deep_mlp, load_mnist1d, random_batches

SETTINGS = {
    "default": {"weight": 1.0, "reduction": "mean"},
    "paper": {"weight": 1.0, "reduction": "sum"},
    "demo": {"weight": 0.5, "reduction": "sum"},
}


def _norm(loss: Tensor, params: list[Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def _conditioning(x: Tensor) -> float:
    """Smallest over largest singular value of the centred (n, d) features (0: rank-deficient)."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    return float(s[min(s.numel(), x.shape[0] - 1) - 1] / s[0]) if s[0] > 0 else 0.0


def trace(
    setting: dict, seed: int, steps: int = 1000, data: dict[str, Tensor] | None = None, clip: float | None = None
) -> list[dict]:
    """The per-step record of one guided demo run (same weights and batches as the demo's seed);
    ``clip``: the gradient-norm limit applied before each step (the demo before 0.3: none; since: 1)."""
    data = data or load_mnist1d(train_samples=DEMO_TRAIN_SAMPLES)
    torch.manual_seed(seed)
    target = deep_mlp()
    guide = cnn1d().eval()
    opt = torch.optim.Adam(target.parameters(), lr=1e-3)
    guided = GuidedModel(target, guide, layers=DEMO_PAIRS, optimizer=opt, **setting)
    batches = random_batches(data["x"], data["y"], 256, seed)
    params = [p for p in target.parameters() if p.requires_grad]
    features: dict[str, Tensor] = {}
    names = {t for t, _ in DEMO_PAIRS}
    for name, module in target.named_modules():
        if name in names:
            module.register_forward_hook(lambda m, i, o, n=name: features.__setitem__(n, o.detach()))
    rows = []
    target.train()
    for step in range(steps):
        x, y = batches(step)
        out = guided(x)
        task = nn.functional.cross_entropy(out, y)
        loss = guided.total_loss(task)
        term = loss - task
        g_task, g_term = _norm(task, params), _norm(term, params)
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        update = math.sqrt(
            sum(float((p.detach() - b).double().pow(2).sum()) for p, b in zip(params, before, strict=True))
        )
        rows.append({
            "step": step + 1, "task_loss": float(task), "term": float(term), "grad_task": g_task,
            "grad_term": g_term, "pull": g_term / g_task if g_task > 0 else math.inf,
            "batch_acc": float((out.argmax(1) == y).float().mean()), "update_norm": update,
            "cka": dict(guided.last_alignment),
            "conditioning": {n: _conditioning(f.flatten(1)) for n, f in features.items()},
        })  # fmt: skip
    guided.close()
    return rows


def report(rows: list[dict], around: int = 6) -> str:
    """The steps around the largest fall of the batch accuracy (a running maximum over 50 steps)."""
    accs = [r["batch_acc"] for r in rows]
    fall = max(range(50, len(rows)), key=lambda i: max(accs[i - 50 : i]) - accs[i])
    lines = ["| step | task loss | term | grad task | grad term | pull | batch acc | update | min CKA | min cond |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    picks = sorted({*range(max(0, fall - 60), fall + around, 10), *range(max(0, fall - around), fall + around)})
    for i in (i for i in picks if i < len(rows)):
        r = rows[i]
        lines.append(
            f"| {r['step']} | {r['task_loss']:.4f} | {r['term']:.4f} | {r['grad_task']:.3g} | {r['grad_term']:.3g} | "
            f"{r['pull']:.3g} | {r['batch_acc']:.3f} | {r['update_norm']:.3g} | {min(r['cka'].values()):.3f} | "
            f"{min(r['conditioning'].values()):.2e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="default", help="default, paper, demo or strength=R")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clip", type=float, help="gradient-norm limit before each step (default: none, as the unclipped demo)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/collapse.json"))
    parser.add_argument("--report", type=Path, help="print the trace saved here")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    if a.report:
        print(report(json.loads(a.report.read_text(encoding="utf-8"))))
    else:
        if a.setting.startswith("strength="):
            chosen = {"strength": float(a.setting.removeprefix("strength=")), "reduction": "mean"}
        else:
            chosen = SETTINGS[a.setting]
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(trace(chosen, a.seed, a.steps, clip=a.clip)), encoding="utf-8")
        print(report(json.loads(a.out.read_text(encoding="utf-8"))))
