"""Trackers on scripted sequences with known answers, and against direct numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataorder.scores.dynamics import AUM, DataMap, Forgetting, occurrence_groups


def logits_for(correct: list[bool], num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose argmax is the target (0) exactly where ``correct`` says so."""
    logits = torch.zeros(len(correct), num_classes)
    for row, ok in enumerate(correct):
        logits[row, 0 if ok else 1] = 2.0
    return logits, torch.zeros(len(correct), dtype=torch.long)


def test_forgetting_counts_correct_to_incorrect_transitions():
    # example -> correctness at its successive presentations
    script = {
        0: [True, False, True, False],   # forgotten twice
        1: [False, True, True],          # learned, never forgotten
        2: [False, False, False],        # never learned -> inf
        3: [True, True, False, False],   # forgotten once
        4: [False, True, False, True],   # once: only correct->incorrect counts
    }
    tracker = Forgetting(6)              # example 5 never presented -> nan
    for step in range(4):
        batch = [i for i, seq in script.items() if step < len(seq)]
        tracker.update(batch, *logits_for([script[i][step] for i in batch]))
    scores = tracker.scores()
    assert scores[:5].tolist() == [2.0, 0.0, math.inf, 1.0, 1.0]
    assert math.isnan(scores[5])


def test_forgetting_sees_repeated_indices_of_one_batch_in_order():
    tracker = Forgetting(2)
    tracker.update([0, 1, 0], *logits_for([True, True, False]))   # 0: correct then incorrect within one batch
    assert tracker.scores().tolist() == [1.0, 0.0]
    tracker.update(torch.tensor([1, 1, 1]), *logits_for([False, True, False]))
    assert tracker.scores().tolist() == [1.0, 2.0]


def test_aum_is_the_mean_logit_margin():
    tracker = AUM(3)
    tracker.update([0, 1], torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]]), torch.tensor([0, 1]))  # +2, -3
    tracker.update([0], torch.tensor([[0.0, 4.0, 1.0]]), torch.tensor([0]))                        # -4
    tracker.update([1, 1], torch.tensor([[0.0, 1.0, 0.0], [0.0, 7.0, 1.0]]), torch.tensor([1, 1]))  # +1, +6
    scores = tracker.scores()
    assert scores[0] == pytest.approx((2 - 4) / 2)
    assert scores[1] == pytest.approx((-3 + 1 + 6) / 3)
    assert math.isnan(scores[2])


def test_datamap_matches_numpy_over_a_random_sequence():
    rng = np.random.default_rng(0)
    n, steps, classes = 7, 6, 4
    targets = torch.from_numpy(rng.integers(0, classes, n))
    history = []
    tracker = DataMap(n)
    for _ in range(steps):
        logits = torch.from_numpy(rng.normal(size=(n, classes))).float()
        history.append(logits)
        order = rng.permutation(n)
        tracker.update(order, logits[order], targets[order])
    stacked = torch.stack(history).double()
    probs = stacked.softmax(dim=2).numpy()[:, np.arange(n), targets.numpy()]      # (steps, n)
    correct = (stacked.argmax(dim=2) == targets).numpy()
    scores = tracker.scores()
    np.testing.assert_allclose(scores["confidence"], probs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scores["variability"], probs.std(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores["correctness"], correct.mean(axis=0))


def test_datamap_unseen_examples_are_nan():
    tracker = DataMap(3)
    tracker.update([1], torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    scores = tracker.scores()
    assert scores["confidence"][1] == pytest.approx(0.5) and scores["variability"][1] == 0.0
    assert all(math.isnan(v[0]) and math.isnan(v[2]) for v in scores.values())


@pytest.mark.parametrize("tracker_cls", [Forgetting, AUM, DataMap])
def test_update_validates_arguments_and_changes_nothing_on_error(tracker_cls):
    tracker = tracker_cls(4)
    logits, targets = logits_for([True, False])
    tracker.update([0, 1], logits, targets)
    before = tracker.state_dict()
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        tracker.update([0, 4], logits, targets)
    with pytest.raises(ValueError, match="3 entries"):
        tracker.update([0, 1, 2], logits, targets)
    with pytest.raises(ValueError, match="class ids"):
        tracker.update([0, 1], logits, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="1-D array of ints"):
        tracker.update([0.5, 1.0], logits, targets)
    after = tracker.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("tracker_cls", [Forgetting, AUM, DataMap])
def test_state_dict_round_trip_resumes_exactly(tracker_cls):
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 5, 4), torch.from_numpy(rng.normal(size=(4, 3))).float(),
                torch.from_numpy(rng.integers(0, 3, 4))) for _ in range(6)]
    whole, first = tracker_cls(5), tracker_cls(5)
    for batch in batches:
        whole.update(*batch)
    for batch in batches[:3]:
        first.update(*batch)
    resumed = tracker_cls(5)
    resumed.load_state_dict(first.state_dict())
    for batch in batches[3:]:
        resumed.update(*batch)
    a, b = whole.scores(), resumed.scores()
    if isinstance(a, dict):
        assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    else:
        assert np.array_equal(a, b, equal_nan=True)
    with pytest.raises(ValueError, match="n=5"):
        tracker_cls(6).load_state_dict(first.state_dict())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=20))
def test_occurrence_groups_split_repeats_in_order(indices):
    array = np.array(indices, dtype=np.int64)
    groups = occurrence_groups(array)
    flat = np.concatenate(groups) if groups else np.zeros(0, int)
    assert sorted(flat.tolist()) == list(range(len(indices)))       # every position exactly once
    for group in groups:
        assert len(set(array[group].tolist())) == len(group)         # no index twice in a group
    for k, group in enumerate(groups):                                # group k = k-th occurrences
        for position in group:
            assert sum(1 for p in range(position) if array[p] == array[position]) == k


def _trained(tracker_cls, n=4):
    tracker = tracker_cls(n)
    logits, targets = logits_for([True, False, True])
    tracker.update([0, 1, 2], logits, targets)
    tracker.update([0, 1], *logits_for([False, True]))
    return tracker


@pytest.mark.parametrize("tracker_cls", [Forgetting, AUM, DataMap])
def test_state_round_trips_through_torch_load_weights_only(tracker_cls, tmp_path):
    import io

    tracker = _trained(tracker_cls)
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    fresh = tracker_cls(4)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    a, b = tracker.scores(), fresh.scores()
    for key in (a if isinstance(a, dict) else [None]):
        x, y = (a[key], b[key]) if key else (a, b)
        assert np.array_equal(x, y, equal_nan=True)
    # a state saved as numpy arrays (the earlier form) still loads
    legacy = {key: value.numpy() if isinstance(value, torch.Tensor) else value
              for key, value in tracker.state_dict().items()}
    older = tracker_cls(4)
    older.load_state_dict(legacy)
    assert all(np.array_equal(getattr(older, k), getattr(tracker, k)) for k in tracker_cls._state_dtypes)


def _tampered(state, key, value):
    state = dict(state)
    if value is _DELETE:
        del state[key]
    else:
        state[key] = value
    return state


_DELETE = object()
_TAMPERED = [
    (Forgetting, "forgets", torch.tensor([-3, 0, 0, 0]), ValueError, "forgets"),
    (Forgetting, "forgets", torch.tensor([5, 0, 0, 0]), ValueError, "forgets"),
    (Forgetting, "forgets", torch.tensor([1.7, 0, 0, 0], dtype=torch.float64), TypeError, "forgets"),
    (Forgetting, "presentations", torch.tensor([-1, 2, 1, 0]), ValueError, "presentations"),
    (Forgetting, "last_correct", torch.tensor([2, 0, 0, 0]), TypeError, "last_correct"),
    (Forgetting, "ever_correct", torch.tensor([False, True, True, True]), ValueError, "ever_correct"),
    (Forgetting, "last_correct", _DELETE, ValueError, "last_correct"),
    (Forgetting, "n", 4.0, TypeError, "n"),
    (Forgetting, "n", True, TypeError, "n"),
    (Forgetting, "tracker", "AUM", ValueError, "AUM"),
    (Forgetting, "extra", 1, ValueError, "extra"),
    (AUM, "total", torch.tensor([float("nan"), 0.0, 0.0, 0.0], dtype=torch.float64), ValueError, "total"),
    (AUM, "total", torch.tensor([float("inf"), 0.0, 0.0, 0.0], dtype=torch.float64), ValueError, "total"),
    (AUM, "total", torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64), ValueError, "total"),
    (AUM, "count", torch.tensor([-1, 1, 1, 0]), ValueError, "count"),
    (AUM, "count", torch.tensor([1.5, 1, 1, 0], dtype=torch.float64), TypeError, "count"),
    (AUM, "count", torch.tensor([1, 1, 1]), ValueError, "count"),
    (AUM, "count", [2, 2, 1, 0], TypeError, "count"),
    (DataMap, "confidence_sum", torch.tensor([5.0, 0, 0, 0], dtype=torch.float64), ValueError, "confidence_sum"),
    (DataMap, "confidence_sq_sum", torch.tensor([-1.0, 0, 0, 0], dtype=torch.float64), ValueError,
     "confidence_sq_sum"),
    (DataMap, "correct", torch.tensor([9, 0, 0, 0]), ValueError, "correct"),
]


@pytest.mark.parametrize(("tracker_cls", "key", "value", "error", "named"), _TAMPERED)
def test_load_state_dict_refuses_tampered_states_and_changes_nothing(tracker_cls, key, value, error, named):
    tracker = _trained(tracker_cls)
    before = tracker.state_dict()
    with pytest.raises(error, match=named) as info:
        tracker.load_state_dict(_tampered(before, key, value))
    assert "\n" not in str(info.value)
    after = tracker.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in tracker_cls._state_dtypes)


@pytest.mark.parametrize("state", [None, [1, 2], "state"])
def test_load_state_dict_refuses_a_non_dict_with_a_type_error(state):
    with pytest.raises(TypeError, match="state must be a dict from AUM.state_dict"):
        AUM(3).load_state_dict(state)


@pytest.mark.parametrize("tracker_cls", [Forgetting, AUM, DataMap])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_refuses_non_finite_logits_and_changes_nothing(tracker_cls, bad):
    tracker = _trained(tracker_cls)
    before = tracker.state_dict()
    with pytest.raises(ValueError, match="logits has NaN or inf in 1 row"):
        tracker.update([0, 1], torch.tensor([[bad, 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 0]))
    after = tracker.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in tracker_cls._state_dtypes)


@pytest.mark.parametrize("tracker_cls", [Forgetting, AUM, DataMap])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_update_accepts_half_precision_logits(tracker_cls, dtype):
    full, half = tracker_cls(2), tracker_cls(2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    full.update([0, 1], logits, torch.tensor([0, 0]))
    half.update([0, 1], logits.to(dtype), torch.tensor([0, 0]))
    a, b = full.scores(), half.scores()
    for key in (a if isinstance(a, dict) else [None]):
        x, y = (a[key], b[key]) if key else (a, b)
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_update_accepts_an_empty_list_of_indices():
    tracker = Forgetting(2)
    tracker.update([], torch.empty(0, 2), torch.empty(0, dtype=torch.long))
    assert np.isnan(tracker.scores()).all()
