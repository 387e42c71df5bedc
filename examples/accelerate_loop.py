"""An existing Accelerate training loop, guided: a deep MLP aligned to an untrained CNN.

Run: python examples/accelerate_loop.py [--steps 100] [--mixed-precision bf16] [--smoke]
     accelerate launch --num_processes 2 examples/accelerate_loop.py   (data parallel; CKA over the global batch)
The guidewrap lines are marked with  # <- guidewrap ; the rest is a plain Accelerate loop with
gradient accumulation, mixed precision and save_state/load_state.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guidewrap import GuidedModel  # <- guidewrap


def build(width: int = 256, depth: int = 8) -> tuple[nn.Module, nn.Module]:
    layers = [m for i in range(depth) for m in (nn.Linear(3 * 16 * 16 if i == 0 else width, width), nn.ReLU())]
    target = nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, 10))
    guide = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    return target, guide


def main(
    steps: int = 100, batch: int = 64, mixed_precision: str = "no", accumulation: int = 2, smoke: bool = False
) -> dict[str, float]:
    if smoke:
        steps, batch = 4, 16
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation)
    images, labels = torch.rand(batch * 8, 3, 16, 16), torch.randint(0, 10, (batch * 8,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True, drop_last=True)
    target, guide = build(width=32 if smoke else 256, depth=3 if smoke else 8)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    guided = GuidedModel(target, guide, until_step=steps // 2, optimizer=optimizer)  # <- guidewrap
    model, optimizer, loader = accelerator.prepare(guided, optimizer, loader)
    checkpoint = tempfile.mkdtemp(prefix="guidewrap-accelerate-")
    step, loss, peak_term = 0, torch.zeros(()), 0.0
    while step < steps * accumulation:
        for x, y in loader:
            with accelerator.accumulate(model):
                out = model(x)
                loss = nn.functional.cross_entropy(out, y) + guided.alignment_loss  # <- guidewrap
                peak_term = max(peak_term, guided.alignment_loss.item())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step += 1
            if step == steps * accumulation // 2:
                accelerator.save_state(checkpoint)  # the guidance step counter is part of the model state
                accelerator.load_state(checkpoint)
            if step >= steps * accumulation:
                break
    result = {"loss": loss.item(), "guidance_steps": float(guided.guidance_step), "peak_guidance_loss": peak_term}
    result.update(guided.guidance_metrics())
    accelerator.print(
        f"loss {result['loss']:.4f} | optimizer steps counted {int(result['guidance_steps'])} | "
        f"largest guidance term {peak_term:.4f} | weight now {result['guidance_weight']:.1f} (window {steps // 2})"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (used by the tests)")
    a = parser.parse_args()
    main(a.steps, a.batch, a.mixed_precision, a.accumulation, a.smoke)
