"""AdaptiveMixtureSampler: mixture weights that the training loop updates from per-domain losses.

The loop reports each domain's loss with :meth:`AdaptiveMixtureSampler.observe`; an update
rule turns the (all-gathered, smoothed) losses into new weights:

- ``rule="exp3"`` (Online Data Mixing, Albalak et al. 2023): the reward of a domain is its
  loss improvement since its previous observation; weights are the base schedule's weights
  tilted by ``exp(rate * smoothed reward)``.
- ``rule="doremi"`` (Xie et al. 2023): the signal is the excess loss over a reference,
  ``max(loss - reference, 0)``; weights follow multiplicative weights,
  ``w <- normalise(w * exp(rate * smoothed excess))``.

Both then mix in the floors, ``w <- floor + (1 - sum(floor)) * w``. Every global batch holds
exactly the largest-remainder counts of the weights in force (:class:`WeightHistory`, the
drop-in for :class:`~dataorder.schedules.BatchCounts` that the mixture kernel reads), so the
stream is a pure function of the seed and the weight history, which is part of the state.

The math is in the small pure functions at the top; the sampler does the bookkeeping.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataorder.samplers._state import StateError, StateReader
from dataorder.samplers.allocation import largest_remainder
from dataorder.samplers.base import check_seed
from dataorder.samplers.mixture import MixtureSampler
from dataorder.samplers.run import fingerprint
from dataorder.schedules import BatchCounts, RunCounts, Schedule

__all__ = ["RULES", "AdaptiveMixtureSampler", "LateObservationError", "WeightHistory", "doremi_weights",
           "exp3_weights", "floor_mix", "plot_weights", "reference_losses", "smooth"]

RULES = ("exp3", "doremi")

#: States taken ahead of the loop's reports that ``observe`` still completes in place (the oldest go first).
MAX_AWAITING = 256


class LateObservationError(ValueError):
    """``observe`` came after this rank's iterator had already produced a batch the update would change.

    Raise ``delay`` to at least the number of batches the DataLoader prefetches
    (``num_workers * prefetch_factor``).

    >>> s = AdaptiveMixtureSampler({"a": 4, "b": 4}, {"a": 1, "b": 1}, num_samples=8, batch_size=2)
    >>> _ = list(s)  # every batch produced: no update can apply any more
    >>> try:
    ...     s.observe(0, {"a": 1.0})
    ... except LateObservationError:
    ...     print("raise delay")
    raise delay
    """


# -- the update rules: pure functions on (S,) float64 arrays --------------------------------------
def smooth(previous: np.ndarray, signal: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average: ``smoothing * previous + (1 - smoothing) * signal``.

    >>> smooth(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.75).tolist()
    [0.75, 0.25]
    """
    return smoothing * previous + (1.0 - smoothing) * signal


def _tilt(weights: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """``normalise(weights * exp(exponent))``, computed without overflow."""
    tilted = weights * np.exp(exponent - exponent.max())
    return tilted / tilted.sum()


def exp3_weights(prior: np.ndarray, reward: np.ndarray, rate: float) -> np.ndarray:
    """EXP3/Hedge weights: ``prior`` tilted by ``exp(rate * reward)``, normalised.

    >>> exp3_weights(np.array([0.5, 0.5]), np.array([math.log(3), 0.0]), 1.0).tolist()
    [0.75, 0.25]
    """
    return _tilt(prior, rate * reward)


def doremi_weights(previous: np.ndarray, excess: np.ndarray, rate: float) -> np.ndarray:
    """DoReMi's multiplicative-weights step: ``normalise(previous * exp(rate * excess))``.

    >>> doremi_weights(np.array([0.25, 0.75]), np.array([math.log(3), 0.0]), 1.0).tolist()
    [0.5, 0.5]
    """
    return _tilt(previous, rate * excess)


def floor_mix(weights: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """``floors + (1 - sum(floors)) * weights``: every domain keeps at least its floor.

    >>> floor_mix(np.array([1.0, 0.0]), np.array([0.1, 0.1])).tolist()
    [0.9, 0.1]
    """
    return floors + (1.0 - floors.sum()) * weights


# -- the per-batch counts of a run whose weights change at updates --------------------------------
class WeightHistory(RunCounts):
    """Per-source counts of every global batch: the base schedule until the first update, then
    the weights of the latest update (constant until the next one).

    A :class:`~dataorder.schedules.RunCounts` like :class:`~dataorder.schedules.BatchCounts`
    (``batch``, ``cumulative``, ``weights``, ``total``, ``full_batches``, ``last_size``,
    ``num_batches``), so the mixture kernel reads it unchanged. Memory: one batch index and one row of weights per update
    (the state), plus derived int64 counts; ``cumulative`` is a binary search.

    >>> history = WeightHistory(BatchCounts(Schedule.constant({"a": 1, "b": 1}), 40, 4))
    >>> history.append(3, np.array([0.75, 0.25]))
    >>> history.batch(np.arange(2, 5)).tolist(), history.cumulative(5).tolist()
    ([[2, 2], [3, 1], [3, 1]], [12, 8])
    """

    def __init__(self, base: BatchCounts) -> None:
        self.base = base
        self._set_run(base.num_samples, base.batch_size)
        columns = len(base.schedule.names)
        # per update, in buffers that double when full (an append is amortised O(1)):
        self._count = 0
        self._starts = np.empty(0, dtype=np.int64)  # first batch of each update
        self._rows = np.empty((0, columns))  # the weights of each update
        self._full = np.empty((0, columns), dtype=np.int64)  # counts of a full batch under each update
        self._before = np.empty((0, columns), dtype=np.int64)  # counts of all batches before each start

    @property
    def starts(self) -> np.ndarray:
        """First global batch of each update, ``(U,)`` (a view)."""
        return self._starts[:self._count]

    @property
    def rows(self) -> np.ndarray:
        """Weights of each update, ``(U, S)`` (a view)."""
        return self._rows[:self._count]

    def __len__(self) -> int:
        return self._count

    def append(self, start: int, weights: np.ndarray) -> None:
        """Weights ``weights`` from global batch ``start`` on (after every earlier update)."""
        count = self._count
        if count and start <= self._starts[count - 1] or not 0 <= start < self.num_batches:
            raise ValueError(f"an update must start after the last one and before batch {self.num_batches}, "
                             f"got start={start}")
        full = largest_remainder(self.batch_size * weights, self.batch_size)
        before = self.cumulative(start)
        if count == len(self._starts):
            grow = max(8, count)
            self._starts = np.concatenate([self._starts, np.zeros(grow, np.int64)])
            self._rows, self._full, self._before = (np.concatenate([a, np.zeros((grow, a.shape[1]), a.dtype)])
                                                    for a in (self._rows, self._full, self._before))
        self._starts[count], self._rows[count], self._full[count], self._before[count] = start, weights, full, before
        self._count = count + 1

    def load(self, starts: np.ndarray, rows: np.ndarray) -> None:
        """Replace the history by ``starts``/``rows`` (checked by the caller)."""
        fresh = WeightHistory(self.base)
        for start, weights in zip(starts.tolist(), rows):
            fresh.append(start, weights)
        self.__dict__.update(fresh.__dict__)

    def _update_of(self, b: np.ndarray) -> np.ndarray:
        """Index of the update in force at each batch ``b`` (-1: the base schedule)."""
        return np.searchsorted(self.starts, b, side="right") - 1

    def weights(self, b: np.ndarray | int) -> np.ndarray:
        """Weights in force at batch(es) ``b``: ``(S,)`` or ``(m, S)``."""
        b = np.asarray(b, dtype=np.int64)
        k = self._update_of(b)
        if not len(self.starts):
            return self.base.weights(b)
        return np.where((k >= 0)[..., None], self.rows[np.maximum(k, 0)], self.base.weights(b))

    def full_batch_counts(self, b: np.ndarray | int) -> np.ndarray:
        """Counts of a full batch at batch(es) ``b``: the latest update's, else the base schedule's."""
        b = np.asarray(b, dtype=np.int64)
        counts = self.base.full_batch_counts(b)
        if not len(self):
            return counts
        k = self._update_of(b)
        return np.where((k >= 0)[..., None], self._full[np.maximum(k, 0)], counts)

    def cumulative_full(self, b: int) -> np.ndarray:
        """Counts of all batches before batch ``b <= full_batches``: a binary search."""
        k = int(self._update_of(b - 1)) if b else -1  # the update in force at the last batch before b
        if k < 0:
            return self.base.cumulative(b)
        return self._before[k] + (b - int(self.starts[k])) * self._full[k]


# -- the sampler ---------------------------------------------------------------------------------
class AdaptiveMixtureSampler(MixtureSampler):
    """A :class:`~dataorder.samplers.mixture.MixtureSampler` whose weights follow the domains' losses.

    ``sources``, ``schedule``, ``num_samples``, ``batch_size`` (the *global* batch) and the
    protocol arguments are as for ``MixtureSampler``; the schedule is the *base*: it holds
    for the first ``warmup`` global batches and is the prior of the ``exp3`` rule.

    After training on global batch ``step``, call ``observe(step, losses)`` on every rank
    with this rank's mean loss of each domain (a domain absent from the rank's share may be
    left out). The ranks' losses are all-gathered and averaged in rank order, so every rank
    computes the same update; the new weights hold from batch ``step + 1 + delay`` until the
    next update. ``delay`` must cover the batches the DataLoader has already drawn from the
    sampler (0 without workers; ``num_workers * prefetch_factor`` with them), else
    :class:`LateObservationError`.

    Rules (see the module doc): ``rule="exp3"`` (reward: loss improvement) or
    ``rule="doremi"`` (excess loss over ``reference``, a dict of per-domain losses, e.g.
    from :func:`reference_losses` on a ``dataorder score`` table). ``rate`` is the step size
    (in 1/nats), ``smoothing`` the moving-average factor of the signal (0: none), ``floor``
    the least weight of every domain (a number or a dict).

    ``order`` optionally gives per-domain difficulty scores: such a domain's draws follow
    ascending score order (easy first, ties by index) on every pass instead of a fresh
    random permutation per pass; a global batch takes the next draws in that order (inside
    the batch, the mixture layout spreads them over the slots).

    State: ``state_dict()`` adds the weight history (one int64 batch index and ``S``
    float64 weights per update, i.e. ``8 * (S + 1)`` bytes: 32 MB after 10⁶ updates with
    3 domains) and the rule's O(S) signal; resuming is bit-exact at any world size that
    divides the position.

    Example::

        >>> sampler = AdaptiveMixtureSampler({"web": 60, "code": 40}, {"web": 0.5, "code": 0.5},
        ...                                  rule="doremi", reference={"web": 2.0, "code": 1.0},
        ...                                  rate=1.0, smoothing=0.0, floor=0.1, num_samples=40, batch_size=10)
        >>> first = [next(it) for it in [iter(sampler)] for _ in range(10)]
        >>> sampler.observe(0, {"web": 2.0, "code": 1.0 + math.log(3)})
        {'web': 0.3, 'code': 0.7}
        >>> sampler.counts_at(1)
        {'web': 3, 'code': 7}
    """

    def __init__(
        self,
        sources: Mapping[str, int | Sized],
        schedule: Schedule | Mapping[str, float] | str | os.PathLike,
        *,
        rule: str = "exp3",
        rate: float = 1.0,
        smoothing: float = 0.9,
        floor: float | Mapping[str, float] = 0.01,
        warmup: int = 0,
        delay: int = 0,
        reference: Mapping[str, float] | None = None,
        order: Mapping[str, Any] | None = None,
        num_samples: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        exhaustion: str = "restart",
        drop_last: bool = False,
    ) -> None:
        if exhaustion != "restart":
            raise ValueError("exhaustion must be 'restart' for an adaptive mixture: where a source runs out "
                             "depends on weights not chosen yet")
        super().__init__(sources, schedule, num_samples=num_samples, batch_size=batch_size, seed=seed, rank=rank,
                         world_size=world_size, exhaustion=exhaustion, drop_last=drop_last)
        names = self.schedule.names
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.rate = _positive(rate, "rate")
        self.smoothing = _fraction(smoothing, "smoothing", closed=False)
        self.floors = _per_source(floor, names, "floor")
        if self.floors.sum() >= 1.0:
            raise ValueError(f"floor must leave room to adapt: the floors sum to {self.floors.sum():g}, need < 1")
        self.warmup = check_seed(warmup, "warmup")
        self.delay = check_seed(delay, "delay")
        if rule == "doremi":
            if reference is None:
                raise ValueError("rule='doremi' needs reference={domain: loss}, e.g. reference_losses(scores, sampler)")
            self.reference = _per_source(reference, names, "reference", lower=-math.inf)
        elif reference is not None:
            raise ValueError("reference is used only by rule='doremi'; leave it out for rule='exp3'")
        else:
            self.reference = None
        self._orders = _within_orders(order, self.sizes)
        self.counts = WeightHistory(self.counts)
        columns = len(names)
        self._signal = np.zeros(columns)  # smoothed reward (exp3) or excess loss (doremi)
        self._last_loss = np.full(columns, np.nan)  # exp3: each domain's previous loss
        self._last_step = -1
        self._made = 0  # global batches whose indices this rank has produced
        self._awaiting: list[tuple[int, dict[str, Any]]] = []  # (batches drawn, state) ahead of the reports

    # -- the loop's report ------------------------------------------------------------------
    def observe(self, step: int, losses: Mapping[str, float]) -> dict[str, float] | None:
        """Report the mean loss of each domain on global batch ``step``; update the weights.

        Call on every rank (a collective when ``torch.distributed`` is initialised), with
        steps in increasing order. Returns the new weights, or ``None`` when they do not
        change yet (warm-up) or no batch is left to change. Non-finite losses raise
        ``ValueError`` on every rank and change nothing.
        """
        step = check_seed(step, "step")
        if step <= self._last_step or step >= self.counts.num_batches:
            raise ValueError(f"step must be a global batch after the last observed one ({self._last_step}) and "
                             f"below {self.counts.num_batches}, got {step}")
        local = self._loss_row(losses)
        mean = _rank_mean(local)
        start = step + 1 + self.delay
        if start < self._made:
            raise LateObservationError(
                f"observe(step={step}) would change batch {start}, but this rank already produced batches up to "
                f"{self._made - 1}; set delay >= {self._made - step - 1} (the DataLoader's prefetched batches)")
        signal, last_loss = self._next_signal(mean)
        applies = self.warmup <= start < self.counts.num_batches
        weights = self._next_weights(start, signal) if applies else None
        if weights is not None:
            self.counts.append(start, weights)
            self._carry = {}  # cached cumulative counts may cover batches the update changed
        self._signal, self._last_loss, self._last_step = signal, last_loss, step
        self._complete_awaiting(step)
        return None if weights is None else self._named(weights)

    def _loss_row(self, losses: Mapping[str, float]) -> np.ndarray:
        """This rank's losses in schedule order, NaN where a domain was not reported."""
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict {{domain: mean loss}}, got {type(losses).__name__}")
        unknown = [name for name in losses if name not in self.sizes]
        if unknown:
            raise ValueError(f"losses has unknown domain(s) {unknown}; domains are {list(self.schedule.names)}")
        row = np.full(len(self.schedule.names), np.nan)
        for column, name in enumerate(self.schedule.names):
            if name in losses:
                value = losses[name]
                if isinstance(value, torch.Tensor):
                    if value.numel() != 1:
                        raise ValueError(f"losses[{name!r}] must be one number (the domain's mean loss), got a tensor "
                                         f"of shape {tuple(value.shape)}; report its .mean()")
                    value = value.item()
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise TypeError(f"losses[{name!r}] must be a number, got {value!r}")
                row[column] = math.inf if math.isnan(float(value)) else float(value)  # NaN marks "absent"
        return row

    def _next_signal(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if np.isinf(mean).any():
            bad = [name for name, v in zip(self.schedule.names, mean) if np.isinf(v)]
            raise ValueError(f"losses of {bad} are not finite (NaN or inf) on some rank; nothing was updated — "
                             "skip the report for this step or fix the loss")
        seen = ~np.isnan(mean)
        if self.rule == "exp3":
            raw = self._last_loss - mean  # improvement; NaN where either loss is missing
            last_loss = np.where(seen, mean, self._last_loss)
        else:
            raw = np.maximum(mean - self.reference, 0.0)
            last_loss = self._last_loss
        has = ~np.isnan(raw)
        signal = np.where(has, smooth(self._signal, np.where(has, raw, 0.0), self.smoothing), self._signal)
        return signal, last_loss

    def _next_weights(self, start: int, signal: np.ndarray) -> np.ndarray:
        if self.rule == "exp3":
            tilted = exp3_weights(self.counts.base.weights(start), signal, self.rate)
        else:
            tilted = doremi_weights(self.counts.weights(start), signal, self.rate)
        return floor_mix(tilted, self.floors)

    # -- logging ----------------------------------------------------------------------------
    def weights_history(self) -> list[dict[str, Any]]:
        """One entry per update: the first batch it holds for, its weights and its batch counts.

        >>> s = AdaptiveMixtureSampler({"a": 8, "b": 8}, {"a": 1, "b": 1}, num_samples=16, batch_size=4,
        ...                            smoothing=0.0, floor=0.0)
        >>> s.observe(0, {"a": 1.0, "b": 1.0}), s.observe(1, {"a": 1.0, "b": 1.0 - math.log(3)})
        ({'a': 0.5, 'b': 0.5}, {'a': 0.25, 'b': 0.75})
        >>> s.weights_history()[1]
        {'batch': 2, 'weights': {'a': 0.25, 'b': 0.75}, 'counts': {'a': 1, 'b': 3}}
        """
        history = self.counts
        return [{"batch": int(start), "weights": self._named(row),
                 "counts": dict(zip(self.schedule.names, history.batch(int(start)).tolist()))}
                for start, row in zip(history.starts, history.rows)]

    def _named(self, weights: np.ndarray) -> dict[str, float]:
        return {name: round(float(w), 12) for name, w in zip(self.schedule.names, weights)}

    # -- the stream -------------------------------------------------------------------------
    def _cumulative(self, b: int) -> np.ndarray:
        return self.counts.cumulative(b)

    def _indices_at(self, positions: np.ndarray) -> np.ndarray:
        column, draw, out = self._map(positions)
        for c, order in self._orders.items():
            mine = column == c
            out[mine] = self._offset[c] + order[draw[mine] % self._n[c]]
        return out

    def __iter__(self) -> Iterator[int]:
        """One global batch's share at a time, so that the batches not produced yet can still change."""
        share, total = self.batch_size // self.world_size, len(self)

        def block_at(first: int) -> list[int]:
            batch = first // share
            self._made = max(self._made, batch + 1)
            return self._rank_indices(first, min(total, (batch + 1) * share)).tolist()

        return self._cursor.iterate(total, block_at)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's position and the weight history, as after the loop's reports of the batches drawn.

        A state describes the sampler once the loop has reported (``observe``) every global
        batch this rank has drawn up to the state's position. A loader that draws ahead of
        the loop (``StatefulDataLoader`` with workers snapshots its sampler when it
        *prefetches* a batch) gets a dict that each later ``observe`` of such a batch brings
        up to date, in place; a report of a later batch freezes it. So the loader's own
        ``state_dict()``, taken after the step's ``observe``, resumes bit for bit. Copy the
        dict (``copy.deepcopy``, ``torch.save``) to freeze it earlier.

        >>> s = AdaptiveMixtureSampler({"a": 4, "b": 4}, {"a": 1, "b": 1}, num_samples=8, batch_size=2)
        >>> _ = [next(it) for it in [iter(s)] for _ in range(2)]  # batch 0 drawn
        >>> state = s.state_dict()                              # ... not reported yet
        >>> _ = s.observe(0, {"a": 1.0, "b": 2.0})
        >>> state["last_step"]
        0
        """
        state = super().state_dict()
        drawn = self._batches_drawn()
        if drawn - 1 > self._last_step:
            self._awaiting.append((drawn, state))
            del self._awaiting[:-MAX_AWAITING]
        return state

    def _batches_drawn(self) -> int:
        """Global batches whose share this rank has yielded completely."""
        if self.position >= len(self):
            return self.counts.num_batches
        return self.position // (self.batch_size // self.world_size)

    def _complete_awaiting(self, step: int) -> None:
        """Write the report of batch ``step`` into the states that drew it; freeze those it went past."""
        fresh, waiting = None, []
        for drawn, state in self._awaiting:
            if step < drawn:
                fresh = fresh or super().state_dict()
                sample = state["sample"]
                state.clear()
                state.update({**fresh, "sample": sample})
            if step < drawn - 1:
                waiting.append((drawn, state))
        self._awaiting = waiting

    def _extra_state(self) -> dict[str, Any]:
        """``MixtureSampler``'s fields plus the settings, the weight history and the rule's signal."""
        return {
            **super()._extra_state(),
            "adaptive": self._settings(),
            "weight_starts": torch.from_numpy(self.counts.starts.copy()),
            "weight_rows": torch.from_numpy(self.counts.rows.copy()),
            "signal": torch.from_numpy(self._signal.copy()),
            "last_loss": [None if math.isnan(loss) else float(loss) for loss in self._last_loss],  # None: not seen
            "last_step": self._last_step,
        }

    def _load(self, state: Any) -> None:
        """Load into this candidate (see ``RunSampler.load_state_dict``): the run's position, then the history."""
        super()._load(state)
        reader = StateReader(state, type(self).__name__)
        reader.same("adaptive", self._settings())
        columns = len(self.schedule.names)
        last_step = reader.int("last_step", low=-1, high=self.counts.num_batches - 1)
        starts = reader.tensor("weight_starts", torch.int64, (None,)).numpy()
        rows = reader.tensor("weight_rows", torch.float64, (len(starts), columns)).numpy()
        _check_history(starts, rows, self.floors, first=max(self.warmup, 1 + self.delay),
                       last=min(last_step + 1 + self.delay, self.counts.num_batches - 1))
        signal = reader.tensor("signal", torch.float64, (columns,)).numpy().copy()
        last_loss = reader.floats("last_loss", (columns,), missing=True)
        history = WeightHistory(self.counts.base)
        history.load(starts, rows)
        share = self.batch_size // self.world_size
        self.counts, self._carry = history, {}
        self._signal, self._last_loss, self._last_step = signal, last_loss, last_step
        self._awaiting = []
        self._made = -(-self.position // share)  # batches this rank has started: an update may not change them

    def _settings(self) -> dict[str, Any]:
        return {"rule": self.rule, "rate": self.rate, "smoothing": self.smoothing, "floor": self.floors.tolist(),
                "warmup": self.warmup, "delay": self.delay,
                "reference": None if self.reference is None else self.reference.tolist(),
                "order": fingerprint({str(c): order.tolist() for c, order in self._orders.items()})}

    def __repr__(self) -> str:
        return (f"AdaptiveMixtureSampler(sources={self.sizes}, rule={self.rule!r}, rate={self.rate}, "
                f"smoothing={self.smoothing}, num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"seed={self.seed}, rank={self.rank}, world_size={self.world_size})")


# -- helpers ---------------------------------------------------------------------------------------
def _check_history(starts: np.ndarray, rows: np.ndarray, floors: np.ndarray, *, first: int, last: int) -> None:
    """Refuse a weight history that ``observe`` could not have built: updates start in ``[first, last]``,
    in increasing order, with weights at or above the floors summing to 1."""
    if len(starts) and (np.any(np.diff(starts) <= 0) or starts[0] < first or starts[-1] > last):
        raise StateError(f"state's weight_starts must be increasing batch indices in [{first}, {last}] (after the "
                         "warm-up, and at most last_step + 1 + delay); the state is corrupt")
    if np.any(rows < floors - 1e-12) or np.any(np.abs(rows.sum(axis=1) - 1.0) > 1e-9):
        raise StateError("state's weight_rows must be rows of weights >= the floors summing to 1; the state is corrupt")


def _rank_mean(local: np.ndarray) -> np.ndarray:
    """Per-domain mean over the ranks that reported it, in rank order (bitwise the same on every rank).

    Infinite marks a non-finite report (so it survives the mean); NaN marks no report.
    """
    from dataorder.distributed import active_world, gather_global_batch

    if active_world() == 1:
        return local
    rows = gather_global_batch(torch.from_numpy(local).reshape(1, -1)).numpy()  # (W, S), rank order
    seen = ~np.isnan(rows)
    total = np.zeros(rows.shape[1])
    for row, mask in zip(rows, seen):
        total = total + np.where(mask, row, 0.0)
    count = seen.sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _fraction(value: Any, name: str, *, closed: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        0 <= float(value) <= 1 if closed else 0 <= float(value) < 1)
    if not ok:
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def _per_source(value: Any, names: tuple[str, ...], name: str, *, lower: float = 0.0) -> np.ndarray:
    """A number (the same for every source) or a dict with every source, as an (S,) array."""
    if isinstance(value, Mapping):
        if set(value) != set(names):
            raise ValueError(f"{name} must give every domain {list(names)} and no other, got {sorted(value)}")
        values = [value[n] for n in names]
    else:
        values = [value] * len(names)
    for n, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lower <= float(v) < math.inf:
            raise ValueError(f"{name} of {n!r} must be a finite number >= {lower:g}, got {v!r}")
    return np.array(values, dtype=np.float64)


def _within_orders(order: Mapping[str, Any] | None, sizes: dict[str, int]) -> dict[int, np.ndarray]:
    """Schedule column -> the domain's draw order (argsort of its scores, easy first)."""
    if order is None:
        return {}
    if not isinstance(order, Mapping):
        raise TypeError("order must be a dict {domain: per-example scores}")
    names = list(sizes)
    out = {}
    for name, scores in order.items():
        if name not in sizes:
            raise ValueError(f"order has unknown domain {name!r}; domains are {names}")
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (sizes[name],) or not np.all(np.isfinite(scores)):
            raise ValueError(f"order[{name!r}] must be {sizes[name]} finite scores (one per example of {name!r})")
        out[names.index(name)] = np.argsort(scores, kind="stable").astype(np.int64)
    return out


def reference_losses(scores: Any, sampler: MixtureSampler, column: str = "loss") -> dict[str, float]:
    """Per-domain mean of a score table's ``column``, for ``rule="doremi"``'s ``reference``.

    ``scores`` is a ``dataorder score`` output (file or folder, read with
    :func:`dataorder.scores.io.load_scores`) or an array with one score per global index of
    the concatenated sources. NaN rows (e.g. the reference documents of a
    ``--reference-split`` run) are left out of the means.

    >>> s = AdaptiveMixtureSampler({"a": 2, "b": 2}, {"a": 1, "b": 1}, num_samples=4, batch_size=2)
    >>> reference_losses(np.array([1.0, 3.0, 0.5, 0.5]), s)
    {'a': 2.0, 'b': 0.5}
    """
    if isinstance(scores, (str, os.PathLike)):
        from dataorder.scores.io import load_scores

        scores = load_scores(Path(scores), column)
    scores = np.asarray(scores, dtype=np.float64)
    total = sum(sampler.sizes.values())
    if scores.shape != (total,):
        raise ValueError(f"scores must hold one value per example of the concatenated sources ({total}), "
                         f"got shape {scores.shape}")
    out = {}
    for name, n in sampler.sizes.items():
        values = scores[sampler.offsets[name]:sampler.offsets[name] + n]
        if not np.isfinite(values).any():
            raise ValueError(f"scores of domain {name!r} are all NaN or infinite; score some of its examples")
        out[name] = float(np.mean(values[np.isfinite(values)]))
    return out


def plot_weights(sampler: AdaptiveMixtureSampler, out: str | os.PathLike, *, title: str = "") -> None:
    """Stacked-area PNG of the weights in force at every global batch (``dataorder schedule plot`` style).

    Needs matplotlib (the ``[plot]`` extra), imported only here.

    >>> import tempfile
    >>> s = AdaptiveMixtureSampler({"a": 4, "b": 4}, {"a": 1, "b": 1}, num_samples=8, batch_size=2)
    >>> plot_weights(s, Path(tempfile.mkdtemp()) / "mixture.png")
    """
    from dataorder._plotting import plot_shares

    steps = np.arange(sampler.counts.num_batches)
    plot_shares(steps, sampler.counts.weights(steps), sampler.schedule.names, out, xlabel="step (global batch)",
                title=f"adaptive mixture ({sampler.rule}) {title}", step="post")
