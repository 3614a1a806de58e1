import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

def test_random_reshuffling_differs_across_epochs_shuffle_once_does_not():
    rr, so = RandomReshuffling(100, seed=0), ShuffleOnce(100, seed=0)
    rr_orders, so_orders = [], []
    for epoch in range(4):
        rr.set_epoch(epoch), so.set_epoch(epoch)
        rr_orders.append(list(rr)), so_orders.append(list(so))
    assert len({tuple(o) for o in rr_orders}) == 4
    assert len({tuple(o) for o in so_orders}) == 1


def test_flipflop_reverses_on_odd_epochs():
    sampler = FlipFlop(20, seed=2)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[1] == orders[0][::-1] and orders[3] == orders[2][::-1]
    assert orders[2] != orders[0]


def test_with_replacement_draws_in_range_with_repeats():
    sampler = WithReplacement(10, num_samples=1000, seed=0)
    draws = np.array(list(sampler))
    assert len(draws) == 1000 and draws.min() >= 0 and draws.max() < 10
    counts = np.bincount(draws, minlength=10)
    assert counts.min() > 60  # every index drawn, roughly uniformly (expected 100 each)
    with pytest.raises(ValueError, match="num_samples"):
        WithReplacement(10, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        WithReplacement(10, num_samples=5).load_state_dict(WithReplacement(10, num_samples=6).state_dict())


def test_dataloader_integration_covers_dataset():
    data = TensorDataset(torch.arange(37))
    sampler = RandomReshuffling(data, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    seen = torch.cat([batch for (batch,) in loader]).tolist()
    assert sorted(seen) == list(range(37))
    assert seen == list(sampler)


