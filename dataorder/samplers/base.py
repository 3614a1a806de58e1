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
import numbers
import operator
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "EpochCursor",
    "IndexSampler",
    "check_bool",
    "check_epoch",
    "check_seed",
    "dataset_length",
    "epoch_rng",
    "resolve_world",
    "shard",
    "shard_length",
]


def check_seed(seed: Any, name: str = "seed") -> int:
    """Return ``seed`` as a non-negative int, or raise a clear error.

    >>> check_seed(3)
    3
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed}; pass e.g. {name}=0")
    return int(seed)


def check_epoch(epoch: Any) -> int:
    """Return ``epoch`` as a non-negative int, or raise a clear error.

    >>> check_epoch(2)
    2
    """
    return check_seed(epoch, name="epoch")


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is a bool, else raise ``TypeError`` naming ``name``.

    >>> check_bool(True, "drop_last")
    True
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def dataset_length(data: Sized | int, name: str = "data") -> int:
    """Number of examples of ``data``: an int ``n`` or any ``Sized`` (a Dataset, an array).

    >>> dataset_length(10), dataset_length([1, 2, 3])
    (10, 3)
    """
    if isinstance(data, bool):
        raise TypeError(f"{name} must be a dataset (any Sized) or an int n, got a bool")
    if isinstance(data, numbers.Integral):
        n = int(data)
    elif isinstance(data, Sized):
        n = len(data)
    else:
        raise TypeError(
            f"{name} must be a dataset with __len__ or an int n, got {type(data).__name__}; "
            "for an IterableDataset, ordering is the dataset's own job"
        )
    if n <= 0:
        raise ValueError(f"{name} must hold at least one example, got n={n}")
    return n


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill in ``rank``/``world_size`` from ``torch.distributed`` when initialised, else 0 and 1.

    An explicit ``world_size`` that disagrees with an initialised process group is an error:
    the shards would overlap or leave examples out.

    >>> resolve_world(None, None)
    (0, 1)
    >>> resolve_world(1, 4)
    (1, 4)
    """
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    world_size = check_seed(world_size, "world_size")
    rank = check_seed(rank, "rank")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
    if initialised and world_size != torch.distributed.get_world_size():
        raise ValueError(
            f"world_size={world_size} does not match the initialised process group "
            f"(size {torch.distributed.get_world_size()}); leave world_size=None to use the group's"
        )
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


class EpochCursor:
    """Where a rank is in its current epoch's list of items (indices or batches).

    :meth:`iterate` hands out a C-level list iterator (as fast as torch's samplers) and the
    position is read off its length hint, so no Python code runs per item.

    >>> cursor = EpochCursor()
    >>> iterator = cursor.iterate([10, 11, 12]); next(iterator)
    10
    >>> cursor.position
    1
    """

    def __init__(self) -> None:
        self.start = 0  # position at which the active pass started
        self._pass: tuple[int, Iterator] | None = None  # (items in the pass, iterator)

    @property
    def position(self) -> int:
        if self._pass is None:
            return self.start
        count, iterator = self._pass
        return self.start + count - operator.length_hint(iterator)

    def move_to(self, position: int) -> None:
        """Forget the active pass; the next :meth:`iterate` starts at ``position``."""
        self.start, self._pass = position, None

    def iterate(self, items: list) -> Iterator:
        """An iterator over ``items`` from the current position (from 0 if the epoch was finished)."""
        start = self.position
        if start >= len(items):
            start = 0  # iterating a finished epoch again replays it, as torch's samplers do
        remaining = items[start:]
        iterator = iter(remaining)
        self.start, self._pass = start, (len(remaining), iterator)
        return iterator


class IndexSampler(Sampler[int], abc.ABC):
    """Base class of the index samplers: sharding, epochs and exact mid-epoch resumption.

    Subclasses implement :meth:`_global_order` (the epoch's order on all ranks, an int64
    array) and, if they hold state beyond ``(seed, epoch, position)``, the hooks
    :meth:`_extra_state` / :meth:`_load_extra_state`.

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
    ) -> None:
        self.n = dataset_length(data)
        self.seed = check_seed(seed)
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.drop_last = check_bool(drop_last, "drop_last")
        self.epoch = 0
        self._cursor = EpochCursor()
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
        return self._cursor.iterate(self.rank_order().tolist())

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly here: plain Python types and tensors."""
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
        """Resume from :meth:`state_dict`; on any mismatch raise ``ValueError`` and change nothing."""
        position = self._check_state(state)
        self._load_extra_state(state)
        self.epoch = state["epoch"]
        self._cursor.move_to(position)
        self._cache = None

    def _check_state(self, state: Any) -> int:
        """Validate ``state`` and return this rank's position in it."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"sampler", "n", "seed", "epoch", "position", "world_size"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict from state_dict()")
        name = type(self).__name__
        if state["sampler"] != name:
            raise ValueError(f"state was saved by {state['sampler']}, not {name}; load it into a {state['sampler']}")
        if state["n"] != self.n:
            raise ValueError(f"state was saved for n={state['n']} examples but this sampler has n={self.n}")
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']}; construct the sampler with seed={state['seed']}")
        if state.get("drop_last", self.drop_last) != self.drop_last:
            raise ValueError(f"state was saved with drop_last={state['drop_last']}; construct the sampler with it")
        check_epoch(state["epoch"])
        position = check_seed(state["position"], "position")
        saved_world = state["world_size"]
        if saved_world != self.world_size:
            if not self.world_size_independent:
                raise ValueError(
                    f"{name}'s order depends on the world size: a state saved at world_size={saved_world} "
                    f"cannot be loaded at world_size={self.world_size}"
                )
            consumed = position * saved_world
            if consumed % self.world_size:
                raise ValueError(
                    f"state was saved at world_size={saved_world} after {consumed} global indices, which "
                    f"world_size={self.world_size} cannot split evenly; resume at an epoch boundary or at a "
                    "multiple of the new world size"
                )
            position = consumed // self.world_size
        self._check_extra_state(state)
        return position

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, seed={self.seed}, epoch={self.epoch}, "
            f"rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last})"
        )
