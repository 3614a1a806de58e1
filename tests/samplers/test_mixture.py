"""MixtureSampler: exact per-batch counts, windows, resumption, sharding, exhaustion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataorder.samplers.mixture import MixtureSampler
from dataorder.samplers.permutation import keyed_permutation
from dataorder.schedules import Schedule

SCHEDULE = Schedule(
    {"web": 0.6, "code": 0.25, "math": 0.15},
    [
        {"at": 0.3, "weights": {"web": 0.2, "code": 0.3, "math": 0.5}, "transition": "linear", "over": 0.3},
        {"at": 0.75, "weights": {"web": 0.0, "code": 0.5, "math": 0.5}},
    ],
)
SIZES = {"math": 7, "web": 50, "code": 13}  # concatenation order differs from the schedule's on purpose
N, B = 1003, 12


def make(**kwargs) -> MixtureSampler:
    options = dict(num_samples=N, batch_size=B, seed=3) | kwargs
    return MixtureSampler(SIZES, SCHEDULE, **options)


def reference_counts(weights: list[float], total: int) -> list[int]:
    """Largest remainder written out: floors, then +1 by remainder, ties to the earlier source."""
    ideal = [total * w for w in weights]
    counts = [math.floor(x + 1e-9) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - counts[i]) if weights[i] > 0 else 2.0, i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sources_of(sampler: MixtureSampler, indices) -> np.ndarray:
    return np.array([sampler.source_of(int(i)) for i in indices])


def test_per_batch_counts_equal_largest_remainder_of_the_schedule():
    sampler = make()
    stream = sampler.stream()
    assert len(stream) == N
    names = sources_of(sampler, stream)
    checked_ramp = checked_step = 0
    for b in range(sampler.num_batches):
        size = min(B, N - b * B)
        progress = b * B / N
        expected = reference_counts(SCHEDULE.weights(progress).tolist(), size)
        got = [int((names[b * B:b * B + size] == name).sum()) for name in SCHEDULE.names]
        assert got == expected, (b, progress)
        assert sampler.counts_at(b) == dict(zip(SCHEDULE.names, expected))
        checked_ramp += 0.3 <= progress < 0.6
        checked_step += progress >= 0.75
    assert checked_ramp > 20 and checked_step > 15
    # after the step at 0.75 there is no web at all, before the ramp 0.6 of each batch
    assert sampler.counts_at(sampler.num_batches - 2)["web"] == 0
    assert sampler.weights_at(0) == {"web": 0.6, "code": 0.25, "math": 0.15}


def test_window_proportions_track_the_schedule():
    sampler = make(num_samples=12_000, batch_size=40)
    names = sources_of(sampler, sampler.stream())
    for start in range(0, 12_000 - 1000, 333):  # windows that do not align with batches
        stop = start + 1000
        batches = np.arange(start // 40, (stop - 1) // 40 + 1)
        for column, name in enumerate(SCHEDULE.names):
            realised = int((names[start:stop] == name).sum())
            scheduled = sum(
                40 * SCHEDULE.weights(b * 40 / 12_000)[column] * (min(stop, (b + 1) * 40) - max(start, b * 40)) / 40
                for b in batches
            )
            # within one example per batch per source, plus the partial batches at both ends
            assert abs(realised - scheduled) <= len(batches) + 2 * 40 / 2
    for first in range(0, 300 - 25, 7):  # whole batches: strictly within one example per batch per source
        window = names[first * 40:(first + 25) * 40]
        scheduled = 40 * SCHEDULE.weights(np.arange(first, first + 25) * 40 / 12_000).sum(axis=0)
        realised = [(window == name).sum() for name in SCHEDULE.names]
        assert np.all(np.abs(realised - scheduled) < 25)


def test_any_run_of_samples_and_each_rank_share_hold_the_batch_mix():
    schedule = Schedule({"web": 0.5, "code": 0.3, "math": 0.15, "books": 0.05},
                        [{"at": 0.3, "weights": {"web": 0.2, "code": 0.3, "math": 0.4, "books": 0.1},
                          "transition": "linear", "over": 0.5}])
    size, batches = 256, 40
    sampler = MixtureSampler(dict.fromkeys(schedule.names, 1000), schedule, num_samples=size * batches,
                             batch_size=size, seed=2)
    column, _, _ = sampler._map(np.arange(size * batches))
    counts = sampler.counts.batch(np.arange(batches))
    # deviation of every window from the batch counts spread evenly over the batch's slots
    excess = np.eye(4)[column] - counts[np.arange(size * batches) // size] / size
    running = np.vstack([np.zeros(4), np.cumsum(excess, axis=0)])
    assert (running.max(axis=0) - running.min(axis=0)).max() <= 6  # a per-batch shuffle gives ~22
    for world in (2, 4, 8, 16):
        for b in range(batches):
            for r in range(world):
                share = np.bincount(column[b * size:(b + 1) * size][r::world], minlength=4)
                assert np.abs(share - counts[b] / world).max() <= 5


def test_indices_are_global_into_the_concatenation():
    sampler = make()
    offsets = {"math": 0, "web": 7, "code": 57}
    assert sampler.offsets == offsets
    for index in sampler.stream():
        name = sampler.source_of(int(index))
        assert offsets[name] <= index < offsets[name] + SIZES[name]
    with pytest.raises(ValueError, match="index must be an int in"):
        sampler.source_of(70)


def test_each_pass_over_a_source_is_a_permutation_and_epochs_are_counted():
    sampler = make()
    column, draw, index = sampler._map(np.arange(N))
    for c, name in enumerate(SCHEDULE.names):
        mask = column == c
        assert np.sort(draw[mask]).tolist() == list(range(mask.sum()))  # draws are consecutive
        local = (index[mask] - sampler.offsets[name])[np.argsort(draw[mask])]
        size = SIZES[name]
        for e in range(len(local) // size):
            assert sorted(local[e * size:(e + 1) * size].tolist()) == list(range(size))
        assert len(local) // size >= 2  # several reshuffles happened
    list(sampler)
    totals = sampler.counts.total()
    assert sampler.epochs_of_source == {name: totals[c] / SIZES[name] for c, name in enumerate(SCHEDULE.names)}


def test_consecutive_passes_are_reshuffled():
    sampler = MixtureSampler({"a": 20}, {"a": 1.0}, num_samples=60, batch_size=1, seed=0)
    stream = sampler.stream().tolist()
    passes = [stream[0:20], stream[20:40], stream[40:60]]
    assert all(sorted(p) == list(range(20)) for p in passes)
    assert passes[0] != passes[1] != passes[2]


def test_exhaustion_stop_ends_before_the_first_batch_that_would_repeat():
    sampler = make(exhaustion="stop")
    length = len(sampler)
    stream = sampler.stream()
    assert length % B == 0 and 0 < length < N
    names = sources_of(sampler, stream)
    for name, size in SIZES.items():
        drawn = stream[names == name]
        assert len(drawn) == len(set(drawn.tolist())) <= size  # nothing repeated
    # one more batch would have needed a repeat
    nxt = sampler.counts.cumulative(length // B + 1)
    assert any(nxt[c] > SIZES[name] for c, name in enumerate(SCHEDULE.names))
    assert list(sampler) == stream.tolist()
    restart = make()
    assert restart.stream(0, length).tolist() == stream.tolist()  # same prefix as "restart"


def test_exhaustion_stop_rejects_a_source_too_small_for_one_batch():
    with pytest.raises(ValueError, match="math cannot fill even the first batch"):
        len(MixtureSampler({"web": 100, "math": 1}, {"web": 0.5, "math": 0.5}, num_samples=100, batch_size=10,
                           exhaustion="stop"))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_local_batches_are_their_share_of_the_global_batch(world_size):
    # the union, equal counts and padding of the shares: tests/conformance/test_protocol.py
    stream = make().stream()
    outputs = [list(make(rank=r, world_size=world_size, batch_size=12)) for r in range(world_size)]
    local = B // world_size
    for r, out in enumerate(outputs):
        assert out[:local] == stream[r:B:world_size].tolist()


@pytest.mark.parametrize(("consumed", "old", "new"), [(0, 1, 1), (1, 1, 1), (360, 2, 3), (504, 4, 2), (996, 3, 4),
                                                      (1002, 2, 1), (250, 1, 2)])
def test_resume_at_any_sample_and_world_size_gives_the_same_stream(consumed, old, new):
    stream = make().stream()
    saved = []
    for r in range(old):
        sampler = make(rank=r, world_size=old)
        iterator = iter(sampler)
        for _ in range(consumed // old):
            next(iterator)
        saved.append(sampler.state_dict())
    assert {s["sample"] for s in saved} == {consumed}
    rest = []
    for r in range(new):
        sampler = make(rank=r, world_size=new)
        sampler.load_state_dict(saved[0])
        rest.append(list(sampler))
    merged = [index for group in zip(*rest) for index in group]
    assert merged[: N - consumed] == stream[consumed:].tolist()


def test_state_is_small_and_resume_is_exact_mid_batch():
    sampler = make()
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(17)]
    state = sampler.state_dict()
    assert state["sample"] == 17 and "position" not in state  # the global position is the whole state
    assert all(isinstance(v, (int, str, bool, dict)) for v in state.values())
    fresh = make()
    fresh.load_state_dict(state)
    assert head + list(fresh) == make().stream().tolist()


def test_resume_at_a_billion_samples():
    big = Schedule.anneal({"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5}, last=0.2, transition="linear", over=0.01)
    kwargs = dict(num_samples=2 * 10**9, batch_size=1 << 20, seed=1)
    sizes = {"a": 10**12, "b": 10**6}
    state = MixtureSampler(sizes, big, **kwargs).state_dict() | {"sample": 10**9}
    sampler = MixtureSampler(sizes, big, **kwargs)
    sampler.load_state_dict(state)
    assert next(iter(sampler)) == sampler.stream(10**9, 10**9 + 1)[0]
    # 953 full batches of 1,048,576 before sample 10⁹: 0.1 of each is 104857.6 -> 104858 (largest remainder)
    full = 10**9 // (1 << 20)
    partial = sampler.stream(full * (1 << 20), 10**9 + 1)
    expected_b = full * 104858 + int((partial >= 10**12).sum())
    assert sampler.source_counts() == {"a": 10**9 + 1 - expected_b, "b": expected_b}
    assert sampler.epochs_of_source["b"] == expected_b / 10**6


def test_a_finished_run_loads_at_any_world_size():
    done = make(rank=0, world_size=4)
    list(done)
    assert done.state_dict()["sample"] == 1004  # 251 per rank, the last one padded
    single = make()
    single.load_state_dict(done.state_dict())
    assert single.position == len(single) == N


def test_state_errors_change_nothing():
    sampler = make(world_size=2, rank=0)
    iterator = iter(sampler)
    next(iterator)
    state = make(world_size=1).state_dict() | {"sample": 5}
    with pytest.raises(ValueError, match="cannot split evenly"):
        sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        make(seed=4).load_state_dict(make().state_dict())
    with pytest.raises(ValueError, match="another schedule"):
        MixtureSampler(SIZES, {"web": 1, "code": 1, "math": 1}, num_samples=N, batch_size=B, seed=3).load_state_dict(
            make().state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        make(batch_size=24).load_state_dict(make().state_dict())
    assert sampler.position == 1


def test_documented_example_with_concatenated_hf_datasets():
    import datasets
    from torch.utils.data import DataLoader

    from dataorder import Schedule as PublicSchedule

    sizes = {"web": 7000, "code": 1500, "math": 1000, "books": 500}
    sources = {name: datasets.Dataset.from_dict({"text": [f"{name} document {i}" for i in range(n)]})
               for name, n in sizes.items()}
    corpus = datasets.concatenate_datasets(list(sources.values()))
    from pathlib import Path

    schedule = PublicSchedule.load(Path(__file__).parents[2] / "examples" / "pretraining_mixture.yaml")
    sampler = MixtureSampler(sources, schedule, num_samples=20_480, batch_size=1024, seed=0)
    loader = DataLoader(corpus, batch_size=1024, sampler=sampler)
    for step, batch in enumerate(loader):
        names = [text.split()[0] for text in batch["text"]]
        assert {name: names.count(name) for name in sizes} == sampler.counts_at(step)
    assert sampler.counts_at(0) == {"web": 717, "code": 154, "math": 102, "books": 51}
    assert sampler.counts_at(19) == {"web": 359, "code": 307, "math": 256, "books": 102}
    assert sampler.epochs_of_source == {"web": 13624 / 7000, "code": 3386 / 1500, "math": 2348 / 1000,
                                        "books": 1122 / 500}


@pytest.mark.slow
def test_benchmark_quick_smoke():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "mixture.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "MixtureSampler, ramped" in result.stdout and "resume at sample 10^9" in result.stdout


def test_schedule_from_yaml_path_and_run_section(tmp_path):
    path = tmp_path / "mix.yaml"
    Schedule(SCHEDULE.base, SCHEDULE.segments, run={"num_samples": N, "batch_size": B}).save(path)
    from_file = MixtureSampler(SIZES, path, seed=3)
    assert from_file.stream().tolist() == make().stream().tolist()
    with pytest.raises(ValueError, match="num_samples is required"):
        MixtureSampler(SIZES, SCHEDULE, batch_size=B)


def test_argument_errors():
    with pytest.raises(ValueError, match="differ"):
        MixtureSampler({"web": 5}, SCHEDULE, num_samples=10, batch_size=2)
    with pytest.raises(ValueError, match="multiple of world_size=4"):
        make(batch_size=10, world_size=4, rank=0)
    with pytest.raises(ValueError, match="exhaustion must be"):
        make(exhaustion="cycle")
    with pytest.raises(TypeError, match="non-empty dict"):
        MixtureSampler([], SCHEDULE, num_samples=10, batch_size=2)
    with pytest.raises(ValueError, match="at least one example"):
        MixtureSampler({"web": 0, "code": 1, "math": 1}, SCHEDULE, num_samples=10, batch_size=2)


def reference_permutation(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """The 8-round Feistel network with cycle-walking, in plain Python integers."""
    mask64 = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    half = (max(2, (n - 1).bit_length()) + 1) // 2
    mask = (1 << half) - 1
    round_keys = [mix(key ^ ((0x9E3779B97F4A7C15 * (r + 1)) & mask64)) for r in range(8)]

    def network(v):
        left, right = v >> half, v & mask
        for k in round_keys:
            left, right = right, left ^ (mix(right ^ k) & mask)
        return (left << half) | right

    out = []
    for v in x.tolist():
        v = network(v)
        while v >= n:
            v = network(v)
        out.append(v)
    return np.array(out)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 1000, 4099])
def test_keyed_permutation_is_a_bijection_equal_to_the_reference(n):
    x = np.arange(n)
    for key in (0, 12345):
        y = keyed_permutation(x, n, key)
        assert sorted(y.tolist()) == list(range(n))
        assert y.tolist() == reference_permutation(x, n, key).tolist()


def test_keyed_permutation_positions_are_close_to_uniform():
    n, trials = 10, 4000
    table = np.array([keyed_permutation(np.arange(n), n, key) for key in range(trials)])
    counts = np.stack([np.bincount(table[:, j], minlength=n) for j in range(n)])
    expected = trials / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 81 * 1.6  # df = 81; a 4-round network gives ~9x that


def test_seeds_of_64_bits_work_at_construction_and_iteration():
    # issue 13, failure 4: seeds >= 2**63 overflowed int64 when hashed
    high = make(seed=2**64 - 1)
    assert list(high)[:B] == high.stream(0, B).tolist() != make(seed=0).stream(0, B).tolist()
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        make(seed=2**64)


def test_a_state_of_the_same_schedule_with_its_sources_in_another_order_is_refused():
    # the sources' order is the stream's column order: the two samplers draw different streams
    from dataorder.samplers import StateError

    first = MixtureSampler({"a": 10, "b": 10}, Schedule({"a": 1, "b": 2}), num_samples=40, batch_size=4, seed=0)
    swapped = MixtureSampler({"a": 10, "b": 10}, Schedule({"b": 2, "a": 1}), num_samples=40, batch_size=4, seed=0)
    assert list(first) != list(swapped)
    assert Schedule({"a": 1, "b": 2}) != Schedule({"b": 2, "a": 1})
    with pytest.raises(StateError, match="another schedule"):
        swapped.load_state_dict(first.state_dict())


def test_a_batch_size_whose_quotas_float64_cannot_split_is_refused_up_front():
    with pytest.raises(ValueError, match=r"batch_size must be a positive int <= 2\*\*40"):
        MixtureSampler({"a": 10, "b": 10}, {"a": 1, "b": 1}, num_samples=2**62, batch_size=2**60)


def test_a_stopping_run_refuses_a_source_too_small_for_its_first_batch_at_construction():
    with pytest.raises(ValueError, match="b cannot fill even the first batch"):
        MixtureSampler({"a": 20, "b": 1}, {"a": 1, "b": 1}, num_samples=40, batch_size=4, exhaustion="stop")


def test_a_stopped_run_has_no_counts_past_its_last_batch():
    sampler = MixtureSampler({"a": 6, "b": 6}, {"a": 1, "b": 1}, num_samples=40, batch_size=4, exhaustion="stop")
    assert sampler.num_batches == 3  # six of each source fill three batches of two and two
    assert sampler.counts_at(2) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 3\)"):
        sampler.counts_at(3)
