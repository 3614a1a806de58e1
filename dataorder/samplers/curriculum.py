"""Curriculum learning and score-based pruning from per-example difficulty scores.

Scores come as an array (one value per example, higher = harder unless
``higher_is_easier=True``) or as the ``scores.parquet`` written by ``dataorder score``
(pass ``column=``). For a file, a score whose direction is known (``aum``, ``confidence``,
``margin``, ``datamap_confidence``... are higher = easier) is turned the right way round
unless ``higher_is_easier`` says otherwise.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from dataorder._validate import check_bool, check_choice, check_count, check_fraction, check_seed
from dataorder.samplers._state import StateError, StateReader
from dataorder.samplers.base import array_digest, epoch_rng
from dataorder.samplers.permutation import hash_key, keyed_permutation
from dataorder.samplers.run import RunSampler, fingerprint
from dataorder.schedules import pacing_function

__all__ = ["CurriculumSampler", "difficulty", "prune", "read_scores"]

STRATEGIES = ("hardest", "easiest", "random", "middle")
ORDERS = ("easy_first", "hard_first")


# -- scores -------------------------------------------------------------------------------------
def read_scores(scores: Any, column: str | None = None) -> tuple[np.ndarray, str | None]:
    """``(values, column)`` from an array-like or a ``scores.parquet`` file or its directory.

    >>> read_scores([0.5, 0.1])
    (array([0.5, 0.1]), None)
    """
    if isinstance(scores, (str, os.PathLike)):
        from pathlib import Path

        import pyarrow.parquet as pq

        from dataorder.scores.io import SCORES_FILE, load_scores

        path = Path(scores)
        file = path / SCORES_FILE if path.is_dir() else path
        if column is None and file.is_file():
            names = pq.read_schema(file).names
            found = [name for name in names if name != "index" and not _is_run_column(name, names)]
            column = found[0] if len(found) == 1 else None
        values = load_scores(path, column)
    else:
        if column is not None:
            raise ValueError("column= applies to a scores file; with an array of scores leave it out")
        values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be one number per example (a non-empty 1-D array), got shape {values.shape}")
    if np.isnan(values).any():  # +-inf is allowed: forgetting is inf for never-learned examples
        bad = np.flatnonzero(np.isnan(values))
        raise ValueError(f"scores must not be NaN; examples {bad[:5].tolist()} are ({bad.size} in all)")
    return values, column


def _is_run_column(name: str, names: list[str]) -> bool:
    stem, separator, run = name.rpartition("_run")
    return bool(separator) and run.isdigit() and stem in names


def difficulty(scores: Any, *, column: str | None = None, higher_is_easier: bool | None = None) -> np.ndarray:
    """Scores turned so that higher = harder (the convention of :func:`prune` and the curriculum).

    ``higher_is_easier=None`` means: as the scores file says for a known score column,
    otherwise higher = harder.

    >>> difficulty([1.0, 3.0], higher_is_easier=True).tolist()
    [-1.0, -3.0]
    """
    values, column = read_scores(scores, column)
    if higher_is_easier is None:
        higher_is_easier = _known_direction(column)
    return -values if check_bool(higher_is_easier, "higher_is_easier") else values


def _known_direction(column: str | None) -> bool:
    if column is None:
        return False
    from dataorder.scores.io import HIGHER_MEANS

    meaning = HIGHER_MEANS.get(column.rsplit("_run", 1)[0] if column not in HIGHER_MEANS else column, "harder")
    if meaning == "ambiguous":
        raise ValueError(f"score {column!r} has no easy/hard direction; pass higher_is_easier=True or False")
    return meaning == "easier"


def _easiest_first(hardness: np.ndarray) -> np.ndarray:
    """Example indices from easiest to hardest; ties keep the lower index first."""
    return np.argsort(hardness, kind="stable")


def _hardest_first(hardness: np.ndarray) -> np.ndarray:
    return np.argsort(-hardness, kind="stable")


# -- pruning --------------------------------------------------------------------------------------
def prune(
    scores: Any,
    keep: float | int,
    *,
    strategy: str = "hardest",
    drop_hardest: float = 0.0,
    seed: int = 0,
    column: str | None = None,
    higher_is_easier: bool | None = None,
) -> np.ndarray:
    """Sorted indices of the examples to keep (data-diet pruning, Paul et al. 2021).

    ``keep`` is a fraction of the dataset in (0, 1] or a count. First the
    ``drop_hardest`` fraction of hardest examples is removed (likely label noise); from the
    rest ``strategy`` keeps the hardest, the easiest, a random subset (``seed``), or the
    ``middle`` band of the score distribution (perplexity pruning, Ankner et al. 2024: the
    examples ranked ``(m - keep) // 2`` to ``(m + keep) // 2`` from the easiest, of the ``m``
    remaining). Ties in score go to the lower index. Fractions are rounded to the nearest count.

    Example::

        >>> scores = [0.9, 0.1, 0.5, 0.7, 0.3]
        >>> prune(scores, 2).tolist()                        # the two hardest
        [0, 3]
        >>> prune(scores, 2, drop_hardest=0.2).tolist()      # skip the single hardest first
        [2, 3]
        >>> prune(scores, 0.4, strategy="easiest").tolist()
        [1, 4]
        >>> prune(scores, 3, strategy="middle").tolist()     # drop the easiest and the hardest
        [2, 3, 4]
    """
    hardness = difficulty(scores, column=column, higher_is_easier=higher_is_easier)
    n = hardness.size
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    count = _count(keep, n)
    drop = _fraction(drop_hardest, "drop_hardest")
    dropped = math.floor(drop * n + 0.5)
    if dropped + count > n:
        raise ValueError(f"keep={keep} ({count} examples) plus drop_hardest={drop_hardest} ({dropped}) exceed the "
                         f"{n} examples; lower one of them")
    hardest = _hardest_first(hardness)
    remaining = hardest[dropped:]
    if strategy == "hardest":
        kept = remaining[:count]
    elif strategy == "easiest":
        allowed = np.ones(n, dtype=bool)
        allowed[hardest[:dropped]] = False
        easiest = _easiest_first(hardness)
        kept = easiest[allowed[easiest]][:count]
    elif strategy == "middle":
        middle = remaining[np.lexsort((remaining, hardness[remaining]))]  # easiest first, ties by index
        start = (middle.size - count) // 2
        kept = middle[start:start + count]
    else:
        kept = epoch_rng(check_seed(seed)).choice(remaining, size=count, replace=False)
    return np.sort(kept).astype(np.int64)


def _count(keep: Any, n: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a fraction in (0, 1] or a count of examples, got {keep!r}")
    if isinstance(keep, numbers.Integral) and keep >= 1:
        if keep > n:
            raise ValueError(f"keep={keep} is more than the {n} examples")
        return int(keep)
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1] or a count in [1, {n}], got {keep}")
    return max(1, math.floor(float(keep) * n + 0.5))


def _fraction(value: Any, name: str) -> float:
    return check_fraction(value, name, one=False)


# -- the curriculum -------------------------------------------------------------------------------
class CurriculumSampler(RunSampler):
    """Draw ``num_samples`` indices over a run, from the easiest examples first, widening by a pacing.

    At progress ``p`` (global samples drawn / ``num_samples``) only the easiest (for
    ``order="hard_first"``: hardest) ``g(p)`` fraction of the examples is eligible, where
    ``g`` is the pacing function (:func:`~dataorder.schedules.pacing_function`) rising from
    ``start`` to 1 at ``full_at``. The run is a sequence of *passes*: a pass starting at
    global sample ``i`` takes the pool of the ``ceil(g(i / num_samples) * n)`` eligible
    examples and visits each once in a random order; the next pass takes the pool as it is
    then. So eligibility never exceeds ``g(p)``, examples are drawn without replacement
    within a pass, and every pass that starts at or after ``full_at`` covers the whole set.

    Each index is a pure function of ``(seed, global position)``; the state is the global
    position. Resuming costs one binary search in the pass table (built once, O(passes
    before the pool is full); with a callable pacing that never reaches 1, O(passes in the
    run)). Sharding, padding and elastic resumption are those of
    :class:`~dataorder.samplers.mixture.RunSampler`.

    Example::

        >>> scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 0.0]   # higher = harder
        >>> sampler = CurriculumSampler(scores, num_samples=20, pacing="step", start=0.5, full_at=0.5)
        >>> sorted(set(list(sampler)[:5]))               # the first pass: the easiest half
        [0, 2, 4, 6, 9]
        >>> sampler.pool_size(0), sampler.pool_size(10)
        (5, 10)
    """

    def __init__(
        self,
        scores: Any,
        *,
        num_samples: int,
        pacing: str | Callable[[float], float] = "linear",
        start: float = 0.2,
        full_at: float = 0.8,
        order: str = "easy_first",
        higher_is_easier: bool | None = None,
        column: str | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        hardness = difficulty(scores, column=column, higher_is_easier=higher_is_easier)
        check_choice(order, "order", ORDERS)
        pace = pacing_function(pacing, start=start, full_at=full_at)
        pacing_name = pacing if isinstance(pacing, str) else getattr(pacing, "__qualname__", "callable")
        settings = {"pacing": pacing_name, "start": float(start), "full_at": float(full_at), "order": order}
        ranking = _easiest_first(hardness) if order == "easy_first" else _hardest_first(hardness)
        ranking_digest = array_digest(ranking)
        # scores computed apart on each rank can rank differently: compare the ranking itself
        shared = {**settings, "score_ranking": ranking_digest}
        super().__init__(num_samples, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, shared=shared)
        self.n = hardness.size
        self.order = order
        self.pacing = pace
        self._custom_pacing = not isinstance(pacing, str)
        self._settings = settings
        #: Example indices in curriculum order: ``ranking[:m]`` is the pool of size ``m``.
        self.ranking = ranking
        self._ranking_digest = ranking_digest
        self._table: tuple[np.ndarray, np.ndarray, int] | None = None
        self._digest: str | None = None

    # -- pacing -------------------------------------------------------------------------------
    def _pool(self, sample: int) -> int:
        g = float(self.pacing(sample / self.num_samples))
        if not 0.0 < g <= 1.0:
            raise ValueError(f"pacing({sample / self.num_samples:g}) = {g}; a pacing must return a fraction in (0, 1]")
        return min(self.n, max(1, math.ceil(g * self.n - 1e-9)))

    def _passes(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(start of each pass before the pool is full, its pool size, start of the first full pass)."""
        if self._table is None:
            starts, pools, position = [], [], 0
            while position < self.num_samples:
                pool = self._pool(position)
                if pool == self.n:
                    break
                starts.append(position)
                pools.append(pool)
                position += pool
            self._table = (np.array(starts, dtype=np.int64), np.array(pools, dtype=np.int64), position)
        return self._table

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pass number, position within the pass, pool size) of each global position."""
        starts, pools, full_from = self._passes()
        early = positions < full_from
        passes = np.empty_like(positions)
        within = np.empty_like(positions)
        sizes = np.full_like(positions, self.n)
        e = np.searchsorted(starts, positions[early], side="right") - 1
        passes[early], within[early], sizes[early] = e, positions[early] - starts[e], pools[e]
        late_passes, late_within = np.divmod(positions[~early] - full_from, self.n)
        passes[~early], within[~early] = len(starts) + late_passes, late_within
        return passes, within, sizes

    def pool_size(self, sample: int | None = None) -> int:
        """How many examples are eligible at global ``sample`` (default: the current position)."""
        sample = min(self.sample, self._run_length() - 1) if sample is None else check_count(sample, "sample", minimum=0)
        if sample >= self.num_samples:
            raise ValueError(f"sample must be < num_samples={self.num_samples}, got {sample}")
        return int(self._locate(np.array([sample], dtype=np.int64))[2][0])

    def eligible(self, sample: int | None = None) -> np.ndarray:
        """Indices of the examples eligible at global ``sample`` (default: the current position)."""
        return np.sort(self.ranking[: self.pool_size(sample)])

    # -- the stream ---------------------------------------------------------------------------
    def _run_length(self) -> int:
        return self.num_samples

    def _indices_at(self, positions: np.ndarray) -> np.ndarray:
        passes, within, sizes = self._locate(positions)
        return self.ranking[keyed_permutation(within, sizes, hash_key(self.seed, passes))]

    # -- state --------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"n": self.n, "curriculum": self._fingerprint()}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        reader = StateReader(state, type(self).__name__)
        reader.same("n", self.n)
        if reader.str("curriculum") != self._fingerprint():
            raise StateError("state was saved with other scores or pacing settings; construct the sampler with the "
                             f"scores and settings of the saved run (these are {self._settings})")

    def _fingerprint(self) -> str:
        if self._digest is None:
            settings = {**self._settings, "ranking": self._ranking_digest}
            if self._custom_pacing:
                # a callable is known by what it does: the pool size of every pass before the pool is full
                starts, pools, full_from = self._passes()
                settings["passes"] = array_digest(np.concatenate([starts, pools, [full_from]]))
            self._digest = fingerprint(settings)
        return self._digest

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self._settings.items())
        return (f"CurriculumSampler(n={self.n}, num_samples={self.num_samples}, {settings}, seed={self.seed}, "
                f"rank={self.rank}, world_size={self.world_size})")

