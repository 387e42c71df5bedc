"""The paper's copy-paste result at small size: guidance by an untrained Transformer helps an RNN."""

from __future__ import annotations

import pytest
import torch
from lab.copy_paste import CopyPasteTask, train_copy_paste


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copy_paste_guided_beats_baseline(seed: int) -> None:
    torch.set_num_threads(2)
    task = CopyPasteTask(min_len=10, max_len=20, symbols=10)
    baseline = train_copy_paste(seed, guided=False, steps=500, batch=64, task=task)
    guided = train_copy_paste(seed, guided=True, steps=500, batch=64, task=task)
    print(f"seed {seed}: baseline {baseline:.3f} guided {guided:.3f}")
    assert guided >= baseline + 0.03, (seed, baseline, guided)
