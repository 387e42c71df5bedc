"""The strength controller: the term's pull held at a set fraction of the task's, in every entry point.

On a step where the pull is measured, the test measures it again itself (two autograd.grad calls on the
task loss and on the term in force, norms over the target's trainable parameters) and compares with the
requested strength (within 10%). Resume continues the controller's state exactly; forgetting the task
loss is an error; a fixed weight whose pull is far off warns.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from guidewrap import Guidance, GuidedModel
from guidewrap.errors import ConfigError, GuidewrapWarning
from tests.conftest import class_batch, tanh_target_relu_guide, train_on_class_batches


def _pull(task: Tensor, term: Tensor, model: nn.Module) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for loss in (term, task):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)))
    return norms[0] / norms[1]


@pytest.mark.parametrize("strength", [0.05, 0.3, 2.0])
def test_guided_model_holds_the_requested_pull_on_measured_steps(strength: float) -> None:
    target, guide = tanh_target_relu_guide()
    opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    guided = GuidedModel(target, guide, strength=strength, strength_every=5, optimizer=opt)
    for step in range(12):
        x, y = class_batch(step)
        task = nn.functional.cross_entropy(guided(x), y)
        loss = guided.total_loss(task)
        if step % 5 == 0:  # measured: the first step, then every 5 steps
            assert guided.engine.strength.since == 0
            assert _pull(task, loss - task, target) == pytest.approx(strength, rel=0.1)
            assert guided.guidance_metrics()["guidance_pull"] == pytest.approx(strength, rel=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_guidance_context_holds_the_pull_and_refuses_a_term_without_the_task_loss() -> None:
    target, guide = tanh_target_relu_guide()
    x, y = class_batch(0)
    with Guidance(target, guide, strength=0.3) as g:
        out = target(x)
        with pytest.raises(ConfigError, match=r"total_loss\(task_loss\)"):
            g.alignment_loss  # noqa: B018 - forgetting the task loss is an error, not a silent weight
        task = nn.functional.cross_entropy(out, y)
        loss = g.total_loss(task)
        assert _pull(task, loss - task, target) == pytest.approx(0.3, rel=0.1)


def test_an_output_loss_gets_the_term_at_the_requested_pull() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    target, guide = transformers.GPT2LMHeadModel(cfg), transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 40, (12, 10))
    guided = GuidedModel(target, guide, strength=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF notices
        out = guided(input_ids=ids, labels=ids)
    term = guided.alignment_loss
    assert _pull(out.loss - term, term, target) == pytest.approx(0.3, rel=0.1)
    with pytest.raises(ConfigError, match="already holds the alignment term"):
        guided.total_loss(out.loss)


def test_the_window_and_decay_scale_the_requested_pull() -> None:
    target, guide = tanh_target_relu_guide()
    guided = GuidedModel(target, guide, strength=0.4, strength_every=1, until_step=4, decay="linear")
    for step in range(3):
        x, y = class_batch(step)
        task = nn.functional.cross_entropy(guided(x), y)
        loss = guided.total_loss(task)
        profile = 1 - step / 4
        assert _pull(task, loss - task, target) == pytest.approx(0.4 * profile, rel=0.1)
        guided.step()


def test_resume_continues_the_controller_bit_identically(tmp_path: Path) -> None:
    target, guide = tanh_target_relu_guide()
    straight_target = copy.deepcopy(target)
    opt = torch.optim.Adam(straight_target.parameters(), lr=1e-2)
    straight = GuidedModel(straight_target, copy.deepcopy(guide), strength=0.3, strength_every=3, optimizer=opt)
    train_on_class_batches(straight, opt, range(10))

    first_opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    first = GuidedModel(target, copy.deepcopy(guide), strength=0.3, strength_every=3, optimizer=first_opt)
    train_on_class_batches(first, first_opt, range(5))  # measured at steps 0 and 3: stops between two measurements
    assert first.engine.strength.since == 1
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, tmp_path / "ckpt.pt")

    resumed_target, _ = tanh_target_relu_guide(seed=5)  # other weights: the checkpoint must restore everything
    resumed_opt = torch.optim.Adam(resumed_target.parameters(), lr=1e-2)
    resumed = GuidedModel(resumed_target, copy.deepcopy(guide), strength=0.3, strength_every=3, optimizer=resumed_opt)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["opt"])
    assert resumed.engine.strength.state_dict() == first.engine.strength.state_dict()
    train_on_class_batches(resumed, resumed_opt, range(5, 10))
    for a, b in zip(straight_target.parameters(), resumed_target.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.engine.strength.state_dict() == straight.engine.strength.state_dict()


def test_guidance_state_dict_carries_the_controller() -> None:
    target, guide = tanh_target_relu_guide()
    with Guidance(target, guide, strength=0.3) as g:
        x, y = class_batch(0)
        g.total_loss(nn.functional.cross_entropy(target(x), y))
        state = g.state_dict()
    assert state["strength"]["measured"] and state["strength"]["pull"] == pytest.approx(0.3)
    with Guidance(*tanh_target_relu_guide(), strength=0.3) as other:
        other.load_state_dict(json.loads(json.dumps(state)))
        assert other.engine.strength.scale == g.engine.strength.scale


def _plain_convnet(depth: int = 20, channels: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for i in range(depth):
        layers += [nn.Conv2d(c_in, channels, 3, stride=2 if i in (depth // 3, 2 * depth // 3) else 1, padding=1),
                   nn.ReLU()]  # fmt: skip
        c_in = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def test_a_strong_first_pull_is_logged_not_warned_about_and_a_weak_one_warns() -> None:
    """The first step's pull is measured and logged; a strong one is not a warning (a run that gains from
    guidance starts dominated: the demo's pull is 13.6 at step 1), a domination that persists per tensor
    is (tests/test_tensor_cap.py); a pull under 0.01 still warns that guidance will change little."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    target = _plain_convnet()
    guide = torchvision.models.resnet18(weights=None, num_classes=10)
    guide.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    guided = GuidedModel(target, guide)  # the default: weight 1 on the mean over pairs
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        guided.total_loss(nn.functional.cross_entropy(guided(x), y))
    assert guided.guidance_metrics()["guidance_pull"] > 10
    weak = GuidedModel(*tanh_target_relu_guide(), weight=1e-6)
    x, y = class_batch(0)
    with pytest.warns(GuidewrapWarning, match="barely registers"):
        weak.total_loss(nn.functional.cross_entropy(weak(x), y))


def test_settings_are_validated() -> None:
    target, guide = tanh_target_relu_guide()
    for bad in (0, -1.0, float("nan"), "0.3", True):
        with pytest.raises(ConfigError, match="strength"):
            GuidedModel(target, guide, strength=bad)
    with pytest.raises(ConfigError, match="give one of them"):
        GuidedModel(target, guide, strength=0.3, weight=2.0)
    with pytest.raises(ConfigError, match="strength_every"):
        GuidedModel(target, guide, strength=0.3, strength_every=0)


def test_guide_trainer_holds_the_pull_logs_it_and_checkpoints_the_controller(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from lab.language import CharCorpus, tiny_gpt2

    from guidewrap.integrations.transformers import guide_trainer

    corpus = CharCorpus("the quick brown fox jumps over the lazy dog. " * 40, seq_len=12)
    torch.manual_seed(0)
    model = tiny_gpt2(corpus.vocab_size, n_layer=2, n_embd=16, n_head=2, n_positions=32)
    guide = tiny_gpt2(corpus.vocab_size, n_layer=2, n_embd=16, n_head=2, n_positions=32)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=corpus.dataset())
    callback = guide_trainer(trainer, guide, strength=0.3, strength_every=1)
    pulls = []
    compute_loss = trainer.compute_loss

    def checked(model_: nn.Module, inputs: dict, *a: object, **kw: object) -> Tensor:  # noqa: ANN401
        total = compute_loss(model_, inputs, *a, **kw)
        loss = total[0] if isinstance(total, tuple) else total
        term = callback.engine.alignment_loss  # measured on this step (strength_every=1), GA scale 1
        pulls.append(_pull(loss - term, term, model_))
        return total

    trainer.compute_loss = checked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF notices
        trainer.train()
    assert len(pulls) == 3 and all(p == pytest.approx(0.3, rel=0.1) for p in pulls)
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert all(row["guidance_pull"] == pytest.approx(0.3, rel=1e-4) and "guidance_task_loss" in row for row in rows)
    assert all(row["guidance_task_loss"] < row["loss"] for row in rows)  # the logged loss includes the term
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["guidewrap_strength"]
    assert saved == callback.engine.strength.state_dict()


def test_a_forward_without_gradients_is_not_measured() -> None:
    target, guide = tanh_target_relu_guide()
    guided = GuidedModel(target, guide)  # a fixed weight: measured once, on the first step with gradients
    x, y = class_batch(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)  # no "inf times the task's" warning
        guided.total_loss(nn.functional.cross_entropy(guided(x), y))
    assert not guided.engine.strength.measured
    guided.total_loss(nn.functional.cross_entropy(guided(x), y))
    assert guided.engine.strength.measured and 0 < guided.guidance_metrics()["guidance_pull"] < 10
