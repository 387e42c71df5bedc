"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU).

Each process guides its half of a fixed batch through DistributedDataParallel and saves the
alignment loss and the target's (all-reduced) gradients.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from guidewrap import GuidedModel


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    guide = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 3))
    return target, guide


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    target, guide = models()
    guided = GuidedModel(target, guide, distributed=mode)
    model = DistributedDataParallel(guided)
    x, y = batch()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    out_t = model(x[part])
    loss = nn.functional.cross_entropy(out_t, y[part]) + guided.alignment_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in target.named_parameters() if p.grad is not None}
    torch.save({"alignment": guided.alignment_loss.item(), "grads": grads}, f"{out}/rank{rank}.pt")
    # Both ranks reach the end before either tears gloo down: a rank destroying its group while the
    # other still talks to it can abort ("terminate called without an active exception") under load.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
