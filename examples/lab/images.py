"""Image-classification pieces shared by the image examples: CIFAR-10 from a local folder (or
generated images), the deep fully connected and plain convolutional targets, accuracy.

Example:
    >>> x, y, x_test, y_test = load_images(None, generated=True)
    >>> tuple(x.shape[1:]), deep_fcn(2, 16)(x[:4]).shape
    ((3, 32, 32), torch.Size([4, 10]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from guidewrap.tasks import accuracy

__all__ = ["load_images", "deep_fcn", "plain_convnet", "accuracy"]


def load_images(data_dir: str | None, generated: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, y, x_test, y_test)``: CIFAR-10 read by torchvision from ``data_dir`` (never downloaded), or
    512 generated 32x32 images whose class is their brightest colour channel.

    Examples:
        >>> load_images(None, generated=True)[1][:3].tolist()
        [0, 2, 2]
    """
    if generated:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(512, 3, 32, 32, generator=gen)
        y = x.mean((2, 3)).argmax(1)
        return x[:384], y[:384], x[384:], y[384:]
    if data_dir is None:
        raise SystemExit("pass --data-dir (CIFAR-10 in torchvision's format) or --smoke")
    import torchvision

    norm = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))]
    )
    out: list[Tensor] = []
    for train in (True, False):
        ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=False, transform=norm)
        out += [torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)]
    return out[0], out[1], out[2], out[3]


def deep_fcn(depth: int, width: int, d_in: int = 3 * 32 * 32, classes: int = 10) -> nn.Sequential:
    """``depth`` x (Linear + BatchNorm + ReLU), then a classifier (the paper's deep FCN, scaled).

    Examples:
        >>> len(deep_fcn(2, 8))
        8
    """
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def plain_convnet(depth: int, channels: int = 64, classes: int = 10) -> nn.Sequential:
    """``depth`` 3x3 conv + BatchNorm + ReLU layers with no skips (stride 2 at 1/3 and 2/3 of the depth).

    Examples:
        >>> plain_convnet(3, 4)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(depth):
        stride = 2 if i in (depth // 3, 2 * depth // 3) else 1
        layers += [nn.Conv2d(c_in, channels, 3, stride=stride, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        c_in = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
