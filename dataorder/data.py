"""Built-in datasets and readers for user data.

Everything here works offline: the built-in real dataset is scikit-learn's bundled
``load_digits`` (1,797 8×8 images, 10 classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TensorSplit", "load_digits_split"]


@dataclass(frozen=True)
class TensorSplit:
    """Train/test tensors of a classification task.

    ``x_*`` are float32 features, ``y_*`` int64 labels in ``[0, num_classes)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0, *, image: bool = False) -> TensorSplit:
    """scikit-learn's bundled digits, standardised with the train statistics.

    ``image=True`` keeps the (1, 8, 8) image shape (for a CNN); otherwise rows are 64
    features. The split is stratified and fixed by ``split_seed``.

    Example::

        >>> split = load_digits_split()
        >>> split.x_train.shape, split.num_classes
        (torch.Size([1347, 64]), 10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return TensorSplit(
        x_train=torch.from_numpy(x_train).reshape(shape),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test).reshape(shape),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        name="digits",
    )
