"""prune(strategy="middle"): the band around the median of the score distribution (perplexity pruning)."""

import numpy as np
import pytest

from dataorder.samplers.curriculum import prune

KNOWN = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0])  # ranks from easiest: 1 6 4 8 2 7 3 5 0 9


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(keep=4), [2, 3, 7, 8]),            # ranks 3..6 of 10
    (dict(keep=0.5), [2, 3, 4, 7, 8]),       # ranks 2..6 (5 of 10: one more on the hard side)
    (dict(keep=1.0), list(range(10))),
    (dict(keep=2, drop_hardest=0.2), [2, 8]),  # 8 remain: ranks 3..4 of them
    (dict(keep=2, higher_is_easier=True), [2, 7]),
])
def test_middle_band_on_a_known_array(kwargs, expected):
    assert prune(KNOWN, strategy="middle", **kwargs).tolist() == expected


def test_middle_keeps_a_contiguous_band_centred_on_the_median():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1001)
    kept = prune(scores, 0.5, strategy="middle")
    inside = np.zeros(scores.size, dtype=bool)
    inside[kept] = True
    assert kept.size == 501
    assert scores[inside].min() > scores[~inside & (scores < np.median(scores))].max()
    assert scores[inside].max() < scores[~inside & (scores > np.median(scores))].min()
    below, above = (scores[~inside] < scores[inside].min()).sum(), (scores[~inside] > scores[inside].max()).sum()
    assert (below, above) == (250, 250)


def test_middle_ties_keep_the_lower_index():
    assert prune([1.0, 1.0, 1.0, 1.0, 1.0], 2, strategy="middle").tolist() == [1, 2]
