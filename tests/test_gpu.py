"""GPU paths: CUDA, bf16 and fp16 (with a GradScaler), NCCL DDP and FSDP2.

Skipped without a CUDA device (CI is CPU only); they run wherever one is present
(`pytest -m gpu`). The multi-process ones need two GPUs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from guidewrap import GuidedModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = Path(__file__).resolve().parents[1]


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    guide = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    return target, guide


def test_cuda_step_matches_the_cpu_step() -> None:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    values = {}
    for device in ("cpu", "cuda"):
        target, guide = _models()
        guided = GuidedModel(target.to(device), guide)  # the guide follows the data
        guided(x.to(device))
        guided.alignment_loss.backward()
        assert next(guide.parameters()).device.type == device
        values[device] = (guided.alignment_loss.item(), target[0].weight.grad.cpu())
    assert values["cuda"][0] == pytest.approx(values["cpu"][0], abs=1e-4)
    torch.testing.assert_close(values["cuda"][1], values["cpu"][1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_a_grad_scaler_stays_finite(dtype: torch.dtype) -> None:
    target, guide = _models()
    target.cuda()
    guided = GuidedModel(target, guide)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for _ in range(5):
        x, y = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            loss = nn.functional.cross_entropy(guided(x), y) + guided.alignment_loss
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    metrics = guided.guidance_metrics()  # the device-side flags are read here
    assert math.isfinite(metrics["guidance_loss"]) and metrics["guidance_skipped_pairs"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["global", "fsdp"])
def test_two_gpu_processes_nccl(tmp_path: Path, mode: str) -> None:
    """The CPU tests' worker under NCCL: DDP with global-batch CKA, and FSDP2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "GUIDEWRAP_TEST_CUDA": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0"]
    cmd += ["--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(ROOT / "tests" / "_ddp_worker.py")]
    run = subprocess.run([*cmd, str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["alignment"] == pytest.approx(ranks[1]["alignment"], abs=1e-5)
