"""Small reference models used by the CLI, the benchmarks and the tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LeNet", "build_model", "mlp"]


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """A ReLU multilayer perceptron; ``hidden=()`` gives logistic regression.

    >>> mlp(64, 10, hidden=(32,))(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 for ``in_channels``×``size``×``size`` images (size 32 in the benchmarks, 8 for digits).

    >>> LeNet(1, 10, size=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, size: int = 32) -> None:
        super().__init__()
        padding = 2 if size < 16 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, size, size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model by name: ``logreg``, ``mlp``, ``cnn`` (LeNet), or ``package.module:factory``.

    A factory is called as ``factory(in_shape, num_classes)`` and must return an ``nn.Module``.

    >>> build_model("logreg", (64,), 10)
    Sequential(
      (0): Flatten(start_dim=1, end_dim=-1)
      (1): Linear(in_features=64, out_features=10, bias=True)
    )
    """
    features = 1
    for size in in_shape:
        features *= size
    if name == "logreg":
        return mlp(features, num_classes, hidden=())
    if name == "mlp":
        return mlp(features, num_classes)
    if name == "cnn":
        if len(in_shape) == 3:
            channels, size = in_shape[0], in_shape[-1]
        else:  # flat features of a square grey image, as digits' 64 = 8×8
            channels, size = 1, int(round(features**0.5))
            if size * size != features:
                raise ValueError(f"--model cnn needs square images; got {features} features")
        return _Reshape((channels, size, size), LeNet(channels, num_classes, size=size))
    if ":" in name:
        return _load_factory(name)(in_shape, num_classes)
    raise ValueError(f"unknown model {name!r}: use logreg, mlp, cnn or package.module:factory")


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...], inner: nn.Module) -> None:
        super().__init__()
        self.shape, self.inner = shape, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(x.shape[0], *self.shape))


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import model factory module {module_name!r}: {error}") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"model factory {spec!r}: {module_name} has no callable {attribute!r}")
    return factory
