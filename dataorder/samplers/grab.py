"""GraBSampler: online Gradient Balancing (Lu, Guo, De Sa, NeurIPS 2022) as a PyTorch sampler.

During epoch ``t`` the training loop feeds each batch's per-example gradients to
:meth:`GraBSampler.step` (or, after :meth:`GraBSampler.attach`, calls ``step()`` after an
ordinary backward); the signs that balancing gives them decide the order of epoch ``t + 1``
(``+1`` to the front in visiting order, ``-1`` to the back in reverse). The epoch
bookkeeping is :class:`~dataorder.samplers.gradient_order.GradientOrderSampler`'s, the
rules are in :mod:`dataorder.samplers.grab_rules`, the math in
:mod:`dataorder.samplers.balance`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataorder.distributed import active_world, gather_global_batches
from dataorder.samplers.balance import reorder
from dataorder.samplers.gradient_order import GradientOrderSampler
from dataorder.samplers.grab_rules import MeanRule, PairRule, Plan
from dataorder.samplers.rows import DenseRows, GhostRows

__all__ = ["BALANCES", "GraBSampler", "GradientOrderSampler"]

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
        self._rule: MeanRule | PairRule | None = None
        self._ghost = None
        self._buckets = np.zeros(0, dtype=np.int16)  # bucket of each stepped position, -1 pending

    # -- the ghost path -------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, *, params: Any = None, sketch: int | None = None) -> GraBSampler:
        """Balance from an ordinary ``loss.backward()``: ghost products, no per-example gradients.

        Registers hooks on ``model`` (:class:`dataorder.ghost.GhostGrads`); afterwards call
        :meth:`step` with no argument after each backward. Each forward/backward since the
        last ``step()`` is balanced as one micro-batch, in order (gradient accumulation).
        The loss must be mean-reduced over the batch. ``params`` selects parameters as in
        :class:`~dataorder.grads.PerExampleGrads`. ``sketch=k`` balances Kronecker sketches of
        the per-example gradients (at most ``k × k`` values per weight,
        :meth:`dataorder.ghost.GhostGrads.collect_sketch`) as dense rows. Returns the sampler.

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
        ghost = GhostGrads(model, params=params, sketch=sketch, seed=self.seed)
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
        if self._ghost.sketch is not None:  # temporary: sketch rows balanced as dense rows
            rows = self._ghost.collect_sketch()
            if not rows:
                raise ValueError("no backward pass since the last step(): call loss.backward() before sampler.step()")
            for batch_rows in rows:
                super().step(batch_rows)
            return
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
        if self._dim is None:
            self._check_ranks_agree(batches[0].batch_size, batches[0].dim)
        position, out = self.steps_position, []
        for batch in batches:
            batch = batch.gathered(gather_global_batches, active_world())
            remaining = self._global_length() - position
            if batch.batch_size > remaining:
                batch = batch.select(list(range(max(remaining, 0))))
            position += batch.batch_size
            out.append(batch)
        return out

    def _wrap(self, rows: Tensor) -> DenseRows:
        return DenseRows(rows)

    def _new_rule(self, k: int, dtype: torch.dtype, device: torch.device) -> MeanRule | PairRule:
        if self.balance == "pair":
            return PairRule(k, dtype, device)
        return MeanRule(k, dtype, device, depth=self.depth if self.balance == "recursive" else 0)

    def _plan(self, rows: Tensor, start: int) -> Plan:
        rule = self._rule or self._new_rule(rows.shape[1], rows.dtype, rows.device)
        return rule.plan(rows, fused=self.fused_cpu and rows.device.type == "cpu")

    def _commit(self, rows: Tensor, plan: Plan, start: int) -> None:
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


def _check_depth(depth: Any) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise TypeError(f"depth must be an int in [0, {MAX_DEPTH}], got {depth!r}")
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in [0, {MAX_DEPTH}] (the tree holds 2**(depth+1)-1 sums), got {depth}")
    return int(depth)
