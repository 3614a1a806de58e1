"""aggregate and consistency against numpy / scipy on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dataorder.scores.aggregate import aggregate, consistency, spearman_brown

RUNS = np.array([
    [0.1, 0.4, 0.3, 0.9, 0.5, 0.2],
    [0.2, 0.5, 0.1, 0.8, 0.6, 0.3],
    [0.3, 0.1, 0.4, 0.7, 0.9, 0.2],
    [0.0, 0.6, 0.2, 0.9, 0.4, 0.5],
    [0.5, 0.3, 0.2, 0.6, 0.8, 0.1],
])


def test_aggregate_mean_and_median():
    np.testing.assert_allclose(aggregate(RUNS), RUNS.mean(axis=0))
    np.testing.assert_allclose(aggregate(RUNS, how="median"), np.median(RUNS, axis=0))
    assert aggregate([[1.0, math.inf], [3.0, 0.0]]).tolist() == [2.0, math.inf]
    assert aggregate([np.array([1.0, 2.0])]).tolist() == [1.0, 2.0]


@pytest.mark.parametrize(("runs", "how", "message"), [
    (RUNS, "max", "how must be one of"),
    ([1.0, 2.0], "mean", "shape \\(2,\\)"),
    ([[1.0, 2.0], [1.0]], "mean", "equal length"),
])
def test_aggregate_rejects_bad_input(runs, how, message):
    with pytest.raises(ValueError, match=message):
        aggregate(runs, how=how)


def test_consistency_equals_scipy():
    result = consistency(RUNS)
    count = len(RUNS)
    for i in range(count):
        for j in range(count):
            expected_s = 1.0 if i == j else stats.spearmanr(RUNS[i], RUNS[j]).statistic
            expected_k = 1.0 if i == j else stats.kendalltau(RUNS[i], RUNS[j]).statistic
            assert result["pairwise"]["spearman"][i][j] == pytest.approx(expected_s)
            assert result["pairwise"]["kendall"][i][j] == pytest.approx(expected_k)
    pairs = [(i, j) for i in range(count) for j in range(count) if i != j]
    assert result["mean_pairwise"]["spearman"] == pytest.approx(
        np.mean([stats.spearmanr(RUNS[i], RUNS[j]).statistic for i, j in pairs]))
    first, second = RUNS[:2].mean(axis=0), RUNS[2:].mean(axis=0)
    assert result["split_half"]["spearman"] == pytest.approx(stats.spearmanr(first, second).statistic)
    assert result["split_half"]["kendall"] == pytest.approx(stats.kendalltau(first, second).statistic)
    assert [entry["runs"] for entry in result["by_runs"]] == [1, 2]
    two = result["by_runs"][1]
    assert two["spearman"] == pytest.approx(stats.spearmanr(RUNS[:2].mean(0), RUNS[2:4].mean(0)).statistic)
    assert result["runs"] == 5 and result["examples"] == 6


def test_consistency_with_median_aggregation():
    result = consistency(RUNS, how="median")
    expected = stats.kendalltau(np.median(RUNS[:2], 0), np.median(RUNS[2:], 0)).statistic
    assert result["split_half"]["kendall"] == pytest.approx(expected)


def test_identical_runs_agree_perfectly_and_need_one_run():
    result = consistency(np.tile(np.arange(10.0), (4, 1)))
    assert result["mean_pairwise"] == {"spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0)}
    assert result["runs_for_target"] == 1


def test_one_run_and_constant_scores_give_nan():
    single = consistency(RUNS[:1])
    assert math.isnan(single["mean_pairwise"]["spearman"]) and math.isnan(single["split_half"]["kendall"])
    assert single["by_runs"] == [] and single["runs_for_target"] is None
    constant = consistency(np.ones((2, 5)))
    assert math.isnan(constant["pairwise"]["spearman"][0][1])


def test_spearman_brown_predicts_runs_needed():
    assert spearman_brown(0.5, 1) == pytest.approx(0.5)
    assert spearman_brown(0.5, 9) == pytest.approx(0.9)
    noisy = np.random.default_rng(0).normal(size=(4, 200)) + np.linspace(0, 1, 200)
    result = consistency(noisy, target=0.9)
    r = result["mean_pairwise"]["spearman"]
    k = result["runs_for_target"]
    assert spearman_brown(r, k) >= 0.9 > spearman_brown(r, k - 1)
    with pytest.raises(ValueError, match="target"):
        consistency(noisy, target=1.5)


def test_consistency_leaves_out_examples_unscored_in_either_run_only():
    runs = np.array([[np.nan, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 4.0, 3.0], [0.0, 2.0, 1.0, 3.0, np.nan]])
    result = consistency(runs)
    pairwise = np.array(result["pairwise"]["spearman"])
    for i in range(3):
        for j in range(i + 1, 3):
            both = ~(np.isnan(runs[i]) | np.isnan(runs[j]))
            assert math.isclose(pairwise[i, j], stats.spearmanr(runs[i][both], runs[j][both]).statistic)
    assert math.isfinite(result["mean_pairwise"]["spearman"]) and math.isfinite(result["split_half"]["kendall"])
    # fewer than two examples in common: undefined
    assert math.isnan(consistency([[np.nan, 1.0, 2.0], [0.0, np.nan, 2.0]])["pairwise"]["spearman"][0][1])


def test_consistency_validates_how_and_target_even_with_one_run():
    with pytest.raises(ValueError, match="how must be one of"):
        consistency([[1.0, 2.0, 3.0]], how="bogus")
    with pytest.raises(TypeError, match="target must be a real number"):
        consistency(RUNS, target="0.9")
    with pytest.raises(ValueError, match="target must be in"):
        consistency(RUNS, target=float("nan"))


def test_spearman_brown_domain():
    assert math.isnan(spearman_brown(-1.0, 2))          # the formula's pole: undefined
    assert math.isnan(spearman_brown(float("nan"), 2))
    with pytest.raises(ValueError, match="r must be a correlation"):
        spearman_brown(1.5, 2)
    with pytest.raises(ValueError, match="k must be"):
        spearman_brown(0.5, 0)
    with pytest.raises(TypeError, match="r must be a real number"):
        spearman_brown("0.5", 2)


@pytest.mark.parametrize("runs", [[[1 + 2j, 1.0]], [[{}, 1.0]], {"a": 1}])
def test_runs_that_are_not_real_numbers_are_a_one_line_type_error(runs):
    with pytest.raises(TypeError, match="runs must hold real numbers") as info:
        aggregate(runs)
    assert "\n" not in str(info.value)


def test_aggregate_accepts_bfloat16_tensors():
    import torch

    runs = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([3.0, 4.0], dtype=torch.bfloat16)]
    assert aggregate(runs).tolist() == [2.0, 3.0]
