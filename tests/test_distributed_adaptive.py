"""AdaptiveMixtureSampler under a real gloo process group: the same weights and global stream on every rank."""

import pytest

from dist_harness import run_distributed

pytestmark = pytest.mark.distributed

CRASH_AT = 7  # global batches trained before the crash


def _rank_run(rank, world_size, rule):
    from samplers.test_adaptive import drive, losses_at, make, same_state

    import math

    sampler = make(rule)
    assert (sampler.rank, sampler.world_size) == (rank, world_size)
    before = sampler.state_dict()
    bad = losses_at(0, rank) | ({"prose": math.nan} if rank == 1 else {})
    try:  # a NaN on one rank is refused on every rank (after the collective, so no rank hangs)
        sampler.observe(0, bad)
        refused = False
    except ValueError:
        refused = True
    assert refused and same_state(before, sampler.state_dict())
    full = drive(sampler)  # each rank reports its own losses (losses_at has a rank offset)
    revived = make(rule)
    head = drive(revived, batches=CRASH_AT)
    state = revived.state_dict()
    del revived  # the crash
    resumed = make(rule)
    resumed.load_state_dict(state)
    tail = drive(resumed, start_batch=CRASH_AT)
    return full, sampler.weights_history(), head + tail, resumed.weights_history()


@pytest.mark.parametrize("rule", ["exp3", "doremi"])
def test_two_ranks_compute_the_same_updates_as_one_process_on_the_mean_losses(rule, tmp_path, monkeypatch):
    import samplers.test_adaptive as helpers

    results = run_distributed(_rank_run, 2, tmp_path, rule)
    (full0, history0, resumed0, rhistory0), (full1, history1, resumed1, rhistory1) = results
    assert history0 == history1 == rhistory0 == rhistory1  # identical weights on every rank, also after resuming
    assert resumed0 == full0 and resumed1 == full1
    merged = [i for b0, b1 in zip(full0, full1) for pair in zip(b0, b1) for i in pair]

    per_rank = helpers.losses_at

    def mean_losses(step, rank=0):  # what the all-gather computes: the ranks' mean, in rank order
        a, b = per_rank(step, 0), per_rank(step, 1)
        return {name: (0.0 + a[name] + b[name]) / 2 for name in a}

    monkeypatch.setattr(helpers, "losses_at", mean_losses)
    single = helpers.make(rule)
    assert [i for batch in helpers.drive(single) for i in batch] == merged
    assert single.weights_history() == history0
