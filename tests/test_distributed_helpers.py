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


# -- run_local_group: private folders, plain-data results, clear errors (issue 13, failure 7) ----
def _world(rank, world_size):
    return {"rank": rank, "world": world_size, "tensor": torch.arange(3) * rank}


def _dies_on_rank_one(rank, world_size):
    import os

    if rank == 1:
        os._exit(3)  # no result, no traceback
    return rank


class _NotPlain:
    pass


def _returns_an_object(rank, world_size):
    return _NotPlain()


class _Planted:
    """A pickle that would write a marker file when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_results_come_back_in_rank_order_and_the_private_folder_is_removed(tmp_path):
    results = run_distributed(_world, 2, tmp_path)
    assert [r["rank"] for r in results] == [0, 1] and results[1]["tensor"].tolist() == [0, 1, 2]
    assert list(tmp_path.iterdir()) == []  # the call's own folder is gone


def test_a_rank_without_a_result_is_an_error_not_the_previous_calls_result(tmp_path):
    from dataorder.distributed import GroupError

    assert run_distributed(_world, 2, tmp_path)[1]["rank"] == 1
    with pytest.raises(GroupError, match="rank 1 exited with code 3 and wrote no result"):
        run_distributed(_dies_on_rank_one, 2, tmp_path)


@pytest.mark.slow
def test_a_result_that_is_not_plain_data_is_refused_by_the_rank(tmp_path):
    from dataorder.distributed import GroupError

    with pytest.raises(GroupError, match="rank 0's result cannot travel as plain data"):
        run_distributed(_returns_an_object, 1, tmp_path)


@pytest.mark.slow
def test_files_planted_in_the_workdir_are_never_loaded(tmp_path):
    marker = tmp_path / "executed"
    for rank in range(2):
        torch.save({"ok": True, "result": _Planted(str(marker))}, tmp_path / f"rank{rank}.pt")
    results = run_distributed(_world, 2, tmp_path)
    assert [r["rank"] for r in results] == [0, 1]
    assert not marker.exists()


def test_a_result_file_is_read_as_plain_data_only(tmp_path):
    import pickle

    from dataorder.distributed import _load_result

    marker, path = tmp_path / "executed", tmp_path / "rank0.pt"
    torch.save({"ok": True, "result": _Planted(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError):
        _load_result(path, 0, 0)
    assert not marker.exists()
    torch.save({"ok": True, "result": [1, torch.ones(2)]}, path)
    assert _load_result(path, 0, 0)[0] == 1


@pytest.mark.parametrize("backend, expected", [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                                               ("cpu:gloo,cuda:nccl", torch.device("cpu"))])
def test_checks_send_their_integers_where_the_backend_takes_them(backend, expected, monkeypatch):
    import dataorder.distributed as distributed

    monkeypatch.setattr(distributed, "active_world", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == expected
