import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from dataorder.samplers.base import IndexSampler, dataset_length, resolve_world, shard, shard_length
from dataorder.samplers.shuffle import RandomReshuffling


class Identity(IndexSampler):
    def _global_order(self, epoch):
        return np.arange(self.n)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), world_size=st.integers(1, 7), drop_last=st.booleans())
def test_shard_matches_distributed_sampler(n, world_size, drop_last):
    if drop_last and n < world_size:
        return  # DistributedSampler yields nothing here; so do we (checked below)
    for rank in range(world_size):
        reference = list(DistributedSampler(range(n), num_replicas=world_size, rank=rank,
                                            shuffle=False, drop_last=drop_last))
        ours = Identity(n, rank=rank, world_size=world_size, drop_last=drop_last)
        assert list(ours) == reference
        assert len(ours) == len(reference)


def test_shard_with_drop_last_smaller_than_world():
    assert len(Identity(2, rank=0, world_size=3, drop_last=True)) == 0
    assert list(Identity(2, rank=2, world_size=3, drop_last=False)) == [0]


def test_shard_length_and_padding_wraps_more_than_once():
    assert shard_length(2, 5, drop_last=False) == 1
    # padding longer than the order repeats it, as DistributedSampler does
    assert [shard(np.arange(2), r, 5, False).tolist() for r in range(5)] == [[0], [1], [0], [1], [0]]


def test_dataset_length_accepts_sized_and_int():
    assert dataset_length(torch.zeros(7, 2)) == 7
    assert dataset_length(3) == 3


@pytest.mark.parametrize("data, error", [(0, ValueError), ([], ValueError), (-3, ValueError),
                                         (True, TypeError), (iter([1]), TypeError)])
def test_dataset_length_rejects(data, error):
    with pytest.raises(error, match="data"):
        dataset_length(data)


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"rank": -1, "world_size": 2}, "rank"),
    ({"world_size": 0}, "world_size"),
    ({"drop_last": "yes"}, "drop_last"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RandomReshuffling(10, **kwargs)


def test_set_epoch_rejects_negative_and_non_int():
    sampler = RandomReshuffling(10)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch"):
        sampler.set_epoch(1.0)
    assert sampler.epoch == 0


def test_resolve_world_defaults_without_process_group():
    assert resolve_world(None, None) == (0, 1)
    assert resolve_world(None, 4) == (0, 4)


def test_position_tracks_consumption_and_finished_epoch_replays():
    sampler = RandomReshuffling(10, seed=3)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(4)]
    assert sampler.position == 4
    rest = list(iterator)
    assert sampler.position == 10
    assert first + rest == list(sampler)  # replays the same epoch, like torch's samplers


def test_set_epoch_same_epoch_keeps_position():
    sampler = RandomReshuffling(10, seed=3)
    iterator = iter(sampler)
    next(iterator), next(iterator)
    sampler.set_epoch(0)
    assert sampler.position == 2
    sampler.set_epoch(1)
    assert sampler.position == 0


def test_load_state_rejects_mismatches_and_leaves_state_untouched():
    source = RandomReshuffling(10, seed=1)
    iterator = iter(source)
    next(iterator)
    state = source.state_dict()
    target = RandomReshuffling(10, seed=1)
    target.set_epoch(5)
    for bad, match in [
        ({**state, "sampler": "ShuffleOnce"}, "ShuffleOnce"),
        ({**state, "n": 11}, "n=11"),
        ({**state, "seed": 2}, "seed=2"),
        ({**state, "position": -1}, "position"),
        ({**state, "drop_last": True}, "drop_last"),
        ({k: v for k, v in state.items() if k != "epoch"}, "missing"),
    ]:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert target.epoch == 5 and target.position == 0
    with pytest.raises(TypeError):
        target.load_state_dict([1, 2])


def test_state_moves_across_world_sizes_when_divisible():
    # two ranks consumed 3 each = 6 global indices; three ranks resume at 2 each
    old = [RandomReshuffling(24, seed=0, rank=r, world_size=2) for r in range(2)]
    for sampler in old:
        iterator = iter(sampler)
        for _ in range(3):
            next(iterator)
    state = old[0].state_dict()
    new = [RandomReshuffling(24, seed=0, rank=r, world_size=3) for r in range(3)]
    for sampler in new:
        sampler.load_state_dict(state)
    remaining = sorted(i for sampler in new for i in sampler)
    order = RandomReshuffling(24, seed=0).global_order()
    assert remaining == sorted(order[6:].tolist())


def test_state_across_world_sizes_not_divisible_is_rejected():
    sampler = RandomReshuffling(24, seed=0, rank=0, world_size=2)
    iterator = iter(sampler)
    next(iterator)  # 2 global indices consumed: 3 ranks cannot split them
    with pytest.raises(ValueError, match="world_size=3"):
        RandomReshuffling(24, seed=0, rank=0, world_size=3).load_state_dict(sampler.state_dict())


def test_order_ignores_global_rng():
    torch.manual_seed(0), np.random.seed(0)
    first = list(RandomReshuffling(50, seed=7))
    torch.manual_seed(1), np.random.seed(1)
    assert list(RandomReshuffling(50, seed=7)) == first
