"""Schedule: evaluation, presets, YAML round-trip and validation; allocation; pacing."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from dataorder.samplers.allocation import largest_remainder as _largest_remainder
from dataorder.schedules import BatchCounts, Schedule, Segment, pacing_function


def largest_remainder(weights, total):
    return _largest_remainder(total * np.asarray(weights, dtype=float), total)

RAMP = Schedule(
    {"web": 0.6, "code": 0.3, "math": 0.1},
    [
        {"at": 0.4, "weights": {"web": 0.2, "code": 0.4, "math": 0.4}, "transition": "linear", "over": 0.2},
        {"at": 0.8, "weights": {"web": 0.0, "code": 0.5, "math": 0.5}},
        {"at": 0.9, "weights": {"web": 1.0, "code": 1.0, "math": 2.0}, "transition": "cosine", "over": 0.1},
    ],
)


def reference_weights(p: float) -> list[float]:
    """The schedule above written out by hand."""
    a, b, c, d = [0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.0, 0.5, 0.5], [0.25, 0.25, 0.5]
    if p < 0.4:
        return a
    if p < 0.6:
        t = (p - 0.4) / 0.2
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    if p < 0.8:
        return b
    if p < 0.9:
        return c
    t = (1 - math.cos(math.pi * (p - 0.9) / 0.1)) / 2
    return [(1 - t) * x + t * y for x, y in zip(c, d)]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.39, 0.4, 0.45, 0.5, 0.59, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.99, 1.0])
def test_weights_follow_segments(p):
    assert RAMP.weights(p) == pytest.approx(reference_weights(p), abs=1e-12)
    assert sum(RAMP.weights_at(p).values()) == pytest.approx(1.0)


def test_vectorised_weights_match_scalar():
    p = np.linspace(0, 1, 101)
    table = RAMP.weights(p)
    assert table.shape == (101, 3)
    assert np.allclose(table, [RAMP.weights(float(x)) for x in p])


def test_step_and_token_addressing():
    s = Schedule.anneal({"a": 1, "b": 0}, {"a": 0, "b": 1}, last=0.2)
    assert s.at_step(79, 100) == {"a": 1.0, "b": 0.0}
    assert s.at_step(80, 100) == {"a": 0.0, "b": 1.0}
    assert s.at_tokens(8 * 10**11, 10**12) == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match="step must be in"):
        s.at_step(101, 100)


def test_anneal_preset_and_ramp():
    s = Schedule.anneal({"web": 0.9, "math": 0.1}, {"web": 0.5, "math": 0.5}, last=0.15, transition="linear", over=0.05)
    assert s.segments == (Segment(0.85, {"web": 0.5, "math": 0.5}, "linear", 0.05),)
    assert s.weights_at(0.875) == {"web": 0.7, "math": 0.3}
    assert s.breakpoints == (0.0, 0.85, 0.9, 1.0)


def test_mean_weights_integrates_the_schedule():
    p = (np.arange(200_000) + 0.5) / 200_000
    numeric = RAMP.weights(p).mean(axis=0)
    assert list(RAMP.mean_weights().values()) == pytest.approx(numeric.tolist(), abs=1e-6)


def test_normalisation_is_reported():
    s = Schedule({"a": 2, "b": 6}, [{"at": 0.5, "weights": {"a": 0.5, "b": 0.5}}])
    assert s.weights_at(0.0) == {"a": 0.25, "b": 0.75}
    assert len(s.notes) == 1 and "sources" in s.notes[0] and "sum to 8" in s.notes[0]


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "mix.yaml"
    s = Schedule(RAMP.base, RAMP.segments, run={"num_samples": 1000, "batch_size": 10, "tokens_per_sample": 2048})
    s.save(path)
    loaded = Schedule.load(path)
    assert loaded == s
    assert np.array_equal(loaded.weights(np.linspace(0, 1, 57)), s.weights(np.linspace(0, 1, 57)))
    assert loaded.run == {"num_samples": 1000, "batch_size": 10, "tokens_per_sample": 2048}


def test_yaml_documented_format():
    text = """
    sources: {web: 0.70, code: 0.15, math: 0.10, books: 0.05}   # starting weights (relative)
    schedule:
      - {at: 0.85, weights: {web: 0.35, code: 0.30, math: 0.25, books: 0.10}, transition: linear, over: 0.05}
    run: {num_samples: 1_000_000, batch_size: 1024}
    """
    s = Schedule.from_yaml(textwrap.dedent(text))
    assert s.names == ("web", "code", "math", "books")
    assert s.weights_at(0.9) == {"web": 0.35, "code": 0.3, "math": 0.25, "books": 0.1}
    assert s.run == {"num_samples": 1_000_000, "batch_size": 1024}
    assert s.notes == ()


def test_example_config_loads():
    from pathlib import Path

    s = Schedule.load(Path(__file__).parents[1] / "examples" / "pretraining_mixture.yaml")
    assert s.weights_at(1.0)["code"] == 0.3


BASE = "sources: {web: 0.7, code: 0.3}\nschedule:\n"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("  - {at: 0.5, weights: {web: 1, cod: 1}}\n", r"line 3 \(schedule\[0\]\): unknown source 'cod'"),
        ("  - {at: 0.5, weights: {web: 1}}\n", r"line 3 \(schedule\[0\]\): no weight for code"),
        ("  - {at: 0.5, weights: {web: -1, code: 1}}\n", r"line 3 .*weight of 'web' must be finite and >= 0"),
        ("  - {at: 0.5, weights: {web: .nan, code: 1}}\n", r"line 3 .*weight of 'web' must be a number"),
        ("  - {at: 0.5, weights: {web: 0, code: 0}}\n", r"line 3 .*all weights are zero"),
        ("  - {at: 1.5, weights: {web: 1, code: 1}}\n", r"line 3 .*at=1.5 is outside \[0, 1\]"),
        ("  - {at: -0.1, weights: {web: 1, code: 1}}\n", r"line 3 .*outside \[0, 1\]"),
        ("  - {at: 0.6, weights: {web: 1, code: 1}}\n  - {at: 0.5, weights: {web: 1, code: 1}}\n",
         r"line 4 \(schedule\[1\]\): at=0.5 is out of order"),
        ("  - {at: 0.5, weights: {web: 1, code: 1}, transition: linear, over: 0.2}\n"
         "  - {at: 0.6, weights: {web: 1, code: 1}}\n", r"line 4 .*previous segment runs until 0.7"),
        ("  - {at: 0.5, weights: {web: 1, code: 1}, transition: linear}\n", r"line 3 .*needs over > 0"),
        ("  - {at: 0.5, weights: {web: 1, code: 1}, transition: jump}\n", r"line 3 .*transition must be one of"),
        ("  - {at: 0.9, weights: {web: 1, code: 1}, transition: linear, over: 0.2}\n", r"line 3 .*ends at 1.1"),
        ("  - {at: 0.5, weight: {web: 1, code: 1}}\n", r"line 3 .*unknown key 'weight'"),
    ],
)
def test_yaml_validation_names_the_line(entries, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_yaml(BASE + entries, name="mix.yaml")


def test_yaml_validation_of_sources_and_run():
    with pytest.raises(ValueError, match=r"mix.yaml line 2 \(sources\): weight of 'b' must be finite and >= 0"):
        Schedule.from_yaml("# comment\nsources: {a: 1, b: -2}", name="mix.yaml")
    with pytest.raises(ValueError, match="missing 'sources'"):
        Schedule.from_yaml("schedule: []", name="mix.yaml")
    with pytest.raises(ValueError, match=r"line 2 \(run\): num_samples must be a number.*1e9"):
        Schedule.from_yaml("sources: {a: 1}\nrun: {num_samples: 1e9}", name="mix.yaml")
    with pytest.raises(ValueError, match=r"line 2 \(stages\): unknown key 'stages'"):
        Schedule.from_yaml("sources: {a: 1}\nstages: []", name="mix.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        Schedule.from_yaml("sources: {a: 1", name="mix.yaml")


def test_python_constructor_validation():
    with pytest.raises(ValueError, match=r"schedule\[0\]: unknown source 'x'"):
        Schedule({"a": 1}, [{"at": 0.5, "weights": {"a": 1, "x": 1}}])
    with pytest.raises(ValueError, match="progress must be in"):
        RAMP.weights(1.5)


# -- allocation --------------------------------------------------------------------------------
def reference_largest_remainder(weights: list[float], total: int) -> list[int]:
    ideal = [total * w for w in weights]
    counts = [math.floor(x + 1e-9) for x in ideal]
    order = sorted(range(len(weights)), key=lambda i: (-(ideal[i] - counts[i]) if weights[i] > 0 else 2.0, i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def test_largest_remainder_matches_reference_and_ties_go_to_the_earlier_source():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w = rng.dirichlet(np.ones(5)) * (rng.random(5) > 0.3)
        if w.sum() == 0:
            continue
        w = w / w.sum()
        total = int(rng.integers(1, 50))
        assert largest_remainder(w, total).tolist() == reference_largest_remainder(w.tolist(), total)
    assert largest_remainder(np.array([0.25, 0.25, 0.25, 0.25]), 2).tolist() == [1, 1, 0, 0]
    assert largest_remainder(np.array([0.0, 0.5, 0.5]), 1).tolist() == [0, 1, 0]
    # 358.4 and 102.4 have equal remainders although their floats differ in the last bits
    assert largest_remainder(np.array([0.35, 0.3, 0.25, 0.1]), 1024).tolist() == [359, 307, 256, 102]


def test_batch_counts_cumulative_matches_summing_every_batch():
    for num_samples, batch in [(1000, 7), (4099, 32)]:
        counts = BatchCounts(RAMP, num_samples, batch)
        counts.CHECKPOINT = 5  # exercise the checkpoints inside transitions
        every = counts.batch(np.arange(counts.num_batches))
        cumulative = np.vstack([np.zeros(3, dtype=np.int64), np.cumsum(every, axis=0)])
        for b in range(counts.num_batches + 1):
            assert counts.cumulative(b).tolist() == cumulative[b].tolist()
        assert counts.total().sum() == num_samples


# -- pacing ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("linear", [0.2, 0.6, 1.0, 1.0]),
        ("root", [0.2, math.sqrt(0.04 + 0.96 * 0.5), 1.0, 1.0]),
        ("geometric", [0.2, 0.2**0.5, 1.0, 1.0]),
        ("step", [0.2, 0.2, 1.0, 1.0]),
    ],
)
def test_pacing_functions(name, expected):
    g = pacing_function(name, start=0.2, full_at=0.8)
    assert [g(p) for p in (0.0, 0.4, 0.8, 1.0)] == pytest.approx(expected)


def test_pacing_validation():
    with pytest.raises(ValueError, match="pacing must be one of"):
        pacing_function("cubic")
    with pytest.raises(ValueError, match="start must be"):
        pacing_function("linear", start=0.0)
    with pytest.raises(ValueError, match=r"pacing\(0.0\) must be a fraction"):
        pacing_function(lambda p: 0.0)


@pytest.mark.parametrize(
    "module", ["dataorder.schedules", "dataorder.samplers.mixture", "dataorder.samplers.curriculum"]
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- regressions: issue 13, failure 6 (hostile YAML) ---------------------------------------------

BILLION_LAUGHS = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["sources: *a8"]
)


def test_an_alias_bomb_is_refused_at_once_with_a_short_message():
    with pytest.raises(ValueError, match="expands to more than 200,000 nodes") as error:
        Schedule.from_yaml(BILLION_LAUGHS, name="bomb.yaml")  # 10**9 nodes expanded: refused unexpanded
    assert len(str(error.value)) < 300


def test_a_moderate_alias_expansion_is_still_refused_when_it_would_print_hugely():
    text = "sources: &w {a: 1, b: 2}\nschedule: [{at: 0.5, weights: [" + ", ".join(["*w"] * 5000) + "]}]"
    with pytest.raises(ValueError, match="weights must be a non-empty mapping") as error:
        Schedule.from_yaml(text)
    assert len(str(error.value)) < 300  # the repr of the expanded value is capped


def test_recursive_aliases_deep_nesting_and_duplicate_keys_are_one_line_errors():
    with pytest.raises(ValueError, match="recursive alias"):
        Schedule.from_yaml("sources: &s {a: *s}")
    for deep in ("sources: " + "[" * 100 + "]" * 100, "sources: " + "[" * 5000 + "]" * 5000):
        with pytest.raises(ValueError, match="nested too deeply") as error:
            Schedule.from_yaml(deep)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="line 2: duplicate key 'sources'"):
        Schedule.from_yaml("sources: {a: 1}\nsources: {b: 1}")
    with pytest.raises(ValueError, match="line 1: duplicate key 'a'"):
        Schedule.from_yaml("sources: {a: 1, b: 1, a: 2}")


@pytest.mark.parametrize("text", ["sources: {a: 1, b: [\n", "sources: {a: 1}\n  bad: indentation: here\n",
                                  "sources: {a: 1}\n\tschedule: []\n", "- a\nb: 1\n", "sources: {a: !!python/object:os.system 1}"])
def test_malformed_yaml_is_one_line_naming_the_line(text):
    with pytest.raises(ValueError, match=r"^mix.yaml( line \d+)?: ") as error:
        Schedule.from_yaml(text, name="mix.yaml")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("run", "message"), [
    ("{num_samples: 1180591620717411303424}", "num_samples must be a positive int <= 2\\*\\*62"),
    ("{num_samples: 1.0e+300}", "num_samples must be a positive int <= 2\\*\\*62"),
    ("{num_samples: .inf}", "must be finite"),
    ("{num_samples: 1e9}", "YAML reads 1e9 as text"),
    ("{batch_size: 0}", "batch_size must be a positive int"),
    ("{num_samples: 10.5}", "num_samples must be a positive int"),
])
def test_run_sizes_out_of_range_are_refused(run, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_yaml(f"sources: {{a: 1}}\nrun: {run}")


def test_weights_whose_sum_overflows_are_refused_not_normalised_to_zero():
    with pytest.raises(ValueError, match="sum to inf, too large to normalise"):
        Schedule({"a": 1e308, "b": 1e308})
    with pytest.raises(ValueError, match="too large to normalise"):
        Schedule({"a": 1}, [{"at": 0.5, "weights": {"a": 1e301}}])
    assert Schedule({"a": 1e299, "b": 3e299}).weights_at(0.5) == {"a": 0.25, "b": 0.75}


# -- regressions: issue 13, failure 6 (count tables of huge runs) --------------------------------


def per_batch_cumulative(counts: BatchCounts, b: int) -> np.ndarray:
    """The definition: the sum of batch(0..b-1), one batch at a time (what the tables replaced)."""
    full = min(b, counts.full_batches)
    total = counts.batch(np.arange(full)).sum(axis=0) if full else np.zeros(len(counts.schedule.names), np.int64)
    return total + (counts.batch(counts.full_batches) if b > counts.full_batches else 0)


RAMPS = [
    RAMP,
    Schedule({"a": 0.7, "b": 0.2, "c": 0.1}, [{"at": 0.1, "weights": {"a": 0.1, "b": 0.1, "c": 0.8},
                                               "transition": "cosine", "over": 0.8}]),
    Schedule({"a": 0.5, "b": 0.25, "c": 0.25}, [{"at": 0.0, "weights": {"a": 0.2, "b": 0.4, "c": 0.4},
                                                 "transition": "linear", "over": 1.0}]),
    Schedule.anneal({"web": 0.7, "code": 0.15, "math": 0.1, "books": 0.05},
                    {"web": 0.35, "code": 0.3, "math": 0.25, "books": 0.1}, last=0.15, transition="linear",
                    over=0.05),
]


@pytest.mark.parametrize("schedule", RAMPS)
@pytest.mark.parametrize(("num_samples", "batch_size"), [(1_000_003, 7), (640_000, 64), (2_000_000, 100)])
@pytest.mark.parametrize("guard", [1, 64])
def test_piecewise_ramp_sums_equal_the_per_batch_sums(schedule, num_samples, batch_size, guard):
    counts = BatchCounts(schedule, num_samples, batch_size)
    counts.BRUTE_FORCE, counts.GUARD = 0, guard  # force the change-point path on every ramp
    reference = BatchCounts(schedule, num_samples, batch_size)
    for b in [0, 1, counts.num_batches // 3, counts.num_batches // 2 + 17, counts.num_batches - 1,
              counts.num_batches]:
        assert counts.cumulative(b).tolist() == per_batch_cumulative(reference, b).tolist()


def count_evaluated_batches(counts: BatchCounts) -> list[int]:
    evaluated = [0]
    batch = counts.batch

    def counting(b):
        evaluated[0] += np.asarray(b).size
        return batch(b)

    counts.batch = counting
    return evaluated


@pytest.mark.parametrize("num_samples", [10**12, 10**15, 10**18, 2**62])
def test_huge_runs_evaluate_few_batches_and_count_every_sample(num_samples):
    counts = BatchCounts(RAMPS[3], num_samples, 1024)
    evaluated = count_evaluated_batches(counts)
    total = counts.total()
    middle = counts.cumulative(int(0.875 * counts.num_batches))  # inside the ramp: a resume there
    assert evaluated[0] < 2_000_000  # the ramp alone holds up to 2**62 / 1024 * 0.05 batches
    assert int(total.sum()) == num_samples and np.all(middle <= total) and int(middle.sum()) == \
        int(0.875 * counts.num_batches) * 1024
    # the constant part before the ramp is exactly the base weights' counts per batch
    assert counts.cumulative(1000).tolist() == (counts.batch(0) * 1000).tolist()


def test_batch_counts_refuse_sizes_beyond_int64_arithmetic():
    with pytest.raises(ValueError, match="num_samples must be a positive int <= 2\\*\\*62"):
        BatchCounts(RAMP, 2**70, 1024)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        BatchCounts(RAMP, 1000, 0)


def test_a_mixture_sampler_resumes_inside_the_ramp_of_a_huge_run_at_once():
    from dataorder.samplers.mixture import MixtureSampler

    schedule = Schedule.anneal({"web": 0.7, "code": 0.3}, {"web": 0.3, "code": 0.7}, last=0.15,
                               transition="linear", over=0.05)
    sizes, n = {"web": 10**6, "code": 10**5}, 10**15
    state = MixtureSampler(sizes, schedule, num_samples=n, batch_size=1024, seed=0).state_dict()
    state["sample"] = int(0.875 * n)
    resumed = MixtureSampler(sizes, schedule, num_samples=n, batch_size=1024, seed=0)
    evaluated = count_evaluated_batches(resumed.counts)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    next(iterator)
    assert evaluated[0] < 2_000_000  # of ~5 * 10**10 batches in the ramp before the resume point
    counts = resumed.source_counts()
    assert sum(counts.values()) == int(0.875 * n) + 1
