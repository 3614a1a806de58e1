"""Models the ghost-balancing benchmark times, built only from layers ghost balancing handles exactly.

* :class:`TinyLM` -- a 2-layer pre-norm causal transformer LM (Embedding, Linear, LayerNorm);
* :class:`BlockStack` -- a GPT-2-small-size stack of the same blocks (12 × d768) on
  embedded sequences, with a small classification head (the GPU rows);
* :class:`ResNet18GN` -- a ResNet-18-size CNN for 32×32 images with GroupNorm (the GPU rows).

Batch norm is avoided on purpose: in training mode it couples the examples of a batch, so
per-example gradients are not defined; GroupNorm is the usual substitute (as in DP training).
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP (×4), residual: the GPT-2 block without dropout."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, steps, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, steps, -1))
        return h + self.down(nn.functional.gelu(self.up(self.norm2(h))))


class TinyLM(nn.Module):
    """A 2-layer pre-norm causal transformer LM from Embedding/Linear/LayerNorm only (ghost-exact)."""

    def __init__(self, vocab: int = 1000, dim: int = 128, heads: int = 2, layers: int = 2, seq_len: int = 128) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)  # untied (tied weights work too; kept as the earlier benchmarks ran)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, steps = tokens.shape
        # indices with the batch dim: ghost hooks read dim 0 of a module's input as the batch
        where = torch.arange(steps, device=tokens.device).expand(batch, steps)
        h = self.tokens(tokens) + self.positions(where)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; equal-length sequences make it the mean of per-sequence means."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class BlockStack(nn.Module):
    """GPT-2-small-size block stack (default 12 × d768, 12 heads) on embedded sequences (B, T, dim).

    The vocabulary embedding and head are left out (a 50k × 768 head at T = 1024 is a
    different question: its per-example block alone is ~1.2G values at B = 32); a small
    linear head classifies the mean-pooled sequence.
    """

    def __init__(self, dim: int = 768, heads: int = 12, layers: int = 12, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm: two 3×3 convolutions and a (projected) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, outputs)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                                          nn.GroupNorm(groups, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 for 32×32 images (3×3 stem, stages of 2 blocks, widths w, 2w, 4w, 8w), GroupNorm.

    ``width=64`` gives the usual 11.2M parameters.

    >>> model = ResNet18GN(width=8)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, width: int = 64, classes: int = 10, groups: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
                                  nn.ReLU())
        layers, inputs = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            outputs = width * 2 ** stage
            layers += [BasicBlock(inputs, outputs, stride, groups), BasicBlock(outputs, outputs, 1, groups)]
            inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


class SmallResNetGN(nn.Module):
    """A small ResNet-style CNN for 32×32 images: a 3×3 stem and two GroupNorm basic blocks, ≥ 64 channels.

    Every convolution but the stem's has at least ``width`` input and output channels (the
    sketched-ghost benchmark's CNN: enough channels for the sketch to pay, a CPU-sized cost).

    >>> SmallResNetGN(width=8)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, width: int = 64, classes: int = 10, groups: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
                                  nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width, 2, groups), BasicBlock(width, 2 * width, 2, groups))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))
