"""Baseline samplers under a real gloo process group (2 and 3 processes)."""

import pytest

from dist_harness import run_distributed

pytestmark = pytest.mark.distributed


def _epoch_shares(rank, world_size, n, crash_after):
    from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

    out = {}
    for cls in (RandomReshuffling, ShuffleOnce, WithReplacement, FlipFlop):
        sampler = cls(n, seed=11)  # rank and world size from the process group
        assert (sampler.rank, sampler.world_size) == (rank, world_size)
        sampler.set_epoch(3)
        full = list(sampler)
        # simulated crash: consume a prefix, keep only the state, rebuild, resume
        iterator = iter(sampler)
        for _ in range(crash_after):
            next(iterator)
        state = sampler.state_dict()
        del sampler, iterator
        revived = cls(n, seed=11)
        revived.load_state_dict(state)
        revived.set_epoch(3)
        resumed = list(revived)
        # a crash right after the last index: nothing of the epoch is left, the next one is whole
        finished = cls(n, seed=11)
        finished.load_state_dict(revived.state_dict())
        finished.set_epoch(3)
        left = list(finished)
        finished.set_epoch(4)
        out[cls.__name__] = (full, resumed, left, list(finished))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_baselines_share_out_the_global_order(world_size, tmp_path):
    from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

    n, crash_after = 31, 4
    results = run_distributed(_epoch_shares, world_size, tmp_path, n, crash_after)
    for cls in (RandomReshuffling, ShuffleOnce, WithReplacement, FlipFlop):
        shares = [r[cls.__name__][0] for r in results]
        assert len({len(s) for s in shares}) == 1
        reference = cls(n, seed=11)
        reference.set_epoch(3)
        global_order = reference.global_order().tolist()
        interleaved = [shares[r][k] for k in range(len(shares[0])) for r in range(world_size)]
        assert interleaved[:n] == global_order
        for rank, result in enumerate(results):
            full, resumed, left, next_epoch = result[cls.__name__]
            assert resumed == full[crash_after:]
            assert left == [] and len(next_epoch) == len(full)
            reference = cls(n, seed=11, rank=rank, world_size=world_size)
            reference.set_epoch(4)
            assert next_epoch == list(reference)
