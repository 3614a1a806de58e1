"""The state layer shared by every sampler: one cursor, one schema check, one world-size rule.

* :class:`Cursor` -- where a rank is in its current epoch (or run) of items. Items are
  handed out by C-level list iterators, so no Python code runs per item, and the position
  is read off the iterator's length hint.
* :class:`StateReader` -- reads the fields of a ``state_dict`` with their type, range,
  finiteness, dtype and device checked, and refuses a state saved by another sampler
  class or with other settings. Every refusal is a :class:`StateError` naming the field.
* :func:`resume_position` -- the one rule for loading a position saved at another world size.

Samplers load a state into a candidate copy and swap it in only when every field passed,
so a refused state changes nothing.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from dataorder._validate import INT64_LIMIT, SEED_LIMIT

__all__ = ["Cursor", "StateError", "StateReader", "StateTypeError", "check_tensors", "refuse_unknown_fields",
           "resume_position"]

#: Tensor dtypes a sampler's state may hold (no complex, quantized or unsigned wide types).
TENSOR_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.bfloat16, torch.float32, torch.float64})


class StateError(ValueError):
    """A ``load_state_dict`` argument that the sampler's ``state_dict()`` could not have produced.

    >>> issubclass(StateError, ValueError)
    True
    """


class StateTypeError(StateError, TypeError):
    """A state field of the wrong type (a ``StateError`` that is also a ``TypeError``).

    >>> issubclass(StateTypeError, TypeError) and issubclass(StateTypeError, StateError)
    True
    """


# -- the cursor ---------------------------------------------------------------------------------
class Cursor:
    """This rank's position in the current epoch's items, and the iterators that move it.

    A pass starts where the cursor stands: right after :meth:`move_to` (a new epoch, or a
    loaded state) that is the given position, so a state saved after the last item resumes
    with nothing left of the epoch. Once a pass has run to the end, the next pass replays the
    epoch from its start, as torch's samplers do when iterated twice.

    >>> cursor = Cursor()
    >>> iterator = cursor.iterate(3, lambda first: [10, 11, 12][first:]); next(iterator)
    10
    >>> cursor.position
    1
    >>> cursor.move_to(3); list(cursor.iterate(3, lambda first: [10, 11, 12][first:]))
    []
    >>> list(cursor.iterate(3, lambda first: [10, 11, 12][first:]))
    [10, 11, 12]
    """

    def __init__(self) -> None:
        self._start = 0  # position of the active block's first item (or where the next pass starts)
        self._block: tuple[int, Iterator] | None = None  # (items in the block, its iterator)
        self._passed = False  # whether a pass has been started since the last move_to

    @property
    def position(self) -> int:
        """Items handed out so far in this epoch."""
        if self._block is None:
            return self._start
        count, iterator = self._block
        return self._start + count - operator.length_hint(iterator)

    def move_to(self, position: int) -> None:
        """Forget the active pass; the next :meth:`iterate` starts at ``position``."""
        self._start, self._block, self._passed = position, None, False

    def copy(self) -> Cursor:
        """A cursor at the same position with no active pass (for a candidate sampler)."""
        fresh = Cursor()
        fresh.move_to(self.position)
        fresh._passed = self._passed
        return fresh

    def iterate(self, length: int, block_at: Callable[[int], list]) -> Iterator:
        """Items from the current position to ``length``; ``block_at(first)`` lists some from ``first`` on.

        ``block_at`` may return the whole rest of the epoch or a bounded block (then it is
        called again where the block ends); it must return at least one item while
        ``first < length``.
        """
        start = self.position
        if self._passed and start >= length:
            start = 0  # the pass ran to the end: iterating again replays the epoch
        block = block_at(start) if start < length else []
        iterator = iter(block)  # a list iterator: the position is read off its length hint
        self._start, self._block, self._passed = start, (len(block), iterator), True
        if start + len(block) >= length:
            return iterator  # the whole rest in one block: no Python code runs per item
        return self._continue(iterator, start + len(block), length, block_at)

    def _continue(self, iterator: Iterator, first: int, length: int, block_at: Callable[[int], list]) -> Iterator:
        yield from iterator
        while first < length:
            block = block_at(first)
            iterator = iter(block)
            self._start, self._block = first, (len(block), iterator)
            yield from iterator
            first += len(block)


# -- the world-size rule --------------------------------------------------------------------------
def resume_position(position: int, *, saved_world: int, world: int, saved_length: int, length: int,
                    elastic: bool, what: str) -> int:
    """This rank's position for a ``position`` saved by each rank at ``saved_world`` ranks.

    The ranks together had consumed ``position * saved_world`` items of the global order; at
    ``world`` ranks that is ``position * saved_world / world`` each, which must be a whole
    number. A state saved at the end of the epoch (``position == saved_length``) resumes at
    the end (``length``) at any world size. ``elastic=False`` (an order that depends on the
    world size) refuses another world size.

    >>> resume_position(4, saved_world=2, world=4, saved_length=5, length=3, elastic=True, what="X")
    2
    >>> resume_position(5, saved_world=2, world=3, saved_length=5, length=4, elastic=True, what="X")
    4
    """
    if position > saved_length:
        raise StateError(f"state's position={position} is past the end of the epoch ({saved_length} items "
                         f"per rank at world_size={saved_world}); pass a dict from state_dict()")
    if saved_world == world:
        return position
    if not elastic:
        raise StateError(f"{what}'s order depends on the world size: a state saved at world_size={saved_world} "
                         f"cannot be loaded at world_size={world}")
    if position == saved_length:
        return length
    consumed = position * saved_world
    if consumed % world:
        raise StateError(f"state was saved at world_size={saved_world} after {consumed} global items, which "
                         f"world_size={world} cannot split evenly; resume at an epoch boundary or at a multiple "
                         "of the new world size (e.g. a global batch boundary)")
    return consumed // world


# -- the schema check ---------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _same_types(value: Any, expected: Any) -> bool:
    """Whether ``value`` has the types of ``expected`` throughout (any int type for an int)."""
    if _is_int(value) and _is_int(expected):
        return True
    if type(value) is not type(expected):
        return False
    if isinstance(expected, Mapping):
        return all(_same_types(value[k], expected[k]) for k in expected if k in value)  # other keys: not equal
    if isinstance(expected, (list, tuple)):
        return all(_same_types(v, e) for v, e in zip(value, expected))
    return True


def check_tensors(value: Any, name: str = "state") -> None:
    """Refuse tensors no sampler or tracker saves, anywhere in ``value`` (nested dicts, lists, tuples).

    A saved tensor must have one of :data:`TENSOR_DTYPES`, hold data (not the meta device)
    and, if floating point, be finite.

    >>> check_tensors({"sums": torch.zeros(2)})
    >>> check_tensors({"sums": torch.tensor([float("nan")])})
    Traceback (most recent call last):
    dataorder.samplers._state.StateError: state['sums'] holds NaN or inf; the state is corrupt
    """
    if isinstance(value, torch.Tensor):
        if value.dtype not in TENSOR_DTYPES:
            raise StateTypeError(f"{name} has dtype {value.dtype}, which no dataorder state holds; the state is corrupt")
        if value.is_meta or value.device.type == "meta":
            raise StateError(f"{name} is on the meta device (it holds no data); save the state from a real sampler")
        if value.requires_grad:
            raise StateError(f"{name} requires grad, which no dataorder state does; pass state_dict()'s own tensors")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise StateError(f"{name} holds NaN or inf; the state is corrupt")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_tensors(item, f"{name}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            check_tensors(item, f"{name}[{position}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise StateError(f"{name} is {value}; the state is corrupt")


def refuse_unknown_fields(state: Mapping, produced: Mapping, owner: str) -> None:
    """Refuse the fields of ``state`` that ``produced`` (what ``owner.state_dict()`` gives) lacks.

    A misspelled or foreign field would otherwise be ignored silently.

    >>> refuse_unknown_fields({"epoch": 0, "positon": 3}, {"epoch": 0, "position": 0}, "X")
    Traceback (most recent call last):
    dataorder.samplers._state.StateError: state has field ['positon'] that X.state_dict() does not produce; pass a dict from X.state_dict()
    """
    unknown = sorted((key for key in state if key not in produced), key=repr)
    if unknown:
        raise StateError(f"state has field {unknown} that {owner}.state_dict() does not produce; "
                         f"pass a dict from {owner}.state_dict()")


class StateReader:
    """Typed access to a ``state_dict`` that names the field on every refusal.

    The constructor checks that ``state`` is a dict saved by ``owner`` (its ``"sampler"``
    field) and that no tensor inside it is corrupt (:func:`check_tensors`).

    >>> reader = StateReader({"sampler": "X", "epoch": 2, "seed": 0}, "X")
    >>> reader.int("epoch", low=0)
    2
    >>> reader.same("seed", 1)
    Traceback (most recent call last):
    dataorder.samplers._state.StateError: state was saved with seed=0 but this X has seed=1; construct it with seed=0
    """

    def __init__(self, state: Any, owner: str, *, tag: str = "sampler") -> None:
        if not isinstance(state, Mapping):
            raise StateTypeError(f"state must be a dict from {owner}.state_dict(), got {type(state).__name__}")
        self.state, self.owner = state, owner
        saved_by = self.field(tag)  # the class that saved it: "sampler" (a score tracker's: "tracker")
        if saved_by != owner:
            raise StateError(f"state was saved by {saved_by!r}, not {owner}; load it into a {saved_by}"
                             if isinstance(saved_by, str) else f"state's {tag}={saved_by!r} is not a class name")
        check_tensors(state)

    def field(self, key: str) -> Any:
        """The raw value of ``key``; a missing key is a :class:`StateError`."""
        if key not in self.state:
            raise StateError(f"state is missing {key!r}; pass a dict from {self.owner}.state_dict()")
        return self.state[key]

    def has(self, key: str) -> bool:
        """Whether the state holds ``key``."""
        return key in self.state

    def int(self, key: str, *, low: int = 0, high: int | None = None) -> int:
        """``state[key]`` as an int in ``[low, high]`` (``high`` included; default: below 2**63)."""
        value = self.field(key)
        if not _is_int(value):
            raise StateTypeError(f"state's {key} must be an int, got {value!r} ({type(value).__name__})")
        top = INT64_LIMIT - 1 if high is None else high
        if not low <= value <= top:
            raise StateError(f"state's {key}={value} is not in [{low}, {top}]; the state is corrupt")
        return int(value)

    def seed(self, key: str = "seed") -> int:
        """``state[key]`` as a seed in ``[0, 2**64)``."""
        return self.int(key, low=0, high=SEED_LIMIT - 1)

    def bool(self, key: str) -> bool:
        """``state[key]`` as a bool."""
        value = self.field(key)
        if not isinstance(value, (bool, np.bool_)):
            raise StateTypeError(f"state's {key} must be True or False, got {value!r} ({type(value).__name__})")
        return bool(value)

    def str(self, key: str) -> str:
        """``state[key]`` as a str."""
        value = self.field(key)
        if not isinstance(value, str):
            raise StateTypeError(f"state's {key} must be a str, got {value!r} ({type(value).__name__})")
        return value

    def ints(self, key: str, length: int, *, low: int = 0, high: int | None = None) -> np.ndarray:
        """``state[key]`` as an int64 array of ``length`` ints, each in ``[low, high]``."""
        value = self.field(key)
        if not isinstance(value, (list, tuple)) or not all(_is_int(item) for item in value):
            raise StateTypeError(f"state's {key} must be a list of ints, got {type(value).__name__}")
        if len(value) != length:
            raise StateError(f"state's {key} has {len(value)} entries, expected {length}; the state is corrupt")
        top = INT64_LIMIT - 1 if high is None else high
        if any(not low <= item <= top for item in value):
            raise StateError(f"state's {key} has entries outside [{low}, {top}]; the state is corrupt")
        return np.array(value, dtype=np.int64)

    def floats(self, key: str, shape: tuple[int, ...], *, missing: bool = False) -> np.ndarray:
        """``state[key]`` (nested lists of numbers) as a float64 array of ``shape``, all finite.

        ``missing=True`` allows ``None`` entries (returned as NaN: an unknown value).
        """
        value = self.field(key)
        try:
            array = np.array(value, dtype=np.float64)  # None becomes NaN
        except (TypeError, ValueError):
            raise StateTypeError(f"state's {key} must be nested lists of numbers of shape {shape}") from None
        if array.shape != shape:
            raise StateError(f"state's {key} has shape {array.shape}, expected {shape}; the state is corrupt")
        flat = np.array(value, dtype=object).reshape(-1) if array.size else np.zeros(0, dtype=object)
        for item in flat:
            if item is None and missing:
                continue
            if not isinstance(item, numbers.Real) or isinstance(item, (bool, np.bool_)) or not math.isfinite(item):
                raise StateError(f"state's {key} holds {item!r}; expected finite numbers; the state is corrupt")
        return array

    def tensor(self, key: str, dtype: torch.dtype, shape: tuple[int | None, ...]) -> torch.Tensor:
        """``state[key]`` as a CPU tensor of ``dtype`` and ``shape`` (``None``: any length there).

        >>> StateReader({"sampler": "X", "w": torch.zeros(2, 3)}, "X").tensor("w", torch.float32, (None, 3)).shape
        torch.Size([2, 3])
        """
        value = self.field(key)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype:
            got = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise StateTypeError(f"state's {key} must be a {dtype} tensor, got {got}")
        if value.dim() != len(shape) or any(want is not None and want != got for want, got in zip(shape, value.shape)):
            expected = tuple("any" if want is None else want for want in shape)
            raise StateError(f"state's {key} has shape {tuple(value.shape)}, expected {expected}; the state is corrupt")
        return value.cpu()  # check_tensors already refused the meta device

    def same(self, key: str, expected: Any, *, fix: str | None = None) -> None:
        """Refuse the state unless ``state[key] == expected`` (a setting the sampler was built with).

        Containers are compared entry by entry with their types, so ``1.0`` does not stand
        for ``1`` nor ``True`` for ``1`` anywhere inside them. ``fix`` replaces the advice
        "construct it with key=saved" (for a field that is not a constructor argument).
        """
        value = self.field(key)
        if not _same_types(value, expected):
            raise StateTypeError(f"state's {key} must have the types of {expected!r} ({type(expected).__name__}), "
                                 f"got {value!r} ({type(value).__name__})")
        if value != expected:
            raise StateError(f"state was saved with {key}={value!r} but this {self.owner} has {key}={expected!r}; "
                             f"{fix or f'construct it with {key}={value!r}'}")
