"""PyTorch Lightning: GuidanceCallback guides a LightningModule (one step, logs, checkpoint keys,
resume, accumulation, 2-process DDP on CPU, and the errors a user meets)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from guidewrap.errors import ConfigError, LayerNotFoundError  # noqa: E402
from guidewrap.integrations.lightning import GuidanceCallback  # noqa: E402

DATA = torch.utils.data.TensorDataset(
    torch.randn(64, 6, generator=torch.Generator().manual_seed(0)),
    torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1)),
)


class Classifier(L.LightningModule):
    """The usual shape: the network in ``self.model``, ``training_step`` logs and returns the task loss."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.returned: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _guide() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _trainer(tmp_path: Path, callbacks: list, **settings) -> L.Trainer:  # noqa: ANN003
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), deterministic=True,
    )  # fmt: skip
    return L.Trainer(callbacks=callbacks, **(options | settings))


def _loader(batch_size: int = 16) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(DATA, batch_size=batch_size, shuffle=False)


def _assert_equals_hand_written_sgd_step(module: Classifier, batches: list) -> None:
    """``module`` after one SGD step (lr 0.1) equals a fresh Classifier stepped by hand on the mean over
    ``batches`` (the micro-batches of one step) of task + term."""
    from guidewrap import GuidedModel

    reference = Classifier()
    guided = GuidedModel(reference, _guide(), until_step=10)
    for x, y in batches:
        (guided.total_loss(nn.functional.cross_entropy(guided(x), y)) / len(batches)).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (name, a), b in zip(module.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} differs from the hand-written guided step")


def test_one_guided_step_adds_the_term_to_the_returned_loss_and_logs(tmp_path: Path) -> None:
    module = Classifier()
    seen: dict[str, float] = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            seen["returned"] = float(outputs["loss"])

    guidance = GuidanceCallback(_guide(), until_step=10)
    trainer = _trainer(tmp_path, [guidance, Spy()], max_steps=1, log_every_n_steps=1,
                       logger=L.pytorch.loggers.CSVLogger(str(tmp_path)))  # fmt: skip
    trainer.fit(module, _loader())
    metrics = trainer.callback_metrics
    task, term, weight = (float(metrics[k]) for k in ("guidance_task_loss", "guidance_loss", "guidance_weight"))
    assert float(metrics["train_loss"]) == pytest.approx(task)  # what the module logs stays the task loss
    assert seen["returned"] == pytest.approx(task + term) and term > 0 and weight == 1.0
    assert guidance.engine.counters["guided_forwards"] == 1 and guidance.engine.step_count == 1
    pairs = [k for k in metrics if k.startswith("guidance_align/")]
    assert len(pairs) == len(guidance.engine.planner.plan) >= 2
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"guidance_loss", "guidance_task_loss", *pairs} <= set(logged)  # through the Lightning logger
    assert guidance.hook_count == 0 and "training_step" not in module.__dict__  # nothing left behind


def test_the_term_changes_the_update_exactly_as_task_plus_term(tmp_path: Path) -> None:
    """The weights after one SGD step equal those of a hand-written step on task + term."""
    module = Classifier()
    trainer = _trainer(tmp_path, [GuidanceCallback(_guide(), until_step=10)], max_steps=1)
    trainer.fit(module, _loader())
    _assert_equals_hand_written_sgd_step(module, list(_loader())[:1])


def test_checkpoint_holds_only_the_target_and_the_guidance_state(tmp_path: Path) -> None:
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    guidance = GuidanceCallback(_guide(), until_step=10)
    module = Classifier()
    trainer = _trainer(tmp_path, [guidance, checkpoints], max_epochs=1, enable_checkpointing=True)
    trainer.fit(module, _loader())
    saved = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)
    assert set(saved["state_dict"]) == set(module.state_dict())  # no guide weight, no guidance buffer
    state = saved["callbacks"]["guidewrap.GuidanceCallback"]
    assert state["step"] == 4 and state["counters"]["guided_forwards"] == 4 and state["plan"]["pairs"]


def _fit_epochs(
    tmp_path: Path, folder: str, epochs: int, resume: str | None = None, **settings
) -> tuple[Classifier, GuidanceCallback]:
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / folder), save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    settings = {"until_step": 6} | settings  # the window ends inside the second run's epochs
    guidance = GuidanceCallback(_guide(), **settings)
    module = Classifier()
    trainer = _trainer(tmp_path, [guidance, checkpoints], max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(module, _loader(batch_size=32), ckpt_path=resume)
    return module, guidance


def test_resume_continues_the_window_bit_identically(tmp_path: Path) -> None:
    straight, straight_guidance = _fit_epochs(tmp_path, "straight", epochs=4)  # 2 steps per epoch
    assert straight_guidance.engine.counters["guided_forwards"] == 6
    resumed, guidance = _fit_epochs(tmp_path, "resumed", epochs=4, resume=str(tmp_path / "straight" / "epoch=1.ckpt"))
    assert guidance.engine.step_count == 8
    assert guidance.engine.counters["guided_forwards"] == 6  # 4 restored from the checkpoint + steps 5-6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_strength_holds_the_requested_pull_and_resumes_its_controller_exactly(tmp_path: Path) -> None:
    settings = {"strength": 0.3, "strength_every": 3}  # measured at steps 1, 4, 7 (of 8)
    straight, guidance = _fit_epochs(tmp_path, "straight", epochs=4, **settings)
    assert guidance.engine.strength.pull == pytest.approx(0.3, rel=0.1)  # on the last measured step
    assert guidance.engine.strength.measured and guidance.engine.weight != 1.0
    state = guidance.engine.strength.state_dict()
    resumed, again = _fit_epochs(tmp_path, "resumed", epochs=4, resume=str(tmp_path / "straight" / "epoch=1.ckpt"),
                                 **settings)  # fmt: skip
    assert again.engine.strength.state_dict() == state  # the controller continued where the checkpoint left it
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming with a strength"


def test_accumulation_counts_optimizer_steps_and_guides_every_micro_batch(tmp_path: Path) -> None:
    guidance = GuidanceCallback(_guide(), until_step=2)
    trainer = _trainer(tmp_path, [guidance], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(Classifier(), _loader(batch_size=8))
    assert trainer.global_step == 3 and guidance.engine.step_count == 3
    assert guidance.engine.counters["guided_forwards"] == 4  # two optimizer steps x two micro-batches


def test_accumulation_normalises_the_term_like_the_task_loss(tmp_path: Path) -> None:
    """accumulate_grad_batches=2 over two batches of 8 gives the step of the mean of the two micro-batch
    (task + term) gradients, as Lightning divides the returned loss."""
    module = Classifier()
    trainer = _trainer(tmp_path, [GuidanceCallback(_guide(), until_step=10)], max_steps=1, accumulate_grad_batches=2)
    trainer.fit(module, _loader(batch_size=8))
    _assert_equals_hand_written_sgd_step(module, list(_loader(batch_size=8))[:2])


def test_a_submodule_target_and_the_errors_users_meet(tmp_path: Path) -> None:
    class CallsSubmodule(Classifier):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            return {"loss": nn.functional.cross_entropy(self.model(x), y)}

    guidance = GuidanceCallback(_guide(), until_step=10, target="model")
    _trainer(tmp_path, [guidance], max_steps=2).fit(CallsSubmodule(), _loader())
    assert guidance.engine.counters["guided_forwards"] == 2 and guidance.engine.target is not None

    class SkipsFirstBatch(CallsSubmodule):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)  # Lightning's skip

    guidance = GuidanceCallback(_guide(), until_step=10, target="model")
    trainer = _trainer(tmp_path, [guidance], max_steps=3)
    trainer.fit(SkipsFirstBatch(), _loader())  # the skipped batch is no error
    assert guidance.engine.counters["guided_forwards"] == 2 and guidance.engine.step_count == trainer.global_step

    module = CallsSubmodule()
    with pytest.raises(ConfigError, match=r"did not run in training_step.*target='model'"):
        _trainer(tmp_path, [GuidanceCallback(_guide())], max_steps=1).fit(module, _loader())
    assert "training_step" not in module.__dict__  # removed although fit raised
    with pytest.raises(LayerNotFoundError, match=r"Did you mean 'model'"):
        _trainer(tmp_path, [GuidanceCallback(_guide(), target="modle")], max_steps=1).fit(Classifier(), _loader())

    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ConfigError, match="manual optimization"):
        _trainer(tmp_path, [GuidanceCallback(_guide())], max_steps=1).fit(Manual(), _loader())


def test_hooks_are_removed_when_training_raises(tmp_path: Path) -> None:
    class Fails(Classifier):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    guidance = GuidanceCallback(_guide(), until_step=10)
    module = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [guidance], max_steps=4).fit(module, _loader())
    assert guidance.hook_count == 0 and "training_step" not in module.__dict__
    assert not module.model[0]._forward_hooks and not module._forward_pre_hooks


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
sys.path.insert(0, {tests!r})
from test_lightning import Classifier, DATA, _guide
from guidewrap.integrations.lightning import GuidanceCallback

class Record(L.Callback):
    def __init__(self):
        self.first = None
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first is None:
            self.first = float(trainer.callback_metrics["guidance_loss"])

class Sharded(Classifier):
    def train_dataloader(self):  # process r of w reads samples r, r + w, ...: one global batch is samples 0-15
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shard = torch.utils.data.Subset(DATA, range(rank, len(DATA), world))
        return torch.utils.data.DataLoader(shard, batch_size=16 // world, shuffle=False)

devices = int(sys.argv[1])
record, guidance = Record(), GuidanceCallback(_guide(), until_step=10)
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
                    callbacks=[guidance, record], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
module = Sharded()
trainer.fit(module)
out = {{"first_guidance_loss": record.first, "guided": guidance.engine.counters["guided_forwards"],
        "weights": [p.detach().flatten().tolist() for p in module.parameters()]}}
with open(sys.argv[2] + f".{{trainer.global_rank}}.json", "w") as f:
    json.dump(out, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_measures_the_global_batch(tmp_path: Path) -> None:
    """Two processes (gloo), 8 samples each: the first step's term equals one process on the same 16
    samples (CKA over the global batch), and both processes end with the same weights."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, str(script), "1", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for attempt in range(2):  # a port taken between choosing and binding fails the launch: choose again once
        env_ddp = env | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        two = subprocess.run([sys.executable, str(script), "2", str(tmp_path / "two")], capture_output=True,
                             text=True, env=env_ddp, timeout=300)  # fmt: skip
        if two.returncode == 0 or "address already in use" not in two.stderr.lower():
            break
        print(f"DDP launch attempt {attempt} failed on port {env_ddp['MASTER_PORT']}: address in use; retrying")
    assert two.returncode == 0, f"2-process Lightning DDP failed:\n{two.stdout[-2000:]}\n{two.stderr[-4000:]}"
    single = json.loads((tmp_path / "one.0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["first_guidance_loss"] == pytest.approx(single["first_guidance_loss"], rel=1e-5, abs=1e-7)
        assert rank["guided"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
