"""HerdingSampler and its greedy kernel against a reference written here."""

import io

import numpy as np
import pytest
import torch

from dataorder.samplers.base import epoch_rng
from dataorder.ordering import GraBSampler
from dataorder.ordering.herding import HerdingSampler, herding_order


def reference_herding(vectors):
    """Pick, one at a time, the unused vector that keeps the running sum shortest."""
    remaining, s, order = list(range(len(vectors))), np.zeros(vectors.shape[1]), []
    while remaining:
        best = min(remaining, key=lambda j: (np.linalg.norm(s + vectors[j]), j))
        order.append(best)
        remaining.remove(best)
        s += vectors[best]
    return order


def test_kernel_equals_reference_greedy_loop():
    vectors = np.random.default_rng(0).standard_normal((60, 5))
    vectors -= vectors.mean(axis=0)
    assert herding_order(vectors).tolist() == reference_herding(vectors)


def one_pass(sampler, vectors, batch=16):
    order = sampler.global_order()
    for start in range(0, len(order), batch):
        sampler.step(vectors[order[start:start + batch]])
    sampler.set_epoch(sampler.epoch + 1)
    return sampler.global_order()


def discrepancy(vectors, order):
    return np.linalg.norm(np.cumsum(vectors[order], axis=0), axis=1).max()


def test_discrepancy_is_below_one_grab_pass():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1024, 32))
    vectors -= vectors.mean(axis=0)
    tensor = torch.from_numpy(vectors).float()
    random = np.median([discrepancy(vectors, rng.permutation(1024)) for _ in range(50)])
    herding = discrepancy(vectors, one_pass(HerdingSampler(1024), tensor)) / random
    grab = discrepancy(vectors, one_pass(GraBSampler(1024), tensor)) / random
    assert herding < grab <= 0.65
    assert herding <= 0.2


def test_next_order_is_the_greedy_order_of_the_stored_gradients():
    vectors = torch.from_numpy(np.random.default_rng(1).standard_normal((30, 4)))
    sampler = HerdingSampler(30, seed=7)
    first = sampler.global_order()
    assert first.tolist() == epoch_rng(7, 0).permutation(30).tolist()
    centred = vectors.float().double().numpy() - vectors.float().double().numpy().mean(axis=0)
    assert one_pass(sampler, vectors, batch=7).tolist() == first[herding_order(centred[first])].tolist()


def test_cut_short_epoch_orders_the_visited_and_keeps_the_rest():
    vectors = torch.randn(20, 3)
    sampler = HerdingSampler(20)
    order = sampler.global_order()
    sampler.step(vectors[order[:8]])
    sampler.set_epoch(1)
    nxt = sampler.global_order()
    assert sorted(nxt[:8].tolist()) == sorted(order[:8].tolist()) and nxt[8:].tolist() == order[8:].tolist()


def test_resume_mid_epoch_gives_the_identical_next_order():
    vectors = torch.randn(25, 3)
    whole, first = HerdingSampler(25, seed=1), HerdingSampler(25, seed=1)
    expected = one_pass(whole, vectors, batch=4).tolist()
    order = first.global_order()
    first.step(vectors[order[:12]])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = HerdingSampler(25, seed=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for start in range(12, 25, 4):
        resumed.step(vectors[order[start:start + 4]])
    resumed.set_epoch(1)
    assert resumed.global_order().tolist() == expected


def test_memory_is_n_by_k_and_sketch_shrinks_it():
    sampler = HerdingSampler(50, sketch_dim=4)
    sampler.step(torch.randn(10, 100))
    assert sampler.state_dict()["stored"].shape == (10, 4)
    assert sampler._store.shape == (50, 4)


def test_nan_raises_and_keeps_the_state():
    sampler = HerdingSampler(10)
    sampler.step(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        sampler.step(torch.full((2, 3), float("nan")))
    assert sampler.state_dict()["visited"] == 2


def test_load_state_dict_rejects_a_bad_store():
    sampler = HerdingSampler(10)
    sampler.step(torch.ones(2, 3))
    state = sampler.state_dict()
    state["stored"] = torch.ones(5, 3)
    with pytest.raises(ValueError, match="stored"):
        HerdingSampler(10).load_state_dict(state)
