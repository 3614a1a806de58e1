import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.distributed


def _gather(rank, world_size):
    from dataorder.distributed import gather_global_batch

    rows = torch.tensor([[10.0 * j + rank] for j in range(3)])  # row j of rank r = 10j + r
    return gather_global_batch(rows).squeeze(1).tolist()


def _gather_many(rank, world_size):
    from dataorder.distributed import gather_global_batches

    floats = torch.tensor([[[10.0 * j + rank, -1.5]] for j in range(2)])  # (2, 1, 2)
    ints = torch.tensor([[2 ** 40 + 100 * j + rank] for j in range(2)])  # beyond float precision
    odd = torch.full((2, 3), rank, dtype=torch.uint8)  # 3 bytes per row: padded in transit
    return [t.tolist() for t in gather_global_batches([floats, ints, odd])]


def _mismatch(rank, world_size):
    from dataorder.distributed import check_same_on_all_ranks

    check_same_on_all_ranks("Test", balance="mean", batch_size=4)
    try:
        check_same_on_all_ranks("Test", balance="mean", seed=rank)
    except ValueError as error:
        return str(error)
    return None


def test_gather_interleaves_into_global_batch_order(tmp_path):
    results = run_distributed(_gather, 3, tmp_path)
    expected = [10.0 * j + r for j in range(3) for r in range(3)]
    assert results == [expected] * 3


def test_gather_many_keeps_dtypes_shapes_and_order_in_one_call(tmp_path):
    results = run_distributed(_gather_many, 2, tmp_path)
    floats = [[[10.0 * j + r, -1.5]] for j in range(2) for r in range(2)]
    ints = [[2 ** 40 + 100 * j + r] for j in range(2) for r in range(2)]
    odd = [[r] * 3 for _ in range(2) for r in range(2)]
    assert results == [[floats, ints, odd]] * 2


def test_mismatch_is_reported_on_every_rank(tmp_path):
    messages = run_distributed(_mismatch, 2, tmp_path)
    for message in messages:
        assert "seed differs across ranks (rank 0: 0, rank 1: 1)" in message


def test_gather_many_refuses_tensors_without_a_shared_batch_dimension():
    from dataorder.distributed import gather_global_batches

    with pytest.raises(ValueError, match="share their first"):
        gather_global_batches([torch.ones(2, 3), torch.ones(3, 3)])
    with pytest.raises(ValueError, match="share their first"):
        gather_global_batches([torch.ones(2), torch.tensor(1.0)])
