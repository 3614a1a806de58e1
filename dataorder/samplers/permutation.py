"""Seeded permutations that can be evaluated at any position in O(1) time and memory.

:func:`keyed_permutation` is a Feistel network with cycle-walking, so a source of 10⁹
examples is shuffled without materialising 10⁹ indices; :func:`hash_key` derives the 64-bit
keys from integers (seed, source, pass, ...). Used by the whole-run samplers
(:mod:`dataorder.samplers.mixture`, :mod:`dataorder.samplers.curriculum`).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["hash_key", "keyed_permutation"]

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

    A part is hashed by its 64 bits, so seeds anywhere in ``[0, 2**64)`` give distinct keys.

    >>> int(hash_key(0, 1)[0]) == int(hash_key(0, 1)[0]) != int(hash_key(0, 2)[0])
    True
    """
    columns = np.broadcast_arrays(*(_as_key_part(part) for part in parts))
    table = np.ascontiguousarray(np.stack(columns, axis=1).reshape(-1, len(parts)))
    out = np.empty(len(table), dtype=np.uint64)
    _hash(table, out)
    return out


def _as_key_part(part: int | np.ndarray) -> np.ndarray:
    """``part`` as int64 bit patterns: ints in ``[2**63, 2**64)`` (large seeds) keep their 64 bits.

    >>> _as_key_part(2**64 - 1).tolist(), _as_key_part(5).tolist()
    ([-1], [5])
    """
    if isinstance(part, int):
        if not -(1 << 63) <= part < (1 << 64):
            raise ValueError(f"hash_key parts must fit in 64 bits, got {part}")
        part = part - (1 << 64) if part >= (1 << 63) else part
    array = np.atleast_1d(np.asarray(part))
    return array.view(np.int64) if array.dtype == np.uint64 else array.astype(np.int64)


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
