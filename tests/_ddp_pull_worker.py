"""Run by tests/test_distributed.py: the first step's logged pull of the official script shapes, in one
process on the global batch or in two (torchrun) on its halves.

- ``trainer``: run_clm.py's shape (tokenized blocks of a fixed length, labels = inputs) through the
  ``Trainer`` with ``guide_trainer``: 8 blocks per step in all.
- ``accelerate``: accelerate's nlp_example shape (a BERT sequence classifier built from a config,
  sentence pairs of different lengths padded per process to the longest of its own batch, the model
  wrapped by ``GuidedModel`` before ``accelerator.prepare``): 32 samples per step in all.

Writes ``rank{r}.json`` with the logged ``guidance_pull`` and ``guidance_loss`` of the first step.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def _gpt2(width: int, seed: int) -> torch.nn.Module:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=width, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def trainer(out: str) -> dict:
    import transformers

    from guidewrap.integrations.transformers import guide_trainer

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 64, (8, 16), generator=gen)  # run_clm's group_texts: equal blocks, labels = ids
    data = [{"input_ids": row, "labels": row.clone()} for row in blocks]
    args = transformers.TrainingArguments(
        out, max_steps=1, per_device_train_batch_size=8 // WORLD, learning_rate=1e-3, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
        ddp_backend="gloo" if WORLD > 1 else None,
    )  # fmt: skip
    trainer = transformers.Trainer(model=_gpt2(32, 0), args=args, train_dataset=data)
    guide_trainer(trainer, _gpt2(16, 1))
    trainer.train()
    row = next(r for r in trainer.state.log_history if "guidance_pull" in r)
    return {"pull": row["guidance_pull"], "term": row["guidance_loss"], "task": row["guidance_task_loss"]}


def accelerate(out: str) -> dict:
    import transformers
    from accelerate import Accelerator

    from guidewrap import GuidedModel

    accelerator = Accelerator(cpu=True)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    torch.manual_seed(1)
    guide = transformers.BertModel(
        transformers.BertConfig(**{**cfg.to_dict(), "hidden_size": 16, "intermediate_size": 32})
    )
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 20, (32,), generator=gen).tolist()
    samples = [
        {"input_ids": torch.randint(1, 100, (n,), generator=gen), "labels": i % 2} for i, n in enumerate(lengths)
    ]

    def collate(rows: list[dict]) -> dict:  # the tokenizer's pad: to the longest of this batch
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])], mask[i, : len(r["input_ids"])] = r["input_ids"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows])}

    loader = torch.utils.data.DataLoader(samples, batch_size=32 // WORLD, shuffle=False, collate_fn=collate)
    guided = GuidedModel(model, guide)  # the three guidewrap lines: wrap, log, (the term is in outputs.loss)
    optimizer = torch.optim.AdamW(guided.parameters(), lr=1e-3)
    guided, optimizer, loader = accelerator.prepare(guided, optimizer, loader)
    batch = next(iter(loader))
    outputs = guided(**batch)
    accelerator.backward(outputs.loss)
    metrics = accelerator.unwrap_model(guided).guidance_metrics()
    return {"pull": metrics["guidance_pull"], "term": metrics["guidance_loss"], "task": metrics["guidance_task_loss"]}


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {"trainer": trainer, "accelerate": accelerate}[mode](out)
    with open(f"{out}/rank{RANK}-of-{WORLD}.json", "w", encoding="utf-8") as f:
        json.dump(result, f)
    if WORLD > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
