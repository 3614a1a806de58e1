import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import qmc
from torch.utils.data import DataLoader

from dataorder.samplers.qmc import (
    BITS,
    SOBOL_MAX_DIM,
    QMCAugment,
    choose,
    crop_offset,
    digital_shifts,
    flip_coin,
    hash_uniform,
    rotation_angle,
)


def with_point(sample, u):
    return sample, torch.from_numpy(u.copy())


def augment(n=40, dim=3, **kwargs):
    return QMCAugment(list(range(n)), with_point, dim, **kwargs)


def epoch_points(data, index, epochs):
    return np.stack([data.point(index, e) for e in range(epochs)])


# -- purity -----------------------------------------------------------------------------------
def loader_points(data, workers, epoch):
    data.set_epoch(epoch)
    loader = DataLoader(data, batch_size=7, shuffle=False, num_workers=workers)
    pairs = [(i, u) for indices, points in loader for i, u in zip(indices.tolist(), points)]
    return dict(sorted((i, u.numpy()) for i, u in pairs))


@pytest.mark.parametrize("method", ["sobol", "random"])
def test_points_do_not_depend_on_worker_count_or_access_order(method):
    data = augment(method=method, seed=5)
    reference = loader_points(data, 0, epoch=2)
    assert reference.keys() == set(range(40))
    parallel = loader_points(augment(method=method, seed=5), 2, epoch=2)
    assert all(np.array_equal(reference[i], parallel[i]) for i in range(40))
    fresh = augment(method=method, seed=5)
    fresh.set_epoch(2)
    for i in reversed(range(40)):  # any order, any instance: the same point
        assert np.array_equal(fresh[i][1].numpy(), reference[i])
        assert np.array_equal(fresh.point(i), reference[i])
    assert np.array_equal(fresh.points(range(40)), np.stack([reference[i] for i in range(40)]))


def test_points_change_with_seed_epoch_and_example():
    data = augment(seed=1)
    assert not np.array_equal(data.point(0, 0), data.point(0, 1))
    assert not np.array_equal(data.point(0, 0), data.point(1, 0))
    assert not np.array_equal(data.point(0, 0), augment(seed=2).point(0, 0))
    assert all(0.0 <= u < 1.0 for u in data.points(range(40), epoch=3).ravel())


# -- the Sobol structure ----------------------------------------------------------------------
def test_consecutive_epochs_are_a_digitally_shifted_scrambled_sobol_sequence():
    seed, dim, m = 3, 4, 5
    data = augment(dim=dim, seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51]))
    reference = qmc.Sobol(dim, scramble=True, bits=BITS, rng=rng).random_base2(m)
    reference_ints = np.rint(reference * 2**BITS).astype(np.uint64)
    for i in (0, 7, 39):
        ints = np.rint(epoch_points(data, i, 2**m) * 2**BITS).astype(np.uint64)
        assert np.array_equal(ints ^ digital_shifts(seed, np.array([i]), dim), reference_ints)


@pytest.mark.parametrize("index", [0, 11, 38])
def test_each_example_gets_a_net_every_power_of_two_epochs(index):
    # The first two Sobol coordinates form a (0, m, 2)-net, and scrambling and digital shifts
    # keep it one: every elementary box of volume 2^-m holds exactly one of the 2^m points.
    m = 4
    points = epoch_points(augment(dim=2, seed=9), index, 2**m)
    for a in range(m + 1):
        cells = np.floor(points[:, 0] * 2**a).astype(int) * 2 ** (m - a) + np.floor(points[:, 1] * 2 ** (m - a)).astype(int)
        assert sorted(cells.tolist()) == list(range(2**m))


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_epoch_points_have_lower_star_discrepancy_than_iid(dim):
    m = 6
    qmc_data, iid_data = augment(dim=dim, seed=4), augment(dim=dim, seed=4, method="random")
    for index in range(8):
        ours = qmc.discrepancy(epoch_points(qmc_data, index, 2**m), method="L2-star")
        iid = qmc.discrepancy(epoch_points(iid_data, index, 2**m), method="L2-star")
        assert ours < iid


def test_iid_points_look_uniform_and_independent():
    u = hash_uniform(0, np.arange(20000), epoch=1, dim=2)
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u.T)[0, 1]) < 0.03
    assert np.histogram(u[:, 0], bins=10, range=(0, 1))[0].min() > 1800


def test_unscrambled_is_the_plain_sobol_sequence_for_every_example():
    data = augment(dim=3, scramble=False, seed=7)
    reference = qmc.Sobol(3, scramble=False).random_base2(3)
    for i in (0, 5):
        assert np.array_equal(epoch_points(data, i, 8), reference)


# -- resumption -------------------------------------------------------------------------------
def test_state_dict_restores_the_epoch_and_the_points():
    data = augment(seed=2)
    data.set_epoch(6)
    expected = data.points(range(40))
    revived = augment(seed=2)
    revived.load_state_dict(data.state_dict())
    assert revived.epoch == 6 and np.array_equal(revived.points(range(40)), expected)
    with pytest.raises(ValueError, match="seed"):
        augment(seed=3).load_state_dict(data.state_dict())


def test_resumes_mid_epoch_with_stateful_dataloader():
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = augment(seed=8)
    data.set_epoch(4)
    loader = StatefulDataLoader(data, batch_size=5, num_workers=0)
    reference = [points for _, points in loader]
    iterator = iter(loader)
    head = [next(iterator)[1] for _ in range(3)]
    state = loader.state_dict()
    resumed_data = augment(seed=8)  # epoch 0 until the loader restores it
    resumed = StatefulDataLoader(resumed_data, batch_size=5, num_workers=0)
    resumed.load_state_dict(state)
    tail = [points for _, points in resumed]
    assert resumed_data.epoch == 4
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True))


# -- fallback and errors ----------------------------------------------------------------------
def test_beyond_the_sobol_limit_falls_back_to_iid_with_a_warning():
    with pytest.warns(UserWarning, match="Sobol limit"):
        data = QMCAugment([0, 1], with_point, SOBOL_MAX_DIM + 1, seed=3)
    assert data.method == "random"
    assert np.array_equal(data.point(1, 2), hash_uniform(3, np.array([1]), 2, SOBOL_MAX_DIM + 1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QMCAugment([0, 1], with_point, SOBOL_MAX_DIM, seed=3)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((object(), with_point, 2), {}, TypeError, "map-style"),
    (([1], "nope", 2), {}, TypeError, "transform"),
    (([1], with_point, 0), {}, ValueError, "dim"),
    (([1], with_point, 2), {"method": "halton"}, ValueError, "method"),
    (([1], with_point, 2), {"seed": -2}, ValueError, "seed"),
    (([1], with_point, 2), {"scramble": "yes"}, TypeError, "scramble"),
])
def test_constructor_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        QMCAugment(*args, **kwargs)


def test_indexing():
    data = augment(n=5, seed=1)
    assert data[-1][0] == 4 and torch.equal(data[-1][1], data[4][1])
    with pytest.raises(IndexError):
        data[5]
    with pytest.raises(IndexError):
        data.points([0, 5])
    with pytest.raises(ValueError, match="epoch"):
        data.set_epoch(-1)


# -- parameter helpers ------------------------------------------------------------------------
def test_helpers_split_the_unit_interval_evenly():
    grid = (np.arange(840) + 0.5) / 840
    assert np.bincount(crop_offset(grid, 32, 28)).tolist() == [168] * 5
    assert np.bincount(choose(grid, 7)).tolist() == [120] * 7
    assert flip_coin(grid, 0.25).sum() == 210
    angles = rotation_angle(grid, 30)
    assert angles.min() > -30 and angles.max() < 30 and abs(angles.mean()) < 1e-9
    assert choose(0.9999999, 4) == 3 and isinstance(choose(0.2, 4), int)
    assert crop_offset(0.5, 8, 8) == 0


@pytest.mark.parametrize("call, match", [
    (lambda: choose(0.5, 0), "k"),
    (lambda: crop_offset(0.5, 8, 9), "crop"),
    (lambda: flip_coin(0.5, 1.5), "p"),
    (lambda: rotation_angle(0.5, -1), "degrees"),
])
def test_helper_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fast_single_point_matches_the_vectorised_path():
    for method, scramble in itertools.product(["sobol", "random"], [True, False]):
        data = augment(dim=5, seed=12, method=method, scramble=scramble)
        for epoch in (0, 9):
            assert np.array_equal(np.stack([data.point(i, epoch) for i in range(40)]), data.points(range(40), epoch))


@pytest.mark.parametrize("method", ["sobol", "random"])
def test_seeds_of_64_bits_are_distinct_and_larger_ones_refused(method):
    # issue 13, failure 4: seed 2**64 silently equalled seed 0 for method="random"
    high = QMCAugment(list(range(8)), lambda x, u: u, dim=2, seed=2**64 - 1, method=method)
    low = QMCAugment(list(range(8)), lambda x, u: u, dim=2, seed=0, method=method)
    assert not np.array_equal(high.points(range(8)), low.points(range(8)))
    assert np.array_equal(high.points(range(8)), np.stack([high.point(i) for i in range(8)]))
    with pytest.raises(ValueError, match="seed"):
        QMCAugment(list(range(8)), lambda x, u: u, dim=2, seed=2**64, method=method)


def test_foreign_or_incomplete_states_are_refused():
    from dataorder.samplers import RandomReshuffling, StateError

    data = augment(seed=2)
    data.set_epoch(3)
    for bad in (RandomReshuffling(40).state_dict(), {"epoch": 5}, {**data.state_dict(), "epoch": -1},
                {k: v for k, v in data.state_dict().items() if k != "scramble"}):
        with pytest.raises(StateError):
            data.load_state_dict(bad)
    assert data.epoch == 3


def test_a_sobol_epoch_past_its_precision_is_refused_where_it_is_set():
    data = augment()
    with pytest.raises(ValueError, match=r"epoch must be below 2\*\*30.*method='random'"):
        data.set_epoch(2**30)
    assert data.epoch == 0
    with pytest.raises(ValueError, match="epoch"):
        data.load_state_dict({**data.state_dict(), "epoch": 2**30})
    augment(method="random").set_epoch(2**30)  # random points have no such bound
