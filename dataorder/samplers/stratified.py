"""Stratified minibatches: every global batch holds fixed per-stratum counts.

The math lives in small pure functions (:func:`encode_strata`, :func:`stratum_draws`,
:func:`merge_moments`, and the rounding in :mod:`dataorder.samplers.allocation`);
:class:`StratifiedBatchSampler` does the bookkeeping (epochs, ranks, resumable state, the
online standard deviations of Neyman allocation).

References: Lu, Park, Chen, Wang, De Sa, Foster, "Variance reduced training with stratified
sampling for forecasting models" (SCott, ICML 2021); Neyman, "On the two different aspects
of the representative method" (1934).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from dataorder.samplers.allocation import allocate, count_range
from dataorder._validate import check_bool, check_count, check_epoch, check_seed
from dataorder.samplers._state import Cursor, StateError, StateReader, refuse_unknown_fields, resume_position
from dataorder.samplers.base import array_digest, epoch_rng, resolve_world

__all__ = ["StratifiedBatchSampler", "encode_strata", "merge_moments", "stratum_draws"]

ALLOCATIONS = ("proportional", "equal", "neyman")


# -- pure functions ---------------------------------------------------------------------------
def encode_strata(strata: Any) -> tuple[np.ndarray, list[Hashable]]:
    """Code each example's stratum as ``0..H-1``; return the codes and the label of each code.

    Labels are sorted when they can be compared, else kept in order of first appearance.

    >>> codes, labels = encode_strata(["b", "a", "b", "c"])
    >>> codes.tolist(), labels
    ([1, 0, 1, 2], ['a', 'b', 'c'])
    """
    if isinstance(strata, torch.Tensor):
        strata = strata.detach().cpu().numpy()
    if isinstance(strata, (str, bytes)) or not isinstance(strata, Iterable):
        raise TypeError(f"strata must be one label per example (an array or a sequence), got {type(strata).__name__}")
    array = strata if isinstance(strata, np.ndarray) else None
    if array is None:
        strata = list(strata)
        try:
            array = np.asarray(strata)
        except (ValueError, TypeError):
            array = None
    if array is not None and array.dtype.kind in "US" and not isinstance(strata, np.ndarray):
        if not all(isinstance(item, (str, bytes)) for item in strata):
            array = None  # numpy would turn [1, "a"] into strings; keep the labels as given
    if array is not None and array.ndim == 1 and array.dtype.kind in "biufUSMm":
        if array.dtype.kind == "f" and np.isnan(array).any():
            raise ValueError("strata contains NaN; give every example a label")
        labels, codes = np.unique(array, return_inverse=True)
        return codes.astype(np.int64).reshape(-1), labels.tolist()
    if isinstance(strata, np.ndarray) and strata.ndim != 1:
        raise ValueError(f"strata must be 1-D (one label per example), got shape {strata.shape}")
    items = list(strata)
    try:
        labels = sorted(set(items))
    except TypeError:  # labels that do not compare: keep the order of first appearance
        labels = list(dict.fromkeys(items))
    lookup = {label: code for code, label in enumerate(labels)}
    return np.fromiter((lookup[item] for item in items), dtype=np.int64, count=len(items)), labels


def stratum_draws(size: int, per_batch: int, num_batches: int, rng: np.random.Generator) -> np.ndarray:
    """Positions ``0..size-1`` drawn ``per_batch`` at a time for ``num_batches`` batches.

    Draws run through a fresh random permutation of the stratum, then another when it is
    exhausted, so within an epoch every member is drawn ``floor`` or ``ceil`` of
    ``per_batch * num_batches / size`` times. A batch that straddles two permutations takes
    the new permutation's members it does not already hold first, so no batch repeats a
    member (this needs ``per_batch <= size``). Returns shape ``(num_batches, per_batch)``.

    >>> draws = stratum_draws(4, 2, 4, np.random.default_rng(0))
    >>> sorted(draws.ravel().tolist())
    [0, 0, 1, 1, 2, 2, 3, 3]
    """
    if not 0 < per_batch <= size:
        raise ValueError(f"per_batch must be in [1, size={size}], got {per_batch}")
    draws = per_batch * num_batches
    cycles = max(1, -(-draws // size))
    perms = rng.permuted(np.tile(np.arange(size, dtype=np.int64), (cycles, 1)), axis=1)
    if per_batch > 1 and size % per_batch:
        for cycle in range(1, cycles):
            held = (cycle * size) % per_batch  # members of the straddling batch from the old cycle
            if held == 0:
                continue
            new = perms[cycle]
            fresh = np.flatnonzero(~np.isin(new, perms[cycle - 1, size - held:]))[: per_batch - held]
            first = np.zeros(size, dtype=bool)
            first[fresh] = True
            perms[cycle] = np.concatenate([new[first], new[~first]])
    return perms.reshape(-1)[:draws].reshape(num_batches, per_batch)


def merge_moments(
    moments: np.ndarray, codes: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Add ``values`` (stratum ``codes``) to per-stratum ``(count, mean, M2)`` rows (Chan et al.).

    ``moments`` has shape ``(H, 3)``; the sample variance of stratum ``h`` is
    ``M2 / (count - 1)``. Returns a new array.

    >>> m = merge_moments(np.zeros((2, 3)), np.array([0, 0, 1]), np.array([1.0, 3.0, 5.0]))
    >>> m.tolist()
    [[2.0, 2.0, 2.0], [1.0, 5.0, 0.0]]
    """
    strata = len(moments)
    count_b = np.bincount(codes, minlength=strata).astype(np.float64)
    sum_b = np.bincount(codes, weights=values, minlength=strata)
    mean_b = np.divide(sum_b, count_b, out=np.zeros(strata), where=count_b > 0)
    m2_b = np.bincount(codes, weights=(values - mean_b[codes]) ** 2, minlength=strata)
    count_a, mean_a, m2_a = moments.T
    count = count_a + count_b
    delta = mean_b - mean_a
    safe = np.where(count > 0, count, 1.0)
    mean = mean_a + delta * count_b / safe
    m2 = m2_a + m2_b + delta**2 * count_a * count_b / safe
    return np.stack([count, mean, m2], axis=1)


def _indices(batch: Any, n: int, name: str) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    array = np.asarray(batch)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(f"{name} must be a 1-D sequence of int indices, got {array.dtype} with shape {array.shape}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n):
        raise ValueError(f"{name} must be in [0, {n}); got values from {array.min()} to {array.max()}")
    return array


# -- the sampler ------------------------------------------------------------------------------
class StratifiedBatchSampler(Sampler[list[int]]):
    """Minibatches with fixed per-stratum counts, for ``DataLoader(batch_sampler=...)``.

    Every *global* batch (``batch_size * world_size`` examples, the batches of all ranks
    together) holds ``counts[h]`` examples of stratum ``h``, drawn without replacement
    from a fresh random permutation of the stratum, reshuffled when exhausted. Rank ``r``
    takes positions ``r, r + W, ...`` of the global batch laid out stratum by stratum, so
    each rank's batch is itself stratified (within one of ``counts[h] / W`` per stratum).

    An epoch is ``ceil(n / global batch)`` full batches (``floor`` with ``drop_last``): as
    many draws as examples. Stratum ``h`` is drawn ``counts[h]`` times per batch, so each of
    its members appears ``floor`` or ``ceil`` of ``counts[h] * len(self) / N_h`` times.

    Allocation (per global batch; largest remainder, ties broken by a draw from
    ``(seed, epoch)``):

    * ``"proportional"`` (default): ``counts[h] ∝ N_h``, at least 1 and at most ``N_h``;
    * ``"equal"``: the same count for every stratum;
    * ``"neyman"``: ``counts[h] ∝ N_h * sigma_h`` (at least 1, at most ``N_h``), with
      ``sigma_h`` the standard deviation of the values passed to :meth:`update` during the
      previous epoch; the allocation changes only when :meth:`set_epoch` starts a new epoch
      (proportional until some values are known);
    * a dict ``{label: share}``: ``counts[h] ∝ share`` (shares summing to the global batch
      size give exactly those counts).

    :meth:`importance_weights` gives ``N_h / (N * counts[h]) * global_batch``, which makes the
    weighted batch mean an unbiased estimate of the full-data mean under any allocation.

    Example::

        >>> labels = [0] * 6 + [1] * 3 + [2] * 3
        >>> sampler = StratifiedBatchSampler(labels, batch_size=4, seed=0)
        >>> sampler.counts
        {0: 2, 1: 1, 2: 1}
        >>> [sorted(labels[i] for i in batch) for batch in sampler]
        [[0, 0, 1, 2], [0, 0, 1, 2], [0, 0, 1, 2]]
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.arange(12)), batch_sampler=sampler)
        >>> [len(x) for (x,) in loader]
        [4, 4, 4]
    """

    def __init__(
        self,
        strata: Any,
        batch_size: int,
        *,
        allocation: str | Mapping[Hashable, float] = "proportional",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        codes, labels = encode_strata(strata)
        if len(codes) == 0:
            raise ValueError("strata must hold at least one example")
        batch_size = check_count(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self.drop_last = check_bool(drop_last, "drop_last")
        self.codes, self.labels = codes, labels
        self.n, self.batch_size = len(codes), int(batch_size)
        shared = {"seed": self.seed, "n": self.n, "batch_size": self.batch_size, "drop_last": self.drop_last,
                  "strata": array_digest(codes.astype(np.int64))}
        self.rank, self.world_size = resolve_world(rank, world_size, owner=type(self).__name__, shared=shared)
        self.global_batch_size = self.batch_size * self.world_size
        self.sizes = np.bincount(codes, minlength=len(labels))
        self.allocation, self._shares = self._check_allocation(allocation)
        self.num_batches = self._num_batches()
        order = np.argsort(codes, kind="stable")
        self._members = np.split(order, np.cumsum(self.sizes)[:-1])
        self.epoch = 0
        self._sigma = np.full(len(labels), np.nan)  # std used by the current Neyman allocation
        self._moments = np.zeros((len(labels), 3))  # (count, mean, M2) of values seen this epoch
        self._counts = self._allocate(0, self._sigma)
        self._cursor = Cursor()
        self._cache: tuple[int, tuple[int, ...], list[list[int]]] | None = None

    # -- validation ---------------------------------------------------------------------------
    def _check_allocation(self, allocation: Any) -> tuple[str, np.ndarray | None]:
        strata, total = len(self.labels), self.global_batch_size
        if total > self.n:
            raise ValueError(
                f"the global batch (batch_size={self.batch_size} x world_size={self.world_size} = {total}) "
                f"is larger than the dataset (n={self.n}); use a smaller batch_size"
            )
        if isinstance(allocation, Mapping):
            unknown = [k for k in allocation if k not in self.labels]
            missing = [label for label in self.labels if label not in allocation]
            if unknown or missing:
                raise ValueError(f"allocation dict must give a share for every stratum: missing {missing}, "
                                 f"unknown {unknown}")
            shares = np.array([allocation[label] for label in self.labels], dtype=np.float64)
            if not (np.isfinite(shares).all() and (shares > 0).all()):
                raise ValueError("allocation dict shares must be positive finite numbers; "
                                 "drop a stratum from the dataset instead of giving it 0")
            name = "dict"
        elif allocation in ALLOCATIONS:
            name, shares = allocation, (np.ones(strata) if allocation == "equal" else None)
            if name == "equal" and total < strata:
                raise ValueError(
                    f"allocation='equal' needs a global batch of at least one example per stratum: "
                    f"{strata} strata but batch_size x world_size = {total}; raise batch_size"
                )
        else:
            raise ValueError(f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))} or a dict "
                             f"{{label: share}}, got {allocation!r}")
        if name != "dict" and name != "equal" and total < strata:
            raise ValueError(
                f"every stratum needs a slot in each batch: {strata} strata but batch_size x world_size "
                f"= {total}; raise batch_size or merge strata"
            )
        if shares is not None:  # explicit counts never change: check them once, for every tie-break
            least, most = count_range(total * shares / shares.sum(), total)
            self._check_explicit_counts(least, most, name)
        return name, shares

    def _check_explicit_counts(self, least: np.ndarray, most: np.ndarray, name: str) -> None:
        for label, low, high, size in zip(self.labels, least, most, self.sizes):
            if low < 1:
                raise ValueError(f"allocation={name!r} can leave stratum {label!r} without a slot in a global batch "
                                 f"of {self.global_batch_size}; raise its share or batch_size")
            if high > size:
                raise ValueError(
                    f"allocation={name!r} gives stratum {label!r} up to {high} slots per batch but it has only "
                    f"{size} members (draws are without replacement); lower its share or batch_size, "
                    "or use 'proportional' or 'neyman', which cap counts at stratum sizes"
                )

    def _num_batches(self) -> int:
        total = self.global_batch_size
        count = self.n // total if self.drop_last else -(-self.n // total)
        if count == 0:
            raise ValueError(f"drop_last=True with a global batch of {total} > n={self.n} leaves no batch")
        return count

    # -- allocation ---------------------------------------------------------------------------
    def _weights(self, sigma: np.ndarray) -> np.ndarray:
        if self._shares is not None:
            return self._shares
        if self.allocation == "proportional":
            return self.sizes.astype(np.float64)
        known = np.isfinite(sigma)
        if not known.any() or np.nanmax(sigma) <= 0:
            return self.sizes.astype(np.float64)  # nothing known yet: proportional
        # strata with no estimate yet get the largest known spread (sample them generously)
        return self.sizes * np.where(known, sigma, np.nanmax(sigma))

    def _allocate(self, epoch: int, sigma: np.ndarray) -> np.ndarray:
        priority = epoch_rng(self.seed, epoch, 0).permutation(len(self.labels))
        return allocate(self._weights(sigma), self.sizes, self.global_batch_size, priority,
                        explicit=self._shares is not None)

    @property
    def counts(self) -> dict[Hashable, int]:
        """Examples of each stratum in every global batch of the current epoch."""
        return dict(zip(self.labels, self._counts.tolist()))

    @property
    def sigma(self) -> dict[Hashable, float]:
        """Per-stratum standard deviation behind the current Neyman allocation (NaN: unknown)."""
        return dict(zip(self.labels, self._sigma.tolist()))

    def stratum_weights(self) -> dict[Hashable, float]:
        """``N_h / (N * counts[h]) * global_batch`` per stratum label (see :meth:`importance_weights`).

        >>> StratifiedBatchSampler([0, 0, 0, 1], 2, allocation="equal").stratum_weights()
        {0: 1.5, 1: 0.5}
        """
        return dict(zip(self.labels, self._weight_table().tolist()))

    def _weight_table(self) -> np.ndarray:
        return self.sizes * self.global_batch_size / (self.n * self._counts)

    def importance_weights(self, batch: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-example weights (of ``dtype``, on the CPU) that make the weighted batch mean unbiased.

        Use them as ``(weights * per_example_loss).mean()``. They depend only on each
        example's stratum and the current epoch's counts, so under DDP each rank can weigh its
        own share and the averaged gradient is the weighted mean of the global batch.

        >>> sampler = StratifiedBatchSampler([0, 0, 0, 1], 2, allocation="equal")
        >>> sampler.importance_weights([2, 3]).tolist()
        [1.5, 0.5]
        """
        indices = _indices(batch, self.n, "batch")
        return torch.from_numpy(self._weight_table()[self.codes[indices]]).to(dtype)

    def update(self, indices: Any, values: Any) -> None:
        """Record per-example ``values`` (e.g. losses or gradient norms) for Neyman allocation.

        Values gathered during an epoch set ``sigma_h`` for the allocation of the next epoch
        (taken when :meth:`set_epoch` moves to it); strata with fewer than two values keep
        their previous estimate. Under DDP, pass the values of all ranks (e.g. gathered with
        ``torch.distributed.all_gather``) so every rank computes the same allocation.

        >>> sampler = StratifiedBatchSampler([0, 0, 1, 1], 2, allocation="neyman")
        >>> sampler.update([0, 1, 2, 3], [0.0, 2.0, 5.0, 5.0])
        >>> sampler.set_epoch(1)
        >>> sampler.sigma, sampler.counts
        ({0: 1.4142135623730951, 1: 0.0}, {0: 1, 1: 1})
        """
        index = _indices(indices, self.n, "indices")
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != index.shape:
            raise ValueError(f"values must have one entry per index: {values.size} values for {index.size} indices")
        if not np.isfinite(values).all():
            raise ValueError("values must be finite (got NaN or inf); skip those examples")
        self._moments = merge_moments(self._moments, self.codes[index], values)

    # -- the protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``iter()`` yields; a new epoch recomputes a Neyman allocation.

        Calling it with the current epoch keeps the position (resuming mid-epoch).
        """
        epoch = check_epoch(epoch)
        if epoch == self.epoch:
            return
        count, _, m2 = self._moments.T
        estimate = np.sqrt(np.divide(m2, count - 1, out=np.zeros_like(m2), where=count > 1))
        sigma = np.where(count > 1, estimate, self._sigma)
        counts = self._allocate(epoch, sigma)
        self.epoch, self._sigma, self._counts = epoch, sigma, counts
        self._moments = np.zeros_like(self._moments)
        self._cursor.move_to(0)

    @property
    def position(self) -> int:
        """How many batches this rank has yielded in the current epoch."""
        return self._cursor.position

    def global_batches(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global batches, shape ``(len(self), batch_size * world_size)``.

        Each row lists stratum 0's draws, then stratum 1's, and so on. Uses the current
        epoch's counts (an epoch other than the current one is drawn with them too).
        """
        epoch = self.epoch if epoch is None else check_epoch(epoch)
        columns = []
        for h, (members, count) in enumerate(zip(self._members, self._counts)):
            draws = stratum_draws(len(members), int(count), self.num_batches, epoch_rng(self.seed, epoch, 1, h))
            columns.append(members[draws])
        return np.concatenate(columns, axis=1)

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (cached until the epoch or counts change)."""
        key = tuple(self._counts.tolist())
        if self._cache is None or self._cache[:2] != (self.epoch, key):
            shares = self.global_batches()[:, self.rank :: self.world_size]
            self._cache = (self.epoch, key, shares.tolist())
        return self._cache[2]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        return self._cursor.iterate(len(batches), lambda first: batches[first:])

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly here (plain Python types)."""
        return {
            "sampler": type(self).__name__,
            "n": self.n,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "allocation": self.allocation,
            "shares": None if self._shares is None else (self._shares / self._shares.sum()).tolist(),
            "sizes": self.sizes.tolist(),
            "counts": self._counts.tolist(),
            "sigma": [None if math.isnan(s) else s for s in self._sigma.tolist()],  # None: unknown
            "moments": self._moments.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        A state may be loaded at another world size when the global batch size
        (``batch_size * world_size``) is the same: positions are in global batches. A state
        this sampler's ``state_dict()`` could not have produced raises a
        :class:`~dataorder.samplers._state.StateError` naming the field and changes nothing.
        """
        reader, produced = StateReader(state, type(self).__name__), self.state_dict()
        for key, mine in (("n", self.n), ("seed", self.seed), ("drop_last", self.drop_last),
                          ("allocation", self.allocation), ("sizes", self.sizes.tolist())):
            reader.same(key, mine)
        reader.same("shares", produced["shares"],  # a dict allocation's shares, normalised
                    fix="construct it with the saved run's allocation dict")
        saved_batch, saved_world = reader.int("batch_size", low=1), reader.int("world_size", low=1)
        if saved_batch * saved_world != self.global_batch_size:
            raise StateError(
                f"state was saved with a global batch of {saved_batch * saved_world} (batch_size={saved_batch} x "
                f"world_size={saved_world}); this sampler's is {self.global_batch_size}: keep batch_size x "
                "world_size the same"
            )
        epoch = reader.int("epoch")
        # every rank yields one batch per global batch, so positions count global batches
        position = resume_position(reader.int("position"), saved_world=1, world=1, saved_length=self.num_batches,
                                   length=self.num_batches, elastic=True, what=type(self).__name__)
        strata = len(self.labels)
        counts = reader.ints("counts", strata, low=1, high=self.global_batch_size)
        sigma = reader.floats("sigma", (strata,), missing=True)
        if (sigma < 0).any():
            raise StateError("state's sigma holds a negative standard deviation; the state is corrupt")
        if not np.array_equal(counts, self._allocate(epoch, sigma)):  # what set_epoch(epoch) allocated from sigma
            raise StateError(f"state's counts {counts.tolist()} are not the allocation of epoch {epoch} from its "
                             "sigma; the state is corrupt")
        moments = reader.floats("moments", (strata, 3))
        if (moments[:, 0] < 0).any() or (moments[:, 2] < 0).any():
            raise StateError("state's moments hold a negative count or M2; the state is corrupt")
        refuse_unknown_fields(state, produced, type(self).__name__)
        self.epoch, self._counts, self._sigma, self._moments = epoch, counts, sigma, moments
        self._cursor.move_to(position)
        self._cache = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.n}, strata={len(self.labels)}, batch_size={self.batch_size}, "
                f"allocation={self.allocation!r}, seed={self.seed}, epoch={self.epoch}, rank={self.rank}, "
                f"world_size={self.world_size}, drop_last={self.drop_last})")
