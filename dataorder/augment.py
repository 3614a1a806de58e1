"""The augmented-digits task of ``dataorder compare --augment qmc|iid``: random shifts of 8×8 digits.

Each training image is shifted by up to ``max_shift`` pixels in each direction (zero fill),
the shift of example ``i`` in epoch ``e`` read off the point ``u`` that
:class:`~dataorder.samplers.qmc.QMCAugment` gives it: a randomised Sobol sequence over
epochs (``qmc``) or i.i.d. points (``iid``), both pure functions of ``(seed, i, epoch)``.
"""

from __future__ import annotations

import numpy as np
import torch

from dataorder.data import TensorSplit
from dataorder.samplers.qmc import QMCAugment, choose

__all__ = ["AUGMENTATIONS", "ShiftTransform", "load_shift_digits_split", "shift_image", "shifted_dataset"]

#: ``--augment`` name -> QMCAugment method.
AUGMENTATIONS = {"qmc": "sobol", "iid": "random"}


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move the content of ``image`` (``(..., H, W)``) down ``dy`` and right ``dx`` pixels, zero fill.

    >>> shift_image(torch.arange(1.0, 5.0).reshape(2, 2), 1, 0).tolist()
    [[0.0, 0.0], [1.0, 2.0]]
    """
    height, width = image.shape[-2:]
    out = torch.zeros_like(image)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[..., max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


class ShiftTransform:
    """``transform(sample, u)`` for QMCAugment: shift an ``(x, y)`` image by ``u[0]``, ``u[1]``.

    Each of the ``(2 * max_shift + 1)²`` shifts has probability ``1 / (2 * max_shift + 1)²``.
    ``shape`` is the image's ``(C, H, W)``; a flat ``x`` is reshaped to it and back.

    >>> transform = ShiftTransform((1, 2, 2), max_shift=1)
    >>> x, y = transform((torch.arange(1.0, 5.0), 7), np.array([0.99, 0.5]))
    >>> x.tolist(), y
    ([0.0, 0.0, 1.0, 2.0], 7)
    """

    def __init__(self, shape: tuple[int, ...], max_shift: int = 1) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.shape, self.max_shift = tuple(shape), int(max_shift)

    def __call__(self, sample: tuple[torch.Tensor, torch.Tensor], u: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample
        choices = 2 * self.max_shift + 1
        dy, dx = choose(u[0], choices) - self.max_shift, choose(u[1], choices) - self.max_shift
        return shift_image(x.reshape(self.shape), dy, dx).reshape(x.shape), y


def shifted_dataset(x: torch.Tensor, y: torch.Tensor, augment: str, *, seed: int = 0,
                    max_shift: int = 1) -> QMCAugment:
    """The training set ``(x, y)`` with shifts driven by ``augment`` (``"qmc"`` or ``"iid"``).

    >>> data = shifted_dataset(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long), "qmc")
    >>> data[0][0].shape
    torch.Size([64])
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    side = int(round(x[0].numel() ** 0.5))
    if side * side != x[0].numel():
        raise ValueError(f"shift augmentation needs square grey images; got {x[0].numel()} features")
    pairs = _Pairs(x, y)
    return QMCAugment(pairs, ShiftTransform((1, side, side), max_shift), dim=2, seed=seed,
                      method=AUGMENTATIONS[augment])


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def load_shift_digits_split(test_fraction: float = 0.25, split_seed: int = 0, *, image: bool = False) -> TensorSplit:
    """scikit-learn's digits with pixels scaled to ``[0, 1]`` (so a shift moves ink, not statistics).

    The same stratified split as :func:`dataorder.data.load_digits_split`; ``image=True``
    keeps the ``(1, 8, 8)`` shape.

    >>> load_shift_digits_split().x_train.shape
    torch.Size([1347, 64])
    """
    from dataorder.errors import require

    load_digits = require("sklearn.datasets", extra="cli", feature="the built-in digits dataset").load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return TensorSplit(torch.from_numpy(x_train).reshape(shape), torch.from_numpy(y_train),
                       torch.from_numpy(x_test).reshape(shape), torch.from_numpy(y_test), 10, "digits-shift")
