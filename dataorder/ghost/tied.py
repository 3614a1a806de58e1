"""A parameter used by several modules (tied weights): its per-example gradient is the sum of the uses'."""

from __future__ import annotations

from dataorder.ghost.factors import DenseFactors

__all__ = ["TiedFactors"]


class TiedFactors(DenseFactors):
    """The exact per-example gradients of a tied parameter: each use's materialised, summed.

    ``uses`` are factor objects that each cover only ``name`` (e.g. GPT-2's token embedding
    and its output head). The cross terms between uses have no cheap factored form, so the
    exact path holds ``B × |param|`` values for a tied parameter; the sketched path
    (:func:`dataorder.ghost.sketch.sketch_factors`) sums each use's sketch instead and never
    does. ``uses`` is kept for it.

    >>> import torch
    >>> from dataorder.ghost.factors import EmbeddingFactors, LinearFactors
    >>> idx, d = torch.tensor([[0, 1]]), torch.ones(1, 2, 2)
    >>> a, delta = torch.ones(1, 1, 2), torch.ones(1, 1, 3)
    >>> tied = TiedFactors("w", [EmbeddingFactors("w", idx, d, 3), LinearFactors("w", None, a, delta, torch.Size([3, 2]))])
    >>> tied.materialize()["w"][0].tolist()
    [[2.0, 2.0], [2.0, 2.0], [1.0, 1.0]]
    """

    def __init__(self, name: str, uses: list) -> None:  # noqa: super().__init__ would materialise now
        self.name, self.uses = name, uses
        self._grads: dict | None = None

    @property
    def grads(self) -> dict:
        """``{name: (B, *shape)}``, summed over the uses on first access (the sketch never asks)."""
        if self._grads is None:
            self._grads = {self.name: sum(use.materialize()[self.name] for use in self.uses)}
        return self._grads

    @property
    def blocks(self) -> dict:
        g = self.grads[self.name]
        return {self.name: g.reshape(len(g), -1)}

    @property
    def device(self):
        return self.uses[0].device
