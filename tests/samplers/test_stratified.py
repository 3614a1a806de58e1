from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from dataorder.samplers import StateError
from dataorder.samplers.allocation import allocate, bounded_quotas, count_range, largest_remainder
from dataorder.samplers.stratified import StratifiedBatchSampler, encode_strata, merge_moments, stratum_draws


def labels_of(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def batch_counts(labels, batch, strata):
    return np.bincount(np.asarray(labels)[batch], minlength=strata).tolist()


def appearances(batches, n):
    return np.bincount(np.concatenate([np.asarray(b) for b in batches]), minlength=n)


# -- allocation math --------------------------------------------------------------------------
def test_largest_remainder_takes_largest_remainders_then_priority():
    assert largest_remainder(np.array([2.2, 0.7, 0.1]), 3, np.arange(3)).tolist() == [2, 1, 0]
    assert largest_remainder(np.array([4 / 3] * 3), 4, np.array([2, 0, 1])).tolist() == [1, 1, 2]
    assert largest_remainder(np.array([4 / 3] * 3), 4, np.array([1, 2, 0])).tolist() == [1, 2, 1]


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(1, 50), min_size=1, max_size=8), total=st.integers(1, 40), seed=st.integers(0, 9))
def test_largest_remainder_properties(weights, total, seed):
    weights = np.array(weights, dtype=float)
    quotas = total * weights / weights.sum()
    priority = np.random.default_rng(seed).permutation(len(weights))
    counts = largest_remainder(quotas, total, priority)
    assert counts.sum() == total
    assert np.all((counts == np.floor(quotas + 1e-9)) | (counts == np.ceil(quotas - 1e-9)))
    # no stratum that rounded down has a strictly larger remainder than one that rounded up
    remainder = quotas - np.floor(quotas + 1e-9)
    up = counts > np.floor(quotas + 1e-9)
    if up.any() and (~up).any():
        assert remainder[~up].max() <= remainder[up].min() + 1e-9
    least, most = count_range(quotas, total)
    assert np.all((least <= counts) & (counts <= most))


def test_bounded_quotas_caps_and_floors():
    # caps first: stratum 0 is held at its size and the others share the rest in proportion
    assert bounded_quotas(np.array([90.0, 5, 5]), 20, np.ones(3), np.array([10.0, 50, 50])).tolist() == [10, 5, 5]
    # floors next: 0.3 and 0.7 are raised to 1; the rest keep their proportions
    assert bounded_quotas(np.array([90.0, 7, 3]), 10, np.ones(3), np.array([90.0, 7, 3])).tolist() == [8, 1, 1]
    quotas = bounded_quotas(np.array([60.0, 30, 1]), 10, np.ones(3), np.array([60.0, 30, 1]))
    assert quotas[2] == 1.0 and quotas[0] / quotas[1] == pytest.approx(2)


def test_allocate_proportional_gives_every_stratum_a_slot():
    sizes = np.array([90, 7, 3])
    assert allocate(sizes, sizes, 10, np.arange(3), explicit=False).tolist() == [8, 1, 1]
    assert allocate(sizes, sizes, 100, np.arange(3), explicit=False).tolist() == [90, 7, 3]


def test_merge_moments_matches_numpy_variance():
    rng = np.random.default_rng(0)
    codes, values = rng.integers(0, 3, 200), rng.normal(size=200) * np.array([1.0, 2, 3])[rng.integers(0, 3, 200)]
    moments = np.zeros((3, 3))
    for chunk in np.array_split(np.arange(200), 7):
        moments = merge_moments(moments, codes[chunk], values[chunk])
    for h in range(3):
        assert moments[h, 0] == (codes == h).sum()
        assert moments[h, 1] == pytest.approx(values[codes == h].mean())
        assert moments[h, 2] / (moments[h, 0] - 1) == pytest.approx(values[codes == h].var(ddof=1))


def test_encode_strata_kinds():
    codes, labels = encode_strata(torch.tensor([3, 1, 3]))
    assert codes.tolist() == [1, 0, 1] and labels == [1, 3]
    codes, labels = encode_strata([(1, "a"), (0, "b"), (1, "a")])
    assert codes.tolist() == [1, 0, 1] and labels == [(0, "b"), (1, "a")]
    codes, labels = encode_strata([1, "a", 1])  # not comparable: first appearance
    assert codes.tolist() == [0, 1, 0] and labels == [1, "a"]
    with pytest.raises(ValueError, match="1-D"):
        encode_strata(np.zeros((3, 2)))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), per_batch=st.integers(1, 12), batches=st.integers(1, 20), seed=st.integers(0, 99))
def test_stratum_draws_cover_and_never_repeat_within_a_batch(size, per_batch, batches, seed):
    if per_batch > size:
        return
    draws = stratum_draws(size, per_batch, batches, np.random.default_rng(seed))
    assert draws.shape == (batches, per_batch)
    assert all(len(set(row)) == per_batch for row in draws.tolist())
    seen = np.bincount(draws.ravel(), minlength=size)
    total = per_batch * batches
    assert seen.min() >= total // size and seen.max() <= -(-total // size)


# -- per-batch counts -------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, batch_size, allocation, expected", [
    ((6, 3, 3), 4, "proportional", [2, 1, 1]),
    ((90, 7, 3), 10, "proportional", [8, 1, 1]),
    ((10, 5, 3), 6, "equal", [2, 2, 2]),
    ((10, 5, 6), 6, {0: 3, 1: 1, 2: 2}, [3, 1, 2]),
    ((10, 5, 6), 6, {0: 0.5, 1: 1 / 6, 2: 1 / 3}, [3, 1, 2]),
])
def test_every_batch_has_the_allocated_counts(sizes, batch_size, allocation, expected):
    labels = labels_of(sizes)
    sampler = StratifiedBatchSampler(labels, batch_size, allocation=allocation, seed=3)
    assert list(sampler.counts.values()) == expected
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-len(labels) // batch_size)
        assert all(batch_counts(labels, b, len(sizes)) == expected for b in batches)
        assert all(len(set(b)) == batch_size for b in batches)


def test_equal_allocation_ties_are_broken_by_seed_and_epoch():
    labels = labels_of((10, 10, 10))
    winners = set()
    for epoch in range(12):
        sampler = StratifiedBatchSampler(labels, 4, allocation="equal", seed=5)
        sampler.set_epoch(epoch)
        counts = list(sampler.counts.values())
        assert sorted(counts) == [1, 1, 2]
        again = StratifiedBatchSampler(labels, 4, allocation="equal", seed=5)
        again.set_epoch(epoch)
        assert again.counts == sampler.counts
        assert all(batch_counts(labels, b, 3) == counts for b in sampler)
        winners.add(counts.index(2))
    assert winners == {0, 1, 2}


def test_neyman_allocation_follows_sigma_and_changes_only_at_epoch_boundaries():
    rng = np.random.default_rng(0)
    labels = labels_of((20, 20, 20))
    spread = np.array([0.0, 1.0, 4.0])
    values = 10 + rng.standard_normal(60) * spread[labels]
    sampler = StratifiedBatchSampler(labels, 12, allocation="neyman", seed=1)
    assert sampler.counts == {0: 4, 1: 4, 2: 4}  # nothing known yet: proportional
    first = list(sampler)
    sampler.update(np.arange(60), values)
    assert sampler.counts == {0: 4, 1: 4, 2: 4} and list(sampler) == first  # fixed within the epoch
    sampler.set_epoch(1)
    sigma = np.array(list(sampler.sigma.values()))
    assert sigma == pytest.approx([values[labels == h].std(ddof=1) for h in range(3)])
    # reference: n_h ∝ N_h sigma_h = (0, s1, s2) * 20; stratum 0 is raised to 1, the other 11 shared
    quota1 = 11 * sigma[1] / (sigma[1] + sigma[2])
    expected1 = int(np.floor(quota1)) + (quota1 % 1 > (11 - quota1) % 1)
    assert sampler.counts == {0: 1, 1: expected1, 2: 11 - expected1}
    assert all(batch_counts(labels, b, 3) == list(sampler.counts.values()) for b in sampler)
    # a stratum without new values keeps its estimate; the others take this epoch's values
    sampler.update(np.flatnonzero(labels == 1), np.zeros(20))
    sampler.set_epoch(2)
    assert list(sampler.sigma.values()) == [sigma[0], 0.0, sigma[2]]
    assert sampler.counts == {0: 1, 1: 1, 2: 10}


def test_neyman_caps_counts_at_stratum_sizes():
    labels = labels_of((3, 30))
    sampler = StratifiedBatchSampler(labels, 8, allocation="neyman")
    sampler.update(np.arange(33), np.concatenate([[0.0, 100.0, 0.0], np.arange(30) * 0.01]))
    sampler.set_epoch(1)
    assert sampler.counts == {0: 3, 1: 5}


# -- importance weights -----------------------------------------------------------------------
@pytest.mark.parametrize("sizes, batch_size, allocation", [
    ((2, 4, 4), 3, "equal"),
    ((2, 8, 4), 4, {0: 1, 1: 2, 2: 1}),
])
def test_weighted_batch_means_average_exactly_to_the_full_mean(sizes, batch_size, allocation):
    labels = labels_of(sizes)
    values = np.random.default_rng(0).normal(size=len(labels)) + 5 * labels
    sampler = StratifiedBatchSampler(labels, batch_size, allocation=allocation, seed=2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        # every stratum is drawn a whole number of times round in this epoch
        seen = appearances(batches, len(labels))
        assert all(len(set(seen[labels == h])) == 1 for h in range(len(sizes)))
        weighted = [float((sampler.importance_weights(b, torch.float64).numpy() * values[b]).mean()) for b in batches]
        plain = [values[b].mean() for b in batches]
        assert np.mean(weighted) == pytest.approx(values.mean(), abs=1e-12)
        assert abs(np.mean(plain) - values.mean()) > 0.5  # without weights the estimate is biased


def test_weighted_batch_mean_is_unbiased_for_a_single_batch():
    labels = labels_of((3, 5, 12))
    values = np.arange(20.0) ** 1.5
    estimates = []
    for seed in range(1500):
        sampler = StratifiedBatchSampler(labels, 5, allocation="equal", seed=seed)
        batch = next(iter(sampler))
        estimates.append(float((sampler.importance_weights(batch, torch.float64).numpy() * values[batch]).mean()))
    error = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - values.mean()) < 4 * error


def test_weights_are_one_under_exact_proportional_allocation():
    sampler = StratifiedBatchSampler(labels_of((8, 4, 4)), 4)
    assert sampler.stratum_weights() == {0: 1.0, 1: 1.0, 2: 1.0}
    assert sampler.importance_weights(torch.tensor([0, 15])).tolist() == [1.0, 1.0]


# -- coverage, determinism ------------------------------------------------------------------------
def test_proportional_epoch_is_a_stratified_permutation():
    labels = labels_of((8, 4, 4))
    sampler = StratifiedBatchSampler(labels, 4, seed=7)
    batches = list(sampler)
    assert sorted(np.concatenate(batches).tolist()) == list(range(16))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), batch=st.integers(1, 8),
       equal=st.booleans(), drop_last=st.booleans(), seed=st.integers(0, 50))
def test_coverage_follows_the_documented_rule(sizes, batch, equal, drop_last, seed):
    labels = labels_of(sizes)
    try:
        sampler = StratifiedBatchSampler(labels, batch, allocation="equal" if equal else "proportional",
                                         seed=seed, drop_last=drop_last)
    except ValueError:
        return  # an allocation the sampler refuses (tested separately)
    batches = list(sampler)
    assert len(batches) == (len(labels) // batch if drop_last else -(-len(labels) // batch))
    seen = appearances(batches, len(labels))
    for h, count in enumerate(sampler.counts.values()):
        draws = count * len(batches)
        assert seen[labels == h].max() <= -(-draws // sizes[h])
        assert seen[labels == h].min() >= draws // sizes[h]
    assert all(len(set(b)) == batch for b in batches)


# -- resumption -------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["proportional", "equal", "neyman"])
def test_state_dict_resumes_mid_epoch(allocation):
    labels = labels_of((13, 7, 5))
    values = np.random.default_rng(1).normal(size=25) * (1 + labels)
    sampler = StratifiedBatchSampler(labels, 6, allocation=allocation, seed=4)
    sampler.update(np.arange(25), values)
    sampler.set_epoch(1)
    reference = list(sampler)
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(2)]
    sampler.update(np.arange(10), values[:10])
    state = sampler.state_dict()
    revived = StratifiedBatchSampler(labels, 6, allocation=allocation, seed=4)
    revived.load_state_dict(state)
    revived.set_epoch(1)  # a training loop's set_epoch at the same epoch keeps the position
    assert taken + list(revived) == reference
    sampler.set_epoch(2)
    revived.set_epoch(2)
    assert revived.counts == sampler.counts and list(revived) == list(sampler)


def test_load_state_dict_rejects_mismatch_and_changes_nothing():
    labels = labels_of((6, 6))
    sampler = StratifiedBatchSampler(labels, 4, seed=0)
    before = sampler.state_dict()
    other = StratifiedBatchSampler(labels_of((8, 4)), 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="sizes"):
        sampler.load_state_dict(other)
    bad = dict(StratifiedBatchSampler(labels, 4, seed=0).state_dict(), counts=[4, 0], epoch=5)
    with pytest.raises(ValueError, match="counts"):
        sampler.load_state_dict(bad)
    with pytest.raises(ValueError, match="global batch"):
        sampler.load_state_dict(StratifiedBatchSampler(labels, 2, seed=0).state_dict())
    assert sampler.state_dict() == before


def test_counts_and_sizes_beyond_int64_are_refused_clearly():
    # issue 13, failure 4: counts >= 2**63 in a state overflowed numpy instead of being refused
    labels = labels_of((6, 6))
    sampler = StratifiedBatchSampler(labels, 4, seed=0)
    before = sampler.state_dict()
    for counts in ([2**63, 2], [2**64, 2], [2.0, 2], ["2", 2]):
        with pytest.raises(StateError, match="counts"):
            sampler.load_state_dict({**before, "counts": counts})
    with pytest.raises(StateError, match="batch_size"):
        sampler.load_state_dict({**before, "batch_size": 2**63})
    with pytest.raises(StateError, match="moments"):
        sampler.load_state_dict({**before, "moments": [[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]})
    assert sampler.state_dict() == before
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 2\*\*63\)"):
        StratifiedBatchSampler(labels, 2**63)


# -- distributed ------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch(world_size):
    labels = labels_of((20, 9, 7))
    single = StratifiedBatchSampler(labels, 3 * world_size, seed=6, rank=0, world_size=1)
    ranks = [StratifiedBatchSampler(labels, 3, seed=6, rank=r, world_size=world_size) for r in range(world_size)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    global_batches = list(single)
    shares = [list(s) for s in ranks]
    assert {len(s) for s in shares} == {len(global_batches)}
    for k, batch in enumerate(global_batches):
        union = [i for share in shares for i in share[k]]
        assert sorted(union) == sorted(batch)
        for share in shares:  # each rank's share is itself stratified: within one of counts / W
            for h, count in enumerate(single.counts.values()):
                assert abs(batch_counts(labels, share[k], 3)[h] - count / world_size) < 1


def test_state_moves_between_world_sizes_with_the_same_global_batch():
    labels = labels_of((20, 9, 7))
    two = [StratifiedBatchSampler(labels, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    iterators = [iter(s) for s in two]
    for iterator in iterators:
        next(iterator), next(iterator)
    single = StratifiedBatchSampler(labels, 8, seed=1, rank=0, world_size=1)
    single.load_state_dict(two[0].state_dict())
    rest = list(single)
    assert [sorted(a + b) for a, b in zip(*(list(it) for it in iterators))] == [sorted(b) for b in rest]


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 2, "allocation": "equal"}, "equal.*3 strata"),
    ({"batch_size": 2}, "slot"),
    ({"batch_size": 12, "allocation": "equal"}, "only 2 members"),
    ({"batch_size": 6, "allocation": {0: 1, 1: 1}}, "missing \\[2\\]"),
    ({"batch_size": 6, "allocation": {0: 1, 1: 1, 2: 0}}, "positive"),
    ({"batch_size": 6, "allocation": "optimal"}, "allocation must be"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 40}, "larger than the dataset"),
    ({"batch_size": 4, "seed": -1}, "seed"),
    ({"batch_size": 4, "drop_last": 1}, "drop_last"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        StratifiedBatchSampler(labels_of((20, 8, 2)), **kwargs)


def test_update_and_weights_errors_leave_state_unchanged():
    sampler = StratifiedBatchSampler(labels_of((5, 5)), 2, allocation="neyman")
    before = sampler.state_dict()
    with pytest.raises(ValueError, match="one entry per index"):
        sampler.update([0, 1], [1.0])
    with pytest.raises(ValueError, match="finite"):
        sampler.update([0, 1], [1.0, float("nan")])
    with pytest.raises(ValueError, match="indices must be in"):
        sampler.update([0, 10], [1.0, 2.0])
    with pytest.raises(TypeError, match="batch"):
        sampler.importance_weights([0.5])
    assert sampler.state_dict() == before


def test_counts_in_batches_match_dataloader_batches():
    labels = labels_of((9, 6, 3))
    sampler = StratifiedBatchSampler(labels, 6, seed=0)
    loader = DataLoader(TensorDataset(torch.from_numpy(labels)), batch_sampler=sampler)
    assert [Counter(y.tolist()) for (y,) in loader] == [Counter({0: 3, 1: 2, 2: 1})] * 3


@pytest.mark.slow
def test_benchmark_quick_smoke():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "stratified_qmc.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "QMC / i.i.d." in result.stdout and "StratifiedBatchSampler" in result.stdout


def _neyman_under_ddp(rank, world_size, labels, values):
    import torch.distributed as dist

    sampler = StratifiedBatchSampler(labels, 4, allocation="neyman", seed=3)  # rank, world from the group
    out = {"epochs": []}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        for batch in batches:  # gather every rank's (index, value) pairs, as the docs prescribe
            local = torch.tensor(batch)
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(gathered, local)
            indices = torch.cat(gathered)
            sampler.update(indices, torch.from_numpy(values)[indices])
        out["epochs"].append((sampler.counts, batches))
    return out


@pytest.mark.distributed
def test_neyman_ranks_agree_under_a_real_process_group(tmp_path):
    from dist_harness import run_distributed

    labels = labels_of((30, 20, 10))
    values = np.random.default_rng(0).normal(size=60) * np.array([0.1, 1.0, 5.0])[labels]
    results = run_distributed(_neyman_under_ddp, 2, tmp_path, labels, values)
    reference = StratifiedBatchSampler(labels, 8, allocation="neyman", seed=3)
    for epoch in range(2):
        counts = [r["epochs"][epoch][0] for r in results]
        assert counts[0] == counts[1]
        reference.set_epoch(epoch)
        assert reference.counts == counts[0]
        shares = [r["epochs"][epoch][1] for r in results]
        assert [sorted(a + b) for a, b in zip(*shares)] == [sorted(b) for b in reference]
        for batch in reference:
            reference.update(batch, values[batch])
    assert results[0]["epochs"][0][0] == {0: 4, 1: 3, 2: 1}  # proportional until sigma is known
    assert results[0]["epochs"][1][0] == {0: 1, 1: 2, 2: 5}  # then n_h ∝ N_h sigma_h


def test_a_state_saved_with_other_allocation_shares_is_refused():
    labels = [0] * 6 + [1] * 6 + [2] * 6
    saved = StratifiedBatchSampler(labels, 6, allocation={0: 4, 1: 1, 2: 1}).state_dict()
    StratifiedBatchSampler(labels, 6, allocation={0: 8, 1: 2, 2: 2}).load_state_dict(saved)  # the same shares
    with pytest.raises(StateError, match="shares=.*the saved run.s allocation dict"):
        StratifiedBatchSampler(labels, 6, allocation={0: 1, 1: 1, 2: 4}).load_state_dict(saved)


def test_counts_other_than_the_epochs_allocation_are_refused():
    sampler = StratifiedBatchSampler([0] * 6 + [1] * 6 + [2] * 6, 6, allocation="proportional", seed=1)
    state = sampler.state_dict()
    assert state["counts"] == [2, 2, 2]
    with pytest.raises(StateError, match=r"counts \[4, 1, 1\] are not the allocation of epoch 0"):
        sampler.load_state_dict({**state, "counts": [4, 1, 1]})
    assert sampler.counts == {0: 2, 1: 2, 2: 2}
