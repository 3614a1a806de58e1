"""Rounding real quotas to integer counts: the allocation math shared by the samplers.

:func:`largest_remainder` is used by :class:`~dataorder.samplers.mixture.MixtureSampler`
(per-source counts of each global batch, vectorised over many batches) and by
:class:`~dataorder.samplers.stratified.StratifiedBatchSampler` (per-stratum counts, with a
seeded tie-break); :func:`bounded_quotas` and :func:`allocate` add the per-stratum bounds.
"""

from __future__ import annotations

import numpy as np

__all__ = ["allocate", "bounded_quotas", "count_range", "largest_remainder"]


def largest_remainder(quotas: np.ndarray, total: int, priority: np.ndarray | None = None) -> np.ndarray:
    """Integers summing to ``total``, each the floor or the ceiling of its quota.

    ``quotas`` is ``(S,)`` or row-wise ``(m, S)``, each row summing to ``total``. The units
    left after taking floors go to the largest remainders; equal remainders go to the entry
    that comes first in ``priority`` (a permutation of ``range(S)``; default: index order).
    A zero quota never gets a unit. Quotas are snapped to 9 decimals first, so that shares
    equal in exact arithmetic tie exactly.

    >>> largest_remainder(np.array([3.5, 2.1, 1.4]), 7).tolist()
    [4, 2, 1]
    >>> largest_remainder(np.array([1.5, 1.5, 1.0]), 4, priority=np.array([1, 0, 2])).tolist()
    [1, 2, 1]
    >>> largest_remainder(np.array([[1.5, 1.5], [0.75, 2.25]]), 3).tolist()
    [[2, 1], [1, 2]]
    """
    snapped = np.round(np.asarray(quotas, dtype=np.float64), 9)
    floors = np.floor(snapped).astype(np.int64)
    remainders = np.where(snapped > 0, np.round(snapped - floors, 9), -1.0)
    extra = int(total) - floors.sum(axis=-1, keepdims=True)
    if np.any(extra < 0) or np.any(extra > snapped.shape[-1]):
        raise ValueError(f"quotas must sum to total={total} along the last axis")
    size = snapped.shape[-1]
    tie_rank = np.arange(size) if priority is None else np.argsort(np.asarray(priority), kind="stable")
    order = np.lexsort((np.broadcast_to(tie_rank, snapped.shape), -remainders), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(size), order.shape), axis=-1)
    return floors + (rank < extra)


def bounded_quotas(weights: np.ndarray, total: float, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Real quotas proportional to ``weights``, summing to ``total``, kept within ``[lower, upper]``.

    Water-filling: strata that would exceed ``upper`` are fixed there and the rest share
    the remainder in proportion; then strata below ``lower`` are raised to it likewise.
    Strata whose weights are all zero share equally. Needs ``sum(lower) <= total <= sum(upper)``.

    >>> bounded_quotas(np.array([8.0, 1.0, 1.0]), 10, lower=np.ones(3), upper=np.array([6.0, 9, 9])).tolist()
    [6.0, 2.0, 2.0]
    """
    weights = np.asarray(weights, dtype=np.float64)
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    if lower.sum() > total + 1e-9 or upper.sum() < total - 1e-9:
        raise ValueError(f"no quotas within the bounds sum to {total}")
    fixed = np.full(len(weights), np.nan)
    for bound, beyond in ((upper, np.greater), (lower, np.less)):  # caps first: they only raise others
        while True:
            quotas = _fill(weights, total, fixed)
            violated = np.isnan(fixed) & beyond(quotas, bound) & (np.abs(quotas - bound) > 1e-9)
            if not violated.any():
                break
            fixed[violated] = bound[violated]
    return _fill(weights, total, fixed)


def _fill(weights: np.ndarray, total: float, fixed: np.ndarray) -> np.ndarray:
    """``fixed`` with its NaN entries sharing what is left of ``total`` in proportion to ``weights``."""
    free = np.isnan(fixed)
    quotas = fixed.copy()
    if free.any():
        share = weights[free] if weights[free].sum() > 0 else np.ones(int(free.sum()))
        quotas[free] = (total - np.nansum(fixed)) * share / share.sum()
    return quotas


def count_range(quotas: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """The least and the most each stratum can get from :func:`largest_remainder` over all tie-breaks.

    >>> [r.tolist() for r in count_range(np.array([2.5, 2.5, 1.0]), 6)]
    [[2, 2, 1], [3, 3, 1]]
    """
    quotas = np.asarray(quotas, dtype=np.float64)
    floors = np.floor(quotas + 1e-9).astype(np.int64)
    remainders = np.round(quotas - floors, 9)
    extra = int(total) - int(floors.sum())
    above = (remainders[None, :] > remainders[:, None]).sum(axis=1)  # strictly larger remainders
    level = (remainders[None, :] == remainders[:, None]).sum(axis=1)  # equal ones, itself included
    return floors + (above + level <= extra), floors + (above < extra)


def allocate(
    weights: np.ndarray, sizes: np.ndarray, total: int, priority: np.ndarray, *, explicit: bool
) -> np.ndarray:
    """Per-stratum counts of a batch of ``total`` examples, proportional to ``weights``.

    With ``explicit=False`` (proportional and Neyman allocation) every stratum gets at least
    one slot and at most its size, the rest shared in proportion (:func:`bounded_quotas`).
    With ``explicit=True`` (equal and user-given shares) the quotas are rounded as they are.
    Rounding is :func:`largest_remainder` with ties broken by ``priority``.

    >>> allocate(np.array([50, 30, 20]), np.array([50, 30, 20]), 8, np.arange(3), explicit=False).tolist()
    [4, 2, 2]
    """
    weights = np.asarray(weights, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if explicit:
        quotas = total * weights / weights.sum()
    else:
        quotas = bounded_quotas(weights, total, np.ones_like(sizes), sizes)
    return largest_remainder(quotas, total, priority)
