"""MixtureSampler: draw from several sources with weights that follow a :class:`Schedule`.

Built on :class:`~dataorder.samplers.run.RunSampler` (whole-run streams, O(1) elastic
resumption) and :func:`~dataorder.samplers.permutation.keyed_permutation` (per-source
shuffles of any size without materialising them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sized
from typing import Any

import numba
import numpy as np

from dataorder._validate import check_choice, check_count, check_int
from dataorder.samplers._state import StateError, StateReader
from dataorder.samplers.base import dataset_length
from dataorder.samplers.permutation import _ROUNDS, _SLOTS, _SOURCES, _chain, _domains, _permute_one, _unit, hash_key
from dataorder.samplers.run import RunSampler, fingerprint
from dataorder.schedules import BatchCounts, Schedule

__all__ = ["MixtureSampler", "schedule_fingerprint"]

_STEP = 0.6180339887498949  # the golden ratio's fractional part: the most evenly spread rotation


@numba.njit(cache=True, nogil=True)
def _layout(counts: np.ndarray, phase: float, size: int, source_of_slot: np.ndarray,
            rank_of_slot: np.ndarray) -> None:  # pragma: no cover - numba
    """Place one batch's per-source ``counts`` on its ``size`` slots.

    Slot ``j`` gets the point ``x_j = (phase + j * golden) mod 1``; slots sorted by ``x``
    take source 0's samples first, then source 1's, and so on. The points of any run of
    consecutive slots, and of any residue class ``r mod W`` (the share of rank ``r`` of
    ``W``), are spread evenly over [0, 1) (a Kronecker sequence), so each such set holds
    every source close to its share: a few samples at most, where a shuffle would be off by
    about the square root of the count. The k-th slot of source ``s`` in ``x`` order gets the
    batch's k-th draw of ``s``.
    """
    x = np.empty(size)
    for j in range(size):
        x[j] = (phase + j * _STEP) % 1.0
    order = np.argsort(x, kind="mergesort")
    s, end = 0, counts[0]
    for k in range(size):
        while k >= end:
            s += 1
            end += counts[s]
        source_of_slot[order[k]] = s
        rank_of_slot[order[k]] = k - (end - counts[s])


@numba.njit(cache=True, nogil=True)
def _mixture_kernel(positions, batch_size, first, counts, before, phases, full_batches, last_size,
                    sizes, offsets, source_keys, halves, masks, column, draw, out):  # pragma: no cover - numba
    """Map ascending global positions to (source column, draw number, global index); see MixtureSampler."""
    round_keys = np.empty(_ROUNDS, dtype=np.uint64)
    source_of_slot = np.empty(batch_size, dtype=np.int64)
    rank_of_slot = np.empty(batch_size, dtype=np.int64)
    laid_out = -1
    for i in range(positions.size):
        b = positions[i] // batch_size
        row = b - first
        if row != laid_out:
            size = last_size if b == full_batches else batch_size
            _layout(counts[row], phases[row], size, source_of_slot, rank_of_slot)
            laid_out = row
        slot = positions[i] - b * batch_size
        c = source_of_slot[slot]
        k = before[row, c] + rank_of_slot[slot]
        n = sizes[c]
        passes, within = k // n, k % n
        column[i] = c
        draw[i] = k
        key = _chain(source_keys[c], passes)
        out[i] = offsets[c] + _permute_one(within, n, halves[c], masks[c], key, round_keys)


# -- the mixture sampler -----------------------------------------------------------------------
class MixtureSampler(RunSampler):
    """Indices into sources concatenated in ``sources``' order, mixed as ``schedule`` says.

    ``sources`` maps each source name to its dataset (any ``Sized``) or size; indices are
    global, ``offset(source) + i``, so ``torch.utils.data.ConcatDataset`` or
    ``datasets.concatenate_datasets`` of the sources in the same order serves them.
    ``schedule`` is a :class:`~dataorder.schedules.Schedule`, a dict of fixed weights, or
    the path of a YAML schedule.

    The run draws ``num_samples`` indices in global batches of ``batch_size`` (the *global*
    batch: each of ``world_size`` ranks gets ``batch_size // world_size`` of each, so give
    the DataLoader that). Global batch ``b`` holds exactly ``largest_remainder(batch_size *
    weights(b * batch_size / num_samples))`` samples of each source (ties to the earlier
    source in the schedule). Inside a batch the sources are spread evenly (:func:`_layout`,
    with a random phase per batch), so any run of consecutive samples and each rank's share
    also hold every source within a few samples of its share. Within a source, samples are
    drawn without replacement along a per-source permutation, reshuffled on each pass
    (``exhaustion="restart"``) or ending the run before the first global batch that would
    need a repeat (``"stop"``).

    Every index is a pure function of ``(seed, global position)``: the k-th draw of source
    ``s`` is ``keyed_permutation(k mod n_s)`` with a key from ``(seed, s, k // n_s)``, so no
    permutation is stored and sources may hold billions of examples. ``state_dict()`` is the
    global position; resuming costs O(1) in constant-weight stretches and O(batches inside
    ramps before the position) once (see :class:`~dataorder.schedules.BatchCounts`), at any
    world size that divides the batch.

    Example::

        >>> sampler = MixtureSampler({"web": 60, "code": 40}, {"web": 0.75, "code": 0.25},
        ...                          num_samples=8, batch_size=4, seed=0)
        >>> indices = list(sampler)
        >>> [sampler.source_of(i) for i in indices].count("web")
        6
        >>> sampler.epochs_of_source
        {'web': 0.1, 'code': 0.05}
    """

    def __init__(
        self,
        sources: Mapping[str, int | Sized],
        schedule: Schedule | Mapping[str, float] | str | os.PathLike,
        *,
        num_samples: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        exhaustion: str = "restart",
        drop_last: bool = False,
    ) -> None:
        schedule = _as_schedule(schedule)
        if not isinstance(sources, Mapping) or not sources:
            raise TypeError("sources must be a non-empty dict {name: dataset or size}, in concatenation order")
        sizes = {name: dataset_length(data, f"sources[{name!r}]") for name, data in sources.items()}
        if set(sizes) != set(schedule.names):
            raise ValueError(
                f"sources {sorted(sizes)} and schedule sources {sorted(schedule.names)} differ; "
                "give a dataset for every source of the schedule and no other"
            )
        num_samples = _from_run(num_samples, schedule, "num_samples")
        batch_size = check_count(_from_run(batch_size, schedule, "batch_size"), "batch_size")
        check_choice(exhaustion, "exhaustion", ("restart", "stop"))
        shared = {"schedule": schedule_fingerprint(schedule), "sizes": sizes, "batch_size": batch_size,
                  "exhaustion": exhaustion}
        super().__init__(num_samples, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, shared=shared)
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size={batch_size} is the global batch and must be a positive multiple of "
                f"world_size={self.world_size}; each rank's DataLoader gets batch_size // world_size"
            )
        self.schedule = schedule
        self.batch_size = batch_size
        self.exhaustion = exhaustion
        self.sizes = sizes
        starts = np.cumsum([0, *sizes.values()])[:-1]
        self.offsets = {name: int(start) for name, start in zip(sizes, starts)}
        # internal arrays are in the schedule's column order
        self._n = np.array([sizes[name] for name in schedule.names], dtype=np.int64)
        self._offset = np.array([self.offsets[name] for name in schedule.names], dtype=np.int64)
        self._bounds = np.array(sorted(self.offsets.values()) + [sum(sizes.values())], dtype=np.int64)
        self._names_by_offset = sorted(sizes, key=self.offsets.__getitem__)
        self.counts = BatchCounts(schedule, self.num_samples, batch_size)
        self._source_keys = hash_key(self.seed, _SOURCES, np.arange(len(self._n)))
        self._domains = _domains(self._n)
        self._carry: dict[int, np.ndarray] = {}  # batch -> cumulative counts before it
        self._length: int | None = None
        if exhaustion == "stop":
            self._check_first_batch_fits()

    # -- logging helpers --------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Global batches in the run (the last may be smaller)."""
        return -(-self._run_length() // self.batch_size)

    def source_of(self, index: int) -> str:
        """Name of the source that global ``index`` belongs to.

        >>> MixtureSampler({"a": 3, "b": 2}, {"a": 1, "b": 1}, num_samples=4, batch_size=2).source_of(3)
        'b'
        """
        index = check_int(index, "index", low=0, high=int(self._bounds[-1]))
        return self._names_by_offset[int(np.searchsorted(self._bounds, index, side="right")) - 1]

    def weights_at(self, step: int) -> dict[str, float]:
        """Scheduled weights of global batch ``step`` (progress ``step * batch_size / num_samples``)."""
        step = self._check_step(step)
        return {name: round(float(w), 12) for name, w in zip(self.schedule.names, self.counts.weights(step))}

    def counts_at(self, step: int) -> dict[str, int]:
        """How many samples of each source global batch ``step`` holds."""
        step = self._check_step(step)
        return dict(zip(self.schedule.names, self.counts.batch(step).tolist()))

    def source_counts(self, sample: int | None = None) -> dict[str, int]:
        """Samples drawn from each source in the first ``sample`` global samples (default: so far)."""
        sample = min(self.sample, self._run_length()) if sample is None else check_count(sample, "sample", minimum=0)
        if sample > self._run_length():
            raise ValueError(f"sample must be <= {self._run_length()} (the run's length), got {sample}")
        b, within = divmod(sample, self.batch_size)
        counts = self._cumulative(min(b, self.counts.num_batches))
        if within:
            column, _, _ = self._map(np.arange(b * self.batch_size, sample, dtype=np.int64))
            counts = counts + np.bincount(column, minlength=len(self._n))
        return dict(zip(self.schedule.names, counts.tolist()))

    @property
    def epochs_of_source(self) -> dict[str, float]:
        """Passes over each source so far: draws / size (``floor`` = completed reshuffles)."""
        counts = self.source_counts()
        return {name: counts[name] / self.sizes[name] for name in self.sizes}

    def _check_step(self, step: int) -> int:
        return check_int(step, "step", low=0, high=self.num_batches)  # exhaustion='stop' may end the run early

    # -- the stream -------------------------------------------------------------------------
    def _run_length(self) -> int:
        if self._length is None:
            self._length = self.num_samples if self.exhaustion == "restart" else self._stop_length()
        return self._length

    def _stop_length(self) -> int:
        """Samples before the first global batch that would draw a source past its size."""
        counts = self.counts
        fits = lambda b: bool(np.all(counts.cumulative(b) <= self._n))  # noqa: E731
        if fits(counts.num_batches):
            return self.num_samples
        lo, hi = 0, counts.num_batches  # fits(lo) holds, fits(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo * self.batch_size

    def _check_first_batch_fits(self) -> None:
        small = [name for name, c, n in zip(self.schedule.names, self.counts.batch(0), self._n) if c > n]
        if small:
            raise ValueError(f"exhaustion='stop' but {', '.join(small)} cannot fill even the first batch; "
                             "use exhaustion='restart' or a smaller batch_size")

    def _cumulative(self, b: int) -> np.ndarray:
        if b not in self._carry:
            self._carry = {b: self.counts.cumulative(b)}
        return self._carry[b]

    def _map(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(schedule column, draw number within the source, global index) at ascending positions.

        Batch ``b``'s samples are placed on its slots by :func:`_layout` keyed by ``(seed, b)``;
        the k-th draw of source ``s`` is position ``k mod n_s`` of the
        permutation keyed by ``(seed, s, k // n_s)``.
        """
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        first, last = int(positions[0]) // self.batch_size, int(positions[-1]) // self.batch_size
        batches = np.arange(first, last + 1)
        counts = self.counts.batch(batches)  # (rows, S)
        before = self._cumulative(first) + np.cumsum(counts, axis=0) - counts  # draws before each batch
        self._carry = {last: before[-1], last + 1: before[-1] + counts[-1]}  # where the next block starts
        column, draw, out = (np.empty(positions.size, dtype=np.int64) for _ in range(3))
        _mixture_kernel(positions, self.batch_size, first, np.ascontiguousarray(counts), np.ascontiguousarray(before),
                        _unit(hash_key(self.seed, _SLOTS, batches)), self.counts.full_batches, self.counts.last_size,
                        self._n, self._offset, self._source_keys, *self._domains, column, draw, out)
        return column, draw, out

    def _indices_at(self, positions: np.ndarray) -> np.ndarray:
        return self._map(positions)[2]

    # -- state ------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "sizes": dict(self.sizes), "exhaustion": self.exhaustion,
                "schedule": schedule_fingerprint(self.schedule)}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        reader = StateReader(state, type(self).__name__)
        reader.same("batch_size", self.batch_size)
        reader.same("sizes", dict(self.sizes))
        reader.same("exhaustion", self.exhaustion)
        if reader.str("schedule") != schedule_fingerprint(self.schedule):
            raise StateError("state was saved with another schedule; the global stream depends on the schedule, "
                             "so construct the sampler with the schedule of the saved run")

    def __repr__(self) -> str:
        return (f"MixtureSampler(sources={self.sizes}, num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"seed={self.seed}, rank={self.rank}, world_size={self.world_size}, exhaustion={self.exhaustion!r})")


def schedule_fingerprint(schedule: Schedule) -> str:
    """A digest of ``schedule`` as the stream depends on it: its phases and its sources' order
    (the stream's column order: a reordered schedule draws another stream).

    >>> schedule_fingerprint(Schedule.constant({"a": 0.5, "b": 0.5})) == schedule_fingerprint(
    ...     Schedule.constant({"b": 0.5, "a": 0.5}))
    False
    """
    return fingerprint({"schedule": schedule.to_dict(), "sources": list(schedule.names)})


def _as_schedule(schedule: Any) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (str, os.PathLike)):
        return Schedule.load(schedule)
    if isinstance(schedule, Mapping):
        return Schedule.constant(schedule)
    raise TypeError(f"schedule must be a Schedule, a dict of weights or a YAML path, got {type(schedule).__name__}")


def _from_run(value: int | None, schedule: Schedule, key: str) -> int:
    if value is not None:
        return value
    if key not in schedule.run:
        raise ValueError(f"{key} is required: pass {key}=... or give run: {{{key}: ...}} in the schedule")
    return schedule.run[key]
