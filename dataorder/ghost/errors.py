"""The ghost path's typed errors, and the one check that refuses layers mixing examples."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["RepeatedBackwardError", "UnsupportedLayerError", "check_no_batch_statistics"]


class UnsupportedLayerError(ValueError):
    """A layer whose per-example gradients the ghost path cannot give (e.g. BatchNorm in train mode).

    A ``ValueError``, so code catching that keeps working; catch this type to tell the case apart.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> try:
    ...     check_no_batch_statistics(model)
    ... except UnsupportedLayerError as error:
    ...     print(str(error).split(":")[0])
    BatchNorm1d '1' uses batch statistics, which mix examples
    """


class RepeatedBackwardError(RuntimeError):
    """A second backward through one forward's graph (``retain_graph=True``) on the sketched path.

    ``GhostGrads(model, sketch=k)`` lets go of each layer's input as soon as that layer's
    sketch is added (as autograd lets go of what it saved), so a layer's output gradient can
    be sketched once per forward. The error drops that forward's rows, so that the redo it asks
    for (the forward and a single backward again, then ``step()``) balances the batch once.

    >>> import torch
    >>> from dataorder.ghost import GhostGrads
    >>> ghost = GhostGrads(nn.Linear(3, 2), sketch=4)
    >>> loss = ghost.model(torch.randn(4, 3)).square().mean()
    >>> loss.backward(retain_graph=True)
    >>> try:
    ...     loss.backward()
    ... except RepeatedBackwardError as error:
    ...     print(str(error).split(":")[0])
    the output gradient of Linear '' arrived twice for one forward (a second backward with retain_graph=True?)
    >>> ghost.collect_sketch()
    []
    """


def check_no_batch_statistics(model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` for a BatchNorm of ``model`` that uses batch statistics.

    >>> check_no_batch_statistics(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())
    """
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise UnsupportedLayerError(
                f"{type(module).__name__} {name!r} uses batch statistics, which mix examples: per-example "
                "gradients need BatchNorm in eval mode with running stats (model.eval() or "
                "module.eval()), or replace it with GroupNorm")
