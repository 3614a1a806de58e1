"""The rules of the gradient orders: a step's rows (or their products) in, signs and the next order out.

Each rule holds its own tensors and their ``state_dict`` and answers, per step, ``plan``
(the signs for a batch of rows and the rule's *new* tensors, computed without touching the
current ones) and ``commit`` (adopt them). A rule's tensors are never changed in place, so
keeping the old references is a complete undo point (gradient accumulation: all
micro-batches or none), and a plan that would leave a non-finite tensor is refused before
anything changes. At an epoch's end the rule turns the stepped positions into the next order.

* :class:`MeanRule` -- GraB's mean balance (``depth=0``) or recursive balance (a tree of sums);
* :class:`PairRule` -- pair balance (CD-GraB), no stale mean;
* :class:`HerdingRule` -- offline greedy herding of the epoch's stored rows.

The math is in :mod:`dataorder.ordering.kernels`; the rows come from
:mod:`dataorder.ordering.sources`.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataorder.ordering.kernels import (
    herding_order,
    mean_balance_signs,
    pair_balance_signs,
    pair_balance_step,
    pair_row_weights,
    recursive_balance_signs,
    reorder,
    tree_balance_step,
    tree_buckets,
    tree_size,
)

__all__ = ["HerdingRule", "MeanRule", "NonFiniteError", "PairRule", "Plan", "check_state_tensor"]


class NonFiniteError(ValueError):
    """A step's gradients hold NaN/inf, or would overflow the rule's running sums; nothing was changed."""


@dataclass
class Plan:
    """One step's decision, computed before any state changes.

    >>> Plan(buckets=np.array([0, 1]), carried=0).new
    {}
    """

    buckets: np.ndarray  # bucket per row of [carried; batch]: 0 front, 1 back (tree: leaf), -1 left pending
    carried: int  # rows carried over from earlier steps (their positions precede the step's first)
    new: dict[str, Any] = field(default_factory=dict)  # the rule's tensors after the step


def _refuse_non_finite() -> None:
    raise NonFiniteError(
        "grads contain NaN or inf, or are large enough to overflow the running sums: fix the loss (or "
        "scale it down), or skip this batch's step; the sampler was left unchanged"
    )


def _finite_products(products: np.ndarray) -> np.ndarray:
    if not np.isfinite(products).all():
        _refuse_non_finite()
    return products


#: An update is refused once its bound passes this fraction of the dtype's largest value: the
#: bound holds in exact arithmetic, and the device's rounding stays far inside the other half.
_HEADROOM = 0.5


def update_bound(peaks: np.ndarray, weights: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """A bound on every entry of ``targets[v] + weights[v] @ rows``, and of each of its partial sums.

    ``peaks[v]`` is target ``v``'s largest magnitude and ``|row_j|`` the root of the Gram's
    diagonal, so the bound ``peaks + |weights| @ |rows|`` comes from host scalars that the
    products transfer already brought: checking an update needs no reduction on the device
    and no second transfer.

    >>> update_bound(np.array([1.0]), np.array([[1.0, -1.0]]), np.array([[9.0, 0.0], [0.0, 16.0]])).tolist()
    [8.0]
    """
    return peaks + np.abs(weights) @ np.sqrt(gram.diagonal())


@functools.cache
def _largest_update(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max * _HEADROOM


def _refuse_overflow(peaks: np.ndarray, weights: np.ndarray, gram: np.ndarray, dtype: torch.dtype) -> None:
    """Refuse an update unless :func:`update_bound` keeps it within half the dtype's range."""
    if not (update_bound(peaks, weights, gram) <= _largest_update(dtype)).all():  # NaN fails too
        _refuse_non_finite()


def check_state_tensor(name: str, value: Any, shape: tuple[int, ...]) -> None:
    """Refuse a saved tensor that ``state_dict()`` could not have produced; the error names ``name``.

    >>> check_state_tensor("sums", torch.zeros(1, 3), (1, 3))
    >>> check_state_tensor("sums", torch.full((1, 3), float("nan")), (1, 3))
    Traceback (most recent call last):
    ...
    ValueError: state's sums holds NaN or inf; it is corrupt
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"state's {name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state's {name} must be float32 or float64, got {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"state's {name} is on the meta device and holds no values; load a saved state")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"state's {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"state's {name} holds NaN or inf; it is corrupt")


def _copy_to(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device, copy=True)


class MeanRule:
    """Mean balance (``depth=0``) or recursive balance: centred by the stale mean, a tree of sums.

    One ``(1 + nodes + 1, k)`` buffer holds the stale mean, the running sums and the next
    epoch's sum, in that order: the mean and the sums are the vectors whose products with
    the rows are taken, the sums and the next sum the vectors one weighted product updates
    (signs for the sums, ones for the next sum).

    >>> from dataorder.ordering.sources import DenseRows
    >>> rule = MeanRule(depth=0)
    >>> rows = DenseRows(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    >>> plan = rule.plan(rows, fused=False)
    >>> plan.buckets.tolist()   # +1 to the front (0), -1 to the back (1)
    [0, 1]
    >>> rule.commit(plan); rule.acc[-1].tolist()
    [2.0, 0.0]
    """

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.acc: Tensor | None = None  # None until the first step fixes the width

    @property
    def nodes(self) -> int:
        return tree_size(self.depth)

    def plan(self, rows: Any, fused: bool) -> Plan:
        size, width = rows.shape
        dense = rows.cpu_rows() if fused else None
        if dense is not None:  # CPU rows: one fused call, on a copy of the buffer
            held = self.acc if self.acc is not None else torch.zeros(self.nodes + 2, width, dtype=dense.dtype)
            acc, buckets, ok = tree_balance_step(dense.to(held.dtype).numpy(), held.cpu().numpy(), self.depth)
            if not ok:
                _refuse_non_finite()
            return Plan(buckets, 0, {"acc": torch.from_numpy(acc)})
        acc = (torch.zeros(self.nodes + 2, width, dtype=rows.dtype, device=rows.device) if self.acc is None
               else _copy_to(self.acc, rows.device))
        # products on the rows' device, one transfer, signs on the host, one weighted update
        centred = rows.centred(acc[0])
        products, peaks = centred.products(acc[1:-1], watched=acc)
        gram = _finite_products(products)[self.nodes:]
        if self.depth == 0:
            signs = mean_balance_signs(gram, products[0])
            weights, buckets = signs[None, :], (signs < 0)
        else:
            paths, weights = recursive_balance_signs(gram, products[:self.nodes], self.depth)
            buckets = tree_buckets(paths)
        # the last row of weights adds the centred rows' plain sum into the next epoch's sum,
        # and the next sum gets size * mean as well: sum of g = sum of (g - mean) + size * mean
        weights = np.vstack([weights, np.ones((1, size))])
        targets = peaks[1:]
        targets[-1] += size * peaks[0]  # the mean's part, bounded before the rows' part is
        _refuse_overflow(targets, weights, gram, acc.dtype)
        centred.add_weighted_to(acc[1:], weights)
        acc[-1].add_(acc[0], alpha=size)
        return Plan(np.asarray(buckets, dtype=np.int16), 0, {"acc": acc})

    def commit(self, plan: Plan, start: int = 0) -> None:
        self.acc = plan.new["acc"]

    def end_epoch(self, visited: int) -> None:
        if self.acc is None:
            return
        acc = torch.zeros_like(self.acc)
        acc[0] = self.acc[-1] / visited if visited else self.acc[0]
        self.acc = acc

    def next_order(self, positions: np.ndarray, order: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        return reorder(order, np.maximum(buckets, 0))

    # -- state ------------------------------------------------------------------------------
    def undo_point(self) -> Any:
        return self.acc

    def restore(self, point: Any) -> None:
        self.acc = point

    def state_dict(self, visited: int) -> dict[str, Any]:
        if self.acc is None:
            return {"tensors": None}
        acc = self.acc.detach().clone()
        return {"tensors": {"sums": acc[1:-1], "mean": acc[0], "next_sum": acc[-1]}}

    def check_state(self, state: dict[str, Any], width: int | None, visited: int) -> None:
        tensors = _rule_tensors(state, width, {"sums", "mean", "next_sum"})
        if tensors is None:
            return
        check_state_tensor("tensors['mean']", tensors["mean"], (width,))
        check_state_tensor("tensors['sums']", tensors["sums"], (self.nodes, width))
        check_state_tensor("tensors['next_sum']", tensors["next_sum"], (width,))
        _same_dtype_and_device(tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        self.acc = None if tensors is None else torch.cat(
            [tensors["mean"][None], tensors["sums"], tensors["next_sum"][None]]).detach().clone()


class PairRule:
    """Pair balance: ``z = g_a - g_b`` over consecutive pairs; no stale mean is needed.

    A batch of odd size leaves its last row pending; it pairs with the next batch's first.

    >>> from dataorder.ordering.sources import DenseRows
    >>> rule = PairRule()
    >>> rows = DenseRows(torch.tensor([[2.0], [1.0], [5.0]]))
    >>> plan = rule.plan(rows, fused=False)
    >>> plan.buckets.tolist()  # the pair (2, 1): first to the front; 5 pending (-1)
    [0, 1, -1]
    >>> rule.commit(plan); rule.pending.tolist()
    [[5.0]]
    """

    depth = 0

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # (1, k), None until the first step
        self.pending: Tensor | None = None  # (0 or 1, k): first of a pair split across steps

    def plan(self, rows: Any, fused: bool) -> Plan:
        size, width = rows.shape
        dense = rows.cpu_rows() if fused else None
        if dense is not None:  # CPU rows: one fused call, on a copy of the sum; it checks the unpaired row
            sums = self.sums if self.sums is not None else torch.zeros(1, width, dtype=dense.dtype)
            pending = self.pending if self.pending is not None else sums[:0]
            new, buckets, tail, ok = pair_balance_step(pending.to(sums.dtype).cpu().numpy(),
                                                       dense.to(sums.dtype).numpy(), sums.cpu().numpy())
            if not ok:
                _refuse_non_finite()
            return Plan(buckets, pending.shape[0], {"sums": torch.from_numpy(new), "pending": torch.from_numpy(tail)})
        if self.sums is None:
            sums = torch.zeros(1, width, dtype=rows.dtype, device=rows.device)
            pending = torch.zeros(0, width, dtype=rows.dtype, device=rows.device)
        else:
            sums, pending = _copy_to(self.sums, rows.device), self.pending.to(rows.device)
        carried = pending.shape[0]
        total = carried + size
        # a finite Gram means finite rows, the unpaired last one included
        joined = rows.prepend(pending) if carried else rows
        products, peaks = joined.products(sums)
        gram = _finite_products(products)[1:]
        signs = pair_balance_signs(gram, products[0])
        weights = pair_row_weights(signs, total)[None, :]
        _refuse_overflow(peaks, weights, gram, sums.dtype)
        joined.add_weighted_to(sums, weights)
        tail = joined.tail(2 * (total // 2)).to(sums.dtype)
        return Plan(_pair_buckets(signs, total), carried, {"sums": sums, "pending": tail})

    def commit(self, plan: Plan, start: int = 0) -> None:
        self.sums, self.pending = plan.new["sums"], plan.new["pending"]

    def end_epoch(self, visited: int) -> None:
        if self.sums is not None:
            self.sums, self.pending = torch.zeros_like(self.sums), self.pending[:0]

    def next_order(self, positions: np.ndarray, order: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        return reorder(order, np.maximum(buckets, 0))  # an unpaired last example joins the front

    # -- state ------------------------------------------------------------------------------
    def undo_point(self) -> Any:
        return self.sums, self.pending

    def restore(self, point: Any) -> None:
        self.sums, self.pending = point

    def state_dict(self, visited: int) -> dict[str, Any]:
        if self.sums is None:
            return {"tensors": None}
        return {"tensors": {"sums": self.sums.detach().clone(), "pending": self.pending.detach().clone()}}

    def check_state(self, state: dict[str, Any], width: int | None, visited: int) -> None:
        tensors = _rule_tensors(state, width, {"sums", "pending"})
        if tensors is None:
            return
        check_state_tensor("tensors['sums']", tensors["sums"], (1, width))
        pending = tensors["pending"]
        rows = pending.shape[0] if isinstance(pending, Tensor) and pending.dim() == 2 else -1
        check_state_tensor("tensors['pending']", pending, (rows if rows in (0, 1) else 1, width))
        if rows != visited % 2:
            raise ValueError(f"state's tensors['pending'] holds {rows} rows after {visited} stepped positions, "
                             f"expected {visited % 2}; it is corrupt")
        _same_dtype_and_device(tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        if tensors is None:
            self.sums = self.pending = None
        else:
            self.sums, self.pending = (tensors[name].detach().clone() for name in ("sums", "pending"))


class HerdingRule:
    """Offline herding: keep the epoch's rows (host, float32), order them greedily at the epoch's end.

    >>> from dataorder.ordering.sources import DenseRows
    >>> rule = HerdingRule(3)
    >>> rule.commit(rule.plan(DenseRows(torch.tensor([[3.0], [-1.0], [-2.0]])), fused=False), start=0)
    >>> positions = np.arange(3)
    >>> rule.next_order(positions, np.array([10, 11, 12]), np.zeros(3)).tolist()
    [11, 10, 12]
    """

    depth = 0

    def __init__(self, n: int) -> None:
        self.n = n
        self.store: np.ndarray | None = None  # (n, k) float32, row i = position i of this epoch

    def plan(self, rows: Any, fused: bool) -> Plan:
        host = rows.rows.to("cpu", torch.float32).numpy()
        if not np.isfinite(host).all():
            _refuse_non_finite()
        return Plan(np.zeros(len(host), dtype=np.int16), 0, {"rows": host})

    def commit(self, plan: Plan, start: int = 0) -> None:
        rows = plan.new["rows"]
        if self.store is None or self.store.shape[1] != rows.shape[1]:
            self.store = np.zeros((self.n, rows.shape[1]), dtype=np.float32)
        self.store[start:start + len(rows)] = rows

    def end_epoch(self, visited: int) -> None:
        """The store is reused next epoch; rows past the next epoch's steps are never read."""

    def next_order(self, positions: np.ndarray, order: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        if len(positions) == 0:
            return order.copy()
        vectors = self.store[positions].astype(np.float64)
        vectors -= vectors.mean(axis=0)
        return order[herding_order(vectors)]

    # -- state ------------------------------------------------------------------------------
    def undo_point(self) -> Any:
        return None  # rows past the stepped positions are never read: resetting the count undoes a step

    def restore(self, point: Any) -> None:
        """Nothing to restore (see :meth:`undo_point`)."""

    def state_dict(self, visited: int) -> dict[str, Any]:
        return {"stored": None if self.store is None else torch.from_numpy(self.store[:visited].copy())}

    def check_state(self, state: dict[str, Any], width: int | None, visited: int) -> None:
        if "stored" not in state:
            raise ValueError("state is missing ['stored']; pass a dict from HerdingSampler.state_dict()")
        stored = state["stored"]
        if stored is None:
            if visited and width is not None:
                raise ValueError("state has stepped positions but no stored gradients; it is corrupt")
            return
        if width is None:
            raise ValueError("state holds stored gradients but no gradient width (dim); it is corrupt")
        check_state_tensor("stored", stored, (visited, width))
        if stored.dtype != torch.float32:
            raise TypeError(f"state's stored must be float32 (herding keeps float32 rows), got {stored.dtype}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = state["stored"]
        if stored is None:
            self.store = None
            return
        self.store = np.zeros((self.n, stored.shape[1]), dtype=np.float32)
        self.store[:stored.shape[0]] = stored.to(torch.float32).numpy()


def _rule_tensors(state: dict[str, Any], width: int | None, names: set[str]) -> dict[str, Tensor] | None:
    if "tensors" not in state:
        raise ValueError("state is missing ['tensors']; pass a dict from GraBSampler.state_dict()")
    tensors = state["tensors"]
    if tensors is None:
        if width is not None:
            raise ValueError("state has balanced steps (dim) but no balancing sums (tensors); it is corrupt")
        return None
    if width is None:
        raise ValueError("state holds balancing sums but no gradient width (dim); it is corrupt")
    if not isinstance(tensors, dict) or set(tensors) != names:
        raise ValueError(f"state's tensors must be a dict of {sorted(names)}; it is corrupt")
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if isinstance(t, Tensor)}
    if dtypes - {state.get("dtype")}:
        raise TypeError(f"state's tensors are {sorted(dtypes)} but its dtype is {state.get('dtype')!r}; it is corrupt")
    return tensors


def _same_dtype_and_device(tensors: dict[str, Tensor]) -> None:
    kinds = {(t.dtype, t.device) for t in tensors.values()}
    if len(kinds) > 1:
        raise ValueError(f"state's tensors mix dtypes/devices {sorted(map(str, kinds))}; it is corrupt")


def _pair_buckets(signs: np.ndarray, size: int) -> np.ndarray:
    """Buckets of the rows of ``[carried; batch]``: 0 front, 1 back, -1 for an unpaired last row."""
    buckets = np.full(size, -1, dtype=np.int16)
    paired = 2 * len(signs)
    buckets[0:paired:2] = signs < 0  # +1: the first of the pair goes to the front
    buckets[1:paired:2] = signs > 0
    return buckets


def check_depth(depth: Any, most: int) -> int:
    """``depth`` of a recursive-balance tree as an int in ``[0, most]``, or a clear error.

    >>> check_depth(2, 10)
    2
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise TypeError(f"depth must be an int in [0, {most}], got {depth!r}")
    if not 0 <= depth <= most:
        raise ValueError(f"depth must be in [0, {most}] (the tree holds 2**(depth+1)-1 sums), got {depth}")
    return int(depth)
