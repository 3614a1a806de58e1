"""Gradient balancing kernels: mean (GraB), pair (CD-GraB) and recursive balance.

Balancing assigns each vector ``c`` of a stream a sign ``ε ∈ {+1, -1}`` so that the running
signed sum ``s = Σ ε c`` stays small (``ε = +1`` iff ``⟨s, c⟩ ≤ 0``). GraB (Lu, Guo, De Sa,
NeurIPS 2022) turns the signs into the next epoch's order: ``+1`` examples go to the front in
visiting order, ``-1`` examples to the back in reverse visiting order.

The kernels are split in three layers so that each can be reused on its own (a ghost
variant computes the same scalars without per-example gradients; a distributed variant runs
the same deterministic host recursion on every rank):

1. device products -- :func:`balance_products`: ``[S; C] @ C.T``, i.e. the inner products of
   the running sums ``S`` with every row and the batch's Gram matrix, with **one**
   device→host transfer;
2. host recursions on float64 scalars (numba) -- :func:`mean_balance_signs`,
   :func:`pair_balance_signs`, :func:`recursive_balance_signs`: the sequential sign choices,
   with the running sums updated implicitly through the Gram matrix;
3. device update -- :func:`apply_signs`: ``S += W @ C`` in one matrix product, the weights
   uploaded without blocking (so a step waits for the device once, in layer 1);

plus the pure order bookkeeping :func:`reorder` and the offline herding order
:func:`herding_order`. No layer issues device work per example.

On the CPU there is no device to keep busy, and the Gram matrix costs ``B²k`` flops against
``2Bk`` for visiting the rows once: :func:`tree_balance_rows` and :func:`pair_balance_rows`
run the same recursions fused over the rows themselves (one pass, dots in float64).

>>> import torch
>>> rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
>>> sums = torch.zeros(1, 2)
>>> products, _ = balance_products(rows, sums)       # (1 + B, B) float64 on the host
>>> signs = mean_balance_signs(products[1:], products[0])
>>> signs.tolist()
[1, -1, 1, -1]
>>> apply_signs(sums, rows, signs[None])
>>> sums.tolist()
[[0.0, 0.0]]
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from dataorder._device import download, upload

__all__ = [
    "apply_signs",
    "balance_products",
    "herding_order",
    "mean_balance_signs",
    "pair_balance_rows",
    "pair_balance_signs",
    "pair_row_weights",
    "recursive_balance_signs",
    "reorder",
    "tree_balance_rows",
    "tree_buckets",
    "tree_size",
]


# -- layer 1: device products ----------------------------------------------------------------
def balance_products(rows: Tensor, sums: Tensor, watched: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``[sums; rows] @ rows.T`` as a float64 host array of shape ``(N + B, B)``, and the peaks of ``watched``.

    ``rows`` is ``(B, k)`` (the batch's centred vectors), ``sums`` is ``(N, k)`` (the running
    sums, ``N = 1`` for mean and pair balance). Row ``v < N`` holds ``⟨sums[v], rows[i]⟩``;
    rows ``N:`` are the Gram matrix. The products cost ``O(B²k)`` on the device; the small
    results are joined there and cross to the host in **one** transfer (joining the inputs
    instead would copy the ``B × k`` rows). The peaks are each row's largest magnitude of
    ``watched`` (``(M, k)``, by default ``sums``), from which the rules bound their update
    without a second transfer.

    >>> products, peaks = balance_products(torch.eye(2), torch.ones(1, 2))
    >>> products.tolist(), peaks.tolist()
    ([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], [1.0])
    """
    watched = sums if watched is None else watched
    products = torch.cat([sums.to(rows.dtype) @ rows.T, rows @ rows.T])
    packed = download(torch.cat([products.reshape(-1), watched.abs().amax(dim=1).to(rows.dtype)]))
    return packed[:products.numel()].reshape(products.shape), packed[products.numel():]


# -- layer 2: host recursions ----------------------------------------------------------------
@numba.njit(cache=True)
def mean_balance_signs(gram: np.ndarray, s_dot: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """Signs of mean balance for one batch: ``ε_i = +1`` iff ``⟨s, c_i⟩ ≤ 0``, then ``s += ε_i c_i``.

    ``gram[i, j] = ⟨c_i, c_j⟩`` and ``s_dot[i] = ⟨s, c_i⟩`` for the running sum ``s`` before the
    batch; the updates of ``s`` inside the batch are carried through ``gram``. Returns int8
    ``(B,)``. O(B²) float64 scalar work.

    >>> import numpy as np
    >>> mean_balance_signs(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([0.0, 0.0])).tolist()
    [1, -1]
    """
    size = s_dot.shape[0]
    signs = np.empty(size, dtype=np.int8)
    dots = s_dot.astype(np.float64).copy()
    for i in range(size):
        sign = 1 if dots[i] <= 0.0 else -1
        signs[i] = sign
        for j in range(i + 1, size):
            dots[j] += sign * gram[i, j]
    return signs


@numba.njit(cache=True)
def pair_balance_signs(gram: np.ndarray, s_dot: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """Signs of pair balance: rows ``(0, 1), (2, 3), ...`` give ``z = c_a - c_b``, balanced as above.

    ``ε = +1`` (``⟨s, z⟩ ≤ 0``) sends ``a`` to the front and ``b`` to the back; ``-1`` the
    reverse. Returns int8 ``(B // 2,)``; an odd last row is left unpaired (the caller carries
    it to the next batch).

    >>> import numpy as np
    >>> gram = np.eye(4); gram[0, 2] = gram[2, 0] = 1.0
    >>> pair_balance_signs(gram, np.zeros(4)).tolist()
    [1, -1]
    """
    pairs = s_dot.shape[0] // 2
    signs = np.empty(pairs, dtype=np.int8)
    dots = np.empty(pairs, dtype=np.float64)
    for i in range(pairs):
        dots[i] = s_dot[2 * i] - s_dot[2 * i + 1]
    for i in range(pairs):
        sign = 1 if dots[i] <= 0.0 else -1
        signs[i] = sign
        a, b = 2 * i, 2 * i + 1
        for j in range(i + 1, pairs):
            c, d = 2 * j, 2 * j + 1
            dots[j] += sign * (gram[a, c] - gram[a, d] - gram[b, c] + gram[b, d])
    return signs


@numba.njit(cache=True)
def recursive_balance_signs(gram: np.ndarray, node_dots: np.ndarray, depth: int):  # pragma: no cover - numba
    """Signs of recursive balance on a tree of running sums of depth ``depth``.

    The tree is stored as a heap (node ``v`` has children ``2v+1`` for ``+1`` and ``2v+2`` for
    ``-1``; ``tree_size(depth)`` nodes). Each vector is balanced against the root's sum, then
    against the sum of the child its sign selects, down to a leaf (Wei, Guo, De Sa et al.
    2023). ``node_dots[v, i] = ⟨S_v, c_i⟩`` before the batch.

    Returns ``(signs, weights)``: int8 ``(B, depth + 1)`` signs along each path, and float64
    ``(N, B)`` weights with ``weights[v, i] = ε`` if vector ``i`` was added to node ``v``, so
    that ``S += weights @ C`` applies the batch. Depth 0 is mean balance.

    >>> import numpy as np
    >>> signs, weights = recursive_balance_signs(np.eye(2), np.zeros((3, 2)), 1)
    >>> signs.tolist(), weights[:, 0].tolist()
    ([[1, 1], [1, 1]], [1.0, 1.0, 0.0])
    """
    nodes, size = node_dots.shape
    signs = np.empty((size, depth + 1), dtype=np.int8)
    weights = np.zeros((nodes, size), dtype=np.float64)
    for i in range(size):
        node = 0
        for level in range(depth + 1):
            dot = node_dots[node, i]
            for j in range(i):
                weight = weights[node, j]
                if weight != 0.0:
                    dot += weight * gram[j, i]
            sign = 1 if dot <= 0.0 else -1
            signs[i, level] = sign
            weights[node, i] = sign
            node = 2 * node + (1 if sign > 0 else 2)
    return signs, weights


def tree_size(depth: int) -> int:
    """Number of running sums in a recursive-balance tree of ``depth`` (``2**(depth+1) - 1``).

    >>> tree_size(0), tree_size(2)
    (1, 7)
    """
    return 2 ** (depth + 1) - 1


def tree_buckets(signs: np.ndarray) -> np.ndarray:
    """Bucket of each example from its path signs ``(B, D + 1)``: the path read as binary (−1 → 1).

    Buckets ascend left to right through the tree, so :func:`reorder` with these buckets
    lists each leaf's ``+1`` examples (visiting order) then its ``-1`` examples (reversed).

    >>> tree_buckets(np.array([[1, 1], [1, -1], [-1, 1]], dtype=np.int8)).tolist()
    [0, 1, 2]
    """
    bits = (np.asarray(signs) < 0).astype(np.int64)
    if bits.shape[1] == 1:  # mean balance: the bucket is the one bit
        return bits[:, 0]
    powers = 2 ** np.arange(bits.shape[1] - 1, -1, -1, dtype=np.int64)
    return bits @ powers


def pair_row_weights(signs: np.ndarray, rows: int) -> np.ndarray:
    """Per-row weights ``(rows,)`` of pair signs: ``+ε`` for the first of each pair, ``-ε`` for the second.

    An unpaired last row gets weight 0.

    >>> pair_row_weights(np.array([1, -1], dtype=np.int8), 5).tolist()
    [1.0, -1.0, -1.0, 1.0, 0.0]
    """
    weights = np.zeros(rows, dtype=np.float64)
    pairs = len(signs)
    weights[0:2 * pairs:2] = signs
    weights[1:2 * pairs:2] = -np.asarray(signs, dtype=np.float64)
    return weights


# -- layer 3: device update -----------------------------------------------------------------
def apply_signs(sums: Tensor, rows: Tensor, weights: np.ndarray) -> None:
    """``sums += weights @ rows`` in place: one matrix product on the rows' device.

    ``sums`` is ``(N, k)``, ``rows`` ``(B, k)``, ``weights`` ``(N, B)`` (signs or 0); the
    weights are uploaded without waiting (:func:`dataorder._device.upload`).

    >>> sums = torch.zeros(1, 2)
    >>> apply_signs(sums, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), np.array([[1, -1]]))
    >>> sums.tolist()
    [[-2.0, -2.0]]
    """
    sums.addmm_(upload(np.asarray(weights, dtype=np.float32), rows.device, sums.dtype), rows.to(sums.dtype))


# -- fused host path (CPU rows) --------------------------------------------------------------
#: Reductions may be reordered (SIMD), but NaN and inf keep their meaning: the kernels detect them.
_SIMD = {"reassoc", "contract"}


@numba.njit(cache=True, fastmath=_SIMD)
def all_finite(values):  # pragma: no cover - numba
    """Whether every entry of a contiguous array is finite, in one SIMD pass (~10x a torch reduction's speed).

    ``x - x`` is 0 for a finite ``x`` and NaN for NaN or inf, so the sum is 0 iff all are finite.

    >>> import numpy as np
    >>> all_finite(np.zeros((2, 3), np.float32)), all_finite(np.array([1.0, np.inf])), all_finite(np.zeros(0))
    (True, False, True)
    """
    flat = values.reshape(-1)
    total = 0.0
    for t in range(flat.size):
        total += np.float64(flat[t] - flat[t])
    return total == 0.0


@numba.njit(cache=True, fastmath=_SIMD)
def tree_balance_rows(rows, mean, sums, next_sum, depth):  # pragma: no cover - numba
    """Mean (``depth=0``) or recursive balance straight over CPU ``rows`` ``(B, k)``, in one pass.

    Centres each row by ``mean``, adds it to ``next_sum``, and walks the tree of ``sums``
    ``(tree_size(depth), k)`` as :func:`recursive_balance_signs` does, updating ``sums`` and
    ``next_sum`` **in place** (pass copies to keep the originals). Dots accumulate in float64.
    Returns ``(paths, ok)``: int8 ``(B, depth + 1)`` signs, and ``False`` as soon as a dot is
    not finite (a NaN or inf in ``rows``), leaving the outputs partly updated, or when
    ``sums`` or ``next_sum`` end holding a NaN or inf (an overflow): ``ok`` then means the
    outputs are finite, and the caller needs no check of its own.

    >>> import numpy as np
    >>> sums, next_sum = np.zeros((1, 2)), np.zeros(2)
    >>> paths, ok = tree_balance_rows(np.array([[1.0, 0.0], [1.0, 0.0]]), np.zeros(2), sums, next_sum, 0)
    >>> paths[:, 0].tolist(), ok, sums.tolist(), next_sum.tolist()
    ([1, -1], True, [[0.0, 0.0]], [2.0, 0.0])
    >>> huge = np.full((2, 1), 3e38, dtype=np.float32)       # finite dots, but next_sum overflows
    >>> tree_balance_rows(huge, np.zeros(1, np.float32), np.zeros((1, 1), np.float32), np.zeros(1, np.float32), 0)[1]
    False
    """
    size, width = rows.shape
    paths = np.empty((size, depth + 1), dtype=np.int8)
    centred = np.empty(width, dtype=sums.dtype)
    for i in range(size):
        dot = 0.0  # the root's dot is taken while centring
        for t in range(width):
            value = rows[i, t]
            next_sum[t] += value
            value = value - mean[t]
            centred[t] = value
            dot += np.float64(sums[0, t]) * np.float64(value)
        node = 0
        for level in range(depth + 1):
            if level > 0:
                dot = 0.0
                for t in range(width):
                    dot += np.float64(sums[node, t]) * np.float64(centred[t])
            if not np.isfinite(dot):
                return paths, False
            sign = 1 if dot <= 0.0 else -1
            paths[i, level] = sign
            for t in range(width):
                sums[node, t] += sign * centred[t]
            node = 2 * node + (1 if sign > 0 else 2)
    return paths, all_finite(sums) and all_finite(next_sum)


@numba.njit(cache=True, fastmath=_SIMD)
def tree_balance_step(rows, acc, depth):  # pragma: no cover - numba
    """One step of mean/recursive balance over CPU ``rows`` on a copy of the rule's buffer, in one call.

    ``acc`` is the rule's ``(1 + tree_size(depth) + 1, k)`` buffer (stale mean, running sums,
    next epoch's sum) and is left unchanged: :func:`tree_balance_rows` runs on a copy.
    Returns ``(new_acc, buckets, ok)``: the updated copy, each row's int16 bucket as
    :func:`tree_buckets` reads its path, and ``ok`` as :func:`tree_balance_rows` gives it.
    One dispatch for the whole step: on a small model the step's cost is its calls.

    >>> import numpy as np
    >>> acc = np.zeros((3, 2))
    >>> new, buckets, ok = tree_balance_step(np.array([[1.0, 0.0], [1.0, 0.0]]), acc, 0)
    >>> buckets.tolist(), ok, new[-1].tolist(), acc[-1].tolist()
    ([0, 1], True, [2.0, 0.0], [0.0, 0.0])
    """
    new = acc.copy()
    nodes = new.shape[0] - 2
    paths, ok = tree_balance_rows(rows, new[0], new[1:1 + nodes], new[1 + nodes], depth)
    size = rows.shape[0]
    buckets = np.zeros(size, dtype=np.int16)
    for i in range(size):
        bucket = 0
        for level in range(depth + 1):
            bucket = 2 * bucket + (1 if paths[i, level] < 0 else 0)
        buckets[i] = bucket
    return new, buckets, ok


@numba.njit(cache=True, fastmath=_SIMD)
def pair_balance_rows(carried, rows, s):  # pragma: no cover - numba
    """Pair balance straight over CPU rows: pairs of ``[carried; rows]``, ``s`` updated in place.

    ``carried`` is ``(0, k)`` or ``(1, k)`` (the first of a pair split across batches). Returns
    ``(signs, ok)`` as :func:`pair_balance_signs` would give, ``ok=False`` on a non-finite dot
    or when ``s`` ends holding a NaN or inf (an overflow).

    >>> import numpy as np
    >>> s = np.zeros(1)
    >>> pair_balance_rows(np.array([[2.0]]), np.array([[1.0], [5.0], [3.0]]), s)[0].tolist(), s.tolist()
    ([1, -1], [-1.0])
    >>> pair_balance_rows(np.zeros((0, 1), np.float32), np.array([[3e38], [-3e38]], np.float32),
    ...                   np.zeros(1, np.float32))[1]                 # the difference overflows float32
    False
    """
    extra = carried.shape[0]
    size, width = extra + rows.shape[0], rows.shape[1]
    pairs = size // 2
    signs = np.empty(pairs, dtype=np.int8)
    diff = np.empty(width, dtype=s.dtype)
    for p in range(pairs):
        a, b = 2 * p, 2 * p + 1
        first = carried[0] if a < extra else rows[a - extra]
        second = rows[b - extra]
        dot = 0.0
        for t in range(width):
            value = first[t] - second[t]
            diff[t] = value
            dot += np.float64(s[t]) * np.float64(value)
        if not np.isfinite(dot):
            return signs, False
        sign = 1 if dot <= 0.0 else -1
        signs[p] = sign
        for t in range(width):
            s[t] += sign * diff[t]
    return signs, all_finite(s)


@numba.njit(cache=True, fastmath=_SIMD)
def pair_balance_step(carried, rows, sums):  # pragma: no cover - numba
    """One step of pair balance over CPU ``rows`` on a copy of the running sum, in one call.

    ``carried`` ``(0 or 1, k)`` is the first of a pair split across steps and ``sums`` the
    rule's ``(1, k)`` running sum, left unchanged. Returns ``(new_sums, buckets, tail, ok)``:
    the updated copy, the int16 bucket of each row of ``[carried; rows]`` (0 front, 1 back,
    -1 for an unpaired last row), that unpaired row as a ``(0 or 1, k)`` copy, and ``ok`` as
    :func:`pair_balance_rows` gives it, also ``False`` for a NaN or inf in the unpaired row.

    >>> import numpy as np
    >>> new, buckets, tail, ok = pair_balance_step(np.zeros((0, 1)), np.array([[2.0], [1.0], [5.0]]), np.zeros((1, 1)))
    >>> new.tolist(), buckets.tolist(), tail.tolist(), ok
    ([[1.0]], [0, 1, -1], [[5.0]], True)
    """
    new = sums.copy()
    signs, ok = pair_balance_rows(carried, rows, new[0])
    total = carried.shape[0] + rows.shape[0]
    buckets = np.full(total, -1, dtype=np.int16)
    for p in range(len(signs)):
        buckets[2 * p] = 1 if signs[p] < 0 else 0  # +1: the first of the pair goes to the front
        buckets[2 * p + 1] = 1 if signs[p] > 0 else 0
    tail = np.empty((total % 2, rows.shape[1]), dtype=sums.dtype)
    if total % 2:
        tail[0] = rows[rows.shape[0] - 1]
        ok = ok and all_finite(tail)
    return new, buckets, tail, ok


# -- order bookkeeping ----------------------------------------------------------------------
def reorder(visited: np.ndarray, buckets: np.ndarray, unvisited: np.ndarray | None = None) -> np.ndarray:
    """The next order from this epoch's visited examples and their buckets.

    Buckets come in ascending order; inside an even bucket examples keep visiting order,
    inside an odd bucket they are reversed. With buckets ``0`` for ``+1`` and ``1`` for
    ``-1`` this is GraB's rule: ``+1`` to the front in visiting order, ``-1`` to the back in
    reverse visiting order. ``unvisited`` examples (an epoch cut short) follow, in their order.

    >>> reorder(np.array([10, 11, 12, 13]), np.array([0, 1, 0, 1]), np.array([14])).tolist()
    [10, 12, 13, 11, 14]
    """
    visited = np.asarray(visited, dtype=np.int64)
    buckets = np.asarray(buckets, dtype=np.int64)
    if visited.shape != buckets.shape:
        raise ValueError(f"visited and buckets must have the same length, got {len(visited)} and {len(buckets)}")
    position = np.arange(len(visited))
    within = np.where(buckets % 2 == 0, position, -position)
    ordered = visited[np.lexsort((within, buckets))]
    if unvisited is None:
        return ordered
    return np.concatenate([ordered, np.asarray(unvisited, dtype=np.int64)])


@numba.njit(cache=True)
def herding_order(vectors: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """Greedy herding order of ``vectors`` ``(n, k)``: each pick minimises ``‖s + v‖``, then ``s += v``.

    ``vectors`` should be centred (mean zero) by the caller. Ties go to the lowest index.
    O(n²·k) time, O(n) extra memory.

    >>> import numpy as np
    >>> herding_order(np.array([[3.0], [-1.0], [-2.0]])).tolist()
    [1, 0, 2]
    """
    n, k = vectors.shape
    norms = np.empty(n, dtype=np.float64)
    for j in range(n):
        acc = 0.0
        for c in range(k):
            acc += vectors[j, c] * vectors[j, c]
        norms[j] = acc
    dots = np.zeros(n, dtype=np.float64)  # <s, v_j>
    taken = np.zeros(n, dtype=np.bool_)
    order = np.empty(n, dtype=np.int64)
    for t in range(n):
        best, best_value = -1, np.inf
        for j in range(n):
            if not taken[j]:
                value = 2.0 * dots[j] + norms[j]  # ‖s + v_j‖² - ‖s‖²
                if value < best_value:
                    best, best_value = j, value
        order[t] = best
        taken[best] = True
        for j in range(n):
            if not taken[j]:
                acc = 0.0
                for c in range(k):
                    acc += vectors[best, c] * vectors[j, c]
                dots[j] += acc
    return order
