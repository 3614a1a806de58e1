"""AdaptiveMixtureSampler under torchdata's StatefulDataLoader, with and without workers.

The loop observes per-domain losses (a deterministic function of the step) every other
step and takes ``loader.state_dict()`` after the step's ``observe`` (through
``torch.save``/``torch.load(weights_only=True)``). A fresh dataset + sampler + loader loaded
from any such state must yield exactly the rest of the uninterrupted run's indices and end
with the same weight history.

With workers the loader draws ``P = num_workers * prefetch_factor`` batches ahead of the loop
and snapshots the sampler's ``state_dict()`` when it *draws* a batch, i.e. before the loop
has observed the batches in flight. The contract (docs/adaptive-mixture.md): ``delay >= P``
so that no update touches a drawn batch, and a state is completed in place by the
``observe`` calls of the batches it has drawn.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch.utils.data import Dataset

from dataorder.samplers.adaptive import AdaptiveMixtureSampler, LateObservationError

stateful = pytest.importorskip("torchdata.stateful_dataloader")

SIZES = {"code": 13, "tests": 7, "prose": 9}
BATCH, BATCHES = 4, 14  # global batch (one process: the loader's batch), global batches in the run
PREFETCH = 2
EVERY = 2  # observe every other step


class Indices(Dataset):
    """Returns its index, so a batch is the sampler's indices."""

    def __len__(self) -> int:
        return sum(SIZES.values())

    def __getitem__(self, index: int) -> int:
        return index


def losses_at(step: int) -> dict[str, float]:
    """Per-domain losses, a deterministic function of the step (tests falls fast, prose slowly)."""
    return {"code": 3.0 / (1 + 0.1 * step), "tests": 3.0 / (1 + 0.6 * step),
            "prose": 3.0 - 0.02 * step + 0.05 * math.sin(step)}


def make_sampler(rule: str, delay: int, **world) -> AdaptiveMixtureSampler:
    reference = {"code": 1.0, "tests": 0.5, "prose": 2.0} if rule == "doremi" else None
    return AdaptiveMixtureSampler(SIZES, {"code": 0.5, "tests": 0.25, "prose": 0.25}, rule=rule, rate=3.0,
                                  smoothing=0.3, floor=0.05, warmup=1, delay=delay, reference=reference,
                                  num_samples=BATCHES * BATCH, batch_size=BATCH, seed=5, **world)


def make_loader(sampler: AdaptiveMixtureSampler, workers: int) -> stateful.StatefulDataLoader:
    options = {}
    if workers:
        options = {"num_workers": workers, "prefetch_factor": PREFETCH, "multiprocessing_context": "fork"}
    return stateful.StatefulDataLoader(Indices(), batch_size=BATCH, sampler=sampler, **options)


def frozen(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same_state(a: dict, b: dict) -> bool:
    """Equal field for field, tensors included (compared through their serialised bytes)."""
    buffer_a, buffer_b = io.BytesIO(), io.BytesIO()
    torch.save(a, buffer_a)
    torch.save(b, buffer_b)
    return buffer_a.getvalue() == buffer_b.getvalue()


def train(loader, sampler, *, first_step: int = 0, keep_states: bool = False):
    """Batches seen and (if asked) the loader's state after each step's observe, keyed by steps done."""
    batches, states = [], {}
    for step, batch in enumerate(loader, start=first_step):
        batches.append(batch.tolist())
        if step % EVERY == 0:
            sampler.observe(step, losses_at(step))
        if keep_states:
            states[step + 1] = frozen(loader.state_dict())
    if keep_states:
        states["ended"] = frozen(loader.state_dict())
    return batches, states


def reference(rule: str, workers: int, delay: int):
    sampler = make_sampler(rule, delay)
    batches, states = train(make_loader(sampler, workers), sampler, keep_states=True)
    return batches, states, sampler


def resume(rule: str, workers: int, delay: int, state):
    sampler = make_sampler(rule, delay)
    loader = make_loader(sampler, workers)
    loader.load_state_dict(state)  # the loader restores the sampler when its iterator starts
    batches, _ = train(loader, sampler, first_step=_steps_done(state, workers))
    return batches, sampler


def _steps_done(state, workers: int) -> int:
    """Batches the loop had consumed when ``state`` was taken (the loader's own count)."""
    if workers:
        return state["_snapshot"]["_snapshot_step"]
    return state["_num_yielded"]


# -- resuming from the loader's state --------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("rule", ["exp3", "doremi"])
def test_resume_from_the_loaders_state_continues_the_uninterrupted_run(rule, workers):
    """Cuts right after an observe (odd steps done), after a step without one, mid-run and after the last batch."""
    delay = workers * PREFETCH
    full, states, sampler = reference(rule, workers, delay)
    history = sampler.weights_history()
    assert len(full) == BATCHES and len(history) >= BATCHES // EVERY - 2  # the weights did change
    for done in (1, 2, 5, 8, 11, BATCHES):
        batches, sampler = resume(rule, workers, delay, states[done])
        assert batches == full[done:], f"resumed after {done} steps"
        assert sampler.weights_history() == history, f"weight history after resuming at {done} steps"


@pytest.mark.parametrize("workers", [0, 2])
def test_every_cut_resumes_exactly(workers):
    rule, delay = "exp3", workers * PREFETCH
    full, states, sampler = reference(rule, workers, delay)
    history = sampler.weights_history()
    for done in range(1, BATCHES + 1):
        batches, sampler = resume(rule, workers, delay, states[done])
        assert batches == full[done:], f"resumed after {done} steps"
        assert sampler.weights_history() == history


@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_taken_after_the_loop_holds_the_whole_run(workers):
    """After the loop the loader's state is its snapshot of the last batch: position at the end, full history."""
    delay = workers * PREFETCH
    full, states, reference_sampler = reference("doremi", workers, delay)
    history = reference_sampler.weights_history()
    saved = states["ended"]
    main = saved["_snapshot"]["_main_snapshot"] if workers else saved
    sampler_state = main["_sampler_iter_state"]["sampler_state"]
    sampler = make_sampler("doremi", delay)
    sampler.load_state_dict(sampler_state)
    assert sampler.position == len(sampler) == BATCHES * BATCH
    assert sampler.weights_history() == history
    assert list(iter(sampler)) == []  # nothing of the run is left
    loader = make_loader(make_sampler("doremi", delay), workers)
    loader.load_state_dict(saved)  # torchdata starts a new pass after a finished iterator: the run again
    assert [batch.tolist() for batch in loader] == full


# -- the contract: when an update takes effect --------------------------------------------------
def test_the_stream_does_not_depend_on_the_workers_given_the_delay():
    """With delay >= P the prefetched batches were drawn before any update could reach them, so the run is
    a pure function of (seed, weight history): the same with 0 or 2 workers, and equal to its ``stream()``."""
    delay = 2 * PREFETCH
    without, _, sampler0 = reference("exp3", 0, delay)
    with_workers, _, sampler2 = reference("exp3", 2, delay)
    assert without == with_workers and sampler0.weights_history() == sampler2.weights_history()
    replay = make_sampler("exp3", delay)
    for step in range(0, BATCHES, EVERY):  # the same reports, no loader: the stream is fixed by the history
        replay.observe(step, losses_at(step))
    assert replay.stream().tolist() == [i for batch in without for i in batch]


def test_each_update_holds_from_step_plus_one_plus_delay():
    delay = 2 * PREFETCH
    full, _, sampler = reference("doremi", 2, delay)
    starts = [entry["batch"] for entry in sampler.weights_history()]
    assert starts == [step + 1 + delay for step in range(0, BATCHES, EVERY) if step + 1 + delay < BATCHES]
    for b, batch in enumerate(full):  # every batch holds exactly the counts of the weights in force
        counts = {name: sum(sampler.source_of(i) == name for i in batch) for name in SIZES}
        assert counts == sampler.counts_at(b), f"batch {b}"


@pytest.mark.parametrize("delay", [0, 2 * PREFETCH - 1])
def test_a_delay_below_the_prefetch_is_refused_and_changes_nothing(delay):
    sampler = make_sampler("exp3", delay)
    loader = make_loader(sampler, 2)
    iterator = iter(loader)
    next(iterator)  # the loader has drawn batches 0..P by now
    before = frozen(sampler.state_dict())
    with pytest.raises(LateObservationError):
        sampler.observe(0, losses_at(0))
    after = frozen(sampler.state_dict())
    assert same_state(before, after) and sampler.weights_history() == []
    del iterator, loader


def test_the_smallest_delay_with_workers_is_the_prefetch():
    delay = 2 * PREFETCH
    sampler = make_sampler("exp3", delay)
    loader = make_loader(sampler, 2)
    for step, _ in enumerate(loader):
        sampler.observe(step, losses_at(step))  # every step, none refused
    assert sampler.weights_history()[0]["batch"] == delay + 1


# -- states taken ahead of the loop's reports (no loader) -------------------------------------------
def test_a_state_taken_before_the_steps_observe_is_completed_by_it():
    sampler = make_sampler("exp3", 0)
    iterator = iter(sampler)
    for step in range(3):
        [next(iterator) for _ in range(BATCH)]
        early = sampler.state_dict()  # batch `step` drawn, not yet observed
        sampler.observe(step, losses_at(step))
        assert same_state(early, sampler.state_dict()), f"step {step}"


def test_a_state_is_frozen_once_the_loop_reports_a_later_step():
    sampler = make_sampler("exp3", 0)
    iterator = iter(sampler)
    [next(iterator) for _ in range(BATCH)]
    sampler.observe(0, losses_at(0))
    [next(iterator) for _ in range(BATCH)]
    state = sampler.state_dict()  # batch 1 drawn, not observed (the loop reports every other step)
    kept = copy.deepcopy(state)
    [next(iterator) for _ in range(BATCH)]
    sampler.observe(2, losses_at(2))  # a later step: the state had seen every report up to batch 1
    assert same_state(state, kept)
    assert state["last_step"] == 0 and sampler.state_dict()["last_step"] == 2


def test_a_refused_observe_leaves_awaiting_states_as_they_were():
    sampler = make_sampler("exp3", 0)
    iterator = iter(sampler)
    [next(iterator) for _ in range(BATCH)]
    state = sampler.state_dict()
    kept = copy.deepcopy(state)
    with pytest.raises(ValueError):
        sampler.observe(0, {"code": math.nan})
    assert same_state(state, kept)
    sampler.observe(0, losses_at(0))
    assert state["last_step"] == 0


# -- two gloo ranks, each with a two-worker StatefulDataLoader ----------------------------------------
CRASH_AT = 5  # steps trained before the crash


def rank_losses(step: int, rank: int) -> dict[str, float]:
    """Each rank reports its own losses; ``observe`` averages them over the ranks."""
    return {name: loss + 0.01 * (rank + 1) * (step % 3) for name, loss in losses_at(step).items()}


def mean_losses(step: int) -> dict[str, float]:
    """What the all-gather computes from two ranks' reports: their mean, in rank order."""
    a, b = rank_losses(step, 0), rank_losses(step, 1)
    return {name: (0.0 + a[name] + b[name]) / 2 for name in a}


def _rank_train(loader, sampler, rank, first_step=0, crash_at=None):
    batches, saved = [], None
    for step, batch in enumerate(loader, start=first_step):
        batches.append(batch.tolist())
        if step % EVERY == 0:
            sampler.observe(step, rank_losses(step, rank))
        if step + 1 == crash_at:
            saved = frozen(loader.state_dict())
            break
    return batches, saved


def _two_ranks(rank, world_size):
    delay = 2 * PREFETCH

    def build():
        sampler = make_sampler("exp3", delay, rank=rank, world_size=world_size)
        options = {"num_workers": 2, "prefetch_factor": PREFETCH, "multiprocessing_context": "fork"}
        return sampler, stateful.StatefulDataLoader(Indices(), batch_size=BATCH // world_size, sampler=sampler,
                                                    **options)

    sampler, loader = build()
    straight, _ = _rank_train(loader, sampler, rank)
    sampler, loader = build()
    head, saved = _rank_train(loader, sampler, rank, crash_at=CRASH_AT)
    del sampler, loader  # the crash
    sampler, loader = build()
    loader.load_state_dict(saved)
    tail, _ = _rank_train(loader, sampler, rank, first_step=CRASH_AT)
    return straight, head + tail, sampler.weights_history(), saved


@pytest.mark.distributed
def test_two_ranks_with_workers_resume_exactly_and_elastically_on_one_process(tmp_path):
    from dist_harness import run_distributed

    (straight0, resumed0, history0, saved), (straight1, resumed1, history1, _) = run_distributed(
        _two_ranks, 2, tmp_path, timeout=240)
    assert resumed0 == straight0 and resumed1 == straight1
    assert history0 == history1 and len(history0) > 0  # the same weights on both ranks
    merged = [[i for pair in zip(b0, b1) for i in pair] for b0, b1 in zip(straight0, straight1)]

    # the two-rank state, resumed by one process with a two-worker loader of the whole global batch
    sampler = make_sampler("exp3", 2 * PREFETCH)
    loader = make_loader(sampler, 2)
    loader.load_state_dict(saved)
    batches = []
    for step, batch in enumerate(loader, start=CRASH_AT):
        batches.append(batch.tolist())
        if step % EVERY == 0:
            sampler.observe(step, mean_losses(step))
    assert batches == merged[CRASH_AT:]
    assert sampler.weights_history() == history0
