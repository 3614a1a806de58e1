"""Small reference models used by the CLI, the benchmarks and the tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BUILT_IN_INPUTS", "ByteLM", "LeNet", "SmallResNet", "build_model", "mlp", "what_it_takes"]


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


class _ResidualBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and a skip (a 1×1 convolution when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.skip = (nn.Identity() if stride == 1 and in_channels == channels else
                     nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                   nn.GroupNorm(groups, channels)))
        nn.init.zeros_(self.norm2.weight)  # each block starts as its skip (Goyal et al. 2017): trains sooner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A small ResNet-style CNN: GroupNorm, residual blocks, ``channels`` (≥ 64) per convolution.

    A stride-2 3×3 stem (32×32 → 16×16), one residual block at 16×16, two stride-2 residual
    blocks (→ 8×8 → 4×4, 1×1-convolution skips; the last one lets each pooled feature see most
    of the image), global average pooling and a linear head. Built from
    ``nn.Conv2d``, ``nn.GroupNorm`` and ``nn.Linear`` only, so every parameter has an exact
    ghost rule.

    >>> SmallResNet(3, 10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: int = 64, groups: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False),
                                  nn.GroupNorm(groups, channels), nn.ReLU())
        self.blocks = nn.Sequential(_ResidualBlock(channels, channels, 1, groups),
                                    _ResidualBlock(channels, channels, 2, groups),
                                    _ResidualBlock(channels, channels, 2, groups))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class _CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """A small byte-level causal transformer language model (pre-norm GPT blocks).

    Input ``(B, T)`` int64 bytes, output ``(B, T, 256)`` next-byte logits, ``T <= context``.
    Built only from ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``, so every parameter
    has an exact ghost rule; positions are looked up per example (``(B, T)`` indices), so the
    position embedding has a per-example gradient too. Head and token embedding are untied.

    >>> model = ByteLM(context=16, dim=32, layers=1, heads=2)
    >>> model(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 256])
    """

    def __init__(self, context: int = 128, dim: int = 64, layers: int = 2, heads: int = 4,
                 vocab_size: int = 256) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.context = context
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        if length > self.context:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.context}")
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.tokens(tokens) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))


#: What each built-in model takes, for the message when a model does not fit the data.
BUILT_IN_INPUTS = {"logreg": "feature vectors", "mlp": "feature vectors", "cnn": "square images",
                   "resnet": "(C, H, W) images", "lm-tiny": "byte-token text"}


def what_it_takes(name: str) -> str:
    """The words that end a "does not fit" message: what ``name`` takes, when it is built in.

    >>> what_it_takes("lm-tiny")
    '; lm-tiny takes byte-token text (logreg and mlp: feature vectors, cnn and resnet: images)'
    >>> what_it_takes("pkg.mod:factory")
    ''
    """
    if name not in BUILT_IN_INPUTS:
        return ""
    return f"; {name} takes {BUILT_IN_INPUTS[name]} (logreg and mlp: feature vectors, cnn and resnet: images)"


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model by name: ``logreg``, ``mlp``, ``cnn`` (LeNet), ``resnet`` (:class:`SmallResNet`, image
    inputs ``(C, H, W)``), ``lm-tiny`` (:class:`ByteLM`), or ``package.module:factory``.

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
    if name == "resnet":
        if len(in_shape) != 3:
            raise ValueError(f"--model resnet needs (channels, height, width) images; got input shape {in_shape}")
        return SmallResNet(in_shape[0], num_classes)
    if name == "lm-tiny":  # in_shape is (context,), num_classes the vocabulary (256 for bytes)
        return ByteLM(context=in_shape[0], vocab_size=num_classes)
    if ":" in name:
        return _load_factory(name)(in_shape, num_classes)
    raise ValueError(f"unknown model {name!r}: use logreg, mlp, cnn, resnet, lm-tiny or package.module:factory")


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
