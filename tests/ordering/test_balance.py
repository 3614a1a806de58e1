"""The balancing kernels against straightforward per-example reference loops written here."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataorder.ordering.kernels import (
    apply_signs,
    balance_products,
    mean_balance_signs,
    pair_balance_rows,
    pair_balance_step,
    pair_balance_signs,
    pair_row_weights,
    recursive_balance_signs,
    reorder,
    tree_balance_rows,
    tree_balance_step,
    tree_buckets,
    tree_size,
)


# -- references: one vector at a time, the running sums updated explicitly ---------------------
def reference_mean(rows, s):
    s, signs = s.copy(), []
    for c in rows:
        sign = 1 if s @ c <= 0 else -1
        s += sign * c
        signs.append(sign)
    return np.array(signs), s


def reference_pair(rows, s):
    s, signs = s.copy(), []
    for a in range(0, len(rows) - 1, 2):
        z = rows[a] - rows[a + 1]
        sign = 1 if s @ z <= 0 else -1
        s += sign * z
        signs.append(sign)
    return np.array(signs), s


def reference_tree(rows, sums, depth):
    sums, paths = sums.copy(), []
    for c in rows:
        node, path = 0, []
        for _ in range(depth + 1):
            sign = 1 if sums[node] @ c <= 0 else -1
            sums[node] += sign * c
            path.append(sign)
            node = 2 * node + (1 if sign > 0 else 2)
        paths.append(path)
    return np.array(paths), sums


def batched_mean(rows, s, batch):
    """The three layers, batch by batch: products, host signs, device update."""
    sums, signs = torch.from_numpy(s[None].copy()), []
    for start in range(0, len(rows), batch):
        chunk = torch.from_numpy(rows[start:start + batch])
        products, _ = balance_products(chunk, sums)
        step = mean_balance_signs(products[1:], products[0])
        apply_signs(sums, chunk, step[None])
        signs.append(step)
    return np.concatenate(signs), sums[0].numpy()


@pytest.fixture
def rows():
    return np.random.default_rng(0).standard_normal((64, 12))


@pytest.mark.parametrize("batch", [1, 7, 16, 64])
def test_batched_mean_balance_equals_per_example_loop(rows, batch):
    s0 = np.random.default_rng(1).standard_normal(12)
    expected_signs, expected_s = reference_mean(rows, s0)
    signs, s = batched_mean(rows, s0, batch)
    np.testing.assert_array_equal(signs, expected_signs)
    np.testing.assert_allclose(s, expected_s, rtol=1e-10, atol=1e-10)


def test_mean_balance_signs_dtype_and_tie_goes_plus():
    signs = mean_balance_signs(np.zeros((3, 3)), np.zeros(3))
    assert signs.dtype == np.int8 and signs.tolist() == [1, 1, 1]


def test_pair_balance_equals_reference_loop(rows):
    s0 = np.random.default_rng(2).standard_normal(12)
    gram, s_dot = rows @ rows.T, rows @ s0
    expected, expected_s = reference_pair(rows, s0)
    signs = pair_balance_signs(gram, s_dot)
    np.testing.assert_array_equal(signs, expected)
    weights = pair_row_weights(signs, len(rows))
    np.testing.assert_allclose(s0 + weights @ rows, expected_s, atol=1e-10)


def test_pair_balance_odd_rows_leave_the_last_unpaired(rows):
    odd = rows[:9]
    signs = pair_balance_signs(odd @ odd.T, np.zeros(9))
    assert len(signs) == 4
    assert pair_row_weights(signs, 9)[-1] == 0.0


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_recursive_balance_equals_reference_tree(rows, depth):
    sums0 = np.random.default_rng(3).standard_normal((tree_size(depth), 12))
    expected_paths, expected_sums = reference_tree(rows, sums0, depth)
    paths, weights = recursive_balance_signs(rows @ rows.T, sums0 @ rows.T, depth)
    np.testing.assert_array_equal(paths, expected_paths)
    np.testing.assert_allclose(sums0 + weights @ rows, expected_sums, atol=1e-10)
    assert (np.abs(weights).sum(axis=0) == depth + 1).all()  # each row touches one node per level


def test_recursive_depth_zero_is_mean_balance(rows):
    s0 = np.random.default_rng(4).standard_normal(12)
    paths, _ = recursive_balance_signs(rows @ rows.T, (rows @ s0)[None], 0)
    np.testing.assert_array_equal(paths[:, 0], mean_balance_signs(rows @ rows.T, rows @ s0))


def test_balance_products_is_one_matrix_of_sum_dots_and_gram_with_the_watched_peaks():
    rows, sums = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    products, peaks = balance_products(rows, sums)
    assert products.dtype == np.float64 and products.shape == (7, 5)
    np.testing.assert_allclose(products[:2], (sums @ rows.T).numpy())
    np.testing.assert_allclose(products[2:], (rows @ rows.T).numpy())
    np.testing.assert_array_equal(peaks, sums.abs().amax(dim=1).numpy())
    watched = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.0, -0.25], [3.0, 3.0, 3.0]], dtype=torch.float64)
    assert balance_products(rows, sums, watched)[1].tolist() == [4.0, 0.5, 3.0]


def test_apply_signs_accumulates_in_the_sums_dtype():
    sums = torch.zeros(1, 2)
    apply_signs(sums, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16), np.array([[1, 1]]))
    assert sums.dtype == torch.float32 and sums.tolist() == [[4.0, 6.0]]


def test_reorder_plus_front_in_order_minus_back_reversed():
    visited = np.array([5, 6, 7, 8, 9])
    order = reorder(visited, np.array([0, 1, 1, 0, 1]), np.array([1, 0]))
    assert order.tolist() == [5, 8, 9, 7, 6, 1, 0]


def test_reorder_tree_buckets_go_leaf_by_leaf():
    paths = np.array([[-1, 1], [1, -1], [1, 1], [-1, -1], [1, 1]], dtype=np.int8)
    assert tree_buckets(paths).tolist() == [2, 1, 0, 3, 0]
    assert reorder(np.arange(5), tree_buckets(paths)).tolist() == [2, 4, 1, 0, 3]


def test_reorder_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        reorder(np.arange(3), np.zeros(2))


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10**6), depth=st.integers(0, 3), cut=st.floats(0, 1))
def test_reorder_is_a_permutation(n, seed, depth, cut):
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    visited = int(cut * n)
    buckets = rng.integers(0, 2 ** (depth + 1), visited)
    result = reorder(order[:visited], buckets, order[visited:])
    assert sorted(result.tolist()) == list(range(n))
    assert result[visited:].tolist() == order[visited:].tolist()


@pytest.mark.parametrize("depth", [0, 2])
def test_fused_tree_rows_equal_reference_and_accumulate_next_sum(rows, depth):
    rng = np.random.default_rng(5)
    mean, sums0 = rng.standard_normal(12), rng.standard_normal((tree_size(depth), 12))
    expected_paths, expected_sums = reference_tree(rows - mean, sums0, depth)
    sums, next_sum = sums0.copy(), np.ones(12)
    paths, ok = tree_balance_rows(rows, mean, sums, next_sum, depth)
    assert ok
    np.testing.assert_array_equal(paths, expected_paths)
    np.testing.assert_allclose(sums, expected_sums, atol=1e-10)
    np.testing.assert_allclose(next_sum, 1 + rows.sum(axis=0))


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_fused_step_is_the_tree_kernel_on_a_copy_with_buckets(rows, depth):
    rng = np.random.default_rng(7)
    acc = rng.standard_normal((tree_size(depth) + 2, 12))
    before = acc.copy()
    new, buckets, ok = tree_balance_step(rows, acc, depth)
    sums, next_sum = acc[1:-1].copy(), acc[-1].copy()
    paths, expected_ok = tree_balance_rows(rows, acc[0].copy(), sums, next_sum, depth)
    assert ok and expected_ok
    np.testing.assert_array_equal(acc, before)  # the rule's buffer is left as it was
    assert buckets.dtype == np.int16
    np.testing.assert_array_equal(buckets, tree_buckets(paths))
    np.testing.assert_array_equal(new[0], before[0])
    np.testing.assert_array_equal(new[1:-1], sums)
    np.testing.assert_array_equal(new[-1], next_sum)


def test_fused_step_reports_non_finite_rows(rows):
    broken = rows.copy()
    broken[0, 0] = np.nan
    assert not tree_balance_step(broken, np.zeros((3, 12)), 0)[2]


@pytest.mark.parametrize("carry", [0, 1])
def test_fused_pair_rows_equal_reference(rows, carry):
    s0 = np.random.default_rng(6).standard_normal(12)
    expected, expected_s = reference_pair(rows[:31], s0)  # 31 rows: 15 pairs, the last unpaired
    s = s0.copy()
    signs, ok = pair_balance_rows(rows[:carry], rows[carry:31], s)
    assert ok
    np.testing.assert_array_equal(signs, expected)
    np.testing.assert_allclose(s, expected_s, atol=1e-10)


@pytest.mark.parametrize(("carry", "count"), [(0, 31), (1, 31), (0, 30), (1, 30)])
def test_fused_pair_step_is_the_pair_kernel_on_a_copy_with_buckets_and_tail(rows, carry, count):
    from dataorder.ordering.rules import _pair_buckets

    sums = np.random.default_rng(8).standard_normal((1, 12))
    before = sums.copy()
    new, buckets, tail, ok = pair_balance_step(rows[:carry], rows[carry:count], sums)
    expected_sums = sums[0].copy()
    signs, expected_ok = pair_balance_rows(rows[:carry], rows[carry:count], expected_sums)
    assert ok and expected_ok
    np.testing.assert_array_equal(sums, before)  # the rule's sum is left as it was
    np.testing.assert_array_equal(new[0], expected_sums)
    assert buckets.dtype == np.int16
    np.testing.assert_array_equal(buckets, _pair_buckets(signs, count))
    np.testing.assert_array_equal(tail, rows[count - 1:count] if count % 2 else rows[:0])


def test_fused_pair_step_reports_a_non_finite_unpaired_row(rows):
    broken = rows[:3].copy()
    broken[2, 0] = np.inf  # the unpaired last row: no dot of the kernel reads it
    assert not pair_balance_step(rows[:0], broken, np.zeros((1, 12)))[3]
    assert pair_balance_step(rows[:0], rows[:3], np.zeros((1, 12)))[3]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fused_kernels_report_non_finite_rows(rows, bad):
    broken = rows.copy()
    broken[3, 2] = bad
    assert not tree_balance_rows(broken, np.zeros(12), np.zeros((1, 12)), np.zeros(12), 0)[1]
    assert not pair_balance_rows(broken[:0], broken, np.zeros(12))[1]
