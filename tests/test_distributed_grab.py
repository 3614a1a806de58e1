"""CD-GraB: GraB and herding under a real gloo process group (2 and 3 processes)."""

import numpy as np
import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.distributed

N, D, LOCAL_BATCH, EPOCHS = 29, 6, 3, 3


def _vectors():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _make(kind, **kwargs):
    from dataorder.ordering import GraBSampler
    from dataorder.ordering import HerdingSampler

    if kind == "herding":
        return HerdingSampler(N, seed=4, **kwargs)
    return GraBSampler(N, balance=kind, seed=4, **kwargs)


def _train(rank, world_size, kind, crash_at):
    vectors = _vectors()
    sampler = _make(kind)
    steps = 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        local = list(sampler)
        for start in range(0, len(local), LOCAL_BATCH):
            if steps == crash_at:  # simulated crash: rebuild from the state alone
                state = sampler.state_dict()
                sampler = _make(kind)
                sampler.load_state_dict(state)
                sampler.set_epoch(epoch)
            sampler.step(vectors[local[start:start + LOCAL_BATCH]])
            steps += 1
    sampler.set_epoch(EPOCHS)
    state = sampler.state_dict()
    return sampler.global_order().tolist(), {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _single_process_reference(kind, world_size):
    """GraB in one process fed the same sequence of gathered global batches."""
    vectors = _vectors()
    sampler = _make(kind, rank=0, world_size=1)
    global_batch = LOCAL_BATCH * world_size
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        order = sampler.global_order().tolist()
        for start in range(0, N, global_batch):
            sampler.step(vectors[order[start:start + global_batch]])
    sampler.set_epoch(EPOCHS)
    return sampler.global_order().tolist()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind", ["mean", "pair", "recursive", "herding"])
def test_cd_grab_matches_single_process_and_ranks_agree(kind, world_size, tmp_path):
    results = run_distributed(_train, world_size, tmp_path, kind, -1)
    orders = [order for order, _ in results]
    assert all(order == orders[0] for order in orders)  # the same next order on every rank
    for name, tensor in results[0][1].items():
        for _, other in results[1:]:
            assert torch.equal(other[name], tensor), name  # identical state, bit for bit
    assert orders[0] == _single_process_reference(kind, world_size)
    assert sorted(orders[0]) == list(range(N))


@pytest.mark.parametrize("kind", ["mean", "pair"])
def test_cd_grab_resumes_after_a_crash_mid_epoch(kind, tmp_path):
    (straight, _), _ = run_distributed(_train, 2, tmp_path / "a", kind, -1)
    (resumed, _), _ = run_distributed(_train, 2, tmp_path / "b", kind, 7)
    assert resumed == straight


def _mismatched_seed(rank, world_size):
    from dataorder.ordering import GraBSampler

    try:
        GraBSampler(N, seed=rank)  # refused where it is built, before any order is drawn
    except ValueError as error:
        return str(error)
    return None


def _mismatched_batch(rank, world_size):
    from dataorder.ordering import GraBSampler

    sampler = GraBSampler(N, seed=0)
    sampler.set_epoch(0)
    local = list(sampler)
    try:
        sampler.step(_vectors()[local[:LOCAL_BATCH + rank]])
    except ValueError as error:
        return str(error)
    return None


def test_mismatched_seed_and_batch_size_are_clear_errors(tmp_path):
    for message in run_distributed(_mismatched_seed, 2, tmp_path / "seed"):
        assert message == ("GraBSampler: seed differs across ranks (rank 0: 0, rank 1: 1); "
                           "every rank must use the same seed")
    for message in run_distributed(_mismatched_batch, 2, tmp_path / "batch"):
        assert message and "batch_size differs across ranks (rank 0: 3, rank 1: 4)" in message


def _gathered_by_caller(rank, world_size):
    from dataorder.distributed import gather_global_batch

    vectors = _vectors()
    sampler = _make("pair")
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        local = list(sampler)
        for start in range(0, len(local), LOCAL_BATCH):
            gathered = gather_global_batch(vectors[local[start:start + LOCAL_BATCH]])
            sampler.step(gathered, global_batch=True)  # the caller gathered (and may use the mean)
    sampler.set_epoch(EPOCHS)
    return sampler.global_order().tolist()


def test_global_batch_gathered_by_the_caller_gives_the_same_order(tmp_path):
    orders = run_distributed(_gathered_by_caller, 2, tmp_path)
    assert orders[0] == orders[1] == _single_process_reference("pair", 2)


def _auto_sketch(rank, world_size):
    import warnings

    from dataorder.ordering import GraBSampler

    GraBSampler.AUTO_SKETCH_ABOVE, GraBSampler.AUTO_SKETCH_DIM = 4, 3  # a "large" model here: d=6 > 4
    vectors = _vectors()
    sampler = GraBSampler(N, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            sampler.set_epoch(epoch)
            local = list(sampler)
            for start in range(0, len(local), LOCAL_BATCH):
                sampler.step(vectors[local[start:start + LOCAL_BATCH]])
                if epoch == 1 and start == 0:  # crash and resume with a sampler built as before
                    state = sampler.state_dict()
                    sampler = GraBSampler(N, seed=4)
                    sampler.load_state_dict(state)
                    sampler.set_epoch(epoch)
    sampler.set_epoch(2)
    return sampler.sketch_dim, sampler.global_order().tolist(), [str(w.message) for w in caught]


def test_large_models_are_gathered_as_sketches_by_default(tmp_path):
    from dataorder.ordering import GraBSampler

    results = run_distributed(_auto_sketch, 2, tmp_path)
    assert all(sketch == 3 for sketch, _, _ in results)
    assert any("CountSketches of width 3" in message for message in results[0][2])
    # the same as one process sketching the gathered batches with the same seed
    vectors = _vectors()
    reference = GraBSampler(N, seed=4, sketch_dim=3, rank=0, world_size=1)
    for epoch in range(2):
        reference.set_epoch(epoch)
        order = reference.global_order().tolist()
        for start in range(0, N, 2 * LOCAL_BATCH):
            reference.step(vectors[order[start:start + 2 * LOCAL_BATCH]])
    reference.set_epoch(2)
    assert results[0][1] == results[1][1] == reference.global_order().tolist()
