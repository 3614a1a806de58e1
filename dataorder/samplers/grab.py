"""GraBSampler: online Gradient Balancing (Lu, Guo, De Sa, NeurIPS 2022) as a PyTorch sampler.

During epoch ``t`` the training loop feeds each batch's per-example gradients to
:meth:`GraBSampler.step`; the signs that balancing gives them decide the order of epoch
``t + 1`` (``+1`` to the front in visiting order, ``-1`` to the back in reverse). The first
epoch is a seeded random permutation. The math lives in :mod:`dataorder.samplers.balance`;
this module is the bookkeeping: which positions a step consumes, the running state, epochs,
and exact resumption.

:class:`GradientOrderSampler` is the shared base of samplers whose next order is decided by
the gradients of the current epoch (GraB, herding).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataorder.samplers.balance import (
    mean_balance_signs,
    pair_balance_rows,
    pair_balance_signs,
    pair_row_weights,
    recursive_balance_signs,
    reorder,
    tree_balance_rows,
    tree_buckets,
    tree_size,
)
from dataorder.distributed import active_world, check_same_on_all_ranks, gather_global_batch, gather_global_batches
from dataorder.samplers.base import IndexSampler, check_epoch, epoch_rng
from dataorder.samplers.rows import DenseRows, GhostRows

__all__ = ["BALANCES", "GraBSampler", "GradientOrderSampler"]

#: The balancing rules :class:`GraBSampler` offers.
BALANCES = ("mean", "pair", "recursive")
MAX_DEPTH = 10


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


@dataclass
class _Plan:
    """One step's balancing decision, computed before any state changes."""

    buckets: np.ndarray  # bucket per row of [carried; batch], -1 for a row left pending
    carried: int  # rows carried over from earlier steps (their positions precede ``start``)
    rows: Any = None  # product path: the rows (DenseRows / GhostRows) the weights apply to
    weights: np.ndarray | None = None  # product path: (nodes, len(rows)) signs, 0 off-path
    replace: dict[str, Tensor] | None = None  # fused CPU path: the rule's updated tensors


def _dense_cpu(rows: Any) -> Tensor | None:
    """The rows as a contiguous CPU tensor when the fused kernels can take them, else None."""
    if isinstance(rows, DenseRows) and rows.device.type == "cpu":
        return rows.rows.contiguous()
    return None


class _MeanRule:
    """Mean balance (``depth=0``) or recursive balance: centred by the stale mean, tree of sums.

    One ``(1 + nodes + 1, k)`` buffer holds the stale mean, the running sums and the next
    epoch's sum, in that order: the mean and the sums are the vectors whose products with
    the rows are taken, the sums and the next sum the vectors one weighted product updates
    (signs for the sums, ones for the next sum). Each is one block of rows, never copied.
    """

    def __init__(self, k: int, dtype: torch.dtype, device: torch.device, depth: int) -> None:
        self.depth = depth
        self.acc = torch.zeros(tree_size(depth) + 2, k, dtype=dtype, device=device)

    @property
    def mean(self) -> Tensor:
        return self.acc[0]

    @property
    def sums(self) -> Tensor:
        return self.acc[1:-1]

    @property
    def next_sum(self) -> Tensor:
        return self.acc[-1]

    def plan(self, rows: Any, fused: bool) -> _Plan:
        dense = _dense_cpu(rows) if fused else None
        if dense is not None:  # one pass over the rows, on a copy of the sums
            acc = self.acc.cpu().clone()
            paths, ok = tree_balance_rows(dense.numpy(), acc[0].to(dense.dtype).numpy(), acc[1:-1].numpy(),
                                          acc[-1].numpy(), self.depth)
            _check(ok)
            return _Plan(tree_buckets(paths).astype(np.int16), 0, replace={"acc": acc})
        self.to(rows.device)
        centred = rows.centred(self.mean)
        products = _finite(centred.products(self.sums))
        nodes = self.sums.shape[0]
        if self.depth == 0:
            signs = mean_balance_signs(products[nodes:], products[0])
            weights, buckets = signs[None, :], (signs < 0).astype(np.int16)
        else:
            path, weights = recursive_balance_signs(products[nodes:], products[:nodes], self.depth)
            buckets = tree_buckets(path).astype(np.int16)
        return _Plan(buckets, 0, rows=centred, weights=weights)

    def commit(self, rows: Any, plan: _Plan) -> None:
        self.to(rows.device)
        if plan.replace is not None:
            self.acc = plan.replace["acc"].to(rows.device)
            return
        size = plan.rows.shape[0]
        # the last row of weights adds the centred rows' plain sum into the next epoch's sum
        plan.rows.add_weighted_to(self.acc[1:], np.vstack([plan.weights, np.ones((1, size))]))
        self.next_sum.add_(self.mean, alpha=size)  # sum of g = sum of (g - mean) + size * mean

    def end_epoch(self, visited: int) -> None:
        if visited:
            self.acc[0] = self.next_sum / visited
        self.acc[1:].zero_()

    def tensors(self) -> dict[str, Tensor]:
        return {"sums": self.sums, "mean": self.mean, "next_sum": self.next_sum}

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.acc = torch.cat([tensors["mean"][None], tensors["sums"], tensors["next_sum"][None]]).detach().clone()

    def to(self, device: torch.device) -> None:
        self.acc = self.acc.to(device)


class _PairRule:
    """Pair balance: ``z = g_a - g_b`` over consecutive pairs; no stale mean is needed."""

    def __init__(self, k: int, dtype: torch.dtype, device: torch.device, depth: int = 0) -> None:
        self.sums = torch.zeros(1, k, dtype=dtype, device=device)
        self.pending = torch.zeros(0, k, dtype=dtype, device=device)  # first of a pair split across steps

    def plan(self, rows: Any, fused: bool) -> _Plan:
        carried = self.pending.shape[0]
        size = carried + rows.shape[0]
        dense = _dense_cpu(rows) if fused else None
        if dense is not None:
            sums = self.sums.cpu().clone()
            pending = self.pending.cpu().to(dense.dtype)
            signs, ok = pair_balance_rows(pending.numpy(), dense.numpy(), sums[0].numpy())
            _check(ok)
            tail = dense[dense.shape[0] - size % 2:].clone()  # the last row, if left unpaired
            return _Plan(_pair_buckets(signs, size), carried, replace={"sums": sums, "pending": tail})
        joined = rows.prepend(self.pending) if carried else rows
        products = _finite(joined.products(self.sums.to(rows.device)))
        signs = pair_balance_signs(products[1:], products[0])
        return _Plan(_pair_buckets(signs, size), carried, rows=joined, weights=pair_row_weights(signs, size)[None, :])

    def commit(self, rows: Any, plan: _Plan) -> None:
        self.to(rows.device)
        if plan.replace is not None:
            self.sums, self.pending = (plan.replace[name].to(rows.device) for name in ("sums", "pending"))
            return
        plan.rows.add_weighted_to(self.sums, plan.weights)
        paired = 2 * (plan.rows.shape[0] // 2)
        self.pending = plan.rows.tail(paired).to(self.sums.dtype)

    def end_epoch(self, visited: int) -> None:
        self.sums.zero_()
        self.pending = self.pending[:0]

    def tensors(self) -> dict[str, Tensor]:
        return {"sums": self.sums, "pending": self.pending}

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.sums, self.pending = (tensors[name].detach().clone() for name in ("sums", "pending"))

    def to(self, device: torch.device) -> None:
        self.sums, self.pending = self.sums.to(device), self.pending.to(device)


def _pair_buckets(signs: np.ndarray, size: int) -> np.ndarray:
    """Buckets of the rows of ``[carried; batch]``: 0 front, 1 back, -1 for an unpaired last row."""
    buckets = np.full(size, -1, dtype=np.int16)
    paired = 2 * len(signs)
    buckets[0:paired:2] = signs < 0  # +1: the first of the pair goes to the front
    buckets[1:paired:2] = signs > 0
    return buckets


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

    Distributed: ``step`` consumes the next ``B`` positions of the *global* order, so with
    several ranks feed the all-gathered global batch (in global-order positions) on every rank.

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

    #: Balance CPU gradients with the fused one-pass kernels (else the Gram path).
    fused_cpu: bool = True

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
        super().__init__(data, sketch_dim=sketch_dim, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        self.balance = balance
        self.depth = _check_depth(depth)
        self._rule: _MeanRule | _PairRule | None = None
        self._ghost = None
        self._buckets = np.zeros(0, dtype=np.int16)  # bucket of each stepped position, -1 pending

    # -- the ghost path -------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, *, params: Any = None) -> GraBSampler:
        """Balance from an ordinary ``loss.backward()``: ghost products, no per-example gradients.

        Registers hooks on ``model`` (:class:`dataorder.ghost.GhostGrads`); afterwards call
        :meth:`step` with no argument after each backward. Each forward/backward since the
        last ``step()`` is balanced as one micro-batch, in order (gradient accumulation).
        The loss must be mean-reduced over the batch. ``params`` selects parameters as in
        :class:`~dataorder.grads.PerExampleGrads`. Returns the sampler.

        Under ``torch.distributed`` (e.g. ``model`` wrapped in DDP) each ``step()`` all-gathers
        the layers' captured inputs and output gradients and balances the global batch on
        every rank (CD-GraB), as ``step(grads)`` does with materialised rows.

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
        from dataorder.ghost import GhostGrads

        if self.sketch_dim is not None:
            raise ValueError("the ghost path never materialises gradients, so it needs no sketch: "
                             "construct the sampler with sketch_dim=None to attach a model")
        ghost = GhostGrads(model, params=params)
        self.detach()
        self._ghost = ghost
        return self

    def detach(self) -> None:
        """Remove the hooks that :meth:`attach` registered (a no-op if none)."""
        if getattr(self, "_ghost", None) is not None:
            self._ghost.remove()
        self._ghost = None

    @torch.no_grad()
    def step(self, grads: Tensor | Mapping[str, Tensor] | None = None, *, global_batch: bool = False) -> None:
        """Balance the next batch: from ``grads`` (B, d) / a dict, or, with no argument, from the
        backward passes captured since the last step by :meth:`attach`.

        See :meth:`GradientOrderSampler.step` for the rules shared by both forms.
        """
        if grads is not None:
            return super().step(grads, global_batch=global_batch)
        if getattr(self, "_ghost", None) is None:
            raise ValueError("step() with no gradients needs sampler.attach(model) first; or pass "
                             "per-example gradients, e.g. sampler.step(PerExampleGrads(model, loss_fn)(x, y).grads)")
        batches = self._ghost.collect()
        if not batches:
            raise ValueError("no backward pass since the last step(): call loss.backward() before sampler.step()")
        if self.world_size > 1 and active_world() > 1:
            batches = self._global_batches(batches)
        self._check_room(sum(batch.batch_size for batch in batches))
        snapshot = self.state_dict() if len(batches) > 1 else None
        try:
            for batch in batches:
                self._step_rows(GhostRows(batch), batch.dim)
        except ValueError:
            if snapshot is not None:
                self.load_state_dict(snapshot)  # all micro-batches or none
            raise

    def _global_batches(self, batches: list) -> list:
        """CD-GraB on the ghost path: every rank gets each micro-batch's global factors.

        The layers' captured inputs and output gradients are all-gathered in global-batch
        order (row ``j`` of rank ``r`` at ``j·W + r``), so every rank balances the same global
        batch and keeps the same state; duplicates the sharding padded in are dropped.
        """
        from dataorder.ghost import GhostBatch

        if self._dim is None:
            self._check_ranks_agree(batches[0].batch_size, batches[0].dim)
        position, out = self.steps_position, []
        for batch in batches:
            batch: GhostBatch = batch.gathered(gather_global_batches, active_world())
            remaining = self._global_length() - position
            if batch.batch_size > remaining:
                batch = batch.select(list(range(max(remaining, 0))))
            position += batch.batch_size
            out.append(batch)
        return out

    def _wrap(self, rows: Tensor) -> DenseRows:
        return DenseRows(rows)

    def _new_rule(self, k: int, dtype: torch.dtype, device: torch.device) -> _MeanRule | _PairRule:
        if self.balance == "pair":
            return _PairRule(k, dtype, device)
        return _MeanRule(k, dtype, device, depth=self.depth if self.balance == "recursive" else 0)

    def _plan(self, rows: Tensor, start: int) -> _Plan:
        rule = self._rule or self._new_rule(rows.shape[1], rows.dtype, rows.device)
        return rule.plan(rows, fused=self.fused_cpu and rows.device.type == "cpu")

    def _commit(self, rows: Tensor, plan: _Plan, start: int) -> None:
        if self._rule is None:
            self._rule = self._new_rule(rows.shape[1], rows.dtype, rows.device)
        if len(self._buckets) != self.n:
            self._buckets = np.zeros(self.n, dtype=np.int16)
        self._rule.commit(rows, plan)
        first = start - plan.carried
        self._buckets[first:first + len(plan.buckets)] = plan.buckets

    def _next_order(self, order: np.ndarray, visited: int) -> np.ndarray:
        buckets = np.maximum(self._buckets[:visited], 0)  # an unpaired last example joins the front
        return reorder(order[:visited], buckets, order[visited:])

    def _end_epoch(self, visited: int) -> None:
        if self._rule is not None:
            self._rule.end_epoch(visited)

    # -- state ------------------------------------------------------------------------------
    def _rule_state(self) -> dict[str, Any]:
        tensors = None if self._rule is None else {k: v.detach().clone() for k, v in self._rule.tensors().items()}
        visited = self._visited if len(self._buckets) == self.n else 0
        return {
            "balance": self.balance,
            "depth": self.depth,
            "buckets": torch.from_numpy(self._buckets[:visited].copy()),
            "tensors": tensors,
        }

    def _check_rule_state(self, state: dict[str, Any], k: int | None) -> None:
        missing = {"balance", "depth", "buckets", "tensors"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict from GraBSampler.state_dict()")
        if state["balance"] != self.balance:
            raise ValueError(f"state was saved with balance={state['balance']!r}; construct the sampler with it")
        if self.balance == "recursive" and state["depth"] != self.depth:
            raise ValueError(f"state was saved with depth={state['depth']}; construct the sampler with it")
        buckets = state["buckets"]
        if not isinstance(buckets, Tensor) or buckets.shape != (state["visited"],):
            raise ValueError("state's buckets do not match its visited count; it is corrupt")
        tensors = state["tensors"]
        if tensors is None:
            return
        if k is None:
            raise ValueError("state holds balancing sums but no gradient width; it is corrupt")
        expected = self._new_rule(k, torch.float32, torch.device("cpu")).tensors()
        if not isinstance(tensors, dict) or set(tensors) != set(expected):
            raise ValueError(f"state's tensors must be {sorted(expected)}; it is corrupt")
        for name, like in expected.items():
            value = tensors[name]
            fits = isinstance(value, Tensor) and value.shape[1:] == like.shape[1:] and value.dim() == like.dim()
            if not fits or (name != "pending" and value.shape != like.shape) or (name == "pending" and value.shape[0] > 1):
                raise ValueError(f"state's {name} has shape {getattr(value, 'shape', None)}, expected {tuple(like.shape)}")

    def _load_rule_state(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        if tensors is None:
            self._rule = None
        else:
            first = tensors["sums"]
            rule = self._new_rule(first.shape[1], first.dtype, first.device)
            rule.load(tensors)
            self._rule = rule
        self._buckets = np.zeros(self.n, dtype=np.int16)
        buckets = np.asarray(state["buckets"], dtype=np.int16)
        self._buckets[:len(buckets)] = buckets

    def __repr__(self) -> str:
        extra = f", depth={self.depth}" if self.balance == "recursive" else ""
        return f"{super().__repr__()[:-1]}, balance={self.balance!r}{extra}, sketch_dim={self.sketch_dim})"


def _check(ok: bool) -> None:
    if not ok:
        raise ValueError(
            "grads contain NaN or inf (or overflow when multiplied): fix the loss, or skip this batch's "
            "step; the sampler was left unchanged"
        )


def _width(grads: Any) -> int:
    """``d`` of a (B, d) tensor or of torch.func's dict of per-example gradients (0 if neither)."""
    if isinstance(grads, Tensor):
        return int(grads.shape[-1]) if grads.dim() else 0
    if isinstance(grads, Mapping):
        return sum(int(v[0].numel()) for v in grads.values() if isinstance(v, Tensor) and v.dim())
    return 0


def _finite(products: np.ndarray) -> np.ndarray:
    _check(bool(np.isfinite(products).all()))
    return products


def _check_sketch_dim(sketch_dim: Any) -> int | None:
    if sketch_dim is None:
        return None
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, numbers.Integral):
        raise TypeError(f"sketch_dim must be None or a positive int, got {sketch_dim!r}")
    if sketch_dim < 1:
        raise ValueError(f"sketch_dim must be a positive int (e.g. 1024), got {sketch_dim}")
    return int(sketch_dim)


def _check_depth(depth: Any) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise TypeError(f"depth must be an int in [0, {MAX_DEPTH}], got {depth!r}")
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in [0, {MAX_DEPTH}] (the tree holds 2**(depth+1)-1 sums), got {depth}")
    return int(depth)
