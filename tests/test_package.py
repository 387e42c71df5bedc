"""Packaging facts: lazy optional imports, public API surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

import guidewrap


def test_import_loads_no_optional_dependency() -> None:
    code = (
        "import sys, guidewrap, guidewrap.metrics, guidewrap.model, guidewrap.context;"
        "heavy = [m for m in ('transformers', 'accelerate', 'datasets', 'torchvision') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import guidewrap loaded {out}"


def test_all_is_explicit_and_documented() -> None:
    for name in guidewrap.__all__:
        obj = getattr(guidewrap, name)
        if name != "__version__":
            assert obj.__doc__ and ">>>" in obj.__doc__, f"{name} needs a docstring with an example"


def test_front_door_is_small() -> None:
    assert len(guidewrap.__all__) <= 13 and "GuidedModel" in guidewrap.__all__ and "Guidance" in guidewrap.__all__


@pytest.mark.parametrize(
    ("old", "home", "new"),
    [
        ("debiased_cka", "guidewrap.metrics", "debiased_cka"),
        ("SkippedPairWarning", "guidewrap.errors", "SkippedPairWarning"),
        ("GuidanceSchedule", "guidewrap.schedules", "GuidanceSchedule"),
        ("EmptyPlanError", "guidewrap.errors", "PlanError"),
        ("NoBatchDimensionError", "guidewrap.errors", "PlanError"),
        ("PlanNotReadyError", "guidewrap.errors", "PlanError"),
    ],
)
def test_moved_names_still_import_with_a_deprecation_warning(old: str, home: str, new: str) -> None:
    import importlib

    with pytest.warns(DeprecationWarning, match=home.replace(".", r"\.")):
        obj = getattr(guidewrap, old)
    assert obj is getattr(importlib.import_module(home), new)


def test_renamed_attributes_warn_and_still_work() -> None:
    import torch

    from guidewrap.errors import PlanError

    with pytest.warns(DeprecationWarning, match="PlanError"):
        from guidewrap.errors import EmptyPlanError  # noqa: F401
    assert EmptyPlanError is PlanError
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    guided = guidewrap.GuidedModel(net, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    guided(torch.randn(8, 4))
    with pytest.warns(DeprecationWarning, match="engine"):
        assert guided.guidance is guided.engine
    with guidewrap.Guidance(net, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))) as g:
        net(torch.randn(8, 4))
        with pytest.warns(DeprecationWarning, match="guidance_metrics"):
            assert g.metrics() == g.guidance_metrics()
