"""Baseline orders: random reshuffling, shuffle-once, with replacement, and flip-flop."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import numpy as np

from dataorder._validate import check_count
from dataorder.samplers._state import StateReader
from dataorder.samplers.base import IndexSampler, dataset_length, epoch_rng

__all__ = ["FlipFlop", "RandomReshuffling", "ShuffleOnce", "WithReplacement"]


class RandomReshuffling(IndexSampler):
    """A fresh random permutation every epoch (what ``DataLoader(shuffle=True)`` does).

    The permutation of epoch ``e`` is a pure function of ``(seed, e)``; call
    :meth:`set_epoch` each epoch, as with ``DistributedSampler``.

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import torch
        >>> data = TensorDataset(torch.arange(10.0))
        >>> sampler = RandomReshuffling(data, seed=0)
        >>> loader = DataLoader(data, batch_size=4, sampler=sampler)
        >>> sampler.set_epoch(1)
        >>> sorted(int(i) for (batch,) in loader for i in batch)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def _global_order(self, epoch: int) -> np.ndarray:
        return epoch_rng(self.seed, epoch).permutation(self.n)


class ShuffleOnce(IndexSampler):
    """One random permutation, drawn from ``seed``, reused for every epoch.

    Example::

        >>> sampler = ShuffleOnce(5, seed=1)
        >>> first = list(sampler); sampler.set_epoch(1)
        >>> list(sampler) == first
        True
    """

    def _global_order(self, epoch: int) -> np.ndarray:
        return epoch_rng(self.seed).permutation(self.n)


class WithReplacement(IndexSampler):
    """``num_samples`` i.i.d. uniform draws per epoch (default ``n``).

    Example::

        >>> sampler = WithReplacement(100, num_samples=8, seed=0)
        >>> len(sampler), all(0 <= i < 100 for i in sampler)
        (8, True)
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        num_samples = dataset_length(data) if num_samples is None else check_count(num_samples, "num_samples")
        super().__init__(data, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                         shared={"num_samples": num_samples})
        self.num_samples = num_samples

    def _global_length(self) -> int:
        return self.num_samples

    def _global_order(self, epoch: int) -> np.ndarray:
        return epoch_rng(self.seed, epoch).integers(0, self.n, size=self.num_samples, dtype=np.int64)

    def _extra_state(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        StateReader(state, type(self).__name__).same("num_samples", self.num_samples)


class FlipFlop(IndexSampler):
    """A fresh random order on even epochs and the reverse of it on the following odd epoch.

    A cheap baseline from the example-ordering literature (Rajput et al. 2022): the reversal
    cancels part of the order's prefix error at no cost.

    Example::

        >>> sampler = FlipFlop(5, seed=0)
        >>> even = list(sampler); sampler.set_epoch(1)
        >>> list(sampler) == even[::-1]
        True
    """

    def _global_order(self, epoch: int) -> np.ndarray:
        order = epoch_rng(self.seed, epoch - epoch % 2).permutation(self.n)
        return order[::-1].copy() if epoch % 2 else order
