"""Property, reference, gradient and degenerate-input tests for guidewrap.metrics."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import debiased_cka_textbook, linear_cka_textbook, rbf_cka_textbook

from guidewrap import metrics as M
from guidewrap.errors import DegenerateFeaturesWarning, MetricError, ShapeMismatchError
from guidewrap.metrics.linear import _linear_cka_sides

SIMILARITIES = {"linear_cka": M.linear_cka, "rbf_cka": M.rbf_cka, "debiased_cka": M.debiased_cka, "rsa": M.rsa}
ALL = {**SIMILARITIES, "procrustes_distance": M.procrustes_distance}
IDENTITY = {name: 1.0 for name in SIMILARITIES} | {"procrustes_distance": 0.0}

dims = st.tuples(st.integers(6, 40), st.integers(1, 60), st.integers(1, 60), st.integers(0, 2**31 - 1))


def _data(n: int, d1: int, d2: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=dtype)
    y = torch.randn(n, d2, generator=g, dtype=dtype) + x[:, :1] * 0.5  # some shared structure
    return x, y


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


@settings(max_examples=40, deadline=None)
@given(dims)
def test_identity(case: tuple[int, int, int, int]) -> None:
    n, d1, _, seed = case
    x, _ = _data(n, max(d1, 2), 2, seed)
    for name, fn in ALL.items():
        assert fn(x, x).item() == pytest.approx(IDENTITY[name], abs=1e-6), name


@settings(max_examples=40, deadline=None)
@given(dims)
def test_symmetric_and_bounded(case: tuple[int, int, int, int]) -> None:
    x, y = _data(*case)
    for name, fn in ALL.items():
        assert fn(x, y).item() == pytest.approx(fn(y, x).item(), abs=1e-8), name
    for fn in (M.linear_cka, M.rbf_cka):
        assert -1e-12 <= fn(x, y).item() <= 1 + 1e-12
    assert 0 <= M.procrustes_distance(x, y).item() <= 1 + 1e-12


@settings(max_examples=40, deadline=None)
@given(dims, st.floats(0.01, 100.0))
def test_invariances(case: tuple[int, int, int, int], scale: float) -> None:
    n, d1, d2, seed = case
    x, y = _data(n, d1, d2, seed)
    perm = torch.randperm(d2, generator=torch.Generator().manual_seed(seed))
    transforms = {
        "orthogonal x": lambda a, b: (a @ _orthogonal(d1, seed), b),
        "orthogonal y": lambda a, b: (a, b @ _orthogonal(d2, seed)),
        "scale x": lambda a, b: (a * scale, b),
        "scale y": lambda a, b: (a, b * scale),
        "permute features": lambda a, b: (a, b[:, perm]),
    }
    for name, fn in ALL.items():
        base = fn(x, y).item()
        for label, transform in transforms.items():
            assert fn(*transform(x, y)).item() == pytest.approx(base, abs=1e-6), (name, label)


@settings(max_examples=30, deadline=None)
@given(dims)
def test_fast_forms_equal_textbook(case: tuple[int, int, int, int]) -> None:
    n, d1, d2, seed = case
    for d1_, d2_ in ((min(d1, n - 1), min(d2, n - 1)), (n + d1, n + d2)):  # d < n and d > n
        for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
            x, y = _data(n, d1_, d2_, seed, dtype)
            assert M.linear_cka(x, y).item() == pytest.approx(linear_cka_textbook(x, y).item(), abs=tol)
            assert M.rbf_cka(x, y).item() == pytest.approx(rbf_cka_textbook(x, y).item(), abs=tol)
            if dtype == torch.float64:
                assert M.debiased_cka(x, y).item() == pytest.approx(debiased_cka_textbook(x, y).item(), abs=tol)


@pytest.mark.parametrize("seed", [12, 293, 295])
def test_rbf_bandwidth_keeps_small_real_distances(seed: int) -> None:
    """Rows near the origin are close but distinct: their distances are real, not rounding noise
    (a noise threshold on the largest squared norm zeroed them and moved the median bandwidth)."""
    x, y = _data(12, 1, 1, seed)
    assert M.rbf_cka(x, y).item() == pytest.approx(rbf_cka_textbook(x, y).item(), abs=1e-9)


def test_feature_and_gram_forms_agree() -> None:
    x, y = _data(30, 10, 80, 0)  # x uses the feature form, y the Gram form
    a, b = M.CenteredSide.of(x, form="gram"), M.CenteredSide.of(y, form="gram")
    c, d = M.CenteredSide.of(x), M.CenteredSide.of(y)
    assert (c.kind, d.kind) == ("features", "gram")
    ok = torch.ones((), dtype=torch.bool)
    assert _linear_cka_sides(a, b, ok)[0].item() == pytest.approx(_linear_cka_sides(c, d, ok)[0].item(), abs=1e-12)


def _offset_case(n: int, d: int, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.rand(1, d, generator=g)
    y = x[:, : min(d, 24)] * 0.3 + torch.randn(n, min(d, 24), generator=g)
    return x + offset * (1 + torch.rand(1, d, generator=g)), y + offset  # float32, as a network gives them


def _centred64(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return t - t.mean(0)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(64, 16), (64, 1024), (256, 4096), (8, 100)]),
    st.sampled_from([0.0, 1e2, 1e4, 1e6]),
    st.integers(0, 2**31 - 1),
)
def test_large_common_offsets_match_float64(shape: tuple[int, int], offset: float, seed: int) -> None:
    """Hidden states with a huge shared offset (massive activations): centring comes before any
    product, so float32 stays within 1e-4 of float64 computed from the same float32 input, in both
    forms and in the engine's stacked path, for the value and the gradient."""
    x, y = _offset_case(*shape, offset, seed)
    expected = linear_cka_textbook(_centred64(x), _centred64(y))
    assert M.linear_cka(x, y).item() == pytest.approx(expected.item(), abs=1e-4)
    assert M.debiased_cka(x, y).item() == pytest.approx(
        debiased_cka_textbook(_centred64(x), _centred64(y)).item(), abs=1e-4
    )
    stacked = M.CenteredSide.of_many([x, x.flip(0)])  # the engine's path for same-shaped target layers
    ok = torch.ones(2, dtype=torch.bool)
    assert _linear_cka_sides(stacked, M.CenteredSide.of(y), ok)[0][0].item() == pytest.approx(expected.item(), abs=1e-4)

    x64 = _centred64(x).requires_grad_(True)
    linear_cka_textbook(x64, _centred64(y)).backward()
    x32 = x.clone().requires_grad_(True)
    side = M.CenteredSide.of_many([x32])
    _linear_cka_sides(side, M.CenteredSide.of(y), ok[:1])[0].sum().backward()
    scale = x64.grad.abs().max().item()
    assert (x32.grad.double() - x64.grad).abs().max().item() <= 1e-3 * scale


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("shape", [(8, 3, 5), (7, 12, 4)])
def test_gradcheck(name: str, shape: tuple[int, int, int]) -> None:
    n, d1, d2 = shape
    x, y = _data(n, d1, d2, 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ALL[name](a, y), (x,), eps=1e-6, atol=1e-5)


def test_tokenwise_batched_matches_loop() -> None:
    x, y = torch.randn(5, 12, 6, dtype=torch.float64), torch.randn(5, 12, 9, dtype=torch.float64)
    batched = M.linear_cka(x, y)
    assert batched.shape == (5,)
    assert torch.allclose(batched, torch.stack([M.linear_cka(a, b) for a, b in zip(x, y, strict=True)]))


def test_weights_exclude_rows_exactly() -> None:
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    w = torch.tensor([1] * 7 + [0] * 3)
    x2 = x.clone()
    x2[7:] = 1e6  # padding content must not matter
    assert M.linear_cka(x2, y, w).item() == pytest.approx(M.linear_cka(x[:7], y[:7]).item(), abs=1e-12)


def test_half_precision_and_autocast_upcast() -> None:
    x, y = torch.randn(64, 32), torch.randn(64, 48)
    ref = M.linear_cka(x, y).item()
    assert M.linear_cka(x.bfloat16(), y.bfloat16()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M.linear_cka(x, y).item() == pytest.approx(ref, abs=1e-5)


def _degenerate_cases() -> dict[str, tuple[torch.Tensor, bool]]:
    nan = torch.randn(8, 3)
    nan[0, 0] = float("nan")
    inf = torch.randn(8, 3)
    inf[2, 1] = float("inf")
    return {  # name -> (x, whether a warning is due for every measure)
        "zero": (torch.zeros(8, 3), True),
        "constant": (torch.full((8, 3), 2.5), True),
        "nan": (nan, True),
        "inf": (inf, True),
        "n=1": (torch.randn(1, 3), True),
        "n=2": (torch.randn(2, 3), False),
        "n=3": (torch.randn(3, 3), False),
    }


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("case", sorted(_degenerate_cases()))
def test_degenerate_inputs_are_finite(name: str, case: str) -> None:
    x, must_warn = _degenerate_cases()[case]
    x = x.clone().requires_grad_(True)
    y = torch.randn(x.shape[0], 4)
    minimum = {"debiased_cka": 4, "rsa": 3}.get(name, 2)
    must_warn = must_warn or x.shape[0] < minimum
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = ALL[name](x, y)
        value.backward()
    assert torch.isfinite(value), (name, case)
    assert torch.isfinite(x.grad).all(), (name, case)
    warned = [w for w in caught if issubclass(w.category, DegenerateFeaturesWarning)]
    if must_warn:
        assert len(warned) == 1, (name, case)
        fallback = 1.0 if name == "procrustes_distance" else 0.0
        assert value.item() == pytest.approx(fallback)
        assert (x.grad == 0).all()


@pytest.mark.parametrize("name", sorted(ALL))
def test_huge_activations(name: str) -> None:
    x, y = _data(16, 5, 7, 1, torch.float32)
    value = ALL[name](x * 1e30, y)
    assert value.item() == pytest.approx(ALL[name](x, y).item(), abs=1e-4)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ShapeMismatchError, match="same number of samples"):
        M.linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ShapeMismatchError, match="flatten"):
        M.linear_cka(torch.randn(5), torch.randn(5))


def test_registry() -> None:
    assert {"cka", "debiased_cka", "rbf_cka", "rsa", "procrustes"} <= set(M.available_metrics())
    x = torch.randn(10, 4)
    assert M.get_metric("cka").distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(MetricError, match="Did you mean 'cka'"):
        M.get_metric("ckaa")
    custom = M.get_metric(lambda a, b: (a.mean() - b.mean()).abs())
    assert custom.distance(x, x).item() == pytest.approx(0.0)
    with pytest.raises(MetricError, match="0-dim"):
        M.get_metric(lambda a, b: a.sum(0)).distance(x, x)


def test_rbf_on_mostly_repeated_rows_warns_and_treats_duplicates_exactly() -> None:
    """More than half the pairs identical: the median bandwidth is 0, so the fallback is used and
    said; identical rows count as distance 0 (not rounding noise), so a rotation still gives 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, generator=g)[torch.randint(0, 2, (512,), generator=g)]
    q = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    with pytest.warns(DegenerateFeaturesWarning, match="identical rows"):
        value = M.rbf_cka(x, x @ q + 3.0)
    with pytest.warns(DegenerateFeaturesWarning):
        exact = M.rbf_cka(x.double(), (x @ q + 3.0).double())
    assert exact.item() == pytest.approx(1.0, abs=1e-9)  # was 0.9976: noise taken as distances
    assert value.item() == pytest.approx(1.0, abs=5e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a few repeats are fine and silent
        M.rbf_cka(torch.randn(64, 5, generator=g).repeat(2, 1), torch.randn(128, 3, generator=g))


def test_rsa_in_float32_matches_float64_on_nearly_collinear_samples() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 50, generator=g)
    x = base + 1e-3 * torch.randn(40, 50, generator=g)
    y = base + 1e-3 * (x - base) @ torch.randn(50, 50, generator=g) / 7 + 1e-3 * torch.randn(40, 50, generator=g)
    exact = M.rsa(x.double(), y.double()).item()
    assert M.rsa(x, y).item() == pytest.approx(exact, abs=1e-4)
    assert M.rsa(x, y).dtype == torch.float32
