"""Fashion-MNIST, offline: a small reader for the IDX files of Debian's ``dataset-fashion-mnist`` package.

The package (``apt-get install -y dataset-fashion-mnist``, or ``make data``) puts the four
``*-ubyte.gz`` files of Zalando's release in ``/usr/share/datasets/fashion-mnist``. A folder holding
the same four files, gzipped or not (a torchvision ``FashionMNIST/raw`` folder for instance), works
too. Nothing is ever downloaded.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_idx(folder / "t.gz", torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3))
    >>> read_idx(folder / "t.gz").tolist()
    [[[0, 1, 2], [3, 4, 5]]]
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "sudo apt-get install -y dataset-fashion-mnist   (or: make data)"
FILES = {
    "x": "train-images-idx3-ubyte",
    "y": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_DTYPES = {0x08: torch.uint8}


class DataMissingError(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for; the message says how to install them."""


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read one IDX file (gzipped or not) of unsigned bytes into a tensor of its stored shape."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    expected = 1
    for d in dims:
        expected *= d
    if len(body) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but {len(body)} bytes follow")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def write_idx(path: str | os.PathLike[str], values: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped when the name ends in ``.gz``); used by the tests."""
    path = Path(path)
    header = bytes([0, 0, 0x08, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    data = header + values.to(torch.uint8).contiguous().numpy().tobytes()
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(data)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise DataMissingError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the offline copy with:\n    {INSTALL_HINT}\n"
        "or pass --data-dir pointing at a folder that holds the four IDX files."
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    train_samples: int | None = None,
    val_samples: int = 5000,
) -> dict[str, Tensor]:
    """Fashion-MNIST as float tensors ``(n, 1, 28, 28)`` scaled to [0, 1] and normalised with the
    training mean/std, with integer labels: ``x``/``y`` (the first ``train_samples`` training images),
    ``x_val``/``y_val`` (the last ``val_samples`` training images, never trained on) and
    ``x_test``/``y_test`` (the 10,000 test images).

    ``root`` defaults to ``$FASHION_MNIST_DIR`` or the Debian package's folder.
    """
    folder = Path(root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_ROOT)
    raw = {key: read_idx(_find(folder, stem)) for key, stem in FILES.items()}
    if len(raw["x"]) != len(raw["y"]) or len(raw["x_test"]) != len(raw["y_test"]):
        raise ValueError(f"{folder}: image and label counts differ")
    n_train = len(raw["x"]) - val_samples
    if n_train < 1:
        raise ValueError(f"val_samples={val_samples} leaves no training images out of {len(raw['x'])}")
    keep = n_train if train_samples is None else min(train_samples, n_train)
    images = raw["x"].float().div(255)
    mean, std = float(images[:n_train].mean()), float(images[:n_train].std())

    def prep(x: Tensor) -> Tensor:
        return ((x.float().div(255) - mean) / std).unsqueeze(1)

    return {
        "x": prep(raw["x"][:keep]),
        "y": raw["y"][:keep].long(),
        "x_val": prep(raw["x"][n_train:]),
        "y_val": raw["y"][n_train:].long(),
        "x_test": prep(raw["x_test"]),
        "y_test": raw["y_test"].long(),
    }
