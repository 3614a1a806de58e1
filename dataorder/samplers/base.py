"""The sampler protocol shared by every dataorder sampler.

A sampler here is a pure function of ``(seed, epoch, state)``: it never reads the global
RNG, the number of DataLoader workers or the history of the world size. Each epoch has a
*global order* (the same on every rank); rank ``r`` of ``W`` takes positions ``r, r+W, ...``
of it after the padding rule of :class:`torch.utils.data.DistributedSampler`, so rank ``r``'s
``k``-th batch is exactly its share of the ``k``-th global batch.

The validation helpers and :func:`shard` are public so that samplers written outside this
package can follow the same rules.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import numbers
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from dataorder._validate import INT64_LIMIT, check_bool, check_epoch, check_rank, check_seed, check_world_size
from dataorder.distributed import check_same_on_all_ranks
from dataorder.samplers._state import (Cursor, StateError, StateReader, StateTypeError, refuse_unknown_fields,
                                      resume_position)

__all__ = [
    "IndexSampler",
    "array_digest",
    "check_bool",
    "check_epoch",
    "check_seed",
    "dataset_length",
    "epoch_rng",
    "resolve_world",
    "shard",
    "shard_length",
]


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (hex): an order or a set of codes, compared across ranks or states.

    >>> array_digest(np.arange(3)) == array_digest(np.array([0, 1, 2])) != array_digest(np.arange(4))
    True
    """
    return hashlib.sha256(np.asarray(array).tobytes()).hexdigest()


def dataset_length(data: Sized | int, name: str = "data") -> int:
    """Number of examples of ``data``: an int ``n`` or any ``Sized`` (a Dataset, an array).

    >>> dataset_length(10), dataset_length([1, 2, 3])
    (10, 3)
    """
    if isinstance(data, (bool, np.bool_)):
        raise TypeError(f"{name} must be a dataset (any Sized) or an int n, got a bool")
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{name} must be a dataset (any Sized) or an int n, got a {type(data).__name__} {data!r:.40}; "
                        "pass int(n) for a count read as text")
    if isinstance(data, numbers.Integral):
        n = int(data)
    elif isinstance(data, Sized):
        n = len(data)
    else:
        raise TypeError(
            f"{name} must be a dataset with __len__ or an int n, got {type(data).__name__}; "
            "for an IterableDataset, ordering is the dataset's own job"
        )
    if not 0 < n < INT64_LIMIT:
        raise ValueError(f"{name} must hold at least one example (and fewer than 2**63), got n={n}")
    return n


def resolve_world(rank: int | None, world_size: int | None, *, owner: str = "sampler",
                  shared: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Fill in ``rank``/``world_size`` from ``torch.distributed`` when initialised, else 0 and 1.

    An explicit ``world_size`` that disagrees with an initialised process group is an error:
    the shards would overlap or leave examples out. So is, under an initialised group of two
    or more ranks, a value of ``shared`` (the settings the global order is drawn from: seed,
    size, ``drop_last``) that differs between ranks: ``ValueError`` on every rank, naming
    ``owner``, the setting and each rank's value (one all-gather of a few integers, so every
    rank must build the sampler).

    >>> resolve_world(None, None)
    (0, 1)
    >>> resolve_world(1, 4, owner="RandomReshuffling", shared={"seed": 0})  # no group: nothing to compare
    (1, 4)
    """
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    world_size = check_world_size(world_size)
    rank = check_rank(rank, world_size)
    if initialised and world_size != torch.distributed.get_world_size():
        raise ValueError(
            f"world_size={world_size} does not match the initialised process group "
            f"(size {torch.distributed.get_world_size()}); leave world_size=None to use the group's"
        )
    if initialised and shared:
        check_same_on_all_ranks(owner, **shared)
    return rank, world_size


def shard_length(total: int, world_size: int, drop_last: bool) -> int:
    """How many items each rank takes from a global order of ``total`` items.

    The rule of :class:`torch.utils.data.DistributedSampler`: with ``drop_last`` the tail
    that does not divide evenly is dropped, otherwise the order is padded by wrapping round.

    >>> shard_length(10, 3, drop_last=False), shard_length(10, 3, drop_last=True)
    (4, 3)
    """
    if drop_last:
        return total // world_size
    return -(-total // world_size)


def shard(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """This rank's share of a global ``order`` (padding or truncation as DistributedSampler).

    >>> shard(np.arange(5), 1, 2, drop_last=False).tolist()
    [1, 3, 0]
    """
    order = np.asarray(order)
    if world_size == 1:
        return order
    per_rank = shard_length(len(order), world_size, drop_last)
    total = per_rank * world_size
    if total > len(order):
        order = np.resize(order, total)  # repeats from the start, as DistributedSampler pads
    return order[rank:total:world_size]


def epoch_rng(seed: int, *stream: int) -> np.random.Generator:
    """A numpy Generator that is a pure function of ``(seed, *stream)``.

    >>> int(epoch_rng(0, 1).integers(100)) == int(epoch_rng(0, 1).integers(100))
    True
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))


class IndexSampler(Sampler[int], abc.ABC):
    """Base class of the index samplers: sharding, epochs and exact mid-epoch resumption.

    Subclasses implement :meth:`_global_order` (the epoch's order on all ranks, an int64
    array) and, if they hold state beyond ``(seed, epoch, position)``, the hooks
    :meth:`_extra_state` / :meth:`_load_extra_state`. A subclass whose order depends on
    settings of its own passes them as ``shared`` (name -> value): under an initialised process
    group they are compared across ranks with ``seed``, ``n`` and ``drop_last``
    (:func:`resolve_world`).

    ``state_dict()`` may be taken at any point of an epoch, also while the DataLoader is
    iterating; loading it into a fresh sampler built with the same arguments makes the next
    ``iter()`` yield exactly the remaining indices of that epoch.

    Example (a sampler that visits examples in reverse)::

        >>> class Reverse(IndexSampler):
        ...     def _global_order(self, epoch):
        ...         return np.arange(self.n)[::-1].copy()
        >>> list(Reverse(4))
        [3, 2, 1, 0]
    """

    #: Whether the global order is independent of the world size, so that a state saved at
    #: one world size may be loaded at another.
    world_size_independent: bool = True

    def __init__(
        self,
        data: Sized | int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        shared: Mapping[str, Any] | None = None,
    ) -> None:
        self.n = dataset_length(data)
        self.seed = check_seed(seed)
        self.drop_last = check_bool(drop_last, "drop_last")
        # a subclass's ``shared``: its own settings the order is drawn from, compared across ranks too
        shared = {"seed": self.seed, "n": self.n, "drop_last": self.drop_last, **(shared or {})}
        self.rank, self.world_size = resolve_world(rank, world_size, owner=type(self).__name__, shared=shared)
        self.epoch = 0
        self._cursor = Cursor()
        self._cache: tuple[int, np.ndarray] | None = None  # (epoch, this rank's order)

    # -- what subclasses define -------------------------------------------------------------
    @abc.abstractmethod
    def _global_order(self, epoch: int) -> np.ndarray:
        """The order of ``epoch`` before sharding, identical on every rank."""

    def _global_length(self) -> int:
        """Length of the global order (``n`` unless the subclass draws another count)."""
        return self.n

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore subclass state; ``state`` has been validated by :meth:`_check_extra_state`."""

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if the subclass part of ``state`` cannot be loaded."""

    # -- the protocol -----------------------------------------------------------------------
    def __len__(self) -> int:
        return shard_length(self._global_length(), self.world_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` yields.

        Calling it with the current epoch keeps the position, so a training loop that calls
        ``set_epoch`` after ``load_state_dict`` resumes mid-epoch.
        """
        epoch = check_epoch(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._cursor.move_to(0)

    @property
    def position(self) -> int:
        """How many indices this rank has yielded in the current epoch."""
        return self._cursor.position

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The order of ``epoch`` (default: the current one) over all ranks, before padding."""
        return np.asarray(self._global_order(self.epoch if epoch is None else check_epoch(epoch)))

    def rank_order(self) -> np.ndarray:
        """This rank's indices for the current epoch (cached until the epoch changes)."""
        if self._cache is None or self._cache[0] != self.epoch:
            order = shard(self.global_order(), self.rank, self.world_size, self.drop_last)
            self._cache = (self.epoch, order)
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        items = self.rank_order().tolist()
        return self._cursor.iterate(len(items), lambda first: items[first:])

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly here: plain Python types and tensors."""
        return self._fields()

    def _fields(self) -> dict[str, Any]:
        """The state's fields as they stand (``state_dict`` with no side effects: subclasses may add some)."""
        state = {
            "sampler": type(self).__name__,
            "n": self.n,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        A state this sampler's ``state_dict()`` could not have produced (another class or
        settings, a position past the epoch, a corrupt field) raises a
        :class:`~dataorder.samplers._state.StateError` (a ``ValueError``; a ``TypeError`` too
        for a field of the wrong type) naming the field, and changes nothing: the state is
        loaded into a copy that replaces this sampler only once every field passed.
        """
        candidate = copy.copy(self)
        candidate._cursor = self._cursor.copy()
        try:
            candidate._load(state)
            refuse_unknown_fields(state, candidate._fields(), type(self).__name__)
        except StateError:
            raise
        except TypeError as error:  # a subclass hook's refusal: typed like the base's own
            raise StateTypeError(str(error)) from error
        except ValueError as error:
            raise StateError(str(error)) from error
        self.__dict__.update(candidate.__dict__)

    def _load(self, state: Any) -> None:
        reader = StateReader(state, type(self).__name__)
        reader.same("n", self.n)
        reader.same("seed", self.seed)
        reader.same("drop_last", self.drop_last)
        epoch = reader.int("epoch")
        saved_world = reader.int("world_size", low=1)
        self._check_extra_state(state)  # the subclass's settings, before positions that depend on them
        position = resume_position(
            reader.int("position"), saved_world=saved_world, world=self.world_size,
            saved_length=shard_length(self._global_length(), saved_world, self.drop_last), length=len(self),
            elastic=self.world_size_independent, what=type(self).__name__,
        )
        self._load_extra_state(state)
        self.epoch = epoch
        self._cursor.move_to(position)
        self._cache = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, seed={self.seed}, epoch={self.epoch}, "
            f"rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last})"
        )
