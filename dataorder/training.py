"""A small, plain training loop shared by ``dataorder compare`` and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dataorder.data import TensorSplit
from dataorder.models import build_model
from dataorder.orderings import Ordering

__all__ = ["RunResult", "evaluate", "train_run"]


@dataclass
class RunResult:
    """One training run: full-train loss after each epoch (index 0: before training)."""

    ordering: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: float = float("nan")

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode.

    >>> model = nn.Linear(3, 2)
    >>> loss, accuracy = evaluate(model, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    >>> 0.0 <= accuracy <= 1.0
    True
    """
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def train_run(split: TensorSplit, model_name: str, ordering: Ordering, *, seed: int, epochs: int,
              batch_size: int = 16, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
              device: str = "cpu", augment: str | None = None) -> RunResult:
    """Train ``model_name`` on ``split`` with ``ordering``; the model init is fixed by ``seed``.

    The same seed gives the same initial weights to every ordering, so orderings are
    compared on equal footing.

    Example::

        >>> from dataorder.data import load_digits_split
        >>> from dataorder.orderings import make_ordering
        >>> result = train_run(load_digits_split(), "logreg", make_ordering("rr"), seed=0, epochs=1)
        >>> len(result.train_loss)
        2
    """
    torch.manual_seed(seed)
    model = build_model(model_name, tuple(split.x_train.shape[1:]), split.num_classes).to(device)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    dataset = TensorDataset(x_train, y_train)
    if augment is not None:  # "qmc" | "iid": random shifts of square images (dataorder.augment)
        from dataorder.augment import shifted_dataset
        dataset = shifted_dataset(x_train, y_train, augment, seed=seed)
    sampler = ordering.make_sampler(len(dataset), seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.functional.cross_entropy
    ordering.attach(model, loss_fn, sampler)
    result = RunResult(ordering=ordering.name, seed=seed)
    result.train_loss.append(evaluate(model, x_train, y_train)[0])
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            ordering.backward(model, loss_fn, x, y, sampler)
            optimizer.step()
        result.train_loss.append(evaluate(model, x_train, y_train)[0])
    result.test_accuracy = evaluate(model, split.x_test.to(device), split.y_test.to(device))[1]
    return result
