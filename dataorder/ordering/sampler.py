"""GradientOrderSampler: the order bookkeeping of samplers whose next order comes from gradients.

During epoch ``t`` the training loop feeds each batch's per-example gradients to ``step``;
the sampler's *rule* (:mod:`dataorder.ordering.rules`) turns them into the order of epoch
``t + 1``. A step flows one way: a source's rows (:mod:`dataorder.ordering.sources`) → the
rule's plan (signs and its new tensors) → the positions stepped here. The epoch advances in
one place, :meth:`GradientOrderSampler.set_epoch`; the first epoch is a seeded random
permutation.

Resumption is defined by the positions *stepped*: ``state_dict()`` holds the rule's tensors
after the last ``step``, where each stepped position went, and how far this rank's iterator
has got. See ``docs/grab-resume.md`` for ``StatefulDataLoader`` with workers.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import warnings
from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataorder.distributed import active_world, check_same_on_all_ranks, gather_global_batch
from dataorder.ordering.sources import DenseRows, check_device, dense_rows, grads_width
from dataorder.samplers._state import StateError, StateReader, StateTypeError
from dataorder.samplers.base import IndexSampler, check_epoch, epoch_rng

__all__ = ["GradientOrderSampler"]

#: How many states taken ahead of step() are completed at most (a prefetching loader holds a few).
MAX_AWAITING = 256
#: The widest CountSketch (``sketch_dim``): its ``(B, k)`` rows are dense.
MAX_SKETCH_DIM = 2**31 - 1


class GradientOrderSampler(IndexSampler):
    """Order bookkeeping for a gradient-driven ``rule``: positions stepped, epochs, CD-GraB, state.

    ``rule`` is a :class:`~dataorder.ordering.rules.MeanRule`, ``PairRule``, ``HerdingRule``
    or any object with their methods. The order of an epoch is only known once the epoch
    before it has been stepped through, so epochs cannot go back once a step was taken.

    Example (herding, fed the whole epoch at once)::

        >>> from dataorder.ordering.rules import HerdingRule
        >>> sampler = GradientOrderSampler(3, rule=HerdingRule(3))
        >>> grads = torch.tensor([[3.0], [-1.0], [-2.0]])
        >>> sampler.step(grads[sampler.global_order()])
        >>> sampler.set_epoch(1)
        >>> sampler.global_order().tolist()
        [1, 0, 2]
    """

    world_size_independent = True
    #: Under torch.distributed with ``sketch_dim=None``, gradients wider than this are
    #: all-gathered as CountSketches of width :attr:`AUTO_SKETCH_DIM` (O(B·k) per rank).
    AUTO_SKETCH_ABOVE = 1_000_000
    AUTO_SKETCH_DIM = 4096
    #: Balance CPU rows with the fused one-pass kernels (else the Gram path).
    fused_cpu: bool = True

    def __init__(
        self,
        data: Sized | int,
        *,
        rule: Any,
        sketch_dim: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(data, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        self.rule = rule
        self.sketch_dim = _check_sketch_dim(sketch_dim)
        self._sketch_auto = sketch_dim is None  # may pick AUTO_SKETCH_DIM for a large model under DDP
        self._order = self._first_order(self.epoch)  # this epoch's global order
        self._visited = 0  # positions of that order already stepped (the next step starts here)
        self._buckets = np.zeros(self.n, dtype=np.int16)  # where each stepped position goes
        self._dim: int | None = None  # width of the gradients fed to step (before sketching); None: never stepped
        self._dtype: torch.dtype | None = None  # accumulation dtype: float32, or float64
        self._sketch = None
        self._source = None  # where step() with no argument takes its rows (see GraBSampler.attach)
        self._rows_sketch: int | None = None  # the attach(sketch=k) the running sums' rows came from (None: exact)
        self._left_out: list[str] | None = None  # parameters the hooks left out of those rows (None: no hooks)
        self._awaiting: list[tuple[int, dict]] = []  # states taken ahead of step(): (position they await, state)
        self._order_tensor: Tensor | None = None  # this epoch's order as saved (cached: it is fixed per epoch)

    # -- epochs: the one place the order advances --------------------------------------------
    def _first_order(self, epoch: int) -> np.ndarray:
        return epoch_rng(self.seed, epoch).permutation(self.n)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. Moving forward turns this epoch's steps into the next order.

        Once a step was taken the epoch may only move forward (its orders depend on the
        gradients of earlier epochs); load an older ``state_dict`` to go back.
        """
        epoch = check_epoch(epoch)
        if epoch == self.epoch:
            return super().set_epoch(epoch)
        if self._dim is None:  # never balanced: every epoch's order is its seeded permutation
            self._order = self._first_order(epoch)
        elif epoch < self.epoch:
            raise ValueError(
                f"{type(self).__name__} cannot go back to epoch {epoch}: its orders depend on the "
                f"gradients of earlier epochs and it is at epoch {self.epoch}; load an older state_dict"
            )
        else:
            self._order = self._next_order()
            self.rule.end_epoch(self._visited)
        self._visited = 0
        self._buckets[:] = 0
        self._awaiting.clear()
        self._order_tensor = None
        super().set_epoch(epoch)

    def _next_order(self) -> np.ndarray:
        visited, order = self._visited, self._order
        head = self.rule.next_order(np.arange(visited), order[:visited], self._buckets[:visited])
        return np.concatenate([head, order[visited:]]).astype(np.int64)

    def _global_order(self, epoch: int) -> np.ndarray:
        if epoch == self.epoch:
            return self._order
        if self._dim is None:
            return self._first_order(epoch)
        raise ValueError(
            f"{type(self).__name__} decides each epoch's order from the gradients of the epoch "
            f"before, so only the current epoch's ({self.epoch}) order is known, not epoch {epoch}'s; "
            "call set_epoch first"
        )

    # -- step -------------------------------------------------------------------------------
    @property
    def steps_position(self) -> int:
        """How many positions of the current epoch's global order :meth:`step` has consumed."""
        return self._visited

    def _distributed(self, global_batch: bool = False) -> int:
        """The process group's size when this sampler balances across ranks (CD-GraB), else 1.

        A sampler of ``world_size > 1`` balances the global batch: it needs the process group
        to gather it, unless the caller passes it whole (``global_batch=True``).
        """
        if self.world_size == 1:
            return 1
        world = active_world()
        if world == 1 and not global_batch:
            raise ValueError(f"this {type(self).__name__} has world_size={self.world_size} but torch.distributed is "
                             "not initialised, so step() cannot gather the other ranks' rows: call "
                             "init_process_group first, or pass the whole global batch with global_batch=True")
        if world not in (1, self.world_size):
            raise ValueError(f"this {type(self).__name__} has world_size={self.world_size} but the process group has "
                             f"{world} ranks: construct it with world_size={world} (or leave world_size to the group)")
        return world

    @torch.no_grad()
    def step(self, grads: Tensor | Mapping[str, Tensor] | None = None, *, global_batch: bool = False) -> None:
        """Feed the per-example gradients of the next ``B`` positions of this epoch's order.

        ``grads`` is a ``(B, d)`` tensor (e.g. ``PerExampleGrads(...)(x, y).grads``) or
        torch.func's dict ``{name: (B, *shape)}``. Half-precision gradients are accumulated in
        float32. A step either completes with finite state or raises (``ValueError`` for a
        wrong batch size, a changed ``d``, NaN/inf or an overflow, ``TypeError`` for a wrong
        type) and leaves the sampler exactly as it was. Inside ``torch.autocast`` the step's own
        arithmetic still runs at the rows' precision.

        Under ``torch.distributed`` (``world_size > 1``) each rank passes its local batch and
        the rows are all-gathered into global-batch order (CD-GraB): every rank then runs the
        same balancing. Pass ``global_batch=True`` when ``grads`` already hold the whole
        global batch, e.g. from :func:`dataorder.distributed.gather_global_batch`.
        """
        autocast = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
        if not autocast:
            return self._step(grads, global_batch)
        with contextlib.ExitStack() as outside:  # the step's arithmetic at the rows' precision
            for device in autocast:
                outside.enter_context(torch.autocast(device, enabled=False))
            self._step(grads, global_batch)

    def _step(self, grads: Tensor | Mapping[str, Tensor] | None, global_batch: bool) -> None:
        if grads is None:
            return self._step_source()
        world = self._distributed(global_batch)
        if world > 1 and self._sketch_auto and self._dim is None and self.sketch_dim is None:
            width = grads_width(grads)
            if width > self.AUTO_SKETCH_ABOVE:
                self.sketch_dim = self.AUTO_SKETCH_DIM
                warnings.warn(f"{type(self).__name__}: d={width} > {self.AUTO_SKETCH_ABOVE:,}, so per-example "
                              f"gradients are all-gathered as CountSketches of width {self.sketch_dim}; pass "
                              "sketch_dim explicitly to choose", stacklevel=2)
        rows = dense_rows(grads, self._dim, self._dtype)
        dim = int(rows.shape[1])
        if self.sketch_dim is not None:
            rows = self._get_sketch(dim, rows.device)(rows)
        if world > 1 and self._dim is None:
            self._check_ranks_agree(rows.shape[0], dim)
        if world > 1 and not global_batch:
            rows = gather_global_batch(rows)  # CD-GraB: every rank balances the same global batch
        rows = DenseRows(rows)
        if world > 1 or global_batch:
            rows = rows.head(self._global_length() - self._visited)  # drop the padding's duplicates
        self._advance([rows], dim, rows_sketch=None)

    def _step_source(self) -> None:
        if self._source is None:
            raise ValueError("step() with no gradients needs sampler.attach(model) first; or pass "
                             "per-example gradients, e.g. sampler.step(PerExampleGrads(model, loss_fn)(x, y).grads)")
        if self._source.displaced:
            raise ValueError("this sampler's hooks were removed when another GraBSampler attached to the same model "
                             "(a model balances for one sampler at a time): call attach(model) again to balance "
                             "with this sampler")
        world = self._distributed()
        batches = self._source.collect()
        if not batches:
            raise ValueError("no backward pass since the last step(): call loss.backward() before sampler.step()")
        if world > 1:
            if self._dim is None:
                self._check_ranks_agree(batches[0].shape[0], batches[0].shape[1])
            batches = self._source.globalise(batches, world)
            position, cut = self._visited, []
            for rows in batches:  # drop the padding's duplicates at the epoch's end
                rows = rows.head(max(self._global_length() - position, 0))
                position += rows.shape[0]
                cut.append(rows)
            batches = [rows for rows in cut if rows.shape[0]] or cut[:1]
        self._advance(batches, batches[0].shape[1], rows_sketch=self._source.sketch)
        self._left_out = self._source.left_out

    def _check_rows_sketch(self, rows_sketch: int | None) -> None:
        """Refuse rows of another space than the running sums': ``attach(model, sketch=k)`` rows
        (``rows_sketch=k``) and exact rows (``None``: ``step(grads)`` or ``attach(model)``) never mix."""
        if self._dim is not None and rows_sketch != self._rows_sketch:
            raise ValueError(f"this sampler's running sums were balanced on {_rows_space(self._rows_sketch)}, so it "
                             f"cannot balance {_rows_space(rows_sketch)}: keep to the first, or start a fresh sampler")

    def _advance(self, batches: list, dim: int, rows_sketch: int | None) -> None:
        """Balance ``batches`` (one per micro-batch, in order) as consecutive positions: all or none."""
        start = self._visited
        total = sum(rows.shape[0] for rows in batches)
        remaining = self._global_length() - start
        if total > remaining:
            raise ValueError(
                f"step got {total} gradients but only {remaining} positions of epoch {self.epoch} "
                f"remain ({start} stepped of {self._global_length()}); feed each batch once, in loader order, "
                "and call set_epoch at the start of each epoch"
            )
        self._check_rows_sketch(rows_sketch)
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"this step's gradients have d={dim} but earlier steps had d={self._dim}; feed the "
                             "same parameters every step")
        for rows in batches:
            check_device(rows.device)
        if len(batches) == 1:  # a plan changes nothing: the step is all or none without an undo log
            self._commit(self.rule.plan(batches[0], fused=self.fused_cpu), total)
        else:
            undo = self.rule.undo_point()  # the rule's tensors are replaced, never changed in place
            first = max(start - 1, 0)  # a pair carried over rewrites the bucket before ``start``
            saved = self._buckets[first:start + total].copy()
            try:
                for rows in batches:
                    self._commit(self.rule.plan(rows, fused=self.fused_cpu), rows.shape[0])
            except BaseException:
                self.rule.restore(undo)
                self._buckets[first:start + total] = saved
                self._visited = start
                raise
        self._dim, self._rows_sketch = dim, rows_sketch
        self._dtype = self._dtype or batches[0].dtype
        if self._awaiting:
            self._complete_awaiting()

    def _commit(self, plan: Any, size: int) -> None:
        """Apply one batch's plan: the rule's tensors, the buckets of its positions, the cursor."""
        self.rule.commit(plan, self._visited)
        written = self._visited - plan.carried
        self._buckets[written:written + len(plan.buckets)] = plan.buckets
        self._visited += size

    def _check_ranks_agree(self, batch: int, dim: int) -> None:
        """Once, at the first step: seeds, settings, batch sizes and widths must match on all ranks."""
        settings = {"drop_last": self.drop_last, "sketch_dim": self.sketch_dim, **self._settings()}
        check_same_on_all_ranks(type(self).__name__, seed=self.seed, n=self.n, settings=settings,
                                epoch=self.epoch, batch_size=batch, grad_dim=dim)

    def _settings(self) -> dict[str, Any]:
        """Constructor settings that a state and every rank must share (the subclass's)."""
        return {}

    def _get_sketch(self, dim: int, device: torch.device):
        from dataorder.grads import CountSketch

        if self._sketch is None or self._sketch.dim_in != dim:
            self._sketch = CountSketch(dim, self.sketch_dim, seed=self.seed, device=device)
        return self._sketch

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly here: plain Python types and tensors.

        The state is defined by the positions *stepped*. If this rank's iterator has yielded
        positions that :meth:`step` has not consumed yet (a loader prefetching batches, e.g.
        ``StatefulDataLoader`` with workers, which snapshots its sampler when it prefetches),
        the returned dict describes the moment the loop has stepped up to the iterator's
        position: the ``step`` that reaches it completes the dict in place. So the loader's
        own ``state_dict()``, taken after ``step()``, resumes bit for bit. Copy the dict
        (``copy.deepcopy``, ``torch.save``) to freeze it earlier.
        """
        state = super().state_dict()
        yielded = min(state["position"] * self.world_size, self._global_length())
        if yielded > self._visited:
            self._awaiting.append((yielded, state))
            del self._awaiting[:-MAX_AWAITING]
        return state

    def _complete_awaiting(self) -> None:
        """Fill in the states that awaited exactly this position; drop those a step went past."""
        fresh, waiting = None, []
        for yielded, state in self._awaiting:
            if yielded == self._visited:
                fresh = fresh or super().state_dict()
                position = state["position"]
                state.clear()
                state.update({**fresh, "position": position})
            elif yielded > self._visited:
                waiting.append((yielded, state))
        self._awaiting = waiting

    def _extra_state(self) -> dict[str, Any]:
        visited = self._visited
        if self._order_tensor is None and self._dim is not None:
            self._order_tensor = torch.from_numpy(self._order.astype(np.int64))
        state = {
            "sketch_dim": self.sketch_dim,
            "sketch_auto": self._sketch_auto and self.sketch_dim is not None,
            "order": None if self._dim is None else self._order_tensor,
            "visited": visited,
            "buckets": torch.from_numpy(self._buckets[:visited].copy()),
            "dim": self._dim,
            "ghost_sketch": self._rows_sketch,
            "left_out": None if self._left_out is None else list(self._left_out),
            "dtype": None if self._dtype is None else str(self._dtype).removeprefix("torch."),
            **self._settings(),
        }
        state.update(self.rule.state_dict(visited))
        return state

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        """Refuse every GraB field ``state_dict()`` could not have produced (the shared fields are the base's)."""
        reader = StateReader(state, type(self).__name__)
        for key, value in self._settings().items():
            reader.same(key, value)
        sketch_dim = self._saved_sketch_dim(reader)
        dim = None if reader.field("dim") is None else reader.int("dim", low=1)
        self._check_saved_rows_sketch(reader, dim)
        self._check_saved_left_out(reader, dim)
        if reader.field("dtype") is not None and reader.str("dtype") not in ("float32", "float64"):
            raise StateError(f"state's dtype={state['dtype']!r} is not None, 'float32' or 'float64'; the state is corrupt")
        if (reader.field("dtype") is None) != (dim is None):
            raise StateError("state's dtype and dim are set together, at the first step; the state is corrupt")
        visited = reader.int("visited", high=self._global_length())
        if reader.field("order") is None:
            if dim is not None:
                raise StateError("state has balanced steps (dim) but no order; the state is corrupt")
        else:
            order = reader.tensor("order", torch.int64, (self.n,)).numpy()
            if not np.array_equal(np.sort(order), np.arange(self.n)):
                raise StateError(f"state's order is not a permutation of {self.n} examples; the state is corrupt")
            if dim is None:
                raise StateError("state holds an order but no gradient width (dim); the state is corrupt")
        buckets = reader.tensor("buckets", torch.int16, (visited,)).numpy()
        top = 2 ** (self.rule.depth + 1)
        if len(buckets) and (buckets.min() < -1 or buckets.max() >= top):
            raise StateError(f"state's buckets hold values outside [-1, {top}); the state is corrupt")
        if dim is None and visited:
            raise StateError("state has stepped positions but no gradient width (dim); the state is corrupt")
        width = None if dim is None else (sketch_dim or dim)
        self.rule.check_state(state, width, visited)

    def _check_saved_rows_sketch(self, reader: StateReader, dim: int | None) -> None:
        """The state's ``ghost_sketch`` must fit its steps and the source this sampler is attached to."""
        saved = None if reader.field("ghost_sketch") is None else reader.int("ghost_sketch", low=1)
        if saved is not None and dim is None:
            raise StateError("state has a ghost_sketch but no balanced steps (dim); the state is corrupt")
        if dim is not None and self._source is not None and saved != self._source.sketch:
            raise StateError(f"state's running sums were balanced on {_rows_space(saved)} but this sampler is "
                             f"attached for {_rows_space(self._source.sketch)}: attach it as the saved run was")

    def _check_saved_left_out(self, reader: StateReader, dim: int | None) -> None:
        """The state's ``left_out``: parameters of the attached model, and only with balanced steps."""
        left_out = reader.field("left_out")
        if left_out is None:
            return
        if not isinstance(left_out, list) or not all(isinstance(name, str) for name in left_out):
            raise StateTypeError(f"state's left_out must be None or a list of parameter names, got {left_out!r}")
        if dim is None:
            raise StateError("state has left_out parameters but no balanced steps (dim); the state is corrupt")
        unknown = sorted(set(left_out) - set(self._source.names)) if self._source is not None else []
        if unknown:
            raise StateError(f"state's left_out names {unknown}, which the attached model's balanced parameters do "
                             "not include: attach the model (and params=) the saved run used")

    def _saved_sketch_dim(self, reader: StateReader) -> int | None:
        """The state's sketch width: this sampler's, or one a sampler built with ``sketch_dim=None`` chose
        at its first distributed step (``sketch_auto``), which such a sampler adopts."""
        auto = reader.bool("sketch_auto")
        if auto and reader.field("sketch_dim") is None:
            raise StateError("state's sketch_auto=True needs a sketch_dim; the state is corrupt")
        if auto and self._sketch_auto:
            return reader.int("sketch_dim", low=1)
        reader.same("sketch_dim", self.sketch_dim)
        return self.sketch_dim

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["sketch_auto"] and self._sketch_auto:
            self.sketch_dim = int(state["sketch_dim"])
        self._dim = None if state["dim"] is None else int(state["dim"])
        self._rows_sketch = None if state["ghost_sketch"] is None else int(state["ghost_sketch"])
        self._left_out = None if state["left_out"] is None else list(state["left_out"])
        self._dtype = None if state["dtype"] is None else getattr(torch, state["dtype"])
        order = state["order"]
        self._order = self._first_order(int(state["epoch"])) if order is None else order.cpu().numpy().astype(np.int64)
        self._visited = int(state["visited"])
        self._buckets = np.zeros(self.n, dtype=np.int16)
        self._buckets[:self._visited] = state["buckets"].cpu().numpy()
        self.rule = copy.copy(self.rule)  # this is a candidate: the live sampler's rule stays as it was
        self.rule.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; on any mismatch raise and change nothing.

        The next :meth:`step` balances the first position not stepped when the state was
        taken. If the iterator had run further (the state was taken between a batch and its
        ``step``, and never completed), a warning says so: the loop must then feed the
        positions from the stepped one on.
        """
        super().load_state_dict(state)
        self._awaiting, self._order_tensor = [], None
        if self._source is not None:  # what the hooks captured before the load belongs to another run
            self._source.discard()
            if self._left_out is not None:
                self._source.settle(self._left_out)
        yielded = min(self.position * self.world_size, self._global_length())
        if yielded > self._visited and self._dim is not None:
            warnings.warn(
                f"{type(self).__name__}: this state was taken {yielded - self._visited} positions after the last "
                f"step() (position {self.position} yielded, {self._visited} stepped): the next step() balances "
                f"position {self._visited}; take states after step() for a loader that resumes where it had yielded",
                stacklevel=2)


def _rows_space(rows_sketch: int | None) -> str:
    """Words for the rows of ``attach(model, sketch=rows_sketch)`` (``None``: exact rows)."""
    if rows_sketch is None:
        return "exact rows (step(grads) or attach(model))"
    return f"sketch={rows_sketch} rows (attach(model, sketch={rows_sketch}))"


def _check_sketch_dim(sketch_dim: Any) -> int | None:
    if sketch_dim is None:
        return None
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, numbers.Integral):
        raise TypeError(f"sketch_dim must be None or a positive int, got {sketch_dim!r}")
    if not 1 <= sketch_dim <= MAX_SKETCH_DIM:
        raise ValueError(f"sketch_dim must be a positive int up to 2**31 - 1 (e.g. 1024), got {sketch_dim}")
    return int(sketch_dim)
