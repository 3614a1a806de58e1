"""The batch-level samplers under a real gloo process group: shares, equal counts, crash and resume."""

import numpy as np
import pytest

from dist_harness import run_distributed

pytestmark = pytest.mark.distributed

N, CRASH_AFTER = 40, 3


def _labels():
    return np.repeat(np.arange(3), [20, 12, 8])


def _scores():
    return np.linspace(0.0, 1.0, N)


def _make(name):
    from dataorder.samplers.curriculum import CurriculumSampler
    from dataorder.samplers.mixture import MixtureSampler
    from dataorder.samplers.stratified import StratifiedBatchSampler

    if name == "stratified":
        return StratifiedBatchSampler(_labels(), batch_size=4, seed=5)
    if name == "mixture":
        return MixtureSampler({"a": 30, "b": 10}, {"a": 0.5, "b": 0.5}, num_samples=48, batch_size=6, seed=5)
    return CurriculumSampler(_scores(), num_samples=48, seed=5)


def _run(rank, world_size, name):
    sampler = _make(name)
    assert (sampler.rank, sampler.world_size) == (rank, world_size)
    sampler.set_epoch(1)
    full = list(sampler)
    iterator = iter(sampler)
    for _ in range(CRASH_AFTER):
        next(iterator)
    state = sampler.state_dict()
    del sampler, iterator  # the crash: only the state survives
    revived = _make(name)
    revived.load_state_dict(state)
    revived.set_epoch(1)
    rest = list(revived)
    finished = _make(name)  # a crash right after the last index: nothing is left
    finished.load_state_dict(revived.state_dict())
    finished.set_epoch(1)
    return full, rest, list(finished)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", ["stratified", "mixture", "curriculum"])
def test_ranks_share_the_global_order_and_resume(name, world_size, tmp_path):
    if name == "mixture" and 6 % world_size:
        pytest.skip("the mixture's global batch must divide by the world size")
    results = run_distributed(_run, world_size, tmp_path, name)
    shares = [full for full, _, _ in results]
    assert len({len(share) for share in shares}) == 1  # equal counts on every rank
    for full, resumed, left in results:
        assert resumed == full[CRASH_AFTER:]
        assert left == []
    if name == "stratified":
        # one process with the whole global batch: rank r holds positions r, r+W, ... of each row
        from dataorder.samplers.stratified import StratifiedBatchSampler

        whole = StratifiedBatchSampler(_labels(), batch_size=4 * world_size, seed=5)
        whole.set_epoch(1)
        for k, row in enumerate(whole.global_batches().tolist()):
            for rank in range(world_size):
                assert shares[rank][k] == row[rank::world_size]
    else:
        reference = _make(name)  # one process, world size 1
        stream = reference.stream().tolist()
        interleaved = [shares[r][k] for k in range(len(shares[0])) for r in range(world_size)]
        assert interleaved[: len(stream)] == stream[: len(interleaved)]


def _built_with(name, seed, drop_last=False):
    from dataorder.samplers.curriculum import CurriculumSampler
    from dataorder.samplers.mixture import MixtureSampler
    from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling
    from dataorder.samplers.stratified import StratifiedBatchSampler

    if name == "rr":
        return RandomReshuffling(N, seed=seed, drop_last=drop_last)
    if name == "flipflop":
        return FlipFlop(N, seed=seed, drop_last=drop_last)
    if name == "stratified":
        return StratifiedBatchSampler(_labels(), batch_size=4, seed=seed, drop_last=drop_last)
    if name == "mixture":
        return MixtureSampler({"a": 30, "b": 10}, {"a": 0.5, "b": 0.5}, num_samples=48, batch_size=6, seed=seed,
                              drop_last=drop_last)
    return CurriculumSampler(_scores(), num_samples=48, seed=seed, drop_last=drop_last)


def _error_of(build):
    """The message of the ValueError ``build()`` raises, or None when it builds."""
    try:
        build()
    except ValueError as error:
        return str(error)
    return None


def _refusals(rank, world_size, name):
    """Each rank's error for a sampler seeded by rank, then for one whose drop_last differs (None: built)."""
    messages = [_error_of(lambda: _built_with(name, seed=rank)),
                _error_of(lambda: _built_with(name, seed=5, drop_last=rank == 1))]
    _built_with(name, seed=5)  # the same settings everywhere still build
    return messages


@pytest.mark.parametrize("name", ["rr", "flipflop", "stratified", "mixture", "curriculum"])
def test_settings_that_differ_across_ranks_are_refused_where_the_sampler_is_built(name, tmp_path):
    owner = {"rr": "RandomReshuffling", "flipflop": "FlipFlop", "stratified": "StratifiedBatchSampler",
             "mixture": "MixtureSampler", "curriculum": "CurriculumSampler"}[name]
    for seed_error, drop_last_error in run_distributed(_refusals, 2, tmp_path, name):
        assert seed_error == (f"{owner}: seed differs across ranks (rank 0: 0, rank 1: 1); "
                              "every rank must use the same seed")
        assert drop_last_error == (f"{owner}: drop_last differs across ranks (rank 0: False, rank 1: True); "
                                   "every rank must use the same drop_last")


def _subclass_refusals(rank, world_size):
    """Each rank's error for samplers whose own settings (beyond seed, size, drop_last) differ by rank."""
    from dataorder.samplers.curriculum import CurriculumSampler
    from dataorder.samplers.mixture import MixtureSampler
    from dataorder.samplers.shuffle import WithReplacement
    from dataorder.samplers.stratified import StratifiedBatchSampler

    builds = [
        lambda: StratifiedBatchSampler(_labels() if rank == 0 else _labels()[::-1], batch_size=4),
        lambda: WithReplacement(N, num_samples=10 + rank),
        lambda: CurriculumSampler(_scores() if rank == 0 else _scores()[::-1], num_samples=48),  # computed apart
        lambda: CurriculumSampler(_scores(), num_samples=48, start=0.2 + rank / 10),
        lambda: MixtureSampler({"a": 30, "b": 10}, {"a": 0.5 + rank / 4, "b": 0.5 - rank / 4}, num_samples=48,
                               batch_size=6),
        lambda: MixtureSampler({"a": 30 + rank, "b": 10}, {"a": 0.5, "b": 0.5}, num_samples=48, batch_size=6),
        lambda: MixtureSampler({"a": 30, "b": 10}, {"a": 0.5, "b": 0.5}, num_samples=48, batch_size=6,
                               exhaustion=("restart", "stop")[rank]),
    ]
    messages = [_error_of(build) for build in builds]
    WithReplacement(N, num_samples=N)  # the same settings, one rank spelling out the default: still built
    WithReplacement(N, num_samples=None if rank == 0 else N)
    return messages


def test_a_subclass_s_own_settings_that_differ_across_ranks_are_refused_where_it_is_built(tmp_path):
    for messages in run_distributed(_subclass_refusals, 2, tmp_path):
        strata, num_samples, ranking, start, weights, sizes, exhaustion = messages
        assert strata.startswith("StratifiedBatchSampler: strata differs across ranks (rank 0: '")
        assert num_samples == ("WithReplacement: num_samples differs across ranks (rank 0: 10, rank 1: 11); "
                               "every rank must use the same num_samples")
        assert ranking.startswith("CurriculumSampler: score_ranking differs across ranks (rank 0: '")
        assert ranking.endswith("'); every rank must use the same score_ranking")
        assert start == ("CurriculumSampler: start differs across ranks (rank 0: 0.2, rank 1: 0.30000000000000004); "
                         "every rank must use the same start")
        assert weights.startswith("MixtureSampler: schedule differs across ranks (rank 0: '")
        assert sizes == ("MixtureSampler: sizes differs across ranks (rank 0: {'a': 30, 'b': 10}, "
                         "rank 1: {'a': 31, 'b': 10}); every rank must use the same sizes")
        assert exhaustion == ("MixtureSampler: exhaustion differs across ranks (rank 0: 'restart', rank 1: 'stop'); "
                              "every rank must use the same exhaustion")
