"""The debiased-CKA kernels: every path (Gram of raw or centred features, symmetric and split
products, the narrow feature-space form, the careful fallback) against the float64 textbook
estimator, in value and gradient, on offset data and on degenerate input."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import debiased_cka_textbook

import guidewrap.metrics.debiased as D
from guidewrap.errors import DegenerateFeaturesWarning
from guidewrap.metrics import get_metric

# Each path, forced on small inputs by lowering the size limits that choose it.
# "fused": both sides of an unbatched call at once (the function's path); "sides": one side at a
# time (the engine's path, with the guide prepared ahead, and batched problems).
_SIDES = {"_fused": lambda x, y: False}
_RAW = {"RAW_GRAM_MIN_ELEMENTS": 0, "RAW_GRAM_MIN_FEATURES": 0}
PATHS = {
    "fused, centred gram": {},
    "fused, raw gram": _RAW,
    "sides, centred gram": _SIDES,
    "sides, raw gram": {**_SIDES, **_RAW},
    "symmetric gram": {"SYMMETRIC_GRAM_MIN_ROWS": 8},
    "sides, split gram": {**_SIDES, "SPLIT_GRAM_MIN_FEATURES": 8},
    "fused, chunked centring": {"CHUNKED_CENTRING_MIN_BYTES": 0, "CENTRING_CHUNK_ELEMENTS": 160},
    "sides, chunked centring": {**_SIDES, "CHUNKED_CENTRING_MIN_BYTES": 0, "CENTRING_CHUNK_ELEMENTS": 160},
}


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(D, name, value)
    return request.param


def _textbook(x: torch.Tensor, y: torch.Tensor) -> float:
    x64, y64 = x.detach().double(), y.detach().double()
    return debiased_cka_textbook(x64 - x64.mean(0), y64 - y64.mean(0)).item()


def _pair(n: int, d1: int, d2: int, seed: int, offset: float = 0.0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = torch.randn(n, d2, generator=g, dtype=torch.float64) + 0.7 * x[:, :1]
    return (x + offset).to(dtype), (y - offset).to(dtype)


@pytest.mark.parametrize("shape", [(16, 24, 40), (24, 64, 32), (9, 16, 16)])
def test_every_gram_path_matches_the_textbook_in_value_and_gradient(path: str, shape: tuple[int, int, int]) -> None:
    x, y = _pair(*shape, seed=sum(shape))
    assert D.debiased_cka(x, y).item() == pytest.approx(_textbook(x, y), abs=1e-10)
    a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(D.debiased_cka, (a, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 8, 3), (64, 16, 10), (200, 12, 50)])
def test_narrow_features_use_the_feature_space_form(shape: tuple[int, int, int], monkeypatch) -> None:
    x, y = _pair(*shape, seed=1)
    calls = []
    original = D._narrow_pair
    monkeypatch.setattr(D, "_narrow_pair", lambda a, b: calls.append(1) or original(a, b))
    assert D.debiased_cka(x, y).item() == pytest.approx(_textbook(x, y), abs=1e-10)
    assert calls, "the narrow form was not used"
    a = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: D.debiased_cka(t, y), (a,), eps=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([(64, 1024, 96), (40, 8, 6), (256, 64, 48), (32, 4096, 4096)]),
    st.sampled_from([0.0, 1.0, 1e2, 1e4]),
    st.sampled_from(sorted(PATHS)),
    st.integers(0, 2**31 - 1),
)
def test_float32_on_offset_data_matches_float64(shape, offset: float, path_name: str, seed: int) -> None:
    """Offsets up to 1e4 times the spread: float32 stays within 1e-4 of float64 computed from the
    same float32 input on every path, and so does the gradient (relative to its largest entry)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in PATHS[path_name].items():
            patch.setattr(D, name, value)
        x, y = _pair(*shape, seed=seed, offset=offset, dtype=torch.float32)
        x32 = x.clone().requires_grad_(True)
        value = D.debiased_cka(x32, y)
        value.backward()
    x64 = x.double().requires_grad_(True)
    y64 = y.double()
    expected = debiased_cka_textbook(x64 - x64.mean(0), y64 - y64.mean(0))
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), abs=1e-4)
    scale = x64.grad.abs().max().item()
    assert (x32.grad.double() - x64.grad).abs().max().item() <= 2e-3 * scale


def test_the_raw_gram_is_taken_only_without_an_offset(monkeypatch) -> None:
    modes: list[bool] = []
    original = D._ZeroDiagonalGram.apply
    monkeypatch.setattr(D._ZeroDiagonalGram, "apply", lambda x, centre: modes.append(centre) or original(x, centre))
    x = torch.randn(64, 16384)
    D.DebiasedSide.of(x)
    assert modes == [False]  # zero-mean wide features: one raw Gram, no centring pass
    modes.clear()
    D.DebiasedSide.of(torch.relu(x))  # ReLU features: the mean is half the spread
    assert modes == [True]
    modes.clear()
    D.DebiasedSide.of(x + 1e4)
    assert modes == [True]


def _degenerate() -> dict[str, torch.Tensor]:
    nan, inf = torch.randn(40, 3), torch.randn(40, 3)
    nan[0, 0], inf[2, 1] = float("nan"), float("inf")
    constant = torch.randn(40, 3)
    constant[:] = constant[0]
    return {"nan": nan, "inf": inf, "zero": torch.zeros(40, 3), "constant rows": constant}


@pytest.mark.parametrize("case", sorted(_degenerate()))
@pytest.mark.parametrize("width", [3, 600])  # narrow (feature form) and wide (Gram)
def test_degenerate_input_falls_back_to_zero_with_one_warning(path: str, case: str, width: int) -> None:
    x = _degenerate()[case].repeat(1, width // 3).clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = D.debiased_cka(x, torch.randn(40, 5))
        value.backward()
    assert value.item() == 0.0 and (x.grad == 0).all()
    assert sum(issubclass(w.category, DegenerateFeaturesWarning) for w in caught) == 1


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_extreme_scales_match_unit_scale(path: str, scale: float) -> None:
    x, y = _pair(40, 600, 30, seed=3, dtype=torch.float32)
    assert D.debiased_cka(x * scale, y).item() == pytest.approx(D.debiased_cka(x, y).item(), abs=1e-4)


def test_engine_metric_prepares_the_guide_once_and_matches_the_function() -> None:
    metric = get_metric("debiased_cka")
    x, y = _pair(32, 96, 128, seed=4)
    prepared = metric.clone_prepared(metric.prepare(y))
    distance, ok = metric.distance_prepared(x.clone().requires_grad_(True), prepared)
    assert bool(ok) and distance.item() == pytest.approx(1 - _textbook(x, y), abs=1e-10)
    batched_x, batched_y = torch.randn(3, 20, 48, dtype=torch.float64), torch.randn(3, 20, 64, dtype=torch.float64)
    distance, ok = metric.distance_prepared(batched_x, metric.prepare(batched_y))
    expected = [1 - _textbook(a, b) for a, b in zip(batched_x, batched_y, strict=True)]
    assert distance.tolist() == pytest.approx(expected, abs=1e-10) and bool(ok.all())
