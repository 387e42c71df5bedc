"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU).

Each process guides its half of a fixed batch through DistributedDataParallel and saves the
alignment loss and the target's (all-reduced) gradients.
"""

from __future__ import annotations

import os
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


class TokenLSTM(nn.Module):
    """A token model taking ``attention_mask`` (right padding leaves real positions unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(30, 12), nn.LSTM(12, 12, batch_first=True), nn.Linear(12, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(input_ids))[0])


class TokenEncoder(nn.Module):
    """A transformer encoder guide that masks padded keys."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)


def token_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return TokenLSTM(), TokenEncoder()


def token_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two processes' batches, each right-padded to its own longest sequence (7 and 10)."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for lengths in ([7, 3, 5, 6], [10, 4, 9, 2]):
        width = max(lengths)
        ids = torch.randint(1, 30, (len(lengths), width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append((ids * mask, mask))
    return out


def padded_together() -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches as one process would see them: padded to the global longest sequence."""
    parts = token_batches()
    width = max(ids.shape[1] for ids, _ in parts)
    pad = lambda t: nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(ids) for ids, _ in parts]), torch.cat([pad(mask) for _, mask in parts])


def dynamic(out: str, sequence: str) -> None:
    rank = dist.get_rank()
    target, guide = token_models()
    left = sequence == "left"
    guided = GuidedModel(target, guide, sequence="flatten" if left else sequence)
    model = DistributedDataParallel(guided)
    ids, mask = token_batches()[rank]
    if left:  # the same batches padded on the left: positions no longer line up across processes
        ids, mask = ids.flip(1), mask.flip(1)
        from guidewrap.errors import ConfigError

        try:
            model(input_ids=ids, attention_mask=mask)
        except ConfigError as exc:
            torch.save({"error": str(exc)}, f"{out}/rank{rank}.pt")
            return
        torch.save({"error": None}, f"{out}/rank{rank}.pt")
        return
    logits = model(input_ids=ids, attention_mask=mask)
    loss = logits[:, 0].pow(2).mean() + guided.alignment_loss  # position 0: the same under any padding
    loss.backward()
    grads = {name: p.grad.clone() for name, p in target.named_parameters() if p.grad is not None}
    torch.save({"alignment": guided.alignment_loss.item(), "grads": grads}, f"{out}/rank{rank}.pt")


def fsdp(out: str) -> None:
    """FSDP2: the target's Linear layers and the target sharded with fully_shard, the guide replicated."""
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    target, guide = models()
    target.to(DEVICE)
    for layer in target:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(target)
    guided = GuidedModel(target, guide)
    x, y = (t.to(DEVICE) for t in batch())
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss = nn.functional.cross_entropy(guided(x[part]), y[part]) + guided.alignment_loss
    loss.backward()
    grads = {name: p.grad.full_tensor().clone() for name, p in target.named_parameters() if p.grad is not None}
    plan = [(p.target.name, p.guide.name, p.target.shape) for p in guided.plan()]
    torch.save({"alignment": guided.alignment_loss.item(), "grads": grads, "plan": plan}, f"{out}/rank{rank}.pt")


class Skipping(nn.Module):
    """A target whose middle layer runs only when ``skip`` is False (set on one process)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(6, 24), nn.Linear(24, 24), nn.Linear(24, 3)
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x).relu()
        return self.last(h if self.skip else self.middle(h).relu())


def missing(out: str) -> None:
    """The target's middle layer runs on process 0 only: its pair must be skipped on both processes
    (the collectives stay matched) while the other pairs still measure the global batch."""
    import warnings

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    target, guide = Skipping(), models()[1]
    guided = GuidedModel(target, guide, layers=[("first", "0"), ("middle", "2"), ("last", "4")])
    x, _ = batch()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    guided.plan(x[part])  # resolved while every layer runs; then a data-dependent branch skips one
    target.skip = rank == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided(x[part])
    torch.save(
        {"alignment": guided.last_alignment, "warnings": [str(w.message) for w in caught]}, f"{out}/rank{rank}.pt"
    )


class CollectiveCounter:
    """Counts the Python-level collectives issued while it is active (DDP's own gradient buckets go
    through its C++ reducer, not these)."""

    def __init__(self) -> None:
        self.counts = {"all_gather": 0, "all_reduce": 0}

    def __enter__(self) -> CollectiveCounter:
        self.saved = {name: getattr(dist, name) for name in self.counts}
        for name, original in self.saved.items():
            setattr(dist, name, self._counting(name, original))
        return self

    def _counting(self, name: str, original):  # noqa: ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.counts[name] += 1
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)


CUDA = os.environ.get("GUIDEWRAP_TEST_CUDA") == "1"  # tests/test_gpu.py: NCCL, one GPU per process
DEVICE = "cuda" if CUDA else "cpu"


def strength(out: str) -> None:
    """strength=0.3 under DDP: each process measures its half, the squared norms are averaged, so both
    processes weight the term alike; three steps, re-measured on every one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    target, guide = models()
    guided = GuidedModel(target, guide, strength=0.3, strength_every=1)
    model = DistributedDataParallel(guided)
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    x, y = batch()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    scales = []
    for step in range(3):
        rows = torch.roll(torch.arange(len(x)), step * 5)[part]  # another half each step
        loss = guided.total_loss(nn.functional.cross_entropy(model(x[rows]), y[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scales.append(guided.engine.strength.scale)
    torch.save({"scales": scales, "pull": guided.engine.strength.pull}, f"{out}/rank{rank}.pt")


def tensor_cap(out: str) -> None:
    """tensor_cap under DDP: each process caps from the gradients as DDP applies them (averaged), so both
    scale each tensor's term alike, as one process would on the whole batch; three steps, capped from the
    second."""
    rank, world = dist.get_rank(), dist.get_world_size()
    target, guide = models()
    opt = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    guided = GuidedModel(target, guide, weight=5.0, tensor_cap=0.5, tensor_cap_after=1, optimizer=opt)
    model = DistributedDataParallel(guided)
    x, y = batch()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    factors = []
    for step in range(3):
        rows = torch.roll(torch.arange(len(x)), step * 5)[part]
        loss = guided.total_loss(nn.functional.cross_entropy(model(x[rows]), y[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        factors.append(dict(guided.engine.strength.tensors.factors))
    params = {n: p.detach().clone() for n, p in target.named_parameters()}
    torch.save({"factors": factors, "params": params}, f"{out}/rank{rank}.pt")


def main(out: str, mode: str) -> None:
    if CUDA:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if CUDA else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "fsdp":
        fsdp(out)
        dist.barrier()
        dist.destroy_process_group()
        return
    if mode in ("missing", "strength", "tensor_cap"):
        {"missing": missing, "strength": strength, "tensor_cap": tensor_cap}[mode](out)
        dist.barrier()
        dist.destroy_process_group()
        return
    if mode == "buckets":  # every layer in its own bucket: the gathers split, the result must not change
        import guidewrap.distributed

        guidewrap.distributed.BUCKET_BYTES, mode = 1, "global"
    if mode.startswith("dynamic-"):
        dynamic(out, mode.removeprefix("dynamic-"))
        dist.barrier()
        dist.destroy_process_group()
        return
    target, guide = models()
    guided = GuidedModel(target.to(DEVICE), guide, distributed=mode)
    model = DistributedDataParallel(guided)
    x, y = (t.to(DEVICE) for t in batch())
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    with CollectiveCounter() as counter:
        out_t = model(x[part])
        loss = nn.functional.cross_entropy(out_t, y[part]) + guided.alignment_loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in target.named_parameters() if p.grad is not None}
    result = {"alignment": guided.alignment_loss.item(), "grads": grads, "collectives": counter.counts}
    torch.save({**result, "pairs": len(guided.plan())}, f"{out}/rank{rank}.pt")
    # Both ranks reach the end before either tears gloo down: a rank destroying its group while the
    # other still talks to it can abort ("terminate called without an active exception") under load.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
