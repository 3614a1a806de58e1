"""Base of samplers that draw ``num_samples`` indices over a whole run (not per epoch).

The index at global position ``i`` is a pure function of ``(seed, i)``, so the state is
the global position and resumption is O(1) and elastic across world sizes.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dataorder.samplers.base import check_bool, check_epoch, check_seed, resolve_world, shard_length

__all__ = ["RunSampler", "fingerprint"]


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
