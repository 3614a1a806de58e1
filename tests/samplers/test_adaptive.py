"""AdaptiveMixtureSampler: update rules, exact per-batch counts, floors, rejection, resumption."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dataorder.samplers.adaptive import (AdaptiveMixtureSampler, LateObservationError, WeightHistory, doremi_weights,
                                         exp3_weights, floor_mix, plot_weights, reference_losses)
from dataorder.samplers._state import StateError
from dataorder.samplers.allocation import largest_remainder
from dataorder.schedules import BatchCounts, Schedule
from dataorder.scores.io import write_scores

SIZES = {"code": 23, "tests": 11, "prose": 17}
BASE = {"code": 0.5, "tests": 0.3, "prose": 0.2}
N, B = 150, 6  # 25 global batches


def make(rule="exp3", **kwargs) -> AdaptiveMixtureSampler:
    options = dict(num_samples=N, batch_size=B, seed=4, rule=rule, rate=2.0, smoothing=0.5, floor=0.05)
    if rule == "doremi":
        options["reference"] = {"code": 1.0, "tests": 1.5, "prose": 2.0}
    return AdaptiveMixtureSampler(SIZES, BASE, **(options | kwargs))


def losses_at(step: int, rank: int = 0) -> dict[str, float]:
    """A deterministic loss curve per domain (tests falls fast, prose slowly), with a rank offset."""
    return {"code": 3.0 / (1 + 0.1 * step) + 0.01 * rank, "tests": 3.0 / (1 + 0.5 * step) - 0.01 * rank,
            "prose": 3.0 - 0.02 * step + 0.03 * math.sin(step)}


def drive(sampler: AdaptiveMixtureSampler, start_batch: int = 0, batches: int | None = None) -> list[list[int]]:
    """Iterate batch by batch (one rank's share), observing every batch after it is drawn."""
    share = sampler.batch_size // sampler.world_size
    iterator = iter(sampler)
    out = []
    step = start_batch
    while batches is None or len(out) < batches:
        batch = [i for _, i in zip(range(share), iterator)]
        if not batch:
            break
        out.append(batch)
        if step < sampler.counts.num_batches:
            sampler.observe(step, losses_at(step, sampler.rank))
        step += 1
    return out


def same_state(a: dict, b: dict) -> bool:
    buffer_a, buffer_b = io.BytesIO(), io.BytesIO()
    torch.save(a, buffer_a)
    torch.save(b, buffer_b)
    return buffer_a.getvalue() == buffer_b.getvalue()


# -- the rules against hand-computed values ----------------------------------------------------------
def test_exp3_against_hand_computed_values():
    s = AdaptiveMixtureSampler({"a": 10, "b": 10}, {"a": 0.75, "b": 0.25}, num_samples=40, batch_size=4,
                               rule="exp3", rate=2.0, smoothing=0.5, floor=0.1)
    assert s.observe(0, {"a": 2.0, "b": 3.0}) == {"a": 0.7, "b": 0.3}  # no reward yet: the base weights, floored
    # rewards (improvements) 0.5 and 1.0, smoothed from 0: 0.25, 0.5; tilt exp(2 * r) of the base weights
    got = s.observe(1, {"a": 1.5, "b": 2.0})
    ea, eb = 0.75 * math.exp(0.5), 0.25 * math.exp(1.0)
    pa = ea / (ea + eb)
    assert got["a"] == pytest.approx(0.1 + 0.8 * pa, abs=1e-12)
    assert got["b"] == pytest.approx(0.1 + 0.8 * (1 - pa), abs=1e-12)
    # next rewards 0.5 and -0.5: signal 0.375, 0.0
    got = s.observe(2, {"a": 1.0, "b": 2.5})
    ea, eb = 0.75 * math.exp(0.75), 0.25
    assert got["a"] == pytest.approx(0.1 + 0.8 * ea / (ea + eb), abs=1e-12)


def test_doremi_against_hand_computed_values():
    s = AdaptiveMixtureSampler({"a": 10, "b": 10}, {"a": 0.5, "b": 0.5}, num_samples=40, batch_size=4,
                               rule="doremi", reference={"a": 1.0, "b": 2.0}, rate=1.0, smoothing=0.5, floor=0.05)
    # excess: max(3 - 1, 0) = 2 and max(1 - 2, 0) = 0; smoothed from 0: 1 and 0
    got = s.observe(0, {"a": 3.0, "b": 1.0})
    pa = 0.5 * math.e / (0.5 * math.e + 0.5)
    assert got["a"] == pytest.approx(0.05 + 0.9 * pa, abs=1e-12)
    # second step multiplies the previous weights (floors included), signal 0.5 + 0.5*0, 0 + 0.5*1
    wa, wb = got["a"], got["b"]
    got = s.observe(1, {"a": 1.0, "b": 3.0})
    ta, tb = wa * math.exp(0.5), wb * math.exp(0.5)
    assert got["a"] == pytest.approx(0.05 + 0.9 * ta / (ta + tb), abs=1e-12)


def test_pure_kernels():
    assert exp3_weights(np.array([0.5, 0.5]), np.array([1000.0, 0.0]), 1.0).tolist() == [1.0, 0.0]  # no overflow
    assert doremi_weights(np.array([0.2, 0.8]), np.zeros(2), 5.0).tolist() == pytest.approx([0.2, 0.8])
    assert floor_mix(np.array([0.5, 0.5]), np.array([0.2, 0.0])).tolist() == pytest.approx([0.6, 0.4])


# -- counts, floors, warm-up, delay --------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["exp3", "doremi"])
def test_every_batch_holds_the_largest_remainder_counts_of_the_weights_in_force(rule):
    s = make(rule)
    batches = drive(s)
    assert len(s.weights_history()) == s.counts.num_batches - 1  # one update per observed step but the last
    names = s.schedule.names
    for b, batch in enumerate(batches):
        weights = s.weights_at(b)
        expected = largest_remainder(B * np.array([weights[n] for n in names]), B).tolist()
        got = [sum(s.source_of(i) == n for i in batch) for n in names]
        assert got == expected == list(s.counts_at(b).values())
    for entry in s.weights_history():
        assert s.weights_at(entry["batch"]) == entry["weights"]
    assert s.source_counts() == {n: sum(s.counts_at(b)[n] for b in range(len(batches))) for n in names}
    assert s.weights_at(0) == BASE


@pytest.mark.parametrize("rule", ["exp3", "doremi"])
def test_floors_are_respected_under_extreme_signals(rule):
    floors = {"code": 0.2, "tests": 0.1, "prose": 0.3}
    s = make(rule, rate=50.0, floor=floors, smoothing=0.0)
    for step in range(s.counts.num_batches - 1):
        s.observe(step, {"code": 10.0 + 5 * step if rule == "doremi" else 10.0 - 5 * step, "tests": 0.0, "prose": 0.0})
    for entry in s.weights_history():
        for name, floor in floors.items():
            assert entry["weights"][name] >= floor - 1e-12
            assert entry["counts"][name] >= math.floor(B * floor)
    assert s.weights_history()[-1]["weights"]["code"] == pytest.approx(1 - 0.1 - 0.3, abs=1e-6)


def test_warmup_follows_the_base_schedule():
    schedule = Schedule({"code": 1, "tests": 1, "prose": 1}, [{"at": 0.2, "weights": {"code": 1, "tests": 0, "prose": 0}}])
    s = AdaptiveMixtureSampler(SIZES, schedule, num_samples=N, batch_size=B, warmup=10, smoothing=0.0)
    for step in range(12):
        result = s.observe(step, losses_at(step))
        assert (result is None) == (step + 1 < 10)
    reference = BatchCounts(schedule, N, B)
    for b in range(10):
        assert s.counts_at(b) == dict(zip(schedule.names, reference.batch(b).tolist()))
    assert s.weights_history()[0]["batch"] == 10


def test_delay_shifts_updates_and_late_observations_are_refused():
    s = make(delay=2)
    iterator = iter(s)
    for _ in range(3 * B):  # three batches produced
        next(iterator)
    assert s.observe(0, losses_at(0)) is not None  # applies from batch 3, not produced yet
    assert s.weights_history()[0]["batch"] == 3
    for _ in range(B + 1):  # batch 3 produced, batch 4 started
        next(iterator)
    before = s.state_dict()
    with pytest.raises(LateObservationError, match="delay"):
        s.observe(1, losses_at(1))  # would change batch 1 + 1 + 2 = 4, already produced
    assert same_state(before, s.state_dict())


def test_late_observation_without_delay():
    s = make()
    iterator = iter(s)
    for _ in range(B + 1):  # batch 1 started
        next(iterator)
    before = s.state_dict()
    with pytest.raises(LateObservationError):
        s.observe(0, losses_at(0))
    assert same_state(before, s.state_dict())


# -- rejection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("rule", ["exp3", "doremi"])
def test_non_finite_losses_are_rejected_with_the_state_unchanged(bad, rule):
    s = make(rule)
    drive(s, batches=3)
    before = s.state_dict()
    with pytest.raises(ValueError, match="not finite"):
        s.observe(3, losses_at(3) | {"tests": bad})
    assert same_state(before, s.state_dict())
    assert s.observe(3, losses_at(3)) is not None  # the same step may be reported again, correctly


@pytest.mark.parametrize("losses, error", [({"code": 1.0, "web": 1.0}, ValueError), ({"code": "1"}, TypeError),
                                           ([1.0, 2.0], TypeError)])
def test_bad_reports_are_rejected(losses, error):
    s = make()
    with pytest.raises(error):
        s.observe(0, losses)
    assert s.observe(0, {"code": 1.0}) is not None


def test_steps_must_increase():
    s = make()
    s.observe(2, losses_at(2))
    with pytest.raises(ValueError, match="step"):
        s.observe(2, losses_at(2))
    with pytest.raises(ValueError, match="step"):
        s.observe(s.counts.num_batches, losses_at(0))


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "odm"}, "rule"), ({"rate": 0.0}, "rate"), ({"smoothing": 1.0}, "smoothing"),
    ({"floor": 0.4}, "floor"), ({"floor": {"code": 0.1}}, "floor"), ({"exhaustion": "stop"}, "exhaustion"),
    ({"rule": "doremi", "reference": None}, "reference"), ({"reference": {"code": 1.0, "tests": 1.0, "prose": 1.0}}, "reference"),
    ({"order": {"code": np.arange(3)}}, "order"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_missing_domains_keep_their_signal():
    s = AdaptiveMixtureSampler({"a": 10, "b": 10}, {"a": 0.5, "b": 0.5}, num_samples=40, batch_size=4,
                               rule="doremi", reference={"a": 0.0, "b": 0.0}, smoothing=0.0, floor=0.0)
    s.observe(0, {"a": math.log(3)})
    assert s.weights_at(1) == pytest.approx({"a": 0.75, "b": 0.25})


# -- resumption ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["exp3", "doremi"])
def test_resume_at_every_position_is_bit_exact(rule):
    full = make(rule)
    reference = [i for batch in drive(full) for i in batch]
    final_history = full.weights_history()
    for position in range(len(reference)):
        s = make(rule)
        done, step = 0, 0
        iterator = iter(s)
        while done < position:
            next(iterator)
            done += 1
            if done % B == 0:
                s.observe(step, losses_at(step))
                step += 1
        buffer = io.BytesIO()
        torch.save(s.state_dict(), buffer)
        buffer.seek(0)
        revived = make(rule)
        revived.load_state_dict(torch.load(buffer, weights_only=True))
        rest = []
        iterator = iter(revived)
        for index in iterator:
            rest.append(index)
            if (position + len(rest)) % B == 0 and step < revived.counts.num_batches:
                revived.observe(step, losses_at(step))
                step += 1
        assert reference[position:] == rest, position
        assert revived.weights_history() == final_history


def test_resume_at_another_world_size():
    full = make()
    reference = [i for batch in drive(full) for i in batch]
    s = make()
    drive(s, batches=8)  # 8 global batches, observed
    state = s.state_dict()
    shares = []
    for rank in range(2):
        revived = make(rank=rank, world_size=2)
        revived.load_state_dict(state)
        shares.append(drive(revived, start_batch=8))
    merged = [i for b0, b1 in zip(*shares) for pair in zip(b0, b1) for i in pair]
    assert merged == reference[8 * B:]


def test_refused_states_change_nothing():
    s = make()
    drive(s, batches=5)
    state = s.state_dict()
    target = make()
    drive(target, batches=2)
    before = target.state_dict()
    broken = [
        {**state, "weight_rows": state["weight_rows"] * 2},
        {**state, "weight_starts": state["weight_starts"].flip(0)},
        {**state, "weight_starts": state["weight_starts"] + 1},  # an update after last_step + 1 + delay
        {**state, "adaptive": {**state["adaptive"], "rate": 3.0}},
        {**state, "adaptive": {**state["adaptive"], "warmup": 0.0}},  # 0.0 does not stand for the int 0
        {**state, "signal": state["signal"].float()},
        {**state, "signal": state["signal"][:2]},
        {**state, "last_loss": [math.nan, 1.0, 1.0]},
        {**state, "last_step": -1},  # updates without observations
        {k: v for k, v in state.items() if k != "adaptive"},
        {**state, "seed": 99},
    ]
    for bad in broken:
        with pytest.raises(StateError):
            target.load_state_dict(bad)
        assert same_state(before, target.state_dict())
    target.load_state_dict(state)  # the untouched state loads
    assert same_state(state, target.state_dict())


def test_unobserved_domains_round_trip_as_none():
    s = make()
    s.observe(0, {"code": 1.0})  # exp3 has seen only code's loss
    state = s.state_dict()
    assert state["last_loss"] == [1.0, None, None]
    revived = make()
    revived.load_state_dict(state)
    assert same_state(state, revived.state_dict())


def test_a_resumed_rank_refuses_updates_to_batches_it_had_started():
    s = make()
    iterator = iter(s)
    for _ in range(B + 1):  # batch 1 started
        next(iterator)
    revived = make()
    revived.load_state_dict(s.state_dict())
    with pytest.raises(LateObservationError):
        revived.observe(0, losses_at(0))  # would change batch 1, partly produced before the checkpoint


# -- within-domain order, logging -----------------------------------------------------------------------
def test_curriculum_order_within_a_domain():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0, 7.0, 8.0, 9.0, 10.0])  # tests: 11 examples
    s = make(order={"tests": scores})
    stream = s.stream().tolist()
    offset = s.offsets["tests"]
    easy_first = np.argsort(scores, kind="stable").tolist()
    done = 0
    for b in range(s.counts.num_batches):  # batch by batch, the next draws in score order (slots spread)
        drawn = sorted(i - offset for i in stream[b * B:(b + 1) * B] if s.source_of(i) == "tests")
        assert drawn == sorted(easy_first[k % 11] for k in range(done, done + len(drawn)))
        done += len(drawn)
    assert done > 11  # several passes
    plain = make()
    assert [i for i in stream if s.source_of(i) != "tests"] == [i for i in plain.stream().tolist()
                                                               if plain.source_of(i) != "tests"]


def test_weight_history_appends_and_refuses_out_of_order():
    history = WeightHistory(BatchCounts(Schedule.constant({"a": 1, "b": 1}), 10, 4))  # last batch holds 2
    history.append(2, np.array([1.0, 0.0]))
    assert history.batch(2).tolist() == [2, 0] and history.total().tolist() == [6, 4]
    with pytest.raises(ValueError):
        history.append(2, np.array([0.5, 0.5]))


def test_reference_losses_and_plot(tmp_path):
    s = make(rule="doremi")
    scores = np.arange(sum(SIZES.values()), dtype=float)
    ref = reference_losses(scores, s)
    assert ref == {n: float(scores[s.offsets[n]:s.offsets[n] + k].mean()) for n, k in SIZES.items()}
    scores[s.offsets["tests"]] = np.nan  # e.g. a reference document of a --reference-split run
    write_scores(tmp_path / "scores.parquet", {"loss": scores[None]}, {})
    from_file = reference_losses(tmp_path, s)
    assert from_file["tests"] == float(np.mean(scores[s.offsets["tests"] + 1:s.offsets["tests"] + 11]))
    assert from_file["code"] == ref["code"]
    drive(s)
    out = tmp_path / "w.png"
    plot_weights(s, out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_dataloader_with_workers_needs_the_prefetch_as_delay():
    from torch.utils.data import DataLoader

    s = make(delay=4)  # 2 workers x prefetch_factor 2
    loader = DataLoader(list(range(sum(SIZES.values()))), batch_size=B, sampler=s, num_workers=2)
    for step, _ in enumerate(loader):
        if step < s.counts.num_batches:
            s.observe(step, losses_at(step))
    single = make(delay=4)
    assert [i for batch in drive(single) for i in batch] == s.stream().tolist()


def test_a_loss_tensor_of_several_values_is_a_value_error_naming_the_domain():
    sampler = make()
    next(iter(sampler))
    with pytest.raises(ValueError, match=r"losses\['code'\] must be one number.*\.mean\(\)"):
        sampler.observe(0, {"code": torch.tensor([1.0, 2.0])})
