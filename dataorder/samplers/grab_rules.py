"""GraB's balancing rules: mean (and recursive) balance with a stale mean, and pair balance.

Each rule holds its running state (O(k) tensors) and answers two calls per step: ``plan``
(the signs for a batch of rows, computed without changing the state) and ``commit`` (apply
them). The rows are :class:`~dataorder.samplers.rows.DenseRows` or
:class:`~dataorder.samplers.rows.GhostRows`; CPU dense rows take the fused one-pass kernels.
The math lives in :mod:`dataorder.samplers.balance`.
"""

from __future__ import annotations

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
    tree_balance_rows,
    tree_buckets,
    tree_size,
)
from dataorder.samplers.rows import DenseRows

__all__ = ["MeanRule", "PairRule", "Plan"]


@dataclass
class Plan:
    """One step's balancing decision, computed before any state changes.

    >>> Plan(buckets=np.array([0, 1]), carried=0).replace is None
    True
    """

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


class MeanRule:
    """Mean balance (``depth=0``) or recursive balance: centred by the stale mean, tree of sums.

    One ``(1 + nodes + 1, k)`` buffer holds the stale mean, the running sums and the next
    epoch's sum, in that order: the mean and the sums are the vectors whose products with
    the rows are taken, the sums and the next sum the vectors one weighted product updates
    (signs for the sums, ones for the next sum). Each is one block of rows, never copied.

    >>> rule = MeanRule(2, torch.float32, torch.device("cpu"), depth=0)
    >>> rows = DenseRows(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    >>> plan = rule.plan(rows, fused=False)
    >>> plan.buckets.tolist()   # +1 to the front (0), -1 to the back (1)
    [0, 1]
    >>> rule.commit(rows, plan); rule.next_sum.tolist()
    [2.0, 0.0]
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

    def plan(self, rows: Any, fused: bool) -> Plan:
        dense = _dense_cpu(rows) if fused else None
        if dense is not None:  # one pass over the rows, on a copy of the sums
            acc = self.acc.cpu().clone()
            paths, ok = tree_balance_rows(dense.numpy(), acc[0].to(dense.dtype).numpy(), acc[1:-1].numpy(),
                                          acc[-1].numpy(), self.depth)
            _check(ok)
            return Plan(tree_buckets(paths).astype(np.int16), 0, replace={"acc": acc})
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
        return Plan(buckets, 0, rows=centred, weights=weights)

    def commit(self, rows: Any, plan: Plan) -> None:
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


class PairRule:
    """Pair balance: ``z = g_a - g_b`` over consecutive pairs; no stale mean is needed.

    A batch of odd size leaves its last row pending; it pairs with the next batch's first.

    >>> rule = PairRule(1, torch.float32, torch.device("cpu"))
    >>> rows = DenseRows(torch.tensor([[2.0], [1.0], [5.0]]))
    >>> plan = rule.plan(rows, fused=False)
    >>> plan.buckets.tolist()  # the pair (2, 1): first to the front; 5 pending (-1)
    [0, 1, -1]
    >>> rule.commit(rows, plan); rule.pending.tolist()
    [[5.0]]
    """

    def __init__(self, k: int, dtype: torch.dtype, device: torch.device, depth: int = 0) -> None:
        self.sums = torch.zeros(1, k, dtype=dtype, device=device)
        self.pending = torch.zeros(0, k, dtype=dtype, device=device)  # first of a pair split across steps

    def plan(self, rows: Any, fused: bool) -> Plan:
        carried = self.pending.shape[0]
        size = carried + rows.shape[0]
        dense = _dense_cpu(rows) if fused else None
        if dense is not None:
            sums = self.sums.cpu().clone()
            pending = self.pending.cpu().to(dense.dtype)
            signs, ok = pair_balance_rows(pending.numpy(), dense.numpy(), sums[0].numpy())
            _check(ok)
            tail = dense[dense.shape[0] - size % 2:].clone()  # the last row, if left unpaired
            return Plan(_pair_buckets(signs, size), carried, replace={"sums": sums, "pending": tail})
        joined = rows.prepend(self.pending) if carried else rows
        products = _finite(joined.products(self.sums.to(rows.device)))
        signs = pair_balance_signs(products[1:], products[0])
        return Plan(_pair_buckets(signs, size), carried, rows=joined, weights=pair_row_weights(signs, size)[None, :])

    def commit(self, rows: Any, plan: Plan) -> None:
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


def _check(ok: bool) -> None:
    if not ok:
        raise ValueError(
            "grads contain NaN or inf (or overflow when multiplied): fix the loss, or skip this batch's "
            "step; the sampler was left unchanged"
        )


def _finite(products: np.ndarray) -> np.ndarray:
    _check(bool(np.isfinite(products).all()))
    return products
