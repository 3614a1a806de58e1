"""GradientOrderSampler: the base of samplers whose next order comes from this epoch's gradients.

During epoch ``t`` the training loop feeds each batch's per-example gradients to ``step``;
the subclass's rule turns them into the order of epoch ``t + 1``. The first epoch is a
seeded random permutation. This module is the bookkeeping shared by GraB and herding:
which positions a step consumes, epochs, CD-GraB's gathering under ``torch.distributed``,
and exact resumption.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataorder.distributed import active_world, check_same_on_all_ranks, gather_global_batch
from dataorder.samplers.base import IndexSampler, check_epoch, epoch_rng

__all__ = ["GradientOrderSampler"]


class GradientOrderSampler(IndexSampler):
    """Base of samplers whose next epoch's order comes from gradients fed to :meth:`step`.

    Subclasses implement ``_plan`` (validate and prepare a batch without changing state),
    ``_commit`` (apply it), ``_next_order`` and ``_end_epoch``, and the ``_rule_state`` hooks.
    The base handles which positions a step consumes, epoch transitions and the state dict.

    The order of an epoch is only known once the epoch before it has been stepped through,
    so :meth:`global_order` answers for the current epoch only, and epochs cannot go back.
    """

    world_size_independent = True
    #: Under torch.distributed with ``sketch_dim=None``, gradients wider than this are
    #: all-gathered as CountSketches of width :attr:`AUTO_SKETCH_DIM` (O(B·k) per rank).
    AUTO_SKETCH_ABOVE = 1_000_000
    AUTO_SKETCH_DIM = 4096

    def __init__(
        self,
        data: Sized | int,
        *,
        sketch_dim: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(data, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        self.sketch_dim = _check_sketch_dim(sketch_dim)
        self._sketch_auto = sketch_dim is None  # may pick AUTO_SKETCH_DIM for a large model under DDP
        self._order: np.ndarray | None = None  # global order of epoch self._order_epoch
        self._order_epoch: int | None = None
        self._visited = 0  # positions of that order already stepped
        self._dim: int | None = None  # width of the gradients fed to step (before sketching)
        self._dtype: torch.dtype | None = None  # accumulation dtype: float32, or float64
        self._sketch = None

    # -- epochs -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; it may only move forward once an order is drawn."""
        epoch = check_epoch(epoch)
        if self._order_epoch is not None and epoch < self._order_epoch:
            raise ValueError(
                f"{type(self).__name__} cannot go back to epoch {epoch}: its orders depend on the "
                f"gradients of earlier epochs and it is at epoch {self._order_epoch}; load an older state_dict"
            )
        super().set_epoch(epoch)

    def _global_order(self, epoch: int) -> np.ndarray:
        if epoch == self._order_epoch:
            return self._order
        if epoch != self.epoch:
            raise ValueError(
                f"{type(self).__name__} decides each epoch's order from the gradients of the epoch "
                f"before, so only the current epoch's ({self.epoch}) order is known, not epoch {epoch}'s; "
                "call set_epoch first"
            )
        if self._order is None:
            order = epoch_rng(self.seed, epoch).permutation(self.n)
        else:
            order = self._next_order(self._order, self._visited)
            self._end_epoch(self._visited)
        self._order, self._order_epoch, self._visited = order, epoch, 0
        return order

    # -- step -------------------------------------------------------------------------------
    @property
    def steps_position(self) -> int:
        """How many positions of the current epoch's global order :meth:`step` has consumed."""
        return self._visited if self._order_epoch == self.epoch else 0

    @torch.no_grad()
    def step(self, grads: Tensor | Mapping[str, Tensor], *, global_batch: bool = False) -> None:
        """Feed the per-example gradients of the next ``B`` positions of this epoch's order.

        ``grads`` is a ``(B, d)`` tensor (e.g. ``PerExampleGrads(...)(x, y).grads``) or
        torch.func's dict ``{name: (B, *shape)}``. Half-precision gradients are accumulated in
        float32. A ``ValueError`` (wrong batch size, a changed ``d``, NaN/inf) leaves the
        sampler as it was, apart from moving to the epoch ``set_epoch`` selected.

        Under ``torch.distributed`` (``world_size > 1``) each rank passes its local batch and
        the rows are all-gathered into global-batch order (CD-GraB): every rank then runs the
        same balancing. Pass ``global_batch=True`` when ``grads`` already hold the whole
        global batch, e.g. from :func:`dataorder.distributed.gather_global_batch` when the
        gathered rows also serve as the data-parallel gradient.
        """
        distributed = self.world_size > 1 and active_world() > 1
        if distributed and self._sketch_auto and self._dim is None and self.sketch_dim is None:
            width = _width(grads)
            if width > self.AUTO_SKETCH_ABOVE:
                self.sketch_dim = self.AUTO_SKETCH_DIM
                warnings.warn(f"{type(self).__name__}: d={width} > {self.AUTO_SKETCH_ABOVE:,}, so per-example "
                              f"gradients are all-gathered as CountSketches of width {self.sketch_dim}; pass "
                              "sketch_dim explicitly to choose", stacklevel=2)
        rows, dim = self._as_rows(grads)
        if distributed and self._dim is None:
            self._check_ranks_agree(rows.shape[0], dim)
        if distributed and not global_batch:
            # CD-GraB: every rank balances the same global batch, so all hold the same state
            rows = gather_global_batch(rows)
        if distributed or global_batch:
            rows = rows[: self._global_length() - self.steps_position]  # drop the padding's duplicates
        self._step_rows(self._wrap(rows), dim)

    def _check_ranks_agree(self, batch: int, dim: int) -> None:
        """Once, at the first step: seeds, settings, batch sizes and widths must match on all ranks."""
        settings = {"drop_last": self.drop_last, "sketch_dim": self.sketch_dim,
                    "balance": getattr(self, "balance", None), "depth": getattr(self, "depth", None)}
        check_same_on_all_ranks(type(self).__name__, seed=self.seed, n=self.n, settings=settings,
                                epoch=self.epoch, batch_size=batch, grad_dim=dim)

    def _wrap(self, rows: Tensor) -> Any:
        """The form the subclass's ``_plan``/``_commit`` take (the tensor itself by default)."""
        return rows

    def _check_room(self, count: int) -> None:
        start = self.steps_position
        remaining = self._global_length() - start
        if count > remaining:
            raise ValueError(
                f"step got {count} gradients but only {remaining} positions of epoch {self.epoch} "
                f"remain ({start} stepped of {self._global_length()}); feed each batch once, in loader order, "
                "and call set_epoch at the start of each epoch"
            )

    def _step_rows(self, rows: Any, dim: int) -> None:
        self._check_room(rows.shape[0])
        start = self.steps_position
        self._global_order(self.epoch)  # the epoch transition iterating would make anyway
        plan = self._plan(rows, start)
        self._dim, self._dtype = dim, rows.dtype
        self._commit(rows, plan, start)
        self._visited = start + rows.shape[0]

    def _as_rows(self, grads: Any) -> tuple[Tensor, int]:
        if isinstance(grads, Mapping):
            from dataorder.grads import flatten_per_example

            grads = flatten_per_example(grads)
        if not isinstance(grads, Tensor):
            raise TypeError(
                f"grads must be a (B, d) tensor or torch.func's dict of per-example gradients, got {type(grads).__name__}"
            )
        if grads.dim() != 2 or grads.shape[0] == 0 or grads.shape[1] == 0:
            raise ValueError(f"grads must be a non-empty (B, d) tensor, one row per example; got shape {tuple(grads.shape)}")
        if not grads.is_floating_point():
            raise TypeError(f"grads must be floating point, got {grads.dtype}")
        dim = int(grads.shape[1])
        if self._dim is not None and dim != self._dim:
            raise ValueError(
                f"grads have d={dim} but earlier steps had d={self._dim}; feed the same parameters "
                "(and the same sketch) every step"
            )
        dtype = self._dtype or (torch.float64 if grads.dtype == torch.float64 else torch.float32)
        rows = grads.detach().to(dtype)
        if self.sketch_dim is not None:
            rows = self._get_sketch(dim, rows.device)(rows)
        return rows, dim

    def _get_sketch(self, dim: int, device: torch.device):
        from dataorder.grads import CountSketch

        if self._sketch is None or self._sketch.dim_in != dim:
            self._sketch = CountSketch(dim, self.sketch_dim, seed=self.seed, device=device)
        return self._sketch

    # -- hooks ------------------------------------------------------------------------------
    def _plan(self, rows: Tensor, start: int) -> Any:
        raise NotImplementedError

    def _commit(self, rows: Tensor, plan: Any, start: int) -> None:
        raise NotImplementedError

    def _next_order(self, order: np.ndarray, visited: int) -> np.ndarray:
        raise NotImplementedError

    def _end_epoch(self, visited: int) -> None:
        raise NotImplementedError

    def _rule_state(self) -> dict[str, Any]:
        return {}

    def _check_rule_state(self, state: dict[str, Any], k: int | None) -> None:
        """Raise ``ValueError`` if the subclass part of ``state`` does not fit."""

    def _load_rule_state(self, state: dict[str, Any]) -> None:
        """Restore the subclass part of a checked ``state``."""

    # -- state ------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        state = {
            "sketch_dim": self.sketch_dim,
            "sketch_auto": self._sketch_auto and self.sketch_dim is not None,
            "order_epoch": self._order_epoch,
            "order": None if self._order is None else torch.from_numpy(self._order.astype(np.int64)),
            "visited": self._visited,
            "dim": self._dim,
            "dtype": None if self._dtype is None else str(self._dtype).removeprefix("torch."),
        }
        state.update(self._rule_state())
        return state

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        missing = {"sketch_dim", "order_epoch", "order", "visited", "dim", "dtype"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict from {name}.state_dict()")
        adopted = self._sketch_auto and state.get("sketch_auto", False)  # chosen at a first distributed step
        if state["sketch_dim"] != self.sketch_dim and not adopted:
            raise ValueError(f"state was saved with sketch_dim={state['sketch_dim']}; construct the sampler with it")
        order = state["order"]
        if order is None:
            if state["order_epoch"] is not None or state["visited"]:
                raise ValueError("state has no order but claims stepped positions; it is corrupt")
        else:
            array = np.asarray(order)
            if array.shape != (self.n,) or not np.array_equal(np.sort(array), np.arange(self.n)):
                raise ValueError(f"state's order is not a permutation of {self.n} examples; it is corrupt")
            if not isinstance(state["order_epoch"], numbers.Integral) or not 0 <= state["order_epoch"] <= state["epoch"]:
                raise ValueError(f"state's order_epoch={state['order_epoch']} does not fit epoch={state['epoch']}")
            if not isinstance(state["visited"], numbers.Integral) or not 0 <= state["visited"] <= self.n:
                raise ValueError(f"state's visited={state['visited']} is not in [0, {self.n}]")
        if state["dtype"] not in (None, "float32", "float64"):
            raise ValueError(f"state's dtype={state['dtype']!r} is not float32 or float64")
        sketch_dim = state["sketch_dim"] if adopted else self.sketch_dim
        k = None if state["dim"] is None else (sketch_dim or state["dim"])
        self._check_rule_state(state, k)

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        order = state["order"]
        if state.get("sketch_auto", False):
            self.sketch_dim = state["sketch_dim"]
        self._order = None if order is None else np.asarray(order, dtype=np.int64).copy()
        self._order_epoch = None if state["order_epoch"] is None else int(state["order_epoch"])
        self._visited = int(state["visited"])
        self._dim = None if state["dim"] is None else int(state["dim"])
        self._dtype = None if state["dtype"] is None else getattr(torch, state["dtype"])
        self._load_rule_state(state)


def _width(grads: Any) -> int:
    """``d`` of a (B, d) tensor or of torch.func's dict of per-example gradients (0 if neither)."""
    if isinstance(grads, Tensor):
        return int(grads.shape[-1]) if grads.dim() else 0
    if isinstance(grads, Mapping):
        return sum(int(v[0].numel()) for v in grads.values() if isinstance(v, Tensor) and v.dim())
    return 0


def _check_sketch_dim(sketch_dim: Any) -> int | None:
    if sketch_dim is None:
        return None
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, numbers.Integral):
        raise TypeError(f"sketch_dim must be None or a positive int, got {sketch_dim!r}")
    if sketch_dim < 1:
        raise ValueError(f"sketch_dim must be a positive int (e.g. 1024), got {sketch_dim}")
    return int(sketch_dim)
