"""Base of samplers that draw ``num_samples`` indices over a whole run (not per epoch).

The index at global position ``i`` is a pure function of ``(seed, i)``, so the state is
the global position and resumption is O(1) and elastic across world sizes.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dataorder._validate import check_bool, check_count, check_epoch, check_seed
from dataorder.samplers._state import Cursor, StateError, StateReader, refuse_unknown_fields, resume_position
from dataorder.samplers.base import resolve_world, shard_length

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
    position and works at another world size when the position splits evenly. A subclass
    passes the settings of its own that the stream is drawn from as ``shared``: they are
    compared across ranks where the sampler is built, with ``seed``, ``num_samples`` and
    ``drop_last`` (:func:`~dataorder.samplers.base.resolve_world`).
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
        shared: Mapping[str, Any] | None = None,
    ) -> None:
        self.num_samples = check_count(num_samples, "num_samples")
        self.seed = check_seed(seed)
        self.drop_last = check_bool(drop_last, "drop_last")
        # a subclass's ``shared``: its own settings the stream is drawn from, compared across ranks too
        shared = {"seed": self.seed, "num_samples": self.num_samples, "drop_last": self.drop_last, **(shared or {})}
        self.rank, self.world_size = resolve_world(rank, world_size, owner=type(self).__name__, shared=shared)
        self.epoch = 0
        self._cursor = Cursor()

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
        return self._cursor.position

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
        total, sizes = len(self), _block_sizes(max(1, self.BLOCK // self.world_size))
        return self._cursor.iterate(total, lambda first: self._rank_indices(first, min(total, first + next(sizes))).tolist())

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global position (``sample``, all ranks together) and what identifies the run: plain Python types.

        ``epoch`` is the last :meth:`set_epoch` (it does not change the order), so a loop that
        resumes any sampler with ``set_epoch(state["epoch"])`` resumes this one too.
        """
        return self._fields()

    def _fields(self) -> dict[str, Any]:
        """The state's fields as they stand (``state_dict`` with no side effects: subclasses may add some)."""
        state = {
            "sampler": type(self).__name__,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "sample": self.sample,
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved global position, possibly at another world size.

        A state this sampler's ``state_dict()`` could not have produced raises a
        :class:`~dataorder.samplers._state.StateError` naming the field and changes nothing.
        """
        candidate = copy.copy(self)
        candidate._cursor = self._cursor.copy()
        candidate._load(state)
        refuse_unknown_fields(state, candidate._fields(), type(self).__name__)
        self.__dict__.update(candidate.__dict__)

    def _load(self, state: Any) -> None:
        reader = StateReader(state, type(self).__name__)
        reader.same("seed", self.seed)
        reader.same("num_samples", self.num_samples)
        reader.same("drop_last", self.drop_last)
        self._check_extra_state(state)
        saved_world = reader.int("world_size", low=1)
        saved_length = shard_length(self._run_length(), saved_world, self.drop_last)
        epoch = reader.int("epoch")
        sample = reader.int("sample")
        if sample % saved_world:
            raise StateError(f"state's sample={sample} is not a whole number of positions of its "
                             f"world_size={saved_world} ranks; the state is corrupt")
        position = sample // saved_world
        position = resume_position(position, saved_world=saved_world, world=self.world_size,
                                   saved_length=saved_length, length=len(self), elastic=True,
                                   what=type(self).__name__)
        self.epoch = epoch
        self._cursor.move_to(position)


def fingerprint(value: Any) -> str:
    """A short digest of a JSON-able value, to check in a state that a run was built the same way.

    >>> fingerprint({"a": 1}) == fingerprint({"a": 1}) != fingerprint({"a": 2})
    True
    """
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _block_sizes(largest: int) -> Iterator[int]:
    """Positions generated per block of a pass: small first blocks, so the first index comes
    quickly (also after a resume), then doubling up to ``largest`` (bounded memory)."""
    size = min(largest, 1024)
    while True:
        yield size
        size = min(largest, 2 * size)
