"""Reliability: every misuse gets a specific error naming the value and the fix, numerical faults never
become NaN/inf losses, no hooks or memory are left behind, and random architectures train (fuzzed)."""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from guidewrap import (
    BatchSizeMismatchError,
    ConfigError,
    EmptyPlanError,
    Guidance,
    GuidanceClosedError,
    GuidedModel,
    GuideRequiresGradError,
    GuidewrapError,
    LayerNotFoundError,
    MetricError,
    NoBatchDimensionError,
    NoiseInputError,
    SkippedPairWarning,
)
from guidewrap.errors import GuidewrapWarning
from tests.conftest import mlp


def _pair() -> tuple[nn.Module, nn.Module]:
    target = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    guide = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    return target, guide


def _no_hooks(*models: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for model in models for m in model.modules())


# ---------------------------------------------------------------- misuse -> specific errors


class _NoBatchOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 3)
        self.bias_net = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.bias_net(torch.ones(3))  # bias_net's output has no batch dimension


class _TextTarget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, note: object = None) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize(
    ("make", "error", "builtin", "words"),
    [
        (lambda t, g: GuidedModel(t, g, layers=[("2.", "2")]), LayerNotFoundError, KeyError, ["'2.'", "list_layers"]),
        (lambda t, g: GuidedModel(t, g, layers=[("0", "tanh")]), LayerNotFoundError, KeyError, ["'tanh'", "guide"]),
        (
            lambda t, g: GuidedModel(t, g, guide_inputs=lambda x: x[:4])(torch.randn(8, 8)),
            BatchSizeMismatchError,
            ValueError,
            ["4 samples", "8", "keep the batch size"],
        ),
        (
            lambda t, g: GuidedModel(_NoBatchOutput(), g, layers=[("bias_net", "0")]).plan(torch.randn(6, 8)),
            NoBatchDimensionError,
            ValueError,
            ["'bias_net'", "(3,)"],
        ),
        (
            lambda t, g: GuidedModel(t, g, layer_types=(nn.Conv2d,)).plan(torch.randn(6, 8)),
            EmptyPlanError,
            ValueError,
            ["nothing to align", "layer_types"],
        ),
        (
            lambda t, g: GuidedModel(t, g, strict_guide=True),
            GuideRequiresGradError,
            ValueError,
            ["requires_grad_(False)", "'0.weight'"],
        ),
        (
            lambda t, g: GuidedModel(t, g, metric=lambda a, b: a.mean(0))(torch.randn(6, 8)),
            MetricError,
            TypeError,
            ["0-dim", ".mean()"],
        ),
        (lambda t, g: GuidedModel(t, g, metric="ckaa"), MetricError, TypeError, ["'ckaa'", "cka"]),
        (lambda t, g: GuidedModel(t, g, until_step=-1), ConfigError, ValueError, ["until_step", "-1"]),
        (lambda t, g: GuidedModel(t, g, start_step=5, until_step=2), ConfigError, ValueError, ["start_step (5)"]),
        (lambda t, g: GuidedModel(t, g, weight=float("nan")), ConfigError, ValueError, ["weight"]),
        (lambda t, g: GuidedModel(t, g, untill_step=3), ConfigError, ValueError, ["untill_step", "until_step"]),
        (
            lambda t, g: GuidedModel(_TextTarget(), g, guide_inputs="noise")(torch.randn(6, 8), note=object()),
            NoiseInputError,
            TypeError,
            ["object", "guide_inputs='same'"],
        ),
    ],
)
def test_misuse_raises_a_specific_error_with_the_fix(make, error, builtin, words) -> None:  # noqa: ANN001
    target, guide = _pair()
    with pytest.raises(error) as info:
        make(target, guide)
    assert isinstance(info.value, GuidewrapError) and isinstance(info.value, builtin)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_guidance_after_exit_is_an_error() -> None:
    target, guide = _pair()
    with Guidance(target, guide) as g:
        target(torch.randn(6, 8))
    with pytest.raises(GuidanceClosedError, match="create a new Guidance"):
        g.alignment_loss  # noqa: B018
    with pytest.raises(GuidanceClosedError):
        g.step()


# ---------------------------------------------------------------- numerical faults


class _Fault(nn.Module):
    """Passes its input through, or replaces it by a fault pattern (dead, constant, huge, NaN)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dead":
            return x * 0
        if self.kind == "constant":
            return x * 0 + 3.0
        if self.kind == "huge":
            return x * 1e30
        if self.kind == "nan":
            y = x.clone()
            y[0] = float("nan")  # one sample's activations are NaN
            return y
        return x


def _faulty(kind: str, width: int = 12) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), _Fault(kind), nn.Linear(width, 3))


@pytest.mark.parametrize("side", ["target", "guide"])
@pytest.mark.parametrize("kind", ["dead", "constant", "huge", "nan"])
def test_faulty_layers_never_make_the_loss_non_finite(side: str, kind: str) -> None:
    target, guide = (_faulty(kind), _faulty("none")) if side == "target" else (_faulty("none", 16), _faulty(kind))
    layers = [("0", "0"), ("3", "3")]  # the second pair reads the faulty layer's output
    guided = GuidedModel(target, guide, layers=layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided(torch.randn(16, 8))
    assert torch.isfinite(guided.alignment_loss)
    if kind in ("dead", "constant", "nan"):  # unmeasurable: skipped once, named, counted
        skipped = [w for w in caught if issubclass(w.category, SkippedPairWarning)]
        assert len(skipped) == 1 and "3<-3" in str(skipped[0].message)
        assert guided.guidance_metrics()["guidance_skipped_pairs"] == 1
        assert set(guided.last_alignment) == {"0<-0"}
    else:  # huge values are rescaled: measured normally
        assert set(guided.last_alignment) == {"0<-0", "3<-3"}
    guided.alignment_loss.backward()  # the term's gradient is finite too (zero through a skipped pair)
    assert all(torch.isfinite(p.grad).all() for p in target.parameters() if p.grad is not None)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_batches_give_finite_losses(n: int) -> None:
    target, guide = _pair()
    guided = GuidedModel(target, guide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guided(torch.randn(n, 8))
    assert torch.isfinite(guided.alignment_loss)
    if n == 1:
        assert guided.alignment_loss.item() == 0.0  # nothing measurable in one sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations(dtype: torch.dtype) -> None:
    target, guide = _pair()
    guided = GuidedModel(target.to(dtype), guide.to(dtype))
    guided(torch.randn(32, 8, dtype=dtype))
    assert guided.alignment_loss.dtype == torch.float32 and torch.isfinite(guided.alignment_loss)
    guided.alignment_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in target.parameters() if p.grad is not None)


def test_bf16_autocast_on_cpu() -> None:
    target, guide = mlp(width=64, depth=4), mlp(width=32, depth=4)
    guided = GuidedModel(target, guide)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guided(torch.randn(32, 8))
    assert torch.isfinite(guided.alignment_loss) and all(math.isfinite(v) for v in guided.last_alignment.values())


# ---------------------------------------------------------------- hooks, memory, compile


def test_no_memory_growth_over_500_guided_steps() -> None:
    target, guide = _pair()
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    guided = GuidedModel(target, guide, optimizer=opt)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on deprecated torch objects warns
            return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    def steps(count: int) -> None:
        for _ in range(count):
            loss = nn.functional.cross_entropy(guided(x), y) + guided.alignment_loss
            opt.zero_grad()
            loss.backward()
            opt.step()

    steps(20)  # warm-up: plan, optimizer state
    before = live_tensors()
    steps(500)
    assert guided.step_count == 520
    assert live_tensors() - before <= 2  # nothing accumulates per step


def test_hooks_gone_after_window_and_after_exception() -> None:
    target, guide = _pair()
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    guided = GuidedModel(target, guide, until_step=2, optimizer=opt)
    for _ in range(3):
        (guided(torch.randn(8, 8)).sum() + guided.alignment_loss).backward()
        opt.step()
    guided(torch.randn(8, 8))
    assert _no_hooks(target, guide)
    target2, guide2 = _pair()
    with pytest.raises(RuntimeError, match="inside"), Guidance(target2, guide2):
        target2(torch.randn(8, 8))
        raise RuntimeError("inside")
    assert _no_hooks(target2, guide2)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_target_under_torch_compile(backend: str) -> None:
    # "eager": dynamo traces the layer hooks; "inductor" also compiles the graph (about 30 s on CPU).
    import shutil

    if backend == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor needs a C++ compiler on CPU")
    target, guide = _pair()
    x = torch.randn(16, 8)
    reference = GuidedModel(target, guide)
    reference(x)
    expected = reference.alignment_loss.item()
    reference.close()  # only the compiled wrapper's hooks remain
    compiled = GuidedModel(torch.compile(target, backend=backend), guide)
    out = compiled(x)
    assert torch.allclose(out, target(x))
    assert compiled.alignment_loss.item() == pytest.approx(expected, rel=1e-5)
    compiled.alignment_loss.backward()
    assert target[0].weight.grad is not None and torch.isfinite(target[0].weight.grad).all()


# ---------------------------------------------------------------- fuzzed architectures

FAMILIES = ("mlp", "cnn", "rnn", "transformer")


def _build(family: str, depth: int, width: int, rng: torch.Generator, seq_first: bool = False) -> nn.Module:
    """A model of ``family`` for 48 input numbers: vectors, (3, 4, 4) images or (6, 8) sequences;
    ``seq_first`` builds the sequence families with ``batch_first=False`` (run on (6, n, 8))."""
    if family == "mlp":
        layers = [nn.Flatten()] + [
            m for i in range(depth) for m in (nn.Linear(48 if i == 0 else width, width), nn.ReLU())
        ]
        return nn.Sequential(*layers, nn.Linear(width, 4))
    if family == "cnn":
        layers = [m for i in range(depth) for m in (nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU())]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 4))
    d = width - width % 2 or 2
    first = not seq_first
    if family == "rnn":
        kind = [nn.RNN, nn.LSTM, nn.GRU][int(torch.randint(0, 3, (1,), generator=rng))]
        return _Seq(nn.ModuleList(kind(8 if i == 0 else d, d, batch_first=first) for i in range(depth)), d, seq_first)
    layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=first)
    return _Seq(
        nn.ModuleList([nn.Linear(8, d), nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)]), d, seq_first
    )


class _Seq(nn.Module):
    def __init__(self, blocks: nn.ModuleList, d: int, seq_first: bool = False) -> None:
        super().__init__()
        self.blocks, self.head, self.seq_first = blocks, nn.Linear(d, 4), seq_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1).view(len(x), 6, 8)  # any input becomes a (n, 6, 8) sequence
        h = h.transpose(0, 1) if self.seq_first else h
        for block in self.blocks:
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(h.mean(0 if self.seq_first else 1))


def _fuzz_reference(model: nn.Module, names: set[str], call: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Each named layer's output as float64 (n, features), laid out by what the test knows: the
    sequence families' 3-D outputs are (T, n, d) when built sequence-first."""
    from reference import capture_outputs

    out = capture_outputs(model, names, torch.no_grad()(call))
    seq_first = getattr(model, "seq_first", False)
    return {n: (t.transpose(0, 1) if seq_first and t.dim() == 3 else t).flatten(1).double() for n, t in out.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target_family=st.sampled_from(FAMILIES),
    guide_family=st.sampled_from(FAMILIES),
    depths=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    widths=st.tuples(st.integers(2, 24), st.integers(2, 24)),
    batch=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    seq_first=st.tuples(st.booleans(), st.booleans()),
    twist=st.sampled_from(["none", "deepcopy_mid_step", "float64_guide", "shared_module"]),
)
def test_fuzzed_architectures_train(  # noqa: ANN001
    target_family, guide_family, depths, widths, batch, seed, seq_first, twist
) -> None:
    """Random pairs train without NaN, hooks or guide changes; every measured pair equals a float64
    reference from the test's own hooks; layouts (sequence-first), snapshots mid-step, a float64
    guide and a guide sharing a module (refused, target untouched) are mixed in."""
    import copy

    from reference import linear_cka_textbook

    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    target = _build(target_family, depths[0], widths[0], rng, seq_first[0])
    if guide_family == target_family:  # the guide comes from another family
        guide_family = FAMILIES[(FAMILIES.index(target_family) + 1) % len(FAMILIES)]
    guide = _build(guide_family, depths[1], widths[1], rng, seq_first[1])
    if twist == "shared_module":
        shared = nn.Sequential(next(m for m in target.modules() if isinstance(m, (nn.Linear, nn.Conv2d))))
        with pytest.raises(ConfigError, match="shares modules"):
            Guidance(target, shared)
        assert all(p.requires_grad for p in target.parameters()) and target.training
    if twist == "float64_guide":
        guide = guide.double()
    x = torch.randn(batch, 48, generator=rng)  # 48 = 6 x 8 sequences = 3 x 4 x 4 images
    x_img = x.view(batch, 3, 4, 4)
    inputs = x_img if target_family == "cnn" else x
    guide_inputs = (lambda t: t.view(batch, 3, 4, 4)) if guide_family == "cnn" else (lambda t: t.flatten(1))
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    params = [p for p in target.parameters() if p.requires_grad]
    with Guidance(target, guide, guide_inputs=guide_inputs) as g, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny batches may make some pairs unmeasurable (skipped, warned)
        plan = g.plan(inputs)
        assert len(plan) > 0  # every family here has layers to align: an empty plan is a bug
        for step in range(2):
            out = target(inputs)
            term = g.alignment_loss
            measured = g.last_alignment
            if step == 0:
                t_ref = _fuzz_reference(target, {p.target.name for p in plan}, lambda: target(inputs))
                g_x = guide_inputs(inputs).to(next(guide.parameters()).dtype)
                g_ref = _fuzz_reference(guide, {p.guide.name for p in plan}, lambda g_x=g_x: guide(g_x))
                for pair in plan:
                    a, b = t_ref[pair.target.name], g_ref[pair.guide.name]
                    if pair.key in measured:
                        want = linear_cka_textbook(a - a.mean(0), b - b.mean(0)).item()
                        assert measured[pair.key] == pytest.approx(want, abs=2e-4), f"{pair.key}\n{plan}"
                    else:  # skipped pairs must really be unmeasurable
                        # float64 rounding leaves ~1e-16 spread on a layer that is constant in float32
                        varies = lambda v: v.std(0).max() > 1e-9 * (1 + v.abs().max())  # noqa: E731
                        # a float64 guide is compared in the target's float32 (documented): judge it there
                        b = b.float().double() if twist == "float64_guide" else b
                        assert batch < 2 or not (varies(a) and varies(b)), f"{pair.key} skipped"
            if twist == "deepcopy_mid_step":
                snapshot = copy.deepcopy(target)  # between the forward and the backward
                snapshot(inputs)
                assert _no_hooks(snapshot)
            if batch >= 3 and measured:  # n = 2 makes every CKA exactly 1 (two centred points)
                assert term.item() > 0, f"a measured plan gave a zero term: {measured}"
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), "no gradient from the term"
            loss = out.pow(2).mean() + term
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in target.parameters())
    assert all(p.grad is None for p in guide.parameters())
    assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items()) and not guide.training
    assert _no_hooks(target, guide)


def test_pre_align_evaluate_and_dropped_wrappers_leave_no_hooks() -> None:
    target, guide = _pair()
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    guided = GuidedModel(target, guide, optimizer=opt)
    guided.pre_align(torch.randn(16, 8), steps=2)
    guided.evaluate_alignment(torch.randn(16, 8))
    assert _no_hooks(target, guide)
    guided(torch.randn(16, 8))  # a training forward attaches the layer hooks for the window
    assert not _no_hooks(target)
    del guided
    gc.collect()
    assert _no_hooks(target, guide) and not opt._optimizer_step_post_hooks


# --------------------------------------------------------------------------- clear errors, not crashes


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.unused, self.b = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _small_guide() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def test_window_bounds_must_be_integers_not_booleans() -> None:
    from guidewrap.errors import ConfigError

    with pytest.raises(ConfigError, match="until_step"):
        GuidedModel(_TwoLayer(), _small_guide(), until_step=True)
    with pytest.raises(ConfigError, match="start_step"):
        GuidedModel(_TwoLayer(), _small_guide(), start_step=False, until_step=3)


def test_a_bare_layer_as_the_whole_model_is_its_own_layer() -> None:
    guided = GuidedModel(nn.LSTM(4, 8, batch_first=True), _small_guide(), exclude_output_layer=False)
    plan = guided.plan(torch.randn(6, 5, 4))
    assert [p.target.name for p in plan] == ["", ""] and all(p.target.type == "LSTM" for p in plan)
    guided(torch.randn(6, 5, 4))
    assert guided.alignment_loss.item() > 0


def test_a_named_layer_that_never_runs_is_an_error_not_a_silent_drop() -> None:
    from guidewrap.errors import PlanError

    guided = GuidedModel(_TwoLayer(), _small_guide(), layers={"target": ["a", "unused"], "guide": ["0", "2"]})
    with pytest.raises(PlanError, match="'unused' did not run"):
        guided.plan(torch.randn(8, 4))
    patterns = GuidedModel(_TwoLayer(), _small_guide(), layers={"target": ["*"], "guide": ["0", "2"]})
    assert len(patterns.plan(torch.randn(8, 4))) == 2  # a pattern may match modules that do not run


def test_a_non_finite_custom_metric_raises_naming_the_pair() -> None:
    from guidewrap.errors import MetricError

    guided = GuidedModel(_TwoLayer(), _small_guide(), metric=lambda x, y: torch.tensor(float("nan")))
    with pytest.raises(MetricError, match="returned a non-finite distance for pair"):
        guided(torch.randn(8, 4))


class _DeadSecond(nn.Module):
    """Two same-shaped layers (one batched group); the second's output is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * 0 + 0.5)


def test_a_dead_layer_in_a_batched_group_is_skipped_with_a_warning_and_no_gradient() -> None:
    """Same-shaped pairs run as one batched problem; a constant target layer among them used to
    be reported as CKA 0 with a rounding-noise gradient and no warning."""
    target = _DeadSecond()
    guide = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
    guided = GuidedModel(target, guide, layers=[("a", "0"), ("b", "2")], exclude_output_layer=False)
    with pytest.warns(SkippedPairWarning, match=r"b<-2 skipped this step \(degenerate"):
        guided(torch.randn(32, 8))
    assert set(guided.last_alignment) == {"a<-0"}
    guided.alignment_loss.backward()
    assert target.b.weight.grad is None or not target.b.weight.grad.any()


def test_value_checks_wait_for_a_read_off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU a step's values stay on the device (no host synchronisation per step); skipped
    steps and non-finite results accumulate there and are reported when someone reads."""
    from guidewrap import readout as readout_module

    monkeypatch.setattr(readout_module, "_reads_at_once", lambda device: False)
    target = _DeadSecond()
    guide = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
    guided = GuidedModel(target, guide, layers=[("a", "0"), ("b", "2")], exclude_output_layer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is reported while the steps run
        for _ in range(3):
            guided(torch.randn(32, 8))
    with pytest.warns(SkippedPairWarning, match=r"b<-2 skipped on 3 steps"):
        logged = guided.guidance_metrics()
    assert logged["guidance_skipped_pairs"] == 3 and "guidance_align/a<-0" in logged

    from guidewrap.errors import MetricError

    nan_metric = GuidedModel(_TwoLayer(), _small_guide(), metric=lambda x, y: torch.tensor(float("nan")))
    nan_metric(torch.randn(8, 4))  # no read, no error yet
    with pytest.raises(MetricError, match="non-finite distance"):
        nan_metric.guidance_metrics()


def test_a_float64_guide_gets_float64_inputs() -> None:
    guided = GuidedModel(_TwoLayer(), _small_guide().double())
    guided(torch.randn(8, 4))
    assert guided.alignment_loss.dtype == torch.float32 and guided.alignment_loss.item() > 0


def test_one_dimensional_input_is_a_plan_error_with_the_reason() -> None:
    from guidewrap.errors import PlanError

    same = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(PlanError, match="1-D output"):
        GuidedModel(same, nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)))(torch.randn(4))


def test_a_guide_with_a_smaller_vocabulary_says_so() -> None:
    from guidewrap.errors import ConfigError

    target = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    guide = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    ids = torch.full((6, 5), 50)
    with pytest.raises(ConfigError, match="vocabulary has 10 tokens but the batch holds ids up to 50"):
        GuidedModel(target, guide)(ids)


def test_an_encoder_decoder_guide_names_the_adapter_to_pass() -> None:
    transformers = pytest.importorskip("transformers")
    from guidewrap.errors import ConfigError

    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    guide = transformers.T5Model(config)
    target = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="get_encoder"):
        GuidedModel(target, guide)(torch.randint(0, 32, (4, 6)))
    encoder = GuidedModel(target, guide.get_encoder())  # the fix the message names
    encoder(torch.randint(0, 32, (4, 6)))
    assert encoder.alignment_loss.item() > 0


def test_a_batch_of_two_warns_once_that_nothing_is_guided() -> None:
    guided = GuidedModel(_TwoLayer(), _small_guide())
    with pytest.warns(GuidewrapWarning, match="batch of 2 samples"):
        guided(torch.randn(2, 4))
    assert guided.alignment_loss.item() == pytest.approx(0.0, abs=1e-6)  # why it warns: CKA is 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidewrapWarning)
        guided(torch.randn(2, 4))  # once is enough
        guided(torch.randn(8, 4))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_snapshots_of_a_guided_target_carry_no_guidance(tmp_path) -> None:  # noqa: ANN001
    """deepcopy, AveragedModel (EMA/SWA) and torch.save of the target, inside a Guidance block,
    before and after a forward: the copy works, never runs the guide or captures, and holds no
    hook once it has run; the original stays guided."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    target, guide = _TwoLayer(), _small_guide()
    x = torch.randn(8, 4)
    with Guidance(target, guide) as guidance:
        early = copy.deepcopy(target)  # before any forward: only the root hooks exist
        target(x)
        snapshots = {"early": early, "deepcopy": copy.deepcopy(target), "ema": AveragedModel(target)}
        torch.save(target, tmp_path / "target.pt")
        snapshots["saved"] = torch.load(tmp_path / "target.pt", weights_only=False)
        runs = guidance.engine.counters["guide_forwards"]
        for name, snapshot in snapshots.items():
            out = snapshot(x)
            assert out.shape == (8, 2), name
            assert _hook_count(snapshot) == 0, f"{name} kept a hook after its first forward"
        assert guidance.engine.counters["guide_forwards"] == runs, "a snapshot ran the original's guide"
        target(x)
        assert guidance.engine.counters["guide_forwards"] == runs + 1 and guidance.alignment_loss.item() > 0
    assert _hook_count(target) == 0


def test_deepcopy_and_pickle_of_a_guided_model_after_a_forward(tmp_path) -> None:  # noqa: ANN001
    import copy

    guided = GuidedModel(_TwoLayer(), _small_guide())
    x = torch.randn(8, 4)
    guided(x)
    twin = copy.deepcopy(guided)
    torch.save(guided, tmp_path / "guided.pt")
    loaded = torch.load(tmp_path / "guided.pt", weights_only=False)
    for copy_ in (twin, loaded):
        assert copy_.guide is not guided.guide and copy_.target is not guided.target
        assert all(not p.requires_grad for p in copy_.guide.parameters())
        copy_(x)  # guided by its own engine
        assert copy_.alignment_loss.item() > 0 and copy_.engine.counters["guide_forwards"] == 2
        assert torch.equal(copy_.alignment_loss, guided.alignment_loss)  # same weights, same input
    assert guided.engine.counters["guide_forwards"] == 1
    twin.close()
    guided(x)  # the original is untouched by the copy's close
    assert guided.engine.counters["guide_forwards"] == 2


def test_a_guide_sharing_a_module_with_the_target_is_refused_and_nothing_is_changed() -> None:
    embedding = nn.Embedding(20, 8)
    target = nn.Sequential(embedding, nn.Flatten(), nn.Linear(24, 4))
    guide = nn.Sequential(embedding, nn.Flatten(), nn.Linear(24, 6))
    target.train()
    with pytest.raises(ConfigError, match=r"shares modules.*target '0' is guide '0'.*copy.deepcopy"):
        GuidedModel(target, guide)
    assert embedding.weight.requires_grad and embedding.training
    tied = nn.Linear(8, 8)
    other = nn.Linear(8, 8)
    other.weight = tied.weight  # tied weights, distinct modules
    with pytest.raises(ConfigError, match="weight"):
        GuidedModel(nn.Sequential(tied), nn.Sequential(other))


class _CalledTwice(nn.Module):
    """``lin`` runs twice per forward: on (n, 4) and on (3, n, 4) (sequence-first)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lin(x)
        b = self.lin(x.unsqueeze(0).repeat(3, 1, 1))
        return self.out(a + b.mean(0))


def test_a_layer_run_with_different_layouts_in_one_forward_says_so() -> None:
    from guidewrap.errors import PlanError

    guide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(PlanError, match=r"'lin' cannot be aligned: runs 2\+ times per forward with different output"):
        GuidedModel(_CalledTwice(), guide, layers=[("lin", "0")])(torch.randn(16, 4))
    auto = GuidedModel(_CalledTwice(), guide)  # automatic matching leaves it out, visibly
    auto(torch.randn(16, 4))
    plan = auto.plan()
    assert "lin" not in {p.target.name for p in plan} and "different output layouts" in str(plan)


class _SeqFirstLSTM(nn.Module):
    """nn.LSTM without batch_first: (T, n, d) in, logits from the last step."""

    def __init__(self, d: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


def _seq_first_encoder(d: int = 6) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0)  # batch_first=False
    return nn.Sequential(nn.Linear(d, d), nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))


def _reference_alignment(target: nn.Module, guide: nn.Module, plan, x: torch.Tensor, gx: torch.Tensor) -> dict:  # noqa: ANN001
    """Per-pair CKA from the test's own hooks: the batch axis is where the test knows it is."""
    from reference import capture_outputs, linear_cka_textbook

    def grab(model: nn.Module, names: set[str], inp: torch.Tensor, axis_of: dict[str, int]) -> dict:
        out = capture_outputs(model, names, torch.no_grad()(lambda: model(inp)))
        return {n: o.movedim(axis_of[n], 0).flatten(1).double() for n, o in out.items()}

    t_axis = {p.target.name: _true_axis(target, p.target.name) for p in plan}
    g_axis = {p.guide.name: _true_axis(guide, p.guide.name) for p in plan}
    tf = grab(target, set(t_axis), x, t_axis)
    gf = grab(guide, set(g_axis), gx, g_axis)
    return {p.key: linear_cka_textbook(tf[p.target.name], gf[p.guide.name]).item() for p in plan}


def _true_axis(model: nn.Module, name: str) -> int:
    """What the test knows: every module in these models is sequence-first (axis 1) for 3-D outputs."""
    return 1 if getattr(model, "_test_seq_first", True) else 0


def test_a_sequence_first_lstm_with_default_settings_uses_the_real_batch() -> None:
    torch.manual_seed(0)
    target, guide = _SeqFirstLSTM(), _seq_first_encoder()
    x = torch.randn(5, 8, 6)  # (T, n, d): 8 samples, 5 steps
    guided = GuidedModel(target, guide, layers=[("rnn", "1.layers.0")])
    guided(x)
    plan = guided.plan()
    assert [(p.target.batch_dim, p.guide.batch_dim) for p in plan] == [(1, 1)]
    assert "batch axis of the target's input: 1" in str(plan)
    expected = _reference_alignment(target, guide, plan, x, x)
    for key, value in guided.last_alignment.items():
        assert value == pytest.approx(expected[key], abs=1e-4), key


def test_the_declared_layout_breaks_ties_when_length_equals_batch() -> None:
    torch.manual_seed(0)
    target, guide = _SeqFirstLSTM(), _seq_first_encoder()
    x = torch.randn(8, 8, 6)  # T == n: only batch_first says which axis holds the samples
    guided = GuidedModel(target, guide, layers=[("rnn", "1.layers.0")], input_batch_dim=1)
    guided(x)
    plan = guided.plan()
    assert [(p.target.batch_dim, p.guide.batch_dim) for p in plan] == [(1, 1)]
    expected = _reference_alignment(target, guide, plan, x, x)
    assert guided.last_alignment["rnn<-1.layers.0"] == pytest.approx(expected["rnn<-1.layers.0"], abs=1e-4)


def test_a_batch_first_target_with_a_sequence_first_guide_behind_an_adapter() -> None:
    torch.manual_seed(0)
    target = nn.Sequential(nn.LSTM(6, 12, batch_first=True))
    guide = _seq_first_encoder()
    x = torch.randn(8, 5, 6)  # batch first
    guided = GuidedModel(target, guide, layers=[("0", "1.layers.0")], guide_inputs=lambda t: t.transpose(0, 1))
    guided(x)  # used to raise a false BatchSizeMismatchError
    plan = guided.plan()
    assert [(p.target.batch_dim, p.guide.batch_dim) for p in plan] == [(0, 1)]
    target._test_seq_first = False  # the test's own knowledge of the target's layout
    expected = _reference_alignment(target, guide, plan, x, x.transpose(0, 1))
    assert guided.last_alignment["0<-1.layers.0"] == pytest.approx(expected["0<-1.layers.0"], abs=1e-4)


def test_an_explicit_batch_axis_that_contradicts_a_declared_layout_is_an_error() -> None:
    from guidewrap.errors import PlanError

    guided = GuidedModel(_SeqFirstLSTM(), _seq_first_encoder(), input_batch_dim=0)
    with pytest.raises(PlanError, match=r"'rnn' \(LSTM, batch_first=False\) has 8 samples.*input_batch_dim=0"):
        guided(torch.randn(5, 8, 6))


def test_layers_agree_on_the_batch_axis_when_the_length_equals_the_batch() -> None:
    """A sequence-first transformer fed 6 sequences of length 6: its input projection (an
    nn.Linear, no declared layout) takes the axis its transformer layers declare."""
    from reference import linear_cka_textbook

    torch.manual_seed(0)
    target = _build("transformer", 2, 8, torch.Generator().manual_seed(0), seq_first=True)
    guide = _build("mlp", 2, 8, torch.Generator().manual_seed(1))
    x = torch.randn(6, 48)
    guided = GuidedModel(target, guide, layers=[("blocks.0", "2"), ("blocks.1.layers.0", "4")])
    guided(x)
    plan = guided.plan()
    assert [p.target.batch_dim for p in plan] == [1, 1]
    t_ref = _fuzz_reference(target, {"blocks.0", "blocks.1.layers.0"}, lambda: target(x))
    g_ref = _fuzz_reference(guide, {"2", "4"}, lambda: guide(x))
    for pair in plan:
        a, b = t_ref[pair.target.name], g_ref[pair.guide.name]
        want = linear_cka_textbook(a - a.mean(0), b - b.mean(0)).item()
        assert guided.last_alignment[pair.key] == pytest.approx(want, abs=1e-4), pair.key


def test_a_compiled_guided_step_has_no_graph_break() -> None:
    """After the first (planning) step, a guided step traced by torch.compile is one graph: no host
    reads of values, no hooks installed per step, the guide under no_grad while tracing."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    guide = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(128, 10))  # fmt: skip
    guided = GuidedModel(target, guide)
    x = torch.randn(32, 3, 4, 4)
    guided(x)  # plans the layers and installs the taps

    def step(x: torch.Tensor) -> torch.Tensor:
        return guided(x).sum() + guided.alignment_loss

    explained = torch._dynamo.explain(step)(x)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    eager = step(x)
    assert torch.isfinite(eager) and guided.last_alignment  # values are read after the step, eagerly


@pytest.mark.parametrize("strength", [None, 0.3], ids=["weight", "strength"])
def test_a_compiled_guided_gpt2_step_has_no_graph_break(strength: float | None) -> None:
    """The many-pair transformer case (GPT-2 LM <- GPT-2, 25 sub-layer pairs, the output's loss
    holding the term): one graph, and in particular no break raised in guidewrap's code; with
    strength= too (the pull is measured in eager steps; a traced step reads the weight as a tensor)."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    import guidewrap

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_positions=16)
    target, guide = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    # transformers derives no loss type from this class name and logs a warning per loss, a graph
    # break of its own (in unguided steps too): name the default.
    target.loss_type = "ForCausalLM"
    ids = torch.randint(0, 100, (4, 16))
    guided = GuidedModel(target, guide, strength=strength)
    guided(input_ids=ids, labels=ids)  # plans the layers, installs the taps, measures the pull

    explained = torch._dynamo.explain(lambda: guided(input_ids=ids, labels=ids).loss)()
    package = str(Path(guidewrap.__file__).resolve().parent)
    reasons = [f"{r.reason.splitlines()[0]} at {[(f.filename, f.lineno) for f in r.user_stack[-2:]]}"
               for r in explained.break_reasons]  # fmt: skip
    ours = [r for r in explained.break_reasons if r.user_stack and r.user_stack[-1].filename.startswith(package)]
    assert not ours, reasons
    assert explained.graph_break_count == 0, reasons
    assert len(guided.plan()) == 13 and guided.last_alignment


def test_compiled_steps_recompile_only_at_the_start_and_the_window_edge() -> None:
    """The step counter and the decaying weight change every step; neither may become a guard that
    recompiles every step (before: one new graph per step until the cache limit, then eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    target = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    guide = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    guided = GuidedModel(target, guide, optimizer=opt, until_step=6, decay="linear")
    x = torch.randn(16, 3, 4, 4)
    guided(x)  # plans eagerly
    before = counters["stats"]["unique_graphs"]
    step = torch.compile(lambda x: guided(x).sum() + guided.alignment_loss, backend="eager")
    terms = []
    for _ in range(9):
        loss = step(x)
        terms.append(guided.alignment_loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs <= 3, f"{graphs} graphs for 9 steps: something the step reads changes every step"
    assert guided.engine.counters["guided_forwards"] == 1 + 6  # the eager planning forward, steps 0-5 compiled
    assert all(t > 0 for t in terms[:6]) and terms[6:] == [0.0] * 3  # the decayed weight, then the window is over
    assert terms[0] > terms[3]  # the weight decays inside one graph
