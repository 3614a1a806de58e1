"""GraBSampler: online Gradient Balancing (Lu, Guo, De Sa, NeurIPS 2022) as a PyTorch sampler.

During epoch ``t`` the training loop feeds each batch's per-example gradients to
:meth:`GraBSampler.step` (or, after :meth:`GraBSampler.attach`, calls ``step()`` after an
ordinary backward); the signs that balancing gives them decide the order of epoch ``t + 1``
(``+1`` to the front in visiting order, ``-1`` to the back in reverse). This class only
picks the rule (:mod:`dataorder.ordering.rules`) and the source of the rows
(:mod:`dataorder.ordering.sources`); the bookkeeping is
:class:`~dataorder.ordering.sampler.GradientOrderSampler`'s.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sized
from typing import Any

import torch

from dataorder.ordering.rules import MeanRule, PairRule, check_depth
from dataorder.ordering.sampler import GradientOrderSampler
from dataorder.ordering.sources import SketchSource, exact_source

__all__ = ["BALANCES", "GraBSampler"]

#: The balancing rules :class:`GraBSampler` offers.
BALANCES = ("mean", "pair", "recursive")
MAX_DEPTH = 10


class GraBSampler(GradientOrderSampler):
    """Online Gradient Balancing: each epoch's order balances the previous epoch's gradients.

    Feed every batch's per-example gradients to :meth:`step` (in loader order); at the next
    :meth:`set_epoch` the examples are reordered so that the prefix sums of their gradients
    stay small, which speeds up SGD over random reshuffling (Lu, Guo, De Sa, NeurIPS 2022).

    Args:
        data: the dataset (any ``Sized``) or the number of examples ``n``.
        balance: ``"mean"`` (GraB: centred by the previous epoch's mean gradient), ``"pair"``
            (balances differences of consecutive pairs; no stale mean, as in CD-GraB) or
            ``"recursive"`` (a tree of running sums of depth ``depth``, Wei et al. 2023).
        depth: depth of the recursive tree (``2**(depth+1) - 1`` running sums); only used by
            ``balance="recursive"``.
        sketch_dim: if set, gradients are compressed to this many values by a seeded
            CountSketch before balancing (state O(k) instead of O(d)).
        seed, rank, world_size, drop_last: as for every sampler; the first epoch's order is a
            random permutation drawn from ``(seed, epoch)``.

    Memory: O(d) (O(k) with a sketch) on the gradients' device -- a few running sums, never
    an ``n × d`` matrix -- plus O(n) integers of order bookkeeping on the host.

    On CPU gradients the balancing runs fused over the rows in one numba pass (``2Bk`` flops);
    on an accelerator it takes one ``B × B`` Gram product and one device→host transfer per
    step (``B²k`` flops, no per-example device work). Set ``sampler.fused_cpu = False`` to use
    the Gram path on the CPU too; both give the same signs up to rounding.

    Distributed: ``step`` consumes the next ``B`` positions of the *global* order; each rank
    passes its local batch and the rows are all-gathered (CD-GraB).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from dataorder.grads import PerExampleGrads
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> model = nn.Linear(4, 3)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sampler = GraBSampler(data, balance="mean")
        >>> loader = DataLoader(data, batch_size=8, sampler=sampler)
        >>> per_example = PerExampleGrads(model, nn.functional.cross_entropy)
        >>> for epoch in range(2):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         out = per_example(x, y)       # sets p.grad to the batch mean
        ...         sampler.step(out.grads)       # balance this batch
        ...         optimizer.step(); optimizer.zero_grad()
        >>> sorted(sampler.global_order().tolist()) == list(range(32))
        True
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        balance: str = "mean",
        depth: int = 2,
        sketch_dim: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        depth = check_depth(depth, MAX_DEPTH)
        rule = PairRule() if balance == "pair" else MeanRule(depth=depth if balance == "recursive" else 0)
        super().__init__(data, rule=rule, sketch_dim=sketch_dim, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.balance, self.depth = balance, depth

    def _settings(self) -> dict[str, Any]:
        return {"balance": self.balance, "depth": self.depth}

    # -- the ghost paths ------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, *, params: Any = None, sketch: int | None = None) -> GraBSampler:
        """Balance from an ordinary ``loss.backward()``: hooks capture each layer's factors.

        Afterwards call :meth:`step` with no argument after each backward. Each
        forward/backward since the last ``step()`` is balanced as one micro-batch, in order
        (gradient accumulation). The loss must be mean-reduced over the batch. ``params``
        selects parameters as in :class:`~dataorder.grads.PerExampleGrads`.

        ``sketch=None`` balances on the exact per-example gradients: for a model with at most
        :data:`~dataorder.ordering.sources.DENSE_EXACT_MAX` selected values as dense rows built
        in the backward, above it from ghost products, never materialised (the same numbers,
        at a cost that suits each size); ``sketch=k`` on per-layer sketches of at most
        ``k × k`` values per weight, seeded by the sampler's seed. Returns the sampler.

        Under ``torch.distributed`` (e.g. ``model`` wrapped in DDP) each ``step()`` all-gathers
        what the layers captured and balances the global batch on every rank (CD-GraB).

        A model balances for one sampler at a time: attaching a second sampler to it (say, a
        notebook cell run again) removes the first one's hooks, with a warning, and that
        sampler's ``step()`` then raises ``ValueError``.

        Example::

            >>> from torch import nn
            >>> model = nn.Linear(4, 2)
            >>> sampler = GraBSampler(8).attach(model)
            >>> sampler.set_epoch(0)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
            >>> sampler.step()
            >>> sampler.steps_position
            4
        """
        if self.sketch_dim is not None:
            raise ValueError("the ghost path never materialises gradients, so it needs no sketch_dim: "
                             "construct the sampler with sketch_dim=None to attach a model")
        if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, numbers.Integral) or sketch < 1):
            raise ValueError(f"sketch must be None (exact) or a positive int k (at most k*k values per weight), "
                             f"got {sketch!r}")
        self._check_rows_sketch(None if sketch is None else int(sketch))
        source = exact_source(model, params) if sketch is None else SketchSource(model, params, int(sketch), self.seed)
        if self._left_out is not None:  # the running sums' rows left these out: so must the new hooks
            try:
                source.settle(self._left_out)
            except ValueError as error:
                source.remove()
                raise ValueError(f"{error}: this sampler's running sums were balanced without them; attach the model "
                                 "(and params=) they came from") from None
        self.detach()
        if source.claim():
            warnings.warn("GraBSampler.attach: the model was attached to another GraBSampler, whose hooks are now "
                          "removed (a model balances for one sampler at a time; that sampler's step() now raises)",
                          stacklevel=2)
        source.release_with(self)
        self._source = source
        return self

    @property
    def attached_model(self) -> torch.nn.Module | None:
        """The model :meth:`attach` hooked; None when not attached (or displaced by another sampler).

        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> GraBSampler(4).attach(model).attached_model is model, GraBSampler(4).attached_model
        (True, None)
        """
        source = self._source
        return None if source is None or source.displaced else source.model

    def detach(self) -> None:
        """Remove the hooks that :meth:`attach` registered (a no-op if none).

        They are removed as well when the sampler is garbage-collected, or when another
        sampler attaches to the same model (a model balances for one sampler at a time).
        """
        if getattr(self, "_source", None) is not None:
            self._source.remove()
        self._source = None

    def __repr__(self) -> str:
        extra = f", depth={self.depth}" if self.balance == "recursive" else ""
        return f"{super().__repr__()[:-1]}, balance={self.balance!r}{extra}, sketch_dim={self.sketch_dim})"
