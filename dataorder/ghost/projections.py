"""The arithmetic of a sketch's projections, in the fastest form the device offers.

A sketch projects each layer's factors onto ``k`` values per side (:mod:`dataorder.ghost.sketch`):
thin products with ``k`` outputs, which on a CPU run at the multiply-add floor of float32.
Two faster forms, chosen per call by size:

* **bfloat16 products** on a CPU with native bf16 dot products (AVX512-BF16, AMX): about twice
  float32's rate, conversion included, once a product has :data:`LOW_PRECISION_MIN_MACS`
  multiply-adds (below that the conversions cost more than they save). Products accumulate in
  float32 and come back as float32. bf16 rounds each input to 8 significant bits (~0.4 %), where
  the sketch itself estimates inner products with a relative spread of ~``1/sqrt(k)`` (25 % at
  ``k = 16``). Set :data:`PROJECTION_DTYPE` to ``torch.float32`` for float32 throughout.
* **A stride-1 convolution's input projection as shifted products** (on a CPU). The patches'
  projection is a convolution with ``k_in`` output channels, which oneDNN's direct convolution
  runs at a fraction of its rate when ``k_in`` is small. The same values come from one product
  with every kernel offset's map stacked (``kh·kw·k_in`` outputs per input position), then
  ``kh·kw`` shifted sums: 1.3-2x faster in float32 and 2-4x in bf16 at ``k_in ≤``
  :data:`SHIFTED_MAX_WIDTH` and ``≥`` :data:`LOW_PRECISION_MIN_CHANNELS` input channels
  (measured with 1 thread on 16-256 channels, 8×8 to 32×32 inputs). With a larger ``k_in``
  the shifted sums cost more than they save.

A side kept exact (the identity) is never projected, so ``k`` covering every side still gives
the exact per-example gradients.

>>> matrix = torch.randn(4, 100)
>>> rows = RowMap.of(matrix)
>>> x = torch.randn(3, 100)
>>> torch.allclose(rows.right(x), x @ matrix.T, atol=1e-5)   # small: a float32 product
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["LOW_PRECISION_MIN_CHANNELS", "LOW_PRECISION_MIN_CONV_MACS", "LOW_PRECISION_MIN_MACS", "PROJECTION_DTYPE",
           "PatchMap", "RowMap", "SHIFTED_MAX_WIDTH", "low_precision_dtype"]

#: The dtype projections run in: ``None`` picks bfloat16 on a CPU with native bf16 dot products
#: and float32 elsewhere; ``torch.float32`` or ``torch.bfloat16`` force one. Read when a layer's
#: maps are first made (once per sketcher, layer and device).
PROJECTION_DTYPE: torch.dtype | None = None

#: Smallest product (multiply-adds) run in bfloat16: below it the two conversions cost more.
LOW_PRECISION_MIN_MACS = 2_000_000

#: Smallest convolution (multiply-adds) run in bfloat16: smaller ones ran slower in place, where
#: their input is cold (on a ResNet's stride-2 layers at 4×4 to 8×8 outputs).
LOW_PRECISION_MIN_CONV_MACS = 50_000_000

#: Fewest input channels for which a convolution's input projection uses bfloat16 or the
#: shifted-product form (with 3 or 6 channels both are slower than the plain convolution).
LOW_PRECISION_MIN_CHANNELS = 16

#: Widest ``k_in`` for which a stride-1 convolution's input projection uses shifted products.
SHIFTED_MAX_WIDTH = 8


@functools.cache
def _native_cpu_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def low_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced dtype large projections on ``device`` run in, or None for float32 (:data:`PROJECTION_DTYPE`).

    >>> low_precision_dtype(torch.device("meta")) is None
    True
    """
    wanted = PROJECTION_DTYPE
    if wanted is None:
        return torch.bfloat16 if device.type == "cpu" and _native_cpu_bf16() else None
    if wanted not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dataorder.ghost.projections.PROJECTION_DTYPE must be None, torch.float32 or "
                         f"torch.bfloat16, got {wanted!r}")
    return None if wanted == torch.float32 else wanted


@dataclass(frozen=True)
class RowMap:
    """A ``(width, size)`` float32 matrix applied to float32 tensors, with its low-precision copy.

    ``right(x)`` maps the last dim (``(..., size) -> (..., width)``), ``left(x)`` the middle
    one (``(B, size, L) -> (B, width, L)``); each runs in the low dtype when the product is
    large enough (:data:`LOW_PRECISION_MIN_MACS`) and returns float32. ``x`` may be float32 or
    already in the low dtype (a layer's input or output gradient under ``torch.autocast``),
    which then goes into the product as it is, without a round trip through float32.

    >>> rows = RowMap.of(torch.randn(4, 10))
    >>> rows.right(torch.randn(3, 10)).shape, rows.left(torch.randn(2, 10, 5)).shape
    (torch.Size([3, 4]), torch.Size([2, 4, 5]))
    """

    matrix: Tensor
    low: Tensor | None = None

    @classmethod
    def of(cls, matrix: Tensor) -> RowMap:
        low = low_precision_dtype(matrix.device)
        return cls(matrix, None if low is None else matrix.to(low))

    def _use_low(self, x: Tensor) -> bool:
        return self.low is not None and x.numel() * self.matrix.shape[0] >= LOW_PRECISION_MIN_MACS

    def right(self, x: Tensor) -> Tensor:
        if self._use_low(x):
            return F.linear(x.to(self.low.dtype), self.low).float()
        return F.linear(x.float(), self.matrix)

    def left(self, x: Tensor) -> Tensor:
        if self._use_low(x):
            return torch.matmul(self.low, x.to(self.low.dtype)).float()
        return torch.matmul(self.matrix, x.float())


@dataclass(frozen=True)
class PatchMap:
    """``R_in`` applied to every patch of a 2-D convolution's input: ``(B, C, H, W) -> (B, k, L)``.

    ``kernel`` is ``R_in`` as a ``(k, C, kh, kw)`` convolution weight; ``stacked`` the
    shifted-product form's ``(kh·kw·k, C)`` map, or None where the convolution is used.

    >>> kernel = torch.randn(4, 16, 3, 3)
    >>> geometry = ((3, 3), (1, 1), (1, 1), (1, 1))  # kernel, dilation, padding, stride
    >>> patches = PatchMap.of(kernel, geometry)
    >>> patches.stacked is not None                  # 4 outputs, 16 channels, stride 1: shifted products
    True
    >>> x = torch.randn(2, 16, 5, 7)
    >>> reference = F.conv2d(x, kernel, padding=1).flatten(2)
    >>> torch.allclose(patches(x), reference, atol=1e-4 * float(reference.abs().max()))
    True
    """

    kernel: Tensor
    geometry: tuple  # kernel size, dilation, padding, stride
    stacked: RowMap | None = None
    low_kernel: Tensor | None = None

    @classmethod
    def of(cls, kernel: Tensor, geometry: tuple) -> PatchMap:
        width, channels, kh, kw = kernel.shape
        if channels < LOW_PRECISION_MIN_CHANNELS:  # few channels: the plain float32 convolution is fastest
            return cls(kernel, geometry)
        low = low_precision_dtype(kernel.device)
        # on a GPU one convolution beats kh·kw launches
        if kernel.device.type == "cpu" and tuple(geometry[3]) == (1, 1) and width <= SHIFTED_MAX_WIDTH:
            stacked = kernel.permute(2, 3, 0, 1).reshape(kh * kw * width, channels).contiguous()
            return cls(kernel, geometry, RowMap(stacked, None if low is None else stacked.to(low)))
        return cls(kernel, geometry, None, None if low is None else kernel.to(low))

    def __call__(self, x: Tensor) -> Tensor:
        (kh, kw), dilation, padding, stride = self.geometry
        if self.stacked is None:
            macs = x.numel() // (stride[0] * stride[1]) * self.kernel.shape[0] * kh * kw
            use_low = self.low_kernel is not None and macs >= LOW_PRECISION_MIN_CONV_MACS
            if use_low:
                out = F.conv2d(x.to(self.low_kernel.dtype), self.low_kernel, stride=stride, padding=padding,
                               dilation=dilation).float()
            else:
                out = F.conv2d(x, self.kernel, stride=stride, padding=padding, dilation=dilation)
            return out.flatten(2)
        return self._shifted(x)

    def _shifted(self, x: Tensor) -> Tensor:
        """``sum_{i,j} shift_{ij}(M_ij x)``: one product for every offset's map, then shifted sums."""
        (kh, kw), (dh, dw), (ph, pw), _ = self.geometry
        batch, channels, height, width = x.shape
        k = self.kernel.shape[0]
        out_h, out_w = height + 2 * ph - dh * (kh - 1), width + 2 * pw - dw * (kw - 1)
        mapped = self.stacked.left(x.reshape(batch, channels, height * width)).view(batch, kh, kw, k, height, width)
        out = x.new_zeros(batch, k, out_h, out_w)
        for i in range(kh):
            rows = i * dh - ph  # output row r reads input row r + rows
            r0, r1 = max(0, -rows), min(out_h, height - rows)
            for j in range(kw):
                cols = j * dw - pw
                c0, c1 = max(0, -cols), min(out_w, width - cols)
                if r0 < r1 and c0 < c1:
                    out[:, :, r0:r1, c0:c1] += mapped[:, i, j, :, r0 + rows:r1 + rows, c0 + cols:c1 + cols]
        return out.flatten(2)
