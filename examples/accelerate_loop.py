"""An existing Accelerate training loop, guided: an LSTM text classifier aligned to an untrained
Transformer encoder, on sentences of different lengths padded per batch (dynamic padding).

Run: python examples/accelerate_loop.py [--steps 60] [--mixed-precision bf16] [--smoke]
Two processes on CPU (data parallel; CKA over the global batch):
     torchrun --nproc_per_node 2 examples/accelerate_loop.py --smoke
(on GPUs: accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py). The shape
is that of accelerate's NLP example: a collate function pads each batch to its own longest sentence,
so every process sees a different sequence length. The guidewrap lines are marked with  # <- guidewrap
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader

from guidewrap import GuidedModel  # <- guidewrap

VOCAB, CLASSES, PAD = 64, 4, 0


class LSTMClassifier(nn.Module):
    """The target: token ids and a padding mask in, class logits out (read at the last real token)."""

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.rnns = nn.ModuleList(nn.LSTM(width, width, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for rnn in self.rnns:
            h = rnn(h)[0]
        last = attention_mask.sum(1) - 1
        return self.head(h[torch.arange(len(h)), last])


class Encoder(nn.Module):
    """The guide: an untrained Transformer encoder that ignores padded positions."""

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.position = nn.Embedding(128, width)
        block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.layers = nn.ModuleList(block if i == 0 else _copy(block) for i in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=attention_mask == 0)
        return h


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def sentences(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Token sequences of 6-40 tokens; the label is which of 4 marker tokens occurs most often."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        length = int(torch.randint(6, 41, (1,), generator=gen))
        ids = torch.randint(5, VOCAB, (length,), generator=gen)
        markers = torch.randint(1, 5, (length // 3,), generator=gen)
        ids[torch.randperm(length, generator=gen)[: len(markers)]] = markers
        data.append((ids.tolist(), int(torch.bincount(markers, minlength=5)[1:].argmax())))
    return data


def pad_batch(batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to this batch's longest sentence (right padding), like DataCollatorWithPadding."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), PAD)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}


def main(
    steps: int = 60,
    batch: int = 32,
    mixed_precision: str = "no",
    accumulation: int = 2,
    smoke: bool = False,
    cpu: bool = False,
) -> dict[str, float]:
    if smoke:
        steps, batch = 4, 8
    torch.manual_seed(0)
    # On a machine without GPUs Accelerate needs cpu=True to join a multi-process (gloo) launch.
    cpu = cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation)
    loader = DataLoader(sentences(batch * 16), batch_size=batch, shuffle=True, drop_last=True, collate_fn=pad_batch)
    width = 16 if smoke else 64
    target, guide = LSTMClassifier(width), Encoder(width)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    guided = GuidedModel(
        target, guide, layers="sublayers", weight=1.0, until_step=steps // 2, optimizer=optimizer
    )  # <- guidewrap
    model, optimizer, loader = accelerator.prepare(guided, optimizer, loader)
    # One checkpoint folder for every process: the main process picks it, the others are told.
    checkpoint = [tempfile.mkdtemp(prefix="guidewrap-accelerate-") if accelerator.is_main_process else None]
    checkpoint = broadcast_object_list(checkpoint)[0]
    micro, loss, peak_term, widths = 0, torch.zeros(()), 0.0, set()
    while micro < steps * accumulation:
        for inputs in loader:
            labels = inputs.pop("labels")
            widths.add(inputs["input_ids"].shape[1])
            with accelerator.accumulate(model):
                logits = model(**inputs)
                # This target returns logits, so the term is added once here (a model that returns
                # outputs.loss already holds it: then loss = outputs.loss).
                loss = guided.total_loss(nn.functional.cross_entropy(logits.float(), labels))  # <- guidewrap
                peak_term = max(peak_term, guided.alignment_loss.item())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            accelerator.log(guided.guidance_metrics(), step=guided.step_count)  # <- guidewrap: to your trackers
            micro += 1
            if micro == steps * accumulation // 2:
                accelerator.save_state(checkpoint)  # the guidance step counter is part of the model state
                accelerator.wait_for_everyone()
                accelerator.load_state(checkpoint)
            if micro >= steps * accumulation:
                break
    result = {"loss": loss.item(), "guidance_steps": float(guided.guidance_step), "peak_guidance_loss": peak_term}
    result.update(guided.guidance_metrics())
    result["processes"] = float(accelerator.num_processes)
    result["batch_widths"] = float(len(widths))
    line = (
        f"process {accelerator.process_index}/{accelerator.num_processes}: loss {result['loss']:.4f} | "
        f"optimizer steps counted {int(result['guidance_steps'])} | largest guidance term {peak_term:.4f} | "
        f"weight now {result['guidance_weight']:.1f} (window {steps // 2}) | padded widths seen {sorted(widths)}\n"
    )
    sys.stdout.write(line)  # one write per process, so two processes' lines do not interleave
    sys.stdout.flush()
    accelerator.wait_for_everyone()  # no process tears the group down while another still uses it
    accelerator.end_training()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (used by the tests)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    a = parser.parse_args()
    main(a.steps, a.batch, a.mixed_precision, a.accumulation, a.smoke, a.cpu)
