"""The per-tensor cap: the term's gradient in each trainable tensor at most ``tensor_cap`` times the task's,
from guided step ``tensor_cap_after`` on, in every entry point; optimizer state cleared where it first
binds; the one-time persistence warning without a cap.

On a capped step the test takes both gradients apart itself (``torch.autograd.grad`` of the task loss
and of the returned total minus the task loss, tensor by tensor) and checks the ratio: equal to the cap
where the uncapped term exceeded it, the uncapped term's where it did not.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from guidewrap import Guidance, GuidedModel
from guidewrap.errors import ConfigError, GuidewrapWarning
from guidewrap.tensor_cap import PERSISTENT_PULL, TensorCap
from tests.conftest import class_batch, tanh_target_relu_guide, train_on_class_batches


def _gpt2_pair(layers: int) -> tuple[nn.Module, nn.Module]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=layers, n_head=2, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg), transformers.GPT2LMHeadModel(cfg)


def _pulls(task: Tensor, total: Tensor, model: nn.Module) -> dict[str, float]:
    """Each trainable tensor's applied term gradient over its task gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g_task = torch.autograd.grad(task, [p for _, p in named], retain_graph=True, allow_unused=True)
    g_all = torch.autograd.grad(total, [p for _, p in named], retain_graph=True, allow_unused=True)
    out = {}
    for (name, _), a, b in zip(named, g_task, g_all, strict=True):
        if a is not None and b is not None and float((b - a).norm()) > 0:
            out[name] = float((b - a).norm() / a.norm())
    return out


def _uncapped(task: Tensor, term: Tensor, model: nn.Module) -> dict[str, float]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g_task = torch.autograd.grad(task, [p for _, p in named], retain_graph=True, allow_unused=True)
    g_term = torch.autograd.grad(term, [p for _, p in named], retain_graph=True, allow_unused=True)
    # a bias right before an aligned layer gets no term gradient (CKA ignores shifts), only rounding
    return {name: float(b.norm() / a.norm()) for (name, _), a, b in zip(named, g_task, g_term, strict=True)
            if a is not None and b is not None and float(b.norm() / a.norm()) > 1e-4}  # fmt: skip


def _check(task: Tensor, total: Tensor, term: Tensor, model: nn.Module, cap: float) -> int:
    """The applied pulls against the cap; returns how many tensors it bound."""
    applied, before = _pulls(task, total, model), _uncapped(task, term, model)
    assert before and set(before) <= set(applied)
    for name, pull in before.items():
        assert applied[name] == pytest.approx(min(cap, pull), rel=1e-3), name
    return sum(before[name] > cap for name in before)


def test_guided_model_caps_each_tensor_after_the_first_steps_and_clears_its_optimizer_state() -> None:
    target, guide = tanh_target_relu_guide()
    opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    guided = GuidedModel(target, guide, weight=5.0, tensor_cap=0.5, tensor_cap_after=3, optimizer=opt)
    for step in range(6):
        x, y = class_batch(step)
        task = nn.functional.cross_entropy(guided(x), y)
        total = guided.total_loss(task)
        term = guided.alignment_loss
        if step < 3:  # the first steps are uncapped: the term as it is
            applied, before = _pulls(task, total, target), _uncapped(task, term, target)
            assert {n: applied[n] for n in before} == pytest.approx(before, rel=1e-4)
            assert all(len(opt.state[p]) for p in target.parameters()) or step == 0
        else:
            bound = _check(task, total, term, target, 0.5)
            assert bound and guided.guidance_metrics()["guidance_tensors_capped"] == bound
            cleared = guided.engine.strength.tensors.cleared
            if step == 3:  # the switch: the tensors it binds on start their moments afresh
                params = dict(target.named_parameters())
                assert cleared and all(not opt.state[params[name]] for name in cleared)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert guided.guidance_metrics()["guidance_max_tensor_pull"] > 0.5


def test_the_context_caps_and_refuses_a_term_without_the_task_loss() -> None:
    target, guide = tanh_target_relu_guide()
    x, y = class_batch(0)
    with Guidance(target, guide, weight=5.0, tensor_cap=0.5, tensor_cap_after=0) as g:
        out = target(x)
        with pytest.raises(ConfigError, match=r"tensor_cap=0.5.*total_loss\(task_loss\)"):
            g.alignment_loss  # noqa: B018 - the cap needs the task loss
        task = nn.functional.cross_entropy(out, y)
        with pytest.warns(GuidewrapWarning, match="optimizer=your_optimizer"):  # nothing to clear: said once
            total = g.total_loss(task)
        assert _check(task, total, g.alignment_loss, target, 0.5)


def test_an_output_loss_carries_the_capped_term() -> None:
    target, guide = _gpt2_pair(layers=2)
    opt = torch.optim.SGD(target.parameters(), lr=0.0)
    guided = GuidedModel(target, guide, weight=20.0, tensor_cap=0.2, tensor_cap_after=0, optimizer=opt)
    ids = torch.randint(0, 40, (12, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF notices
        out = guided(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].flatten(0, 1)
    task = nn.functional.cross_entropy(logits, ids[:, 1:].flatten())
    assert float(task.detach()) == pytest.approx(float((out.loss - guided.alignment_loss).detach()), rel=1e-5)
    assert _check(task, out.loss, guided.alignment_loss, target, 0.2)


def test_settings_are_validated() -> None:
    target, guide = tanh_target_relu_guide()
    for bad in (0, -1.0, float("inf"), "1", True):
        with pytest.raises(ConfigError, match="tensor_cap must be"):
            GuidedModel(target, guide, tensor_cap=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="tensor_cap_after"):
            GuidedModel(target, guide, tensor_cap=1.0, tensor_cap_after=bad)


def test_resume_continues_the_cap_bit_identically(tmp_path: Path) -> None:
    settings = {"weight": 5.0, "tensor_cap": 0.5, "tensor_cap_after": 3}
    target, guide = tanh_target_relu_guide()
    straight_target = copy.deepcopy(target)
    opt = torch.optim.Adam(straight_target.parameters(), lr=1e-2)
    straight = GuidedModel(straight_target, copy.deepcopy(guide), optimizer=opt, **settings)
    train_on_class_batches(straight, opt, range(10))

    first_opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    first = GuidedModel(target, copy.deepcopy(guide), optimizer=first_opt, **settings)
    train_on_class_batches(first, first_opt, range(5))  # past the switch: some tensors' state cleared
    assert first.engine.strength.tensors.cleared
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, tmp_path / "ckpt.pt")

    resumed_target, _ = tanh_target_relu_guide(seed=5)
    resumed_opt = torch.optim.Adam(resumed_target.parameters(), lr=1e-2)
    resumed = GuidedModel(resumed_target, copy.deepcopy(guide), optimizer=resumed_opt, **settings)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["opt"])
    assert resumed.engine.strength.tensors.state_dict() == first.engine.strength.tensors.state_dict()
    train_on_class_batches(resumed, resumed_opt, range(5, 10))
    for a, b in zip(straight_target.parameters(), resumed_target.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_compiled_target_is_capped_from_eager_total_loss_without_a_graph_break() -> None:
    target, guide = tanh_target_relu_guide()
    guided = GuidedModel(torch.compile(target, backend="aot_eager"), guide, weight=5.0, tensor_cap=0.5,
                         tensor_cap_after=0, optimizer=torch.optim.SGD(target.parameters(), lr=0.0))  # fmt: skip
    x, y = class_batch(0)
    guided(x)  # plans
    explained = torch._dynamo.explain(lambda: guided(x))()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    task = nn.functional.cross_entropy(guided(x), y)
    total = guided.total_loss(task)
    assert _check(task, total, guided.alignment_loss, target, 0.5)


def test_the_output_loss_path_inside_a_compiled_forward_names_the_fix() -> None:
    target, guide = _gpt2_pair(layers=1)
    target.loss_type = "ForCausalLM"
    guided = GuidedModel(target, guide, tensor_cap=1.0)
    ids = torch.randint(0, 40, (8, 8))
    guided(input_ids=ids, labels=ids)
    with pytest.raises(Exception, match="add_to_output_loss=False"):
        torch.compile(lambda: guided(input_ids=ids, labels=ids).loss, backend="eager", fullgraph=True)()


# --------------------------------------------------------------------------- the persistence warning


def _convnet() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(12):
        layers += [nn.Conv2d(1 if i == 0 else 8, 8, 3, padding=1, stride=2 if i in (4, 8) else 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_the_persistence_warning_fires_on_a_plain_convnet_and_names_the_tensors_and_the_fix() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    target = _convnet()
    guide = torchvision.models.resnet18(weights=None, num_classes=10)
    guide.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    opt = torch.optim.Adam(target.parameters(), lr=1e-3)
    guided = GuidedModel(target, guide.eval(), layers="sublayers", tensor_cap_after=20, optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    caught = []
    for step in range(21):
        x, y = torch.rand(32, 1, 16, 16, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loss = guided.total_loss(nn.functional.cross_entropy(guided(x), y))
        caught += [(step, str(w.message)) for w in seen if issubclass(w.category, GuidewrapWarning)]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [step for step, _ in caught] == [20]  # once, after the first steps (not the first step's pull)
    assert re.search(
        r"over 100 times the task loss's in \d+ of \d+ trainable tensors \(worst: '[\w.]+', [\d.e+]+ times",
        caught[0][1],
    )
    assert "tensor_cap=1" in caught[0][1]
    assert guided.guidance_metrics()["guidance_max_tensor_pull"] > PERSISTENT_PULL


RECORDED = Path(__file__).resolve().parents[1] / "docs" / "data" / "tensor-pulls"


@pytest.mark.parametrize("path", sorted(RECORDED.glob("*.json")), ids=lambda p: p.stem)
def test_recorded_runs_warn_on_the_convnet_only(path: Path) -> None:
    """The tensor pulls measured after 100 guided steps of each documented run (examples/tensor_trace.py
    --record): the check that warns on them fires for the plain ConvNet at the default and for none of the
    demo, copy-paste and character-LM runs at their documented settings."""
    record = json.loads(path.read_text(encoding="utf-8"))
    named = [(name, torch.zeros(())) for name in record["tensors"]]
    cap = TensorCap(None, after=record["after"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cap._warn_if_persistent(named, record["grad_task"], record["grad_term"])
    fired = [w for w in seen if issubclass(w.category, GuidewrapWarning)]
    assert bool(fired) == record["task"].startswith("conv"), (record["task"], cap.largest)


def test_no_warning_without_a_persistent_domination() -> None:
    cap = TensorCap(None, after=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        cap._warn_if_persistent([("a", torch.zeros(())), ("b", torch.zeros(()))], [1.0, 1e-3], [50.0, 0.09])
    assert cap.largest == pytest.approx(90.0)
    assert not math.isinf(cap.largest)


# --------------------------------------------------------------------------- the integrations


def _capture_totals(monkeypatch: pytest.MonkeyPatch, cap: float, after: int) -> list[int]:
    """Check every total an engine returns against its task loss as it is returned (before the step's
    backward); the tensors bound on each capped one."""
    from guidewrap.engine import GuidanceEngine

    bound: list[int] = []
    original = GuidanceEngine.total_for

    def total_for(self: GuidanceEngine, task_loss: Tensor) -> Tensor:
        total = original(self, task_loss)
        if self.strength.tensors.steps > after:
            bound.append(_check(task_loss, total, self.strength.loss, self.target, cap))
        return total

    monkeypatch.setattr(GuidanceEngine, "total_for", total_for)
    return bound


def test_guide_trainer_caps_every_micro_batch_under_accumulation(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    from lab.language import CharCorpus, tiny_gpt2

    from guidewrap.integrations.transformers import guide_trainer

    bound = _capture_totals(monkeypatch, 0.2, after=2)
    corpus = CharCorpus("the quick brown fox jumps over the lazy dog. " * 40, seq_len=12)
    torch.manual_seed(0)
    model = tiny_gpt2(corpus.vocab_size, n_layer=2, n_embd=16, n_head=2, n_positions=32)
    guide = tiny_gpt2(corpus.vocab_size, n_layer=2, n_embd=8, n_head=2, n_positions=32)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=corpus.dataset())
    callback = guide_trainer(trainer, guide, weight=20.0, tensor_cap=0.2, tensor_cap_after=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(bound) == 4 and any(bound)  # micro-batches 3-6 of 3 steps x 2, each against its task loss
    assert callback.engine.steps.optimizers and callback.engine.strength.tensors.cleared  # the Trainer's optimizer
    assert all("guidance_tensors_capped" in row for row in trainer.state.log_history[1:] if "loss" in row)


def test_accelerate_caps_under_accumulation(monkeypatch) -> None:  # noqa: ANN001
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    bound = _capture_totals(monkeypatch, 0.5, after=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    target, guide = tanh_target_relu_guide()
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-2)
    guided = GuidedModel(target, guide, weight=5.0, tensor_cap=0.5, tensor_cap_after=2, optimizer=optimizer)
    model, optimizer = accelerator.prepare(guided, optimizer)
    for step in range(6):
        x, y = class_batch(step)
        with accelerator.accumulate(model):
            loss = guided.total_loss(nn.functional.cross_entropy(model(x), y))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert guided.step_count == 3 and len(bound) == 4 and any(bound)


def test_lightning_caps_the_returned_loss(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    L = pytest.importorskip("lightning")  # noqa: N806
    from guidewrap.integrations.lightning import GuidanceCallback

    bound = _capture_totals(monkeypatch, 0.5, after=2)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tanh_target_relu_guide()[0]

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = torch.utils.data.TensorDataset(*class_batch(0))
    guidance = GuidanceCallback(tanh_target_relu_guide()[1], weight=5.0, tensor_cap=0.5, tensor_cap_after=2)
    trainer = L.Trainer(max_steps=4, callbacks=[guidance], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    assert len(bound) == 2 and any(bound)
    assert guidance.engine.strength.tensors.cleared and "guidance_tensors_capped" in trainer.callback_metrics


def test_the_demo_at_its_documented_setting_does_not_warn() -> None:
    """The flagship command's guided run (the demo's pairs, weight 0.5 on the sum, clipped at 1): its
    first steps are dominated (10 to 19 times in its most dominated tensor at step 100), not persistently."""
    pytest.importorskip("mnist1d")
    from guidewrap.tasks import DEMO_TRAIN_SAMPLES, load_mnist1d, train_variant

    data = load_mnist1d(train_samples=DEMO_TRAIN_SAMPLES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        train_variant("guided", data, seed=0, steps=102, eval_every=102)
