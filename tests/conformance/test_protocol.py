"""The sampler protocol (DESIGN.md), checked over every sampler class (``sampler_cases.CASES``).

* a state taken at any position -- also right after the last index of an epoch -- resumes
  bit for bit, through ``torch.save``/``torch.load(weights_only=True)``, into the next epoch;
* the ranks of world sizes 1-3 share each global batch as ``DistributedSampler`` does;
* tampered and foreign states are refused with an error naming the field, and a refused
  load changes nothing;
* the order never reads the global RNGs;
* through ``StatefulDataLoader`` a checkpoint after the last batch resumes with no batches
  of that epoch, as the loader's own ``RandomSampler`` does.
"""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dataorder.samplers import StateError
from sampler_cases import CASES, EPOCHS, GLOBAL_BATCH, N, dataset_items, flatten, train

SAMPLERS = [case for case in CASES if case.kind != "dataset"]


def params(cases, test):
    """``cases`` as pytest params named after the sampler, with the case's known failure of ``test``."""
    return [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=True, reason=case.known_failures[test])]
                         if test in case.known_failures else []) for case in cases]


def ids(cases):
    return [case.name for case in cases]


def round_trip(state):
    """``state`` through torch.save and torch.load(weights_only=True), as a checkpoint does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def canonical(value):
    """A comparable form of a state: tensors become (dtype, values)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.tolist())
    if isinstance(value, dict):
        return {key: canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def epochs_of(case):
    return EPOCHS if case.per_epoch else 1


def straight_run(case, **kwargs):
    """Everything the sampler yields over its epochs, stepped as a training loop steps it."""
    sampler = case.build(**kwargs)
    items = []
    for epoch in range(epochs_of(case)):
        sampler.set_epoch(epoch)
        items += train(case, sampler, iter(sampler))
    return items


def stop_positions(case, length):
    if case.steps:  # the training loop steps whole batches: states at batch boundaries and at the end
        return sorted({*range(0, length, GLOBAL_BATCH), length})
    return list(range(length + 1))


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", SAMPLERS, ids=ids(SAMPLERS))
def test_a_state_at_every_position_resumes_bit_for_bit_into_the_next_epoch(case, world):
    if case.steps and world > 1:
        pytest.skip("a gradient-driven sampler steps a global batch across ranks: tests/test_distributed_grab.py")
    rank = world - 1
    expected = straight_run(case, rank=rank, world_size=world)
    length = len(case.build(rank=rank, world_size=world))
    for stop in stop_positions(case, length):
        sampler = case.build(rank=rank, world_size=world)
        sampler.set_epoch(0)
        head = train(case, sampler, iter(sampler), stop=stop)
        assert sampler.position == stop
        state = round_trip(sampler.state_dict())
        resumed = case.build(rank=rank, world_size=world)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # a training loop calls this after loading: it must not rewind
        assert resumed.position == stop
        items = head + train(case, resumed, iter(resumed))
        for epoch in range(1, epochs_of(case)):
            resumed.set_epoch(epoch)
            items += train(case, resumed, iter(resumed))
        assert items == expected, f"resumed at position {stop}"


@pytest.mark.parametrize("case", [c for c in SAMPLERS if not c.steps], ids=ids([c for c in SAMPLERS if not c.steps]))
def test_iterating_a_finished_epoch_again_replays_it(case):
    sampler = case.build()
    first = list(sampler)
    assert sampler.position == len(sampler)
    assert list(sampler) == first  # as torch's samplers do when iterated twice without set_epoch
    resumed = case.build()
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == []  # the loaded state had nothing left of the epoch
    assert list(resumed) == first  # ... and a further pass replays it


def test_a_state_at_the_end_of_an_epoch_moves_to_another_world_size():
    case = next(c for c in SAMPLERS if c.name == "RandomReshuffling")
    done = case.build(rank=0, world_size=3)
    list(done)
    single = case.build()
    single.load_state_dict(done.state_dict())
    assert single.position == len(single) and list(single) == []


# -- shares across ranks -----------------------------------------------------------------------
def interleave(shares, world):
    """The ranks' items back in global order: rank r holds positions r, r + W, ..."""
    return [shares[r][k] for k in range(len(shares[0])) for r in range(world)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("case", SAMPLERS, ids=ids(SAMPLERS))
def test_ranks_share_each_global_batch_like_distributed_sampler(case, world, drop_last):
    single = list(case.build(drop_last=drop_last))
    shares = [list(case.build(rank=r, world_size=world, drop_last=drop_last)) for r in range(world)]
    lengths = {len(share) for share in shares}
    assert lengths == {len(case.build(rank=0, world_size=world, drop_last=drop_last))}  # equal counts
    if case.kind == "batches":  # each rank holds positions r::W of every global batch
        rebuilt = [interleave([share[k] for share in shares], world) for k in range(len(shares[0]))]
        assert rebuilt == single
        return
    if not drop_last and world == 1:
        assert len(single) == len(case.build(drop_last=False))
    total = len(shares[0]) * world
    # DistributedSampler's rule: drop the uneven tail, or pad by wrapping round to the start
    expected = single[:total] if total <= len(single) else single + single[: total - len(single)]
    if drop_last:
        assert total == len(single) // world * world
    else:
        assert total == -(-len(single) // world) * world
    assert interleave(shares, world) == expected
    if case.per_epoch and not drop_last and case.name != "WithReplacement":
        assert sorted(set(interleave(shares, world))) == list(range(N))  # every example, each rank its share


# -- refused states ------------------------------------------------------------------------------
def sample_state(case):
    """A sampler mid-way through its second epoch (the first for a whole-run sampler) and its state."""
    sampler = case.build()
    if case.kind == "dataset":
        sampler.set_epoch(3)
        return sampler, sampler.state_dict()
    if case.per_epoch:
        train(case, sampler, iter(sampler))
        sampler.set_epoch(1)
    train(case, sampler, iter(sampler), stop=GLOBAL_BATCH if case.steps else 5)
    return sampler, sampler.state_dict()


def tampered(state, length):
    """(description, state) pairs that no ``state_dict()`` of this sampler could have produced."""
    out = []

    def edit(description, path, value=None, delete=False):
        new = copy.deepcopy(state)
        target = new
        for key in path[:-1]:
            target = target[key]
        if delete:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        out.append((description, new))

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
            return
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel():
                for bad in (float("nan"), float("inf")):
                    broken = value.clone()
                    broken.view(-1)[0] = bad
                    edit(f"{bad} in {path}", path, broken)
            if value.is_floating_point():
                edit(f"{path} requiring grad", path, value.detach().clone().requires_grad_(True))
            edit(f"complex {path}", path, value.to(torch.complex64))
            edit(f"meta {path}", path, value.to("meta"))
            return
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) or v is None for v in
                                                      np.ravel(np.array(value, dtype=object))):
            if any(isinstance(v, float) for v in np.ravel(np.array(value, dtype=object))):
                edit(f"NaN in {path}", path, np.full(np.shape(value), np.nan).tolist())
        if isinstance(value, bool):
            edit(f"{path} as an int", path, int(value) + 2)
        elif isinstance(value, int):
            for bad in (-1, 2**64, 1.5, True, "3"):
                edit(f"{path}={bad!r}", path, bad)
        elif isinstance(value, str):
            edit(f"{path} changed", path, value + "x")
            edit(f"{path} as an int", path, 3)
        if len(path) == 1 and value is not None:
            edit(f"{path} as a str", path, "x" if not isinstance(value, str) else 7)

    for key in state:
        edit(f"missing {key}", (key,), delete=True)
    edit("an unknown field", ("positon",), 0)
    walk(state, ())
    if "position" in state:
        edit("position past the epoch", ("position",), length + 1)
    if "sample" in state:  # a whole-run sampler's global position
        edit("sample past the run", ("sample",), (length + 1) * state["world_size"])
    if "world_size" in state:
        for bad in (0, -2, 1.5, "1", True):
            edit(f"world_size={bad!r}", ("world_size",), bad)
    out.append(("not a dict", list(state.items())))
    return out


@pytest.mark.parametrize("case", params(CASES, "test_tampered_states_are_refused_and_change_nothing"))
def test_tampered_states_are_refused_and_change_nothing(case):
    sampler, state = sample_state(case)
    before = canonical(sampler.state_dict())
    length = len(sampler) if case.kind != "dataset" else 0
    accepted = []
    for description, bad in tampered(state, length):
        try:
            sampler.load_state_dict(bad)
        except (ValueError, TypeError) as error:
            assert isinstance(error, StateError), f"{description}: {type(error).__name__}: {error}"
        else:
            accepted.append(description)
            sampler = sample_state(case)[0]  # start over from an untouched sampler
            continue
        assert canonical(sampler.state_dict()) == before, f"a refused state ({description}) changed the sampler"
    assert accepted == []
    # after all the refused loads, the sampler continues exactly as an untouched one does
    untouched = sample_state(case)[0]
    if case.kind == "dataset":
        assert dataset_items(sampler) == dataset_items(untouched)
    else:
        assert train(case, sampler, iter(sampler)) == train(case, untouched, iter(untouched))


FOREIGN = [(a, b) for a in CASES for b in CASES if a is not b]


@pytest.mark.parametrize(("saved", "loader"), FOREIGN, ids=[f"{a.name}->{b.name}" for a, b in FOREIGN])
def test_a_state_of_another_sampler_is_refused(saved, loader):
    _, state = sample_state(saved)
    target = sample_state(loader)[0]
    before = canonical(target.state_dict())
    with pytest.raises(StateError):
        target.load_state_dict(state)
    assert canonical(target.state_dict()) == before


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_a_state_with_other_settings_is_refused(case):
    _, state = sample_state(case)
    other = case.build(seed=1)
    with pytest.raises(StateError, match="seed"):
        other.load_state_dict(state)


# -- seeds and the global RNG -------------------------------------------------------------------
def run_with(case, seed=0):
    """What the sampler yields over its epochs (QMCAugment: its items at epoch 1)."""
    if case.kind == "dataset":
        wrapper = case.build(seed=seed)
        wrapper.set_epoch(1)
        return dataset_items(wrapper)
    return straight_run(case, seed=seed)


def with_global_seed(global_seed, case, seed=0):
    torch.manual_seed(global_seed)
    np.random.seed(global_seed)
    random.seed(global_seed)
    return run_with(case, seed)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_the_order_ignores_the_global_rngs(case):
    assert with_global_seed(0, case) == with_global_seed(99, case)
    assert with_global_seed(0, case) != with_global_seed(0, case, seed=1)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_seeds_up_to_two_to_the_64_are_accepted_and_distinct(case):
    high = run_with(case, 2**64 - 1)
    assert high == run_with(case, 2**64 - 1)
    assert high != run_with(case, 0)
    assert high != run_with(case, 2**63 - 1)
    for bad, error in ((2**64, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="seed"):
            case.build(seed=bad)


# -- StatefulDataLoader ------------------------------------------------------------------------
def loader_for(case, sampler, num_workers=0):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    data = TensorDataset(torch.arange(N))
    if case.kind == "batches":
        return stateful.StatefulDataLoader(data, batch_sampler=sampler, num_workers=num_workers)
    return stateful.StatefulDataLoader(data, batch_size=4, sampler=sampler, num_workers=num_workers)


def batches_of(loader):
    return [batch.tolist() for (batch,) in loader]


NO_STEPS = [case for case in SAMPLERS if not case.steps]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("case", NO_STEPS, ids=ids(NO_STEPS))
def test_stateful_dataloader_checkpoint_after_the_last_batch_resumes_with_no_batches(case, num_workers):
    if num_workers and case.name not in ("RandomReshuffling", "StratifiedBatchSampler"):
        pytest.skip("workers only change where indices are fetched: two samplers cover it")
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    # the reference: the loader's own RandomSampler gives no batches after such a checkpoint
    reference = stateful.StatefulDataLoader(TensorDataset(torch.arange(N)), batch_size=4, shuffle=True)
    iterator = iter(reference)
    for _ in range(len(reference)):
        next(iterator)
    fresh = stateful.StatefulDataLoader(TensorDataset(torch.arange(N)), batch_size=4, shuffle=True)
    fresh.load_state_dict(reference.state_dict())
    assert batches_of(fresh) == []

    sampler = case.build()
    loader = loader_for(case, sampler, num_workers)
    iterator = iter(loader)
    for _ in range(len(loader)):
        next(iterator)
    state = round_trip(loader.state_dict())
    resumed_sampler = case.build()
    resumed = loader_for(case, resumed_sampler, num_workers)
    resumed.load_state_dict(state)
    assert batches_of(resumed) == []
    if case.per_epoch:  # the next epoch is whole
        resumed_sampler.set_epoch(1)
        sampler.set_epoch(1)
        assert batches_of(resumed) == batches_of(loader_for(case, sampler))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("case", NO_STEPS, ids=ids(NO_STEPS))
def test_stateful_dataloader_resumes_mid_epoch(case, num_workers):
    if num_workers and case.name not in ("RandomReshuffling", "StratifiedBatchSampler"):
        pytest.skip("workers only change where indices are fetched: two samplers cover it")
    expected = batches_of(loader_for(case, case.build()))
    loader = loader_for(case, case.build(), num_workers)
    iterator = iter(loader)
    head = [next(iterator)[0].tolist() for _ in range(2)]
    state = round_trip(loader.state_dict())
    resumed = loader_for(case, case.build(), num_workers)
    resumed.load_state_dict(state)
    assert head + batches_of(resumed) == expected
