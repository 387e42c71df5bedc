"""Guide a plain PyTorch loop: a deep MLP aligned to an untrained CNN on random images.

Run: python examples/plain_loop.py [--steps 50]
The guidewrap lines are marked with  # <- guidewrap.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from guidewrap import GuidedModel  # <- guidewrap


def main(steps: int = 50, batch: int = 64) -> float:
    torch.manual_seed(0)
    hidden = [m for i in range(6) for m in (nn.Linear(768 if i == 0 else 128, 128), nn.ReLU())]
    target = nn.Sequential(nn.Flatten(), *hidden, nn.Linear(128, 10))
    guide = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10))  # fmt: skip
    model = GuidedModel(target, guide, layers="sublayers", weight=1.0, until_step=steps // 2)  # <- guidewrap
    print(model.plan(torch.randn(batch, 3, 16, 16)))  # <- guidewrap (optional: show the layer pairs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
        loss = nn.functional.cross_entropy(model(x), y) + model.alignment_loss  # <- guidewrap (+ term)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.step()  # <- guidewrap (count optimizer steps for the window)
        if step % 10 == 0:
            print(f"step {step:3d} loss {loss.item():.3f} alignment {model.last_alignment}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    main(parser.parse_args().steps)
