import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from dataorder.samplers._state import Cursor, StateError, StateReader, StateTypeError, resume_position
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


def test_set_epoch_same_epoch_keeps_position():
    sampler = RandomReshuffling(10, seed=3)
    iterator = iter(sampler)
    next(iterator), next(iterator)
    sampler.set_epoch(0)
    assert sampler.position == 2
    sampler.set_epoch(1)
    assert sampler.position == 0


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




# -- the state layer (dataorder/samplers/_state.py) ---------------------------------------------
def test_a_state_after_the_last_index_resumes_with_nothing_left_then_the_next_epoch():
    # issue 13, failure 1: "position = epoch length" used to replay the whole epoch
    sampler = RandomReshuffling(10, seed=3)
    epoch0 = list(sampler)
    resumed = RandomReshuffling(10, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(0)
    assert list(resumed) == []
    resumed.set_epoch(1)
    sampler.set_epoch(1)
    assert list(resumed) == list(sampler) != epoch0


def test_a_failed_load_changes_nothing_even_when_a_subclass_hook_fails_half_way():
    class Halfway(IndexSampler):
        def _global_order(self, epoch):
            return np.arange(self.n)

        def _load_extra_state(self, state):
            self.loaded = True  # half-loaded ...
            raise ValueError("the subclass refuses")  # ... then refused

    sampler = Halfway(6)
    iterator = iter(sampler)
    next(iterator)
    state = {**sampler.state_dict(), "epoch": 4}
    with pytest.raises(StateError, match="the subclass refuses"):
        sampler.load_state_dict(state)
    assert not hasattr(sampler, "loaded") and sampler.epoch == 0 and sampler.position == 1
    assert list(iterator) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("position", "old", "new", "expected"), [
    (3, 2, 3, 2),     # 6 global items: 2 each at three ranks
    (0, 4, 1, 0),
    (5, 2, 3, 4),     # the end of the epoch (saved length 5) is the end at any world size
])
def test_resume_position_moves_whole_global_items(position, old, new, expected):
    length = {1: 10, 2: 5, 3: 4, 4: 3}
    assert resume_position(position, saved_world=old, world=new, saved_length=length[old], length=length[new],
                           elastic=True, what="X") == expected


@pytest.mark.parametrize(("position", "old", "new", "elastic", "match"), [
    (6, 2, 2, True, "past the end of the epoch"),
    (1, 2, 3, True, "cannot split evenly"),
    (2, 2, 1, False, "depends on the world size"),
])
def test_resume_position_refusals(position, old, new, elastic, match):
    with pytest.raises(StateError, match=match):
        resume_position(position, saved_world=old, world=new, saved_length=5, length=10, elastic=elastic, what="X")


def test_cursor_continues_an_interrupted_pass_and_replays_a_finished_one():
    items = list(range(5))
    cursor = Cursor()
    iterator = cursor.iterate(5, lambda first: items[first:])
    assert [next(iterator), next(iterator)] == [0, 1]
    assert list(cursor.iterate(5, lambda first: items[first:])) == [2, 3, 4]  # a new iter() continues
    assert list(cursor.iterate(5, lambda first: items[first:])) == items  # after the end: replays
    blocks = []
    cursor.move_to(1)
    chunked = cursor.iterate(5, lambda first: blocks.append(first) or items[first:first + 2])
    assert list(chunked) == [1, 2, 3, 4] and blocks == [1, 3] and cursor.position == 5


@pytest.mark.parametrize(("state", "error", "match"), [
    ([("sampler", "X")], StateTypeError, "must be a dict"),
    ({"epoch": 1}, StateError, "missing 'sampler'"),
    ({"sampler": "Y"}, StateError, "saved by 'Y'"),
    ({"sampler": "X", "epoch": "1"}, StateTypeError, "epoch must be an int"),
    ({"sampler": "X", "epoch": True}, StateTypeError, "epoch must be an int"),
    ({"sampler": "X", "epoch": 2**63}, StateError, "epoch=9223372036854775808 is not in"),
    ({"sampler": "X", "t": torch.tensor([1.0, float("inf")])}, StateError, r"state\['t'\] holds NaN or inf"),
    ({"sampler": "X", "t": torch.zeros(2, dtype=torch.complex64)}, StateTypeError, "complex64"),
    ({"sampler": "X", "t": [torch.zeros(2, device="meta")]}, StateError, "meta device"),
])
def test_state_reader_names_the_field(state, error, match):
    with pytest.raises(error, match=match):
        StateReader(state, "X").int("epoch")


def test_state_reader_typed_lists():
    reader = StateReader({"sampler": "X", "counts": [2, 2**63], "sigma": [None, 1.0], "m": [[1.0, 2.0]]}, "X")
    with pytest.raises(StateError, match="counts has entries outside"):
        reader.ints("counts", 2)
    assert np.isnan(reader.floats("sigma", (2,), missing=True)[0])
    with pytest.raises(StateError, match="sigma holds None"):
        reader.floats("sigma", (2,))
    with pytest.raises(StateError, match="has shape"):
        reader.floats("m", (2, 1))
    with pytest.raises(StateError, match=r"state\['m'\]\[0\]\[1\] is nan"):
        StateReader({"sampler": "X", "m": [[1.0, float("nan")]]}, "X")


# -- dataorder.samplers re-exports ----------------------------------------------------------------
def test_state_reader_same_compares_types_inside_containers():
    reader = StateReader({"sampler": "X", "sizes": {"a": 3, "b": True}, "floor": [0.1, 1], "k": 2}, "X")
    with pytest.raises(StateTypeError, match="sizes"):
        reader.same("sizes", {"a": 3, "b": 1})  # True == 1, but no state_dict() saves True for a size
    with pytest.raises(StateTypeError, match="floor"):
        reader.same("floor", [0.1, 1.0])  # 1 == 1.0, but the saved setting was a float
    with pytest.raises(StateError, match="sizes"):
        reader.same("sizes", {"a": 3})  # another key set: not equal
    reader.same("k", np.int64(2))  # any int type stands for an int
    reader.same("sizes", {"a": 3, "b": True})


def test_state_reader_tensor_checks_dtype_and_shape():
    reader = StateReader({"sampler": "X", "w": torch.zeros(2, 3, dtype=torch.float64), "l": [1.0]}, "X")
    assert reader.tensor("w", torch.float64, (None, 3)).shape == (2, 3)
    with pytest.raises(StateTypeError, match="w must be a torch.float32 tensor"):
        reader.tensor("w", torch.float32, (2, 3))
    with pytest.raises(StateError, match=r"w has shape \(2, 3\), expected \(2, 2\)"):
        reader.tensor("w", torch.float64, (2, 2))
    with pytest.raises(StateError, match="w has shape"):
        reader.tensor("w", torch.float64, (6,))
    with pytest.raises(StateTypeError, match="l must be a torch.float64 tensor, got list"):
        reader.tensor("l", torch.float64, (1,))


def test_the_package_re_exports_every_sampler_class_and_imports_light():
    import subprocess
    import sys

    import dataorder
    import dataorder.samplers as samplers

    for name in samplers.__all__:
        assert getattr(samplers, name) is getattr(dataorder, name, getattr(samplers, name))
    from dataorder.samplers import (AdaptiveMixtureSampler, GraBSampler, HerdingSampler,  # lazily
                                    LateObservationError)

    assert GraBSampler is dataorder.GraBSampler and HerdingSampler is dataorder.HerdingSampler
    assert AdaptiveMixtureSampler is dataorder.AdaptiveMixtureSampler
    assert LateObservationError.__module__ == "dataorder.samplers.adaptive"
    code = ("import sys, dataorder.samplers; "
            "print(sorted(m for m in ('numba', 'datasets', 'pyarrow') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        samplers.Nope


@pytest.mark.parametrize("text", ["3", b"3"])
def test_text_is_not_taken_for_a_dataset(text):
    with pytest.raises(TypeError, match=r"dataset \(any Sized\) or an int n.*int\(n\)"):
        RandomReshuffling(text)
