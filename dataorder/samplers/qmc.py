"""Quasi-Monte-Carlo data augmentation: each example's random parameters follow a Sobol sequence.

Example ``i`` in epoch ``e`` gets the point ``u = sobol[e] XOR shift[i]`` of ``[0, 1)^dim``:
``sobol`` is one Owen-scrambled Sobol sequence (:class:`scipy.stats.qmc.Sobol`) drawn from
the seed, and ``shift[i]`` a random digital shift hashed from ``(seed, i)``. A digital shift
keeps every block of ``2^m`` consecutive points a ``(t, m, d)``-net, so each example's
points over epochs are a randomised QMC sequence of its own, while the shifts make the
points of different examples independent and each one uniform. Nothing depends on a
counter, so DataLoader workers, ranks and resumption never change a point.

Reference: Lu, Meng, De Sa, "A General Analysis of Example-Selection for Stochastic
Gradient Descent" (ICLR 2022), which drives augmentation with QMC points.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sized
from typing import Any

import numpy as np
from scipy.stats import qmc
from torch.utils.data import Dataset

from dataorder._validate import check_bool, check_choice, check_count, check_epoch, check_seed
from dataorder.samplers._state import StateReader, refuse_unknown_fields

__all__ = [
    "QMCAugment",
    "SOBOL_MAX_DIM",
    "choose",
    "crop_offset",
    "digital_shifts",
    "flip_coin",
    "hash_uniform",
    "rotation_angle",
    "sobol_point",
]

#: Largest dimension scipy's Sobol generator supports; beyond it QMCAugment falls back to i.i.d.
SOBOL_MAX_DIM = qmc.Sobol.MAXDIM
BITS = 30  # scipy's default Sobol precision; points are multiples of 2**-30
METHODS = ("sobol", "random")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SOBOL_TAG, _SHIFT_TAG, _RANDOM_TAG = 0x51, 0x5E, 0xAD
_SCALAR_DIM = 64  # up to this dim, one example's point is hashed with Python ints


# -- counter-based hashing: pure functions of their keys --------------------------------------
def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash(*keys: np.ndarray | int, dim: int) -> np.ndarray:
    """uint64 hashes of ``keys`` (broadcast over their leading shape) and coordinates ``0..dim-1``."""
    z = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            z = _mix(z * _GOLDEN + np.asarray(key, dtype=np.uint64) + np.uint64(1))
        coords = np.arange(1, dim + 1, dtype=np.uint64) * _GOLDEN
        return _mix(z[..., None] ^ coords)


_MASK = (1 << 64) - 1
_GOLDEN_INT = int(_GOLDEN)


def _mix_int(z: int) -> int:
    """:func:`_mix` on one Python int: much faster than numpy for a single example."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _hash_int(*keys: int, dim: int) -> list[int]:
    """:func:`_hash` of scalar keys, as Python ints (the same values)."""
    z = 0
    for key in keys:
        z = _mix_int((z * _GOLDEN_INT + key + 1) & _MASK)
    return [_mix_int(z ^ ((j * _GOLDEN_INT) & _MASK)) for j in range(1, dim + 1)]


def digital_shifts(seed: int, indices: np.ndarray, dim: int) -> np.ndarray:
    """Per-example random digital shifts: ``BITS``-bit integers, shape ``(len(indices), dim)``.

    >>> digital_shifts(0, np.array([3]), 2).tolist() == digital_shifts(0, np.array([3]), 2).tolist()
    True
    """
    return (_hash(seed, _SHIFT_TAG, indices, dim=dim) >> np.uint64(64 - BITS)).astype(np.uint64)


def hash_uniform(seed: int, indices: np.ndarray, epoch: int, dim: int) -> np.ndarray:
    """I.i.d.-looking uniform points in ``[0, 1)``: a pure function of ``(seed, i, epoch, coordinate)``.

    >>> u = hash_uniform(0, np.arange(1000), epoch=0, dim=2)
    >>> u.shape, bool(0 <= u.min() and u.max() < 1), round(float(u.mean()), 1)
    ((1000, 2), True, 0.5)
    """
    bits = _hash(seed, _RANDOM_TAG, np.asarray(indices), epoch, dim=dim) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0**-53


def sobol_point(seed: int, index: int, dim: int, scramble: bool = True) -> np.ndarray:
    """Point ``index`` of the Sobol sequence of ``seed`` as ``BITS``-bit integers, shape ``(dim,)``.

    ``scramble=True``: Owen-scrambled (LMS + digital shift) with a generator drawn from
    ``seed``; ``scramble=False``: the plain Sobol sequence (point 0 is all zeros).

    >>> sobol_point(0, 0, 2, scramble=False).tolist()
    [0, 0]
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SOBOL_TAG])) if scramble else None
    engine = qmc.Sobol(dim, scramble=scramble, bits=BITS, rng=rng)
    if index:
        engine.fast_forward(index)
    return np.rint(engine.random(1)[0] * 2.0**BITS).astype(np.uint64)


# -- mapping coordinates to augmentation parameters ------------------------------------------
def choose(u: float | np.ndarray, k: int) -> int | np.ndarray:
    """One of ``k`` options, each with probability ``1/k``: ``floor(u * k)``.

    >>> choose(0.0, 3), choose(0.5, 3), choose(0.999, 3)
    (0, 1, 2)
    """
    k = check_count(k, "k")
    value = np.minimum(np.floor(np.asarray(u, dtype=np.float64) * k), k - 1).astype(np.int64)
    return int(value) if value.ndim == 0 else value


def crop_offset(u: float | np.ndarray, size: int, crop: int) -> int | np.ndarray:
    """Offset of a ``crop``-long window in a ``size``-long axis, uniform over ``0..size-crop``.

    >>> crop_offset(0.0, 32, 28), crop_offset(0.99, 32, 28)
    (0, 4)
    """
    if not 0 < crop <= size:
        raise ValueError(f"crop must be in [1, size={size}], got {crop}")
    return choose(u, size - crop + 1)


def flip_coin(u: float | np.ndarray, p: float = 0.5) -> bool | np.ndarray:
    """True with probability ``p``: ``u < p``.

    >>> flip_coin(0.3), flip_coin(0.7), flip_coin(0.7, p=0.8)
    (True, False, True)
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    value = np.asarray(u) < p
    return bool(value) if value.ndim == 0 else value


def rotation_angle(u: float | np.ndarray, degrees: float) -> float | np.ndarray:
    """An angle uniform in ``[-degrees, degrees)``.

    >>> rotation_angle(0.0, 15), rotation_angle(0.5, 15)
    (-15.0, 0.0)
    """
    if degrees < 0:
        raise ValueError(f"degrees must be >= 0, got {degrees}")
    value = (2.0 * np.asarray(u, dtype=np.float64) - 1.0) * degrees
    return float(value) if value.ndim == 0 else value


# -- the dataset wrapper ----------------------------------------------------------------------
class QMCAugment(Dataset):
    """Wrap a map-style dataset so that item ``i`` is ``transform(dataset[i], u)``.

    ``u`` (a float64 array of ``dim`` coordinates in ``[0, 1)``) is point ``epoch`` of
    example ``i``'s randomised Sobol sequence: consecutive epochs take consecutive points,
    and ``u`` is a pure function of ``(seed, i, epoch)``. Call :meth:`set_epoch` before
    each epoch, as with ``DistributedSampler``; DataLoader workers receive the epoch when
    the loader's iterator is created (so use ``persistent_workers=False``).

    ``method="random"`` draws ``u`` i.i.d. from a hash of ``(seed, i, epoch)`` instead: the
    baseline to compare against, with the same purity. Dimensions beyond
    :data:`SOBOL_MAX_DIM` fall back to it with a warning. ``scramble=False`` uses the
    plain Sobol sequence, identical for every example (``u`` is all zeros at epoch 0).

    Example::

        >>> data = [10.0, 20.0, 30.0]
        >>> augmented = QMCAugment(data, lambda x, u: x + u[0], dim=1, seed=0)
        >>> first = [augmented[i] for i in range(3)]
        >>> augmented.set_epoch(1)
        >>> [augmented[i] for i in range(3)] != first
        True
        >>> augmented.set_epoch(0)
        >>> [augmented[i] for i in range(3)] == first
        True
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any, np.ndarray], Any],
        dim: int,
        *,
        seed: int = 0,
        scramble: bool = True,
        method: str = "sobol",
    ) -> None:
        if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be map-style (with __len__ and __getitem__), got {type(dataset).__name__}")
        if not callable(transform):
            raise TypeError(f"transform must be callable as transform(sample, u), got {type(transform).__name__}")
        dim = check_count(dim, "dim")
        check_choice(method, "method", METHODS)
        self.dataset, self.transform, self.dim = dataset, transform, dim
        self.seed = check_seed(seed)
        self.scramble = check_bool(scramble, "scramble")
        self.method = method
        if method == "sobol" and self.dim > SOBOL_MAX_DIM:
            warnings.warn(
                f"dim={self.dim} exceeds the Sobol limit of {SOBOL_MAX_DIM}; QMCAugment falls back to "
                "i.i.d. points hashed from (seed, i, epoch)", UserWarning, stacklevel=2,
            )
            self.method = "random"
        self.epoch = 0
        self._base: tuple[int, np.ndarray, list[int]] | None = None  # (epoch, Sobol point, as ints)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, i.e. which point of each example's sequence ``__getitem__`` uses."""
        self.epoch = self._check_epoch(check_epoch(epoch))

    def _check_epoch(self, epoch: int) -> int:
        if self.method == "sobol" and epoch >= 2**BITS:
            raise ValueError(f"epoch must be below 2**{BITS} for a Sobol sequence of {BITS} bits, got {epoch}; "
                             "use method='random' for longer runs")
        return epoch

    def _base_point(self, epoch: int) -> np.ndarray:
        if self._base is None or self._base[0] != epoch:
            self._check_epoch(epoch)
            point = sobol_point(self.seed, epoch, self.dim, self.scramble)
            self._base = (epoch, point, point.tolist())
        return self._base[1]

    def points(self, indices: Any, epoch: int | None = None) -> np.ndarray:
        """The points of examples ``indices`` at ``epoch`` (default: the current one), ``(len, dim)``.

        >>> QMCAugment([0, 1], lambda x, u: x, dim=3).points([0, 1]).shape
        (2, 3)
        """
        epoch = self.epoch if epoch is None else check_epoch(epoch)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.dataset)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"indices must be in [0, {n}), got values from {indices.min()} to {indices.max()}")
        if self.method == "random":
            return hash_uniform(self.seed, indices, epoch, self.dim)
        base = self._base_point(epoch)
        if self.scramble:
            base = base ^ digital_shifts(self.seed, indices, self.dim)
        return np.broadcast_to(base, (indices.size, self.dim)).astype(np.float64) * 2.0**-BITS

    def point(self, index: int, epoch: int | None = None) -> np.ndarray:
        """The point of example ``index`` at ``epoch`` (default: the current one), shape ``(dim,)``.

        The same values as :meth:`points`, computed with Python ints for small ``dim``
        (numpy's per-call overhead dominates for one example).
        """
        epoch = self.epoch if epoch is None else check_epoch(epoch)
        if self.dim > _SCALAR_DIM or not 0 <= index < len(self.dataset):
            return self.points([index], epoch)[0]
        if self.method == "random":
            hashes = _hash_int(self.seed, _RANDOM_TAG, index, epoch, dim=self.dim)
            return np.array([h >> 11 for h in hashes], dtype=np.float64) * 2.0**-53
        self._base_point(epoch)
        base = self._base[2]
        if self.scramble:
            shifts = _hash_int(self.seed, _SHIFT_TAG, index, dim=self.dim)
            base = [b ^ (h >> (64 - BITS)) for b, h in zip(base, shifts)]
        return np.array(base, dtype=np.float64) * 2.0**-BITS

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        index = int(index) % n
        return self.transform(self.dataset[index], self.point(index))

    def state_dict(self) -> dict[str, Any]:
        """The epoch (points are a pure function of it), and what checks a matching wrapper."""
        return {"sampler": type(self).__name__, "epoch": self.epoch, "seed": self.seed, "dim": self.dim,
                "method": self.method, "scramble": self.scramble}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch.

        A state this wrapper's ``state_dict()`` could not have produced (another class, other
        settings, a missing or corrupt field) raises a
        :class:`~dataorder.samplers._state.StateError` naming the field and changes nothing.
        """
        reader = StateReader(state, type(self).__name__)
        for key in ("seed", "dim", "method", "scramble"):
            reader.same(key, getattr(self, key))
        epoch = reader.int("epoch", high=2**BITS - 1 if self.method == "sobol" else None)
        refuse_unknown_fields(state, self.state_dict(), type(self).__name__)
        self.epoch = epoch

    def __repr__(self) -> str:
        return (f"QMCAugment(n={len(self.dataset)}, dim={self.dim}, method={self.method!r}, seed={self.seed}, "
                f"scramble={self.scramble}, epoch={self.epoch})")
