"""CurriculumSampler (pacing, eligibility, coverage, resumption) and prune."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataorder.samplers import StateError
from dataorder.samplers.curriculum import CurriculumSampler, difficulty, prune
from dataorder.schedules import pacing_function

N_EXAMPLES = 50
SCORES = np.random.default_rng(0).permutation(N_EXAMPLES) / 10.0  # distinct, higher = harder
RANK = np.empty(N_EXAMPLES, dtype=np.int64)
RANK[np.argsort(SCORES)] = np.arange(N_EXAMPLES)  # 0 = easiest


def make(**kwargs) -> CurriculumSampler:
    return CurriculumSampler(SCORES, **(dict(num_samples=1000, seed=1) | kwargs))


@pytest.mark.parametrize("pacing", ["linear", "root", "geometric", "step", lambda p: min(1.0, 0.1 + p)])
def test_eligibility_never_exceeds_the_pacing_function(pacing):
    sampler = make(pacing=pacing, start=0.2, full_at=0.8)
    g = pacing_function(pacing, start=0.2, full_at=0.8)
    stream = sampler.stream()
    for i, index in enumerate(stream):
        assert RANK[index] < math.ceil(g(i / 1000) * N_EXAMPLES - 1e-9), (i, index)
    assert RANK[stream[:10]].max() < 0.2 * N_EXAMPLES + 1


def test_passes_visit_their_pool_without_replacement():
    sampler = make(pacing="linear", start=0.2, full_at=0.8)
    stream = sampler.stream()
    position = 0
    while position < 1000:
        pool = sampler.pool_size(position)
        chunk = stream[position:position + pool]
        assert len(set(chunk.tolist())) == len(chunk)
        if len(chunk) == pool:
            assert sorted(RANK[chunk].tolist()) == list(range(pool))  # exactly the easiest `pool`
        position += pool


def test_covers_the_whole_set_after_full_at():
    sampler = make(pacing="root", start=0.3, full_at=0.6)
    stream = sampler.stream()
    first_full = next(i for i in range(1000) if sampler.pool_size(i) == N_EXAMPLES)
    assert 600 <= first_full <= 600 + N_EXAMPLES
    for start in range(first_full, 1000 - N_EXAMPLES + 1, N_EXAMPLES):
        assert sorted(stream[start:start + N_EXAMPLES].tolist()) == list(range(N_EXAMPLES))
    assert set(stream[600:].tolist()) == set(range(N_EXAMPLES))
    assert sampler.eligible(999).tolist() == list(range(N_EXAMPLES))


def test_hard_first_and_higher_is_easier():
    hard = make(order="hard_first", pacing="step", start=0.2, full_at=0.5)
    assert set(hard.stream(0, 10).tolist()) == set(np.argsort(SCORES)[-10:].tolist())
    flipped = CurriculumSampler(-SCORES, num_samples=1000, seed=1, higher_is_easier=True)
    assert flipped.stream().tolist() == make().stream().tolist()


def test_reshuffles_between_passes():
    sampler = make(pacing="step", start=0.2, full_at=0.9)
    stream = sampler.stream()
    passes = [stream[k * 10:(k + 1) * 10].tolist() for k in range(5)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)
    assert len({tuple(p) for p in passes}) == 5


@pytest.mark.parametrize(("consumed", "old", "new"), [(0, 1, 2), (37, 1, 1), (400, 4, 2), (702, 2, 3)])
def test_resume_elastic_identical_stream(consumed, old, new):
    stream = make().stream()
    sampler = make(rank=0, world_size=old)
    iterator = iter(sampler)
    for _ in range(consumed // old):
        next(iterator)
    state = sampler.state_dict()
    rest = []
    for r in range(new):
        resumed = make(rank=r, world_size=new)
        resumed.load_state_dict(state)
        rest.append(list(resumed))
    merged = [index for group in zip(*rest) for index in group]
    assert merged[: 1000 - consumed] == stream[consumed:].tolist()


def test_state_rejects_other_scores():
    state = make().state_dict()
    with pytest.raises(ValueError, match="other scores or pacing"):
        CurriculumSampler(SCORES[::-1].copy(), num_samples=1000, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="other scores or pacing"):
        make(pacing="root").load_state_dict(state)


def test_argument_errors():
    with pytest.raises(ValueError, match="order must be"):
        make(order="random")
    with pytest.raises(ValueError, match="must not be NaN"):
        CurriculumSampler([0.1, float("nan")], num_samples=10)
    with pytest.raises(ValueError, match="num_samples must be an int in"):
        make(num_samples=0)
    with pytest.raises(ValueError, match="pacing must be one of"):
        make(pacing="exp")


# -- prune -----------------------------------------------------------------------------------------
KNOWN = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0])  # example 9 hardest, 1 easiest


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(keep=3), [0, 5, 9]),
        (dict(keep=0.3), [0, 5, 9]),
        (dict(keep=3, drop_hardest=0.1), [0, 3, 5]),
        (dict(keep=3, drop_hardest=0.2), [3, 5, 7]),
        (dict(keep=3, strategy="easiest"), [1, 4, 6]),
        (dict(keep=3, strategy="easiest", drop_hardest=0.2), [1, 4, 6]),
        (dict(keep=8, strategy="easiest", drop_hardest=0.2), [1, 2, 3, 4, 5, 6, 7, 8]),
        (dict(keep=1.0), list(range(10))),
        (dict(keep=2, higher_is_easier=True), [1, 6]),
    ],
)
def test_prune_strategies_on_a_known_array(kwargs, expected):
    assert prune(KNOWN, **kwargs).tolist() == expected


def test_prune_random_is_seeded_and_excludes_the_dropped():
    kept = prune(KNOWN, 5, strategy="random", drop_hardest=0.3, seed=4)
    assert len(kept) == 5 and not {9, 0, 5} & set(kept.tolist())
    assert kept.tolist() == sorted(kept.tolist())
    assert prune(KNOWN, 5, strategy="random", seed=4).tolist() == prune(KNOWN, 5, strategy="random", seed=4).tolist()
    draws = {tuple(prune(KNOWN, 5, strategy="random", seed=s).tolist()) for s in range(10)}
    assert len(draws) > 5


def test_infinite_scores_sort_as_hardest_or_easiest():
    forgetting = [1.0, float("inf"), 0.0, 2.0]  # inf: never learned
    assert prune(forgetting, 1).tolist() == [1]
    assert prune(forgetting, 1, strategy="easiest", drop_hardest=0.25).tolist() == [2]


def test_prune_ties_keep_the_lower_index():
    assert prune([1.0, 1.0, 1.0, 0.0], 2).tolist() == [0, 1]
    assert prune([0.0, 0.0, 0.0, 1.0], 2, strategy="easiest").tolist() == [0, 1]


def test_prune_errors():
    with pytest.raises(ValueError, match="exceed"):
        prune(KNOWN, 9, drop_hardest=0.2)
    with pytest.raises(ValueError, match="keep must be a fraction"):
        prune(KNOWN, 0.0)
    with pytest.raises(ValueError, match="more than the 10"):
        prune(KNOWN, 11)
    with pytest.raises(TypeError, match="keep must be"):
        prune(KNOWN, True)
    with pytest.raises(ValueError, match="strategy must be"):
        prune(KNOWN, 3, strategy="median")
    with pytest.raises(ValueError, match="drop_hardest"):
        prune(KNOWN, 3, drop_hardest=1.0)


def write_scores_file(folder, columns: dict[str, np.ndarray]) -> None:
    """A scores.parquet as the scoring CLI writes it: index, mean columns, per-run columns."""
    n = len(next(iter(columns.values())))
    table = {"index": np.arange(n, dtype=np.int64)}
    for name, values in columns.items():
        table[name] = values
        table[f"{name}_run0"] = values
    pq.write_table(pa.table(table), folder / "scores.parquet")


def test_prune_and_curriculum_read_the_scoring_parquet(tmp_path):
    write_scores_file(tmp_path, {"el2n": KNOWN, "aum": -KNOWN, "datamap_variability": KNOWN})
    assert prune(tmp_path, 3, column="el2n").tolist() == [0, 5, 9]
    # aum: higher = easier, so the file's direction is applied
    assert prune(tmp_path, 3, column="aum").tolist() == [0, 5, 9]
    assert prune(tmp_path / "scores.parquet", 3, column="aum", higher_is_easier=False).tolist() == [1, 4, 6]
    with pytest.raises(ValueError, match="no easy/hard direction"):
        prune(tmp_path, 3, column="datamap_variability")
    with pytest.raises(ValueError, match="several scores"):
        prune(tmp_path, 3)
    sampler = CurriculumSampler(tmp_path, column="el2n", num_samples=40, pacing="step", start=0.3, full_at=0.5)
    assert sorted(sampler.stream(0, 3).tolist()) == [1, 4, 6]
    assert difficulty(tmp_path, column="aum").tolist() == KNOWN.tolist()


def test_single_score_file_needs_no_column(tmp_path):
    write_scores_file(tmp_path, {"forgetting": KNOWN})
    assert prune(tmp_path, 2).tolist() == [0, 9]


def test_seeds_of_64_bits_work_when_iterating():
    # issue 13, failure 4: a seed >= 2**63 was accepted and overflowed only at iter()
    high, low = make(seed=2**64 - 1), make(seed=0)
    assert sorted(set(list(high))) == sorted(set(list(low)))  # the same pools ...
    assert list(high) != list(low)  # ... in another order
    with pytest.raises(ValueError, match="seed"):
        make(seed=2**64)


def test_state_rejects_another_callable_pacing_of_the_same_name():
    # two lambdas share a __qualname__: the state knows a callable by the pools it gives each pass
    gentle, steep = (lambda p: min(1.0, 0.2 + p)), (lambda p: min(1.0, 0.5 + p))
    state = make(pacing=gentle).state_dict()
    make(pacing=gentle).load_state_dict(state)
    with pytest.raises(StateError, match="other scores or pacing settings"):
        make(pacing=steep).load_state_dict(state)


def test_a_state_holds_the_epoch_for_a_loop_that_resumes_every_sampler_alike():
    sampler = make()
    sampler.set_epoch(3)
    state = sampler.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])
    assert resumed.epoch == 3 and list(resumed) == list(sampler)
