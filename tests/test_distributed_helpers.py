import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.distributed


def _gather(rank, world_size):
    from dataorder.distributed import gather_global_batch

    rows = torch.tensor([[10.0 * j + rank] for j in range(3)])  # row j of rank r = 10j + r
    return gather_global_batch(rows).squeeze(1).tolist()


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


def test_mismatch_is_reported_on_every_rank(tmp_path):
    messages = run_distributed(_mismatch, 2, tmp_path)
    for message in messages:
        assert "seed differs across ranks (rank 0: 0, rank 1: 1)" in message
