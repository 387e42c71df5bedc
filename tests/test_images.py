"""Fashion-MNIST reading (tiny IDX files written here), the image study's smoke run, error consistency."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from guidewrap.analysis import error_consistency
from guidewrap.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from fashion_data import DataMissingError, load_fashion_mnist, read_idx, write_idx  # noqa: E402


def _write_split(folder: Path, n_train: int = 30, n_test: int = 12, gz: bool = True) -> None:
    gen = torch.Generator().manual_seed(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", torch.randint(0, 256, (n, 28, 28), generator=gen))
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", torch.arange(n) % 10)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_split(tmp_path: Path, gz: bool) -> None:
    _write_split(tmp_path, gz=gz)
    data = load_fashion_mnist(tmp_path, train_samples=10, val_samples=8)
    assert data["x"].shape == (10, 1, 28, 28) and data["x_val"].shape == (8, 1, 28, 28)
    assert data["x_test"].shape == (12, 1, 28, 28)
    assert data["y"].tolist() == list(range(10))
    assert data["y_val"].tolist() == [(22 + i) % 10 for i in range(8)]  # the last 8 training images
    # normalised with the training images' own mean and std
    assert abs(float(torch.cat([data["x"], load_fashion_mnist(tmp_path, val_samples=8)["x"]]).mean())) < 0.2


def test_idx_reader_reads_bytes_in_order(tmp_path: Path) -> None:
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 9, 8, 7, 6, 5, 4])  # a hand-written 2x3 IDX file
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    assert read_idx(tmp_path / "a").tolist() == [[9, 8, 7], [6, 5, 4]]
    assert read_idx(tmp_path / "a.gz").tolist() == [[9, 8, 7], [6, 5, 4]]


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "png")


def test_missing_files_name_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_image_study_smoke_runs_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("fashion_mnist", EXAMPLES / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(smoke=True)
    assert {r["variant"] for r in rows} == set(module.FCN_VARIANTS + module.CONV_VARIANTS + module.NORES_VARIANTS)
    assert all(0 <= r["test_acc"] <= 1 and r["curve"] for r in rows)
    printed = capsys.readouterr().out
    assert "| guided_untrained |" in printed and "error consistency" in printed


def test_error_consistency_hand_computed() -> None:
    labels = [0] * 10
    a = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]  # right on the first six
    b = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]  # right on 0-3 and 8-9
    # c_obs = 6/10 (0-3 both right, 6-7 both wrong); c_exp = .6*.6 + .4*.4 = .52; kappa = .08/.48
    assert error_consistency(a, b, labels) == pytest.approx(0.08 / 0.48)
    assert error_consistency(a, a, labels) == pytest.approx(1.0)
    assert error_consistency(torch.tensor(a), torch.tensor(b), torch.tensor(labels)) == pytest.approx(1 / 6)


def test_error_consistency_uses_correctness_not_the_predicted_class() -> None:
    labels = [1, 2, 3, 4]
    # both wrong on the last two trials, with different wrong answers: still consistent errors
    assert error_consistency([1, 2, 0, 0], [1, 2, 9, 8], labels) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("a", "b", "labels", "message"),
    [
        ([0, 1], [0], [0, 1], "equally long"),
        ([], [], [], "at least one"),
        ([0, 1], [0, 1], [0, 1], "undefined"),  # both always right
    ],
)
def test_error_consistency_bad_input(a: list, b: list, labels: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        error_consistency(a, b, labels)


@pytest.mark.skipif(
    not (Path("/usr/share/datasets/fashion-mnist") / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make data)",
)
def test_the_installed_fashion_mnist_reads_as_the_study_uses_it() -> None:
    data = load_fashion_mnist(train_samples=5000, val_samples=5000)
    assert data["x"].shape == (5000, 1, 28, 28) and data["x_val"].shape == (5000, 1, 28, 28)
    assert data["x_test"].shape == (10_000, 1, 28, 28)
    assert sorted(data["y_test"].unique().tolist()) == list(range(10))
    assert torch.bincount(data["y_test"]).tolist() == [1000] * 10  # the official test split is balanced
