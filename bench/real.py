"""Guided step over its floor on the models real scripts train, side by side in one process (CPU).

Run: python bench/real.py [--reps 7]
Cases, each one training step with AdamW, timed interleaved, median of ``reps`` repetitions:
  - GPT-2 <- GPT-2: a GPT-2 LM (4 blocks, d 128, GPT-2's vocabulary of 50,257) on tokenized blocks of
    128 tokens, batch 8 (the shape run_clm.py trains), guided by an untrained GPT-2 of the same size;
  - GPT-2 <- LSTM: the same target guided by a 2-layer LSTM LM (hidden 128);
  - BERT, dynamic padding: a BERT classifier (4 layers, d 256) on batches of 16 padded to their
    longest (lengths 16-128, an attention mask), guided by an untrained BERT of the same size;
  - per-pair overhead: a tiny GPT-2 pair at the "sublayers" level (25 pairs) against "blocks" (2),
    the extra time per extra pair in microseconds.
floor = the unguided step + one guide forward under inference mode: what any guidance must pay.
Every case states the level, pair reduction and weight it uses (the library's defaults unless said).
Prints, last, lm_guided_over_floor=<x> for the GPT-2 <- GPT-2 case. ``--strength R`` and ``--tensor-cap C``
add those settings' steps to the GPT-2 <- GPT-2 case (lm_strength_over_fixed, lm_tensor_cap_over_fixed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guidewrap import GuidedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import strength_cost  # noqa: E402  (one amortisation rule for both benches)

MATCHING: dict[str, Any] = {"layers": "auto", "reduction": "mean", "weight": 1.0}  # the defaults, named


def gpt2(vocab: int = 50257, layers: int = 4, width: int = 128, positions: int = 128) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=4, n_positions=positions)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


class LSTMLM(nn.Module):
    """A 2-layer LSTM language model (a guide for the GPT-2 target)."""

    def __init__(self, vocab: int = 50257, hidden: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lstm = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        h = self.emb(input_ids)
        for layer in self.lstm:
            h = layer(h)[0]
        return h


def bert(width: int = 256, layers: int = 4, head: bool = True) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=28996, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config) if head else BertModel(config)


def padded_batch(n: int, low: int, high: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch padded to its longest sequence (DataCollatorWithPadding's output), right padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen)
    longest = int(lengths.max())
    ids = torch.randint(1, vocab, (n, longest), generator=gen)
    mask = (torch.arange(longest) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=gen)}


def make_steps(
    target: nn.Module,
    guide: nn.Module,
    batch: dict[str, torch.Tensor],
    guide_batch: dict[str, torch.Tensor],
    strength: float | None = None,
    reps: int = 7,
    tensor_cap: float | None = None,
    **settings: Any,
) -> dict[str, Callable[[], None]]:
    """plain, floor and guided steps on one batch (the target's output carries its loss)."""
    opt = torch.optim.AdamW(target.parameters(), lr=1e-4)
    guided = GuidedModel(target, guide, **settings)
    guide.eval()

    def train_step(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            loss = model(**batch).loss  # a GuidedModel's output.loss already holds the alignment term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    plain = train_step(target)

    def floor() -> None:
        with torch.inference_mode():
            guide(**guide_batch)
        plain()

    steps = {"plain": plain, "floor": floor, "guided": train_step(guided)}
    if strength is not None:  # re-measured on the last timed repetition: strength_every = the repetitions
        steps["strength"] = train_step(GuidedModel(target, guide, **settings, strength=strength, strength_every=reps))
    if tensor_cap is not None:  # in force from the first step: every timed step takes the gradients apart
        capped = GuidedModel(target, guide, **settings, tensor_cap=tensor_cap, tensor_cap_after=0, optimizer=opt)
        steps["tensor_cap"] = train_step(capped)
    return steps


def time_steps(steps: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    for fn in steps.values():
        fn()  # warm-up: plans, allocator
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():  # interleaved: drift hits every variant alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    RAW_TIMES.clear()
    RAW_TIMES.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


RAW_TIMES: dict[str, list[float]] = {}  # the last time_steps' every repetition, by step


def _report(title: str, med: dict[str, float], pairs: int) -> float:
    print(f"{title} ({pairs} pairs)")
    print("  " + "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in med.items()))
    return med["guided"] / med["floor"]


def main(
    reps: int = 7,
    batch: int = 8,
    length: int = 128,
    vocab: int = 50257,
    width: int = 128,
    tiny: bool = False,
    strength: float | None = None,
    strength_every: int = 25,
    tensor_cap: float | None = None,
) -> float:
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; matching: "
        + ", ".join(f"{k}={v}" for k, v in MATCHING.items())
    )
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    lm_batch = {"input_ids": ids, "labels": ids}
    target = gpt2(vocab, 4, width, length)
    ratios = {}
    for name, guide in (("gpt2", gpt2(vocab, 4, width, length)), ("lstm", LSTMLM(vocab, width))):
        with_strength, with_cap = (strength, tensor_cap) if name == "gpt2" else (None, None)
        steps = make_steps(target, guide, lm_batch, {"input_ids": ids}, with_strength, reps, with_cap, **MATCHING)
        pairs = len(GuidedModel(target, guide, **MATCHING).plan(input_ids=ids))
        med = time_steps(steps, reps)
        ratios[name] = _report(f"GPT-2 LM (4 x {width}, vocab {vocab}) <- {name}, batch {batch} x {length}", med, pairs)
        print(f"lm_{name}_guided_over_floor={ratios[name]:.2f}")
        if with_strength is not None:
            cost = strength_cost(RAW_TIMES["strength"], reps - 1, strength_every)
            print(f"lm_strength_guided_over_floor={cost / med['floor']:.2f} (re-measured every {strength_every} steps)")
            print(f"lm_strength_over_fixed={cost / med['guided']:.3f}")
        if with_cap is not None:
            print(f"lm_tensor_cap_guided_over_floor={med['tensor_cap'] / med['floor']:.2f}")
            print(f"lm_tensor_cap_over_fixed={med['tensor_cap'] / med['guided']:.3f}")

    cls_batch = padded_batch(16 if not tiny else 4, 16 if not tiny else 4, 128 if not tiny else 12, 28996, seed=1)
    b_width = 32 if tiny else 256
    steps = make_steps(bert(b_width), bert(b_width, head=False), cls_batch,
                       {k: cls_batch[k] for k in ("input_ids", "attention_mask")}, **MATCHING)  # fmt: skip
    med = time_steps(steps, reps)
    pairs = len(GuidedModel(bert(b_width), bert(b_width, head=False), **MATCHING).plan(**cls_batch))
    shape = tuple(cls_batch["input_ids"].shape)
    bert_ratio = _report(f"BERT classifier (4 x {b_width}) <- BERT, dynamic padding {shape}", med, pairs)
    print(f"bert_guided_over_floor={bert_ratio:.2f}")

    # Per-pair cost: the same tiny pair at two levels, the difference spread over the extra pairs.
    small_ids = torch.randint(0, 100, (8, 16))
    small_t, small_g = gpt2(100, 2, 32, 16), gpt2(100, 2, 32, 16)
    small = {"input_ids": small_ids, "labels": small_ids}
    fine = make_steps(small_t, small_g, small, {"input_ids": small_ids}, layers="sublayers")
    coarse = make_steps(small_t, small_g, small, {"input_ids": small_ids}, layers="blocks")
    med = time_steps({"blocks": coarse["guided"], "sublayers": fine["guided"]}, max(reps, 15))
    n_fine = len(GuidedModel(small_t, small_g, layers="sublayers").plan(input_ids=small_ids))
    n_coarse = len(GuidedModel(small_t, small_g, layers="blocks").plan(input_ids=small_ids))
    per_pair = (med["sublayers"] - med["blocks"]) / (n_fine - n_coarse)
    print(f"tiny GPT-2 <- GPT-2 (2 x 32, batch 8 x 16): {n_coarse} pairs {med['blocks'] * 1e3:.2f} ms, "
          f"{n_fine} pairs {med['sublayers'] * 1e3:.2f} ms")  # fmt: skip
    print(f"per_pair_overhead_us={per_pair * 1e6:.0f}")
    print(f"lm_guided_over_floor={ratios['gpt2']:.2f}")
    return ratios["gpt2"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--strength", type=float, help="also time strength= on GPT-2 <- GPT-2 (amortised)")
    parser.add_argument("--strength-every", type=int, default=25, help="the re-measurement interval amortised over")
    parser.add_argument(
        "--tensor-cap", type=float, help="also time tensor_cap= in force on every step (GPT-2 <- GPT-2)"
    )
    args = parser.parse_args()
    main(args.reps, strength=args.strength, strength_every=args.strength_every, tensor_cap=args.tensor_cap)
