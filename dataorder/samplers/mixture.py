"""MixtureSampler: draw from several sources with weights that follow a :class:`Schedule`.

Also the two building blocks shared with :mod:`dataorder.samplers.curriculum`:

* :func:`keyed_permutation`, a seeded permutation of ``[0, n)`` that can be evaluated at
  any position in O(1) time and memory (a Feistel network with cycle-walking), so a
  source of 10⁹ examples is shuffled without materialising 10⁹ indices;
* :class:`RunSampler`, the base of samplers that draw ``num_samples`` indices over a whole
  run (not per epoch): the index at global position ``i`` is a pure function of
  ``(seed, i)``, so the state is the global position and resumption is elastic.
"""

from __future__ import annotations

import abc
import numbers
import operator
import os
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numba
import numpy as np
from torch.utils.data import Sampler

from dataorder.samplers.base import check_bool, check_epoch, check_seed, dataset_length, resolve_world, shard_length
from dataorder.schedules import BatchCounts, Schedule

__all__ = ["MixtureSampler", "RunSampler", "fingerprint", "hash_key", "keyed_permutation"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROOT = np.uint64(0x243F6A8885A308D3)
# stream tags that keep the keys of different uses apart
_SLOTS, _SOURCES = 1, 2


# -- keyed permutations (numba kernels on scalars; wrap-around arithmetic is intended) ----------
@numba.njit(inline="always")
def _mix64(z: np.uint64) -> np.uint64:
    """The splitmix64 finaliser, a bijective 64-bit mixer."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _chain(key: np.uint64, part: np.int64) -> np.uint64:
    """Fold one integer into a key: the step of :func:`hash_key`."""
    return _mix64(key ^ _mix64(np.uint64(part) + _GOLDEN))


_ROUNDS = 8  # 4 rounds already make a permutation; 8 remove a visible bias on small domains


@numba.njit(inline="always")
def _network(v: np.uint64, half: np.uint64, mask: np.uint64, round_keys: np.ndarray) -> np.uint64:
    left, right = v >> half, v & mask
    for r in range(_ROUNDS):
        left, right = right, left ^ (_mix64(right ^ round_keys[r]) & mask)
    return (left << half) | right


@numba.njit(inline="always")
def _shape(n: np.int64) -> tuple[np.uint64, np.uint64]:
    """Half-width and mask of the smallest even-bit Feistel domain covering ``n``."""
    bits = 2
    while (np.int64(1) << bits) < n:
        bits += 1
    half = np.uint64((bits + 1) // 2)
    return half, (np.uint64(1) << half) - np.uint64(1)


@numba.njit(inline="always")
def _permute_one(x: np.int64, n: np.int64, half: np.uint64, mask: np.uint64, key: np.uint64,
                 round_keys: np.ndarray) -> np.int64:
    """Position ``x`` of the permutation of ``[0, n)`` keyed by ``key`` (``round_keys`` is scratch)."""
    for r in range(_ROUNDS):
        round_keys[r] = _mix64(key ^ (_GOLDEN * np.uint64(r + 1)))
    v = _network(np.uint64(x), half, mask, round_keys)
    while v >= np.uint64(n):  # cycle-walking keeps the bijection inside [0, n)
        v = _network(v, half, mask, round_keys)
    return np.int64(v)


@numba.njit(cache=True, nogil=True)
def _permute(x: np.ndarray, sizes: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    n = sizes[0]
    half, mask = _shape(n)
    round_keys = np.empty(_ROUNDS, dtype=np.uint64)
    for i in range(x.size):
        if sizes.size > 1 and sizes[i] != n:
            n = sizes[i]
            half, mask = _shape(n)
        out[i] = _permute_one(x[i], n, half, mask, keys[i if keys.size > 1 else 0], round_keys)


@numba.njit(cache=True, nogil=True)
def _hash(parts: np.ndarray, out: np.ndarray) -> None:
    for i in range(parts.shape[0]):
        key = _ROOT
        for j in range(parts.shape[1]):
            key = _chain(key, parts[i, j])
        out[i] = key


def hash_key(*parts: int | np.ndarray) -> np.ndarray:
    """64-bit keys that are a pure function of the integer ``parts`` (arrays broadcast).

    >>> int(hash_key(0, 1)[0]) == int(hash_key(0, 1)[0]) != int(hash_key(0, 2)[0])
    True
    """
    columns = np.broadcast_arrays(*(np.atleast_1d(np.asarray(part, dtype=np.int64)) for part in parts))
    table = np.ascontiguousarray(np.stack(columns, axis=1).reshape(-1, len(parts)))
    out = np.empty(len(table), dtype=np.uint64)
    _hash(table, out)
    return out


def _unit(keys: np.ndarray) -> np.ndarray:
    """Map 64-bit keys to floats in [0, 1) (their top 53 bits)."""
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _domains(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feistel half-widths and masks for permutations of each size (see :func:`_shape`)."""
    bits = np.maximum(2, [(int(n) - 1).bit_length() for n in sizes])
    half = ((bits + 1) // 2).astype(np.uint64)
    return half, (np.uint64(1) << half) - np.uint64(1)


def keyed_permutation(x: np.ndarray, n: int | np.ndarray, key: int | np.ndarray) -> np.ndarray:
    """Position ``x`` of a pseudo-random permutation of ``[0, n)`` chosen by ``key``.

    An 8-round Feistel network on the smallest even number of bits covering ``n``, with
    cycle-walking (re-apply until the value falls below ``n``), so it is a bijection of
    ``[0, n)`` for any ``n``. Time O(1) per element (on average fewer than 4 network passes,
    in a numba kernel), memory O(1): nothing of size ``n`` is stored. ``n`` and ``key`` (a
    64-bit key, e.g. from :func:`hash_key`) are one value or one per element.

    >>> sorted(keyed_permutation(np.arange(10), 10, key=7).tolist())
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    >>> keyed_permutation(np.arange(10), 10, key=7).tolist() == keyed_permutation(np.arange(10), 10, key=8).tolist()
    False
    """
    x = np.ascontiguousarray(x, dtype=np.int64)
    sizes = np.ascontiguousarray(np.atleast_1d(np.asarray(n, dtype=np.int64)).ravel())
    keys = np.ascontiguousarray(np.atleast_1d(np.asarray(key)).astype(np.uint64).ravel())
    for name, values in (("n", sizes), ("key", keys)):
        if values.size not in (1, x.size):
            raise ValueError(f"{name} must be one value or one per position ({x.size}), got {values.size}")
    if sizes.min() < 1:
        raise ValueError(f"n must be >= 1, got {int(sizes.min())}")
    if x.size and (x.min() < 0 or np.any(x.ravel() >= sizes)):
        raise ValueError(f"positions must be in [0, n), got values in [{int(x.min())}, {int(x.max())}] for n={n}")
    out = np.empty(x.size, dtype=np.int64)
    _permute(x.ravel(), sizes, keys, out)
    return out.reshape(x.shape)


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


# -- samplers over a whole run -----------------------------------------------------------------
class RunSampler(Sampler[int], abc.ABC):
    """Base of samplers that draw ``num_samples`` indices over a whole run.

    The run has one *global stream* of indices, the same on every rank; the index at
    position ``i`` is a pure function of ``(seed, i)`` (:meth:`_indices_at`). Rank ``r`` of
    ``W`` yields positions ``r, r + W, ...`` (padded by wrapping round to the start, as
    :class:`torch.utils.data.DistributedSampler`, unless ``drop_last``), so a local batch of
    ``b`` indices per rank is exactly this rank's share of a global batch of ``b * W``.

    The whole run is one epoch: :meth:`set_epoch` is accepted and changes nothing.
    ``state_dict()`` holds the global position (``sample``); loading it costs O(1) in the
    position and works at another world size when the position splits evenly.
    """

    #: Global positions generated at a time while iterating (bounded memory per block).
    BLOCK = 1 << 15

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = check_seed(num_samples, "num_samples")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1: the number of samples drawn over the whole run")
        self.seed = check_seed(seed)
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.drop_last = check_bool(drop_last, "drop_last")
        self.epoch = 0
        self._start = 0
        self._pass: tuple[int, int, Iterator[int]] | None = None  # (block start, block length, iterator)

    # -- what subclasses define -------------------------------------------------------------
    @abc.abstractmethod
    def _run_length(self) -> int:
        """Length of the global stream (``num_samples`` unless the sampler stops early)."""

    @abc.abstractmethod
    def _indices_at(self, positions: np.ndarray) -> np.ndarray:
        """Global-stream indices at ascending ``positions`` in ``[0, _run_length())``."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` was saved by a sampler built differently."""

    # -- the protocol -----------------------------------------------------------------------
    def __len__(self) -> int:
        return shard_length(self._run_length(), self.world_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Accepted for compatibility; the run is a single epoch, so the order does not change."""
        self.epoch = check_epoch(epoch)

    @property
    def position(self) -> int:
        """How many indices this rank has yielded in the run."""
        if self._pass is None:
            return self._start
        start, count, iterator = self._pass
        return start + count - operator.length_hint(iterator)

    @property
    def sample(self) -> int:
        """Global samples consumed by all ranks together (``position * world_size``)."""
        return self.position * self.world_size

    def stream(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The global stream's indices at positions ``[start, stop)`` (the same on every rank).

        >>> from dataorder.samplers.mixture import MixtureSampler
        >>> s = MixtureSampler({"a": 4, "b": 4}, {"a": 1, "b": 1}, num_samples=8, batch_size=4)
        >>> sorted(s.stream().tolist()) == list(range(8))
        True
        """
        length = self._run_length()
        stop = length if stop is None else stop
        if not 0 <= start <= stop <= length:
            raise ValueError(f"need 0 <= start <= stop <= {length}, got start={start}, stop={stop}")
        return self._indices_at(np.arange(start, stop, dtype=np.int64))

    def _rank_indices(self, first: int, last: int) -> np.ndarray:
        """This rank's indices at its positions ``[first, last)``."""
        positions = self.rank + self.world_size * np.arange(first, last, dtype=np.int64)
        length = self._run_length()
        if positions.size == 0 or positions[-1] < length:
            return self._indices_at(positions)
        wrapped = positions % length  # the padding repeats the start of the stream
        unique, inverse = np.unique(wrapped, return_inverse=True)
        return self._indices_at(unique)[inverse]

    def __iter__(self) -> Iterator[int]:
        start = self.position
        if start >= len(self):
            start = 0  # the run was finished: iterating again replays it, as torch's samplers do
        self._start, self._pass = start, None
        return self._generate(start)

    def _generate(self, start: int) -> Iterator[int]:
        total, first = len(self), start
        step = max(1, self.BLOCK // self.world_size)
        size = min(step, 1024)  # small first blocks: the first index comes quickly, also after a resume
        while first < total:
            block = self._rank_indices(first, min(total, first + size)).tolist()
            iterator = iter(block)  # a list iterator: the position is read off its length hint
            self._pass = (first, len(block), iterator)
            yield from iterator
            first, size = first + len(block), min(step, 2 * size)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global position and what identifies the run: plain Python types."""
        state = {
            "sampler": type(self).__name__,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
            "position": self.position,
            "sample": self.sample,
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved global position, possibly at another world size.

        Raises ``ValueError`` and changes nothing if the state does not fit this sampler.
        """
        position = self._check_state(state)
        self._start, self._pass = position, None

    def _check_state(self, state: Any) -> int:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"sampler", "seed", "num_samples", "sample"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict from state_dict()")
        name = type(self).__name__
        if state["sampler"] != name:
            raise ValueError(f"state was saved by {state['sampler']}, not {name}; load it into a {state['sampler']}")
        for key in ("seed", "num_samples", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]!r}; construct the sampler with {key}={state[key]!r}")
        self._check_extra_state(state)
        sample = check_seed(state["sample"], "sample")
        if sample >= self._run_length():
            return len(self)  # the run was finished (possibly into the padding of another world size)
        if sample % self.world_size:
            raise ValueError(
                f"state was saved after {sample} global samples, which world_size={self.world_size} cannot split "
                "evenly; resume at a multiple of the new world size (e.g. at a global batch boundary)"
            )
        return sample // self.world_size


def fingerprint(value: Any) -> str:
    """A short digest of a JSON-able value, to check in a state that a run was built the same way.

    >>> fingerprint({"a": 1}) == fingerprint({"a": 1}) != fingerprint({"a": 2})
    True
    """
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _check_same(state: dict[str, Any], key: str, value: Any) -> None:
    if state.get(key) != value:
        raise ValueError(f"state was saved with {key}={state.get(key)!r} but this sampler has {key}={value!r}; "
                         "construct it with the same arguments")


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
        batch_size = check_seed(_from_run(batch_size, schedule, "batch_size"), "batch_size")
        if exhaustion not in ("restart", "stop"):
            raise ValueError(f"exhaustion must be 'restart' (reshuffle a used-up source) or 'stop', got {exhaustion!r}")
        super().__init__(num_samples, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        if batch_size < 1 or batch_size % self.world_size:
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
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < self._bounds[-1]:
            raise ValueError(f"index must be an int in [0, {int(self._bounds[-1])}), got {index!r}")
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
        sample = min(self.sample, self._run_length()) if sample is None else check_seed(sample, "sample")
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
        step = check_seed(step, "step")
        if step >= self.counts.num_batches:
            raise ValueError(f"step must be a global batch index in [0, {self.counts.num_batches}), got {step}")
        return step

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
        if lo == 0:
            small = [name for name, c, n in zip(self.schedule.names, counts.batch(0), self._n) if c > n]
            raise ValueError(f"exhaustion='stop' but {', '.join(small)} cannot fill even the first batch; "
                             "use exhaustion='restart' or a smaller batch_size")
        return lo * self.batch_size

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
                "schedule": fingerprint(self.schedule.to_dict())}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        _check_same(state, "batch_size", self.batch_size)
        _check_same(state, "sizes", dict(self.sizes))
        _check_same(state, "exhaustion", self.exhaustion)
        if state.get("schedule") != fingerprint(self.schedule.to_dict()):
            raise ValueError("state was saved with another schedule; the global stream depends on the schedule, "
                             "so construct the sampler with the schedule of the saved run")

    def __repr__(self) -> str:
        return (f"MixtureSampler(sources={self.sizes}, num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"seed={self.seed}, rank={self.rank}, world_size={self.world_size}, exhaustion={self.exhaustion!r})")


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
