"""Every non-gradient sampler resumes bit-exact through torchdata's ``StatefulDataLoader``.

A run is two epochs of a tiny dataset. The reference is one uninterrupted run; each case
takes ``loader.state_dict()`` at a step boundary of the training loop (after ``k`` batches
of epoch 0 -- including right after its last batch -- or between epochs, once the loop over
epoch 0 has ended and ``set_epoch(1)`` has been called), rebuilds sampler, dataset and loader from scratch, loads the state and finishes the
run. What the resumed run yields must equal the rest of the reference, batch for batch.

GraB and herding through ``StatefulDataLoader`` (steps vs prefetching) are tested with the
GraB sampler itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dataorder import (
    CurriculumSampler,
    FlipFlop,
    MixtureSampler,
    QMCAugment,
    RandomReshuffling,
    ShuffleOnce,
    StratifiedBatchSampler,
    WithReplacement,
)

stateful = pytest.importorskip("torchdata.stateful_dataloader")
StatefulDataLoader = stateful.StatefulDataLoader

N, BATCH, EPOCHS = 12, 3, 2


def _add_point(value, u):
    """QMCAugment's transform: the example plus its first coordinate, so the point is checked."""
    return value + float(u[0])


def _labels() -> list[int]:
    return [0] * 6 + [1] * 3 + [2] * 3


# name -> builder of (dataset, loader keyword arguments, objects to call set_epoch on)
def _build(name: str):
    data = TensorDataset(torch.arange(N, dtype=torch.float64))
    if name == "RandomReshuffling":
        sampler = RandomReshuffling(data, seed=3)
    elif name == "ShuffleOnce":
        sampler = ShuffleOnce(data, seed=3)
    elif name == "WithReplacement":
        sampler = WithReplacement(data, num_samples=10, seed=3)
    elif name == "FlipFlop":
        sampler = FlipFlop(data, seed=3)
    elif name == "CurriculumSampler":
        scores = np.linspace(0.0, 1.0, N)[::-1].tolist()
        sampler = CurriculumSampler(scores, num_samples=2 * N, start=0.25, full_at=0.5, seed=3)
    elif name == "MixtureSampler":
        sampler = MixtureSampler({"a": 8, "b": 4}, {"a": 0.5, "b": 0.5}, num_samples=2 * N, batch_size=BATCH, seed=3)
    elif name == "StratifiedBatchSampler":
        sampler = StratifiedBatchSampler(_labels(), batch_size=4, seed=3)
        return data, {"batch_sampler": sampler}, [sampler]
    elif name == "QMCAugment":
        augmented = QMCAugment(data.tensors[0], _add_point, dim=2, seed=3)
        sampler = RandomReshuffling(augmented, seed=3)
        return augmented, {"sampler": sampler, "batch_size": BATCH}, [sampler, augmented]
    else:  # pragma: no cover - a typo in the parametrisation
        raise KeyError(name)
    return data, {"sampler": sampler, "batch_size": BATCH}, [sampler]


SAMPLERS = ["RandomReshuffling", "ShuffleOnce", "WithReplacement", "FlipFlop", "CurriculumSampler",
            "MixtureSampler", "StratifiedBatchSampler", "QMCAugment"]


def _loader(name: str, num_workers: int, prefetch_factor: int | None):
    dataset, kwargs, epoch_objects = _build(name)
    extra = {"num_workers": num_workers}
    if num_workers:
        extra["prefetch_factor"] = prefetch_factor
        extra["multiprocessing_context"] = "fork"
    return StatefulDataLoader(dataset, **kwargs, **extra), epoch_objects


def _batch_values(batch) -> list[float]:
    tensor = batch[0] if isinstance(batch, (list, tuple)) else batch
    return tensor.tolist()


def _run(loader, epoch_objects, epochs, first_epoch=0, snapshots=None):
    """Batches per epoch; with ``snapshots`` a dict, the loader's state after each batch of epoch 0."""
    out = []
    for epoch in range(first_epoch, epochs):
        for thing in epoch_objects:
            thing.set_epoch(epoch)
        batches = []
        for batch in loader:
            batches.append(_batch_values(batch))
            if snapshots is not None and epoch == 0:
                snapshots[len(batches)] = loader.state_dict()
        if snapshots is not None and epoch == 0:
            # between epochs: take the state once the next epoch is selected (see docs/integrations.md)
            for thing in epoch_objects:
                thing.set_epoch(1)
            snapshots["ended"] = loader.state_dict()
        out.append(batches)
    return out


def _reference(name, num_workers, prefetch_factor):
    loader, epoch_objects = _loader(name, num_workers, prefetch_factor)
    snapshots: dict = {}
    return _run(loader, epoch_objects, EPOCHS, snapshots=snapshots), snapshots


def _resumed(name, state, num_workers, prefetch_factor, first_epoch=0):
    """Rebuild everything, load ``state`` and finish the run from ``first_epoch``."""
    loader, epoch_objects = _loader(name, num_workers, prefetch_factor)
    loader.load_state_dict(state)
    return _run(loader, epoch_objects, EPOCHS, first_epoch=first_epoch)


def _check(name, cut, num_workers, prefetch_factor=2):
    reference, snapshots = _reference(name, num_workers, prefetch_factor)
    if cut == "ended":  # the loop over epoch 0 had finished and set_epoch(1) was called
        resumed = _resumed(name, snapshots[cut], num_workers, prefetch_factor, first_epoch=1)
        assert resumed == reference[1:], "the epochs after the one that had ended"
        return
    resumed = _resumed(name, snapshots[cut], num_workers, prefetch_factor)
    assert resumed[0] == reference[0][cut:], f"rest of epoch 0 after {cut} batches"
    assert resumed[1:] == reference[1:], "the following epoch"


def _cuts(name: str) -> list:
    loader, _ = _loader(name, 0, None)
    return list(range(1, len(loader) + 1)) + ["ended"]


def _params(name: str, cuts: list) -> list:
    return [pytest.param(name, cut, id=f"{name}-{cut}") for cut in cuts]


# With workers, a state taken after the loop is the loader's snapshot of the last batch, not the
# sampler's live state, so the between-epochs cut is a single-process guarantee only.
ALL_CUTS = [p for name in SAMPLERS for p in _params(name, _cuts(name))]
IN_LOOP_CUTS = [p for name in SAMPLERS for p in _params(name, _cuts(name)[:-1])]
FEW_CUTS = [p for name in SAMPLERS for p in _params(name, [1, _cuts(name)[-2]])]


@pytest.mark.parametrize(("name", "cut"), ALL_CUTS)
def test_resume_without_workers(name, cut):
    _check(name, cut, num_workers=0)


@pytest.mark.parametrize(("name", "cut"), FEW_CUTS)
def test_resume_with_two_workers(name, cut):
    _check(name, cut, num_workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers,prefetch_factor", [(1, 3), (2, 3)])
@pytest.mark.parametrize(("name", "cut"), IN_LOOP_CUTS)
def test_resume_with_workers_every_step(name, cut, num_workers, prefetch_factor):
    _check(name, cut, num_workers=num_workers, prefetch_factor=prefetch_factor)


def test_workers_see_the_same_order_as_the_main_process():
    """The reference itself: workers and prefetching do not change what a sampler yields."""
    for name in ("RandomReshuffling", "StratifiedBatchSampler", "QMCAugment"):
        assert _reference(name, 2, 2)[0] == _reference(name, 0, None)[0]


def test_state_round_trips_through_torch_save(tmp_path):
    """The loader's state (sampler state included) survives torch.save/torch.load(weights_only=True)."""
    reference, snapshots = _reference("MixtureSampler", 0, None)
    torch.save(snapshots[2], tmp_path / "loader.pt")
    state = torch.load(tmp_path / "loader.pt", weights_only=True)
    assert _resumed("MixtureSampler", state, 0, None)[0] == reference[0][2:]
