"""Argument checks shared by the whole package: one rule per kind of argument.

Each check returns the value in its canonical Python type (``int``, ``bool``, ``float``) or
raises ``TypeError`` (wrong type) / ``ValueError`` (wrong value) with a one-line message that
names the argument and says what to pass instead. numpy scalars are accepted wherever the
Python type is; ``bool`` is never accepted as a number.

Seeds are ints in ``[0, 2**64)`` everywhere (the range of a 64-bit key); counts and sizes
that end up in int64 arrays are below ``2**63``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

import numpy as np

__all__ = [
    "FLOAT32_MAX",
    "INT64_LIMIT",
    "SEED_LIMIT",
    "check_bool",
    "check_choice",
    "check_count",
    "check_epoch",
    "check_float32",
    "check_fraction",
    "check_int",
    "check_rank",
    "check_real",
    "check_seed",
    "check_world_size",
]

#: Seeds are ints in ``[0, SEED_LIMIT)``: every 64-bit key.
SEED_LIMIT = 1 << 64
#: Counts, sizes, epochs and positions are below ``INT64_LIMIT`` (they live in int64 arrays).
INT64_LIMIT = 1 << 63
#: The largest float32: a hyperparameter torch stores as float32 (lr, momentum, ...) must not exceed it.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None,
              example: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high)`` (either bound may be left out).

    ``example`` is the value suggested in the message (default: ``low``).

    >>> check_int(3, "depth", low=0, high=8)
    3
    >>> check_int(9, "depth", low=0, high=8)
    Traceback (most recent call last):
    ValueError: depth must be an int in [0, 8), got 9; pass e.g. depth=0
    """
    suggestion = low if example is None else example
    hint = "" if suggestion is None else f"; pass e.g. {name}={suggestion}"
    if low is not None and high is not None:
        wanted = f"an int in [{low}, {high})"
    elif low is not None:
        wanted = f"an int >= {low}"
    elif high is not None:
        wanted = f"an int < {high}"
    else:
        wanted = "an int"
    if not _is_int(value):
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__}){hint}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be {wanted}, got {value}{hint}")
    return value


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed: an int in ``[0, 2**64)``.

    >>> check_seed(3), check_seed(2**64 - 1) == 2**64 - 1
    (3, True)
    >>> check_seed(-1)
    Traceback (most recent call last):
    ValueError: seed must be an int in [0, 2**64), got -1; pass e.g. seed=0
    """
    if not _is_int(seed):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {seed!r} ({type(seed).__name__}); pass e.g. {name}=0")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed}; pass e.g. {name}=0")
    return int(seed)


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """A count or size: an int in ``[minimum, 2**63)``.

    >>> check_count(64, "batch_size")
    64
    >>> check_count(0, "batch_size")
    Traceback (most recent call last):
    ValueError: batch_size must be an int in [1, 2**63), got 0; pass e.g. batch_size=1
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an int in [{minimum}, 2**63), got {value!r} ({type(value).__name__}); "
                        f"pass e.g. {name}={max(minimum, 1)}")
    if not minimum <= value < INT64_LIMIT:
        raise ValueError(f"{name} must be an int in [{minimum}, 2**63), got {value}; pass e.g. {name}={max(minimum, 1)}")
    return int(value)


def check_epoch(epoch: Any, name: str = "epoch") -> int:
    """An epoch number: an int in ``[0, 2**63)``.

    >>> check_epoch(2)
    2
    """
    return check_count(epoch, name, minimum=0)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (a numpy bool too).

    >>> check_bool(True, "drop_last")
    True
    >>> check_bool(1, "drop_last")
    Traceback (most recent call last):
    TypeError: drop_last must be True or False, got 1 (int)
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number within the bounds (closed unless ``low_open``/``high_open``).

    >>> check_real(0.5, "lr", low=0.0, low_open=True)
    0.5
    >>> check_real(float("nan"), "lr")
    Traceback (most recent call last):
    ValueError: lr must be a finite number, got nan
    """
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_float32(value: Any, name: str, *, positive: bool = False) -> float:
    """A finite number ``>= 0`` (``> 0`` if ``positive``) that fits float32, as torch's optimizers store it.

    >>> check_float32(0.5, "lr", positive=True)
    0.5
    >>> check_float32(1e39, "lr", positive=True)
    Traceback (most recent call last):
    ValueError: lr must be a finite number > 0 and <= 3.4e+38 (float32's largest; torch trains in float32), got 1e+39
    """
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not (math.isfinite(number) and (number > 0 if positive else number >= 0) and number <= FLOAT32_MAX):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'} and <= {FLOAT32_MAX:.2g} "
                         f"(float32's largest; torch trains in float32), got {value!r}")
    return number


def check_fraction(value: Any, name: str, *, zero: bool = True, one: bool = True) -> float:
    """A fraction in ``[0, 1]``; ``zero=False`` / ``one=False`` exclude that end.

    >>> check_fraction(0.25, "drop_hardest", one=False)
    0.25
    >>> check_fraction(1.0, "drop_hardest", one=False)
    Traceback (most recent call last):
    ValueError: drop_hardest must be in [0.0, 1.0), got 1.0
    """
    return check_real(value, name, low=0.0, high=1.0, low_open=not zero, high_open=not one)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """One of the string ``choices``.

    >>> check_choice("mean", "balance", ("mean", "pair"))
    'mean'
    >>> check_choice("avg", "balance", ("mean", "pair"))
    Traceback (most recent call last):
    ValueError: balance must be one of 'mean', 'pair', got 'avg'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_world_size(world_size: Any, name: str = "world_size") -> int:
    """A number of processes: an int in ``[1, 2**63)``.

    >>> check_world_size(4)
    4
    """
    return check_count(world_size, name, minimum=1)


def check_rank(rank: Any, world_size: int, name: str = "rank") -> int:
    """A process rank: an int in ``[0, world_size)``.

    >>> check_rank(1, 2)
    1
    >>> check_rank(2, 2)
    Traceback (most recent call last):
    ValueError: rank must be an int in [0, 2) (world_size=2), got 2
    """
    if not _is_int(rank):
        raise TypeError(f"{name} must be an int in [0, {world_size}), got {rank!r} ({type(rank).__name__})")
    if not 0 <= rank < world_size:
        raise ValueError(f"{name} must be an int in [0, {world_size}) (world_size={world_size}), got {rank}")
    return int(rank)
