import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

PERMUTATION_SAMPLERS = [RandomReshuffling, ShuffleOnce, FlipFlop]


def rank_yields(cls, n, world_size, drop_last, epoch, seed, **kwargs):
    out = []
    for rank in range(world_size):
        sampler = cls(n, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from(PERMUTATION_SAMPLERS), n=st.integers(1, 80), world_size=st.integers(1, 5),
       drop_last=st.booleans(), epoch=st.integers(0, 6), seed=st.integers(0, 2**31))
def test_epoch_is_a_permutation_shared_out_evenly(cls, n, world_size, drop_last, epoch, seed):
    shares = rank_yields(cls, n, world_size, drop_last, epoch, seed)
    counts = {len(share) for share in shares}
    assert len(counts) == 1  # every rank yields the same count
    union = [i for share in shares for i in share]
    if drop_last:
        assert len(union) == (n // world_size) * world_size
        assert len(set(union)) == len(union)  # disjoint
    else:
        assert set(union) == set(range(n))  # covers every example; padding repeats a few
        assert len(union) == -(-n // world_size) * world_size
    # the union in global-batch order is the global order
    global_order = cls(n, seed=seed).global_order(epoch).tolist()
    interleaved = [shares[r][k] for k in range(len(shares[0])) for r in range(world_size)]
    assert interleaved[: min(len(interleaved), n)] == global_order[: len(interleaved)]
    assert sorted(global_order) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from(PERMUTATION_SAMPLERS + [WithReplacement]), n=st.integers(1, 60),
       world_size=st.integers(1, 4), drop_last=st.booleans(), epoch=st.integers(0, 4),
       seed=st.integers(0, 1000), data=st.data())
def test_state_after_any_prefix_resumes_identically(cls, n, world_size, drop_last, epoch, seed, data):
    rank = data.draw(st.integers(0, world_size - 1))
    sampler = cls(n, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
    sampler.set_epoch(epoch)
    full = list(sampler)
    consumed = data.draw(st.integers(0, len(full)))
    iterator = iter(sampler)
    for _ in range(consumed):
        next(iterator)
    state = sampler.state_dict()
    resumed = cls(n, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # a training loop calls this after loading: it must not rewind
    expected = full[consumed:] if consumed < len(full) else full
    assert list(resumed) == expected
    assert list(iterator) == full[consumed:]


@pytest.mark.parametrize("cls", PERMUTATION_SAMPLERS + [WithReplacement])
def test_deterministic_by_seed(cls):
    assert list(cls(100, seed=5)) == list(cls(100, seed=5))
    assert list(cls(100, seed=5)) != list(cls(100, seed=6))


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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch(num_workers):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    data = TensorDataset(torch.arange(50))

    def make():
        sampler = RandomReshuffling(data, seed=4)
        sampler.set_epoch(1)
        return stateful.StatefulDataLoader(data, batch_size=4, sampler=sampler, num_workers=num_workers)

    loader = make()
    batches = []
    iterator = iter(loader)
    for _ in range(5):
        batches.append(next(iterator)[0].tolist())
    state = loader.state_dict()
    rest = [b[0].tolist() for b in iterator]
    resumed = make()
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in resumed] == rest
