"""Training-dynamics trackers: fed the logits of each training batch, scored after training.

Each tracker is built with the dataset size ``n`` and updated with
``update(indices, logits, targets)``, where ``logits`` are the model outputs the training
step computed for the examples ``indices`` (one presentation each). Memory is O(n); the
per-batch work is a few vectorised tensor operations plus one copy of B values to the host.

Sign conventions (the same table is in ``docs/scores.md``):

=======================  ================  ===================================================
score                    higher means      note
=======================  ================  ===================================================
forgetting               harder            correct→incorrect transitions; ``inf``: never learned
aum                      easier            mean margin on logits; < 0 suggests a wrong label
datamap confidence       easier            mean true-class probability over presentations
datamap variability      ambiguous         its std over presentations (population std)
datamap correctness      easier            fraction of presentations classified correctly
=======================  ================  ===================================================

Examples never presented score ``nan``.

Example::

    >>> import torch
    >>> tracker = Forgetting(2)
    >>> for logits in ([[2.0, 0.0], [2.0, 0.0]], [[0.0, 2.0], [2.0, 0.0]]):
    ...     tracker.update([0, 1], torch.tensor(logits), torch.tensor([0, 0]))
    >>> tracker.scores().tolist()     # example 0 was learned, then forgotten once
    [1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dataorder.samplers._state import StateError, StateReader, refuse_unknown_fields
from dataorder.samplers.base import dataset_length
from dataorder.scores import functional

__all__ = ["AUM", "DataMap", "Forgetting"]


def occurrence_groups(indices: np.ndarray) -> list[np.ndarray]:
    """Split batch positions into groups in which no index repeats, keeping presentation order.

    A batch drawn with replacement may present an example twice; the ``k``-th group holds
    the ``k``-th occurrence of each index, so sequential statistics see them in order.

    >>> [g.tolist() for g in occurrence_groups(np.array([5, 7, 5, 5]))]
    [[0, 1], [2], [3]]
    """
    if len(indices) == 0:
        return [np.arange(0)]
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    run_start = np.r_[True, sorted_idx[1:] != sorted_idx[:-1]]
    first = np.maximum.accumulate(np.where(run_start, np.arange(len(indices)), 0))
    rank = np.empty(len(indices), dtype=np.int64)
    rank[order] = np.arange(len(indices)) - first  # k for the k-th occurrence of an index
    if rank.max() == 0:
        return [np.arange(len(indices))]
    return [np.flatnonzero(rank == k) for k in range(int(rank.max()) + 1)]


class _TrackerState(StateReader):
    """A :class:`StateReader` for a tracker's state (saved under ``"tracker"``, not ``"sampler"``)."""

    def __init__(self, state: Any, owner: str, n: int, fields: Mapping[str, torch.dtype]) -> None:
        if isinstance(state, Mapping):  # a state saved before tensors were used holds numpy arrays
            state = {key: torch.from_numpy(value) if isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
                     else value for key, value in state.items()}
        super().__init__(state, owner, tag="tracker")
        refuse_unknown_fields(self.state, {"tracker": owner, "n": n, **fields}, owner)
        saved_n = self.int("n", low=1)
        if saved_n != n:
            raise StateError(f"state is from {owner} with n={saved_n}; this is {owner} with n={n}; "
                             f"construct it with n={saved_n}")

    def array(self, key: str, dtype: torch.dtype, n: int) -> np.ndarray:
        """``state[key]`` as a fresh numpy array of ``n`` values of ``dtype``."""
        return self.tensor(key, dtype, (n,)).numpy().copy()


def _refuse(bad: np.ndarray, key: str, rule: str) -> None:
    """Refuse the state if any entry of ``bad`` is set: ``state[key]`` breaks ``rule``."""
    if bad.any():
        where = np.flatnonzero(bad)
        more = f" and {len(where) - 1} more" if len(where) > 1 else ""
        raise StateError(f"state's {key} breaks '{rule}' at index {int(where[0])}{more}; the state is corrupt")


class _Tracker:
    """Shared validation and bookkeeping; subclasses define ``_observe``, ``_check_state`` and ``scores``."""

    #: The arrays of the state and their dtypes (each of shape ``(n,)``).
    _state_dtypes: dict[str, torch.dtype] = {}

    def __init__(self, n: int) -> None:
        self.n = dataset_length(n, "n")

    def update(self, indices: Any, logits: Any, targets: Any) -> None:
        """Record one presentation of each example ``indices[i]`` with ``logits[i]`` and ``targets[i]``.

        Non-finite logits (a diverged step) are refused with a ``ValueError`` and change nothing.
        """
        logits, targets = functional._check(logits, targets, min_classes=2)
        if not bool(torch.isfinite(logits).all()):
            rows = torch.nonzero(~torch.isfinite(logits).all(dim=1)).flatten()
            raise ValueError(f"logits has NaN or inf in {len(rows)} row(s) (first: row {int(rows[0])}); skip the "
                             "update for a diverged step or fix the model's outputs")
        indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if indices.ndim == 1 and indices.size == 0:
            indices = indices.astype(np.int64)  # an empty list has no int dtype of its own
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise ValueError(f"indices must be a 1-D array of ints, got shape {indices.shape} dtype {indices.dtype}")
        if len(indices) != len(logits):
            raise ValueError(f"indices has {len(indices)} entries but logits has {len(logits)} rows")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n):
            raise ValueError(f"indices must be in [0, {self.n}), got values in [{indices.min()}, {indices.max()}]")
        values = {key: value.cpu().numpy() for key, value in self._measure(logits, targets).items()}
        indices = indices.astype(np.int64)
        for group in occurrence_groups(indices):
            self._observe(indices[group], {key: value[group] for key, value in values.items()})

    def _measure(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _observe(self, indices: np.ndarray, values: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Refuse arrays that no sequence of updates produces (a tampered or corrupt state)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The tracker's arrays as CPU tensors (copies), for checkpointing mid-training.

        The dict holds only strings, ints and tensors, so it round-trips exactly through
        ``torch.save`` and ``torch.load(..., weights_only=True)``.
        """
        return {"tracker": type(self).__name__, "n": self.n,
                **{name: torch.from_numpy(getattr(self, name).copy()) for name in self._state_dtypes}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuse what it could not have produced and change nothing.

        A refusal is a :class:`~dataorder.samplers._state.StateError` (a ``ValueError``; a
        ``TypeError`` too for a field of the wrong type) naming the field. A state saved as
        numpy arrays (by earlier versions) is accepted as well.
        """
        owner = type(self).__name__
        reader = _TrackerState(state, owner, self.n, self._state_dtypes)
        arrays = {name: reader.array(name, dtype, self.n) for name, dtype in self._state_dtypes.items()}
        self._check_state(arrays)
        for name, array in arrays.items():
            setattr(self, name, array)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class Forgetting(_Tracker):
    """Forgetting events (Toneva et al. 2019): correct→incorrect transitions between presentations.

    Correctness is the argmax of the training-step logits. Examples that were presented but
    never classified correctly score ``inf`` (the paper treats them as the most forgettable);
    examples never presented score ``nan``.

    >>> import torch
    >>> tracker = Forgetting(3)
    >>> tracker.update([0, 1], torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0]))
    >>> tracker.scores().tolist()
    [inf, 0.0, nan]
    """

    _state_dtypes = {"last_correct": torch.bool, "forgets": torch.int64, "ever_correct": torch.bool,
                     "presentations": torch.int64}

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.last_correct = np.zeros(self.n, dtype=bool)
        self.forgets = np.zeros(self.n, dtype=np.int64)
        self.ever_correct = np.zeros(self.n, dtype=bool)
        self.presentations = np.zeros(self.n, dtype=np.int64)

    def _measure(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"correct": logits.argmax(dim=1) == targets}

    def _observe(self, indices: np.ndarray, values: dict[str, np.ndarray]) -> None:
        correct = values["correct"]
        self.forgets[indices] += self.last_correct[indices] & ~correct
        self.last_correct[indices] = correct
        self.ever_correct[indices] |= correct
        self.presentations[indices] += 1

    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        forgets, presentations = arrays["forgets"], arrays["presentations"]
        _refuse(presentations < 0, "presentations", "presentations >= 0")
        _refuse(forgets < 0, "forgets", "forgets >= 0")
        # each forget takes a correct and an incorrect presentation; a last correct one takes another
        _refuse(2 * forgets + arrays["last_correct"] > presentations, "forgets",
                "2 * forgets + last_correct <= presentations")
        _refuse(arrays["last_correct"] & ~arrays["ever_correct"], "last_correct", "last_correct implies ever_correct")
        _refuse((forgets > 0) & ~arrays["ever_correct"], "ever_correct", "forgets > 0 implies ever_correct")
        _refuse(arrays["ever_correct"] & (presentations == 0), "ever_correct", "ever_correct implies presentations > 0")

    def scores(self) -> np.ndarray:
        """Forgetting counts as float64 (``inf`` never learned, ``nan`` never presented)."""
        out = self.forgets.astype(np.float64)
        out[~self.ever_correct] = np.inf
        out[self.presentations == 0] = np.nan
        return out


class AUM(_Tracker):
    """Area under the margin (Pleiss et al. 2020): the mean over presentations of the logit margin.

    The margin is the true-class logit minus the largest other logit (see
    :func:`dataorder.scores.functional.margin`); a negative AUM suggests a mislabelled example.

    >>> import torch
    >>> tracker = AUM(1)
    >>> tracker.update([0], torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    >>> tracker.update([0], torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    >>> tracker.scores().tolist()    # (2 + (-1)) / 2
    [0.5]
    """

    _state_dtypes = {"total": torch.float64, "count": torch.int64}

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.total = np.zeros(self.n, dtype=np.float64)
        self.count = np.zeros(self.n, dtype=np.int64)

    def _measure(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"margin": functional.margin(logits, targets)}

    def _observe(self, indices: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self.total[indices] += values["margin"]
        self.count[indices] += 1

    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        _refuse(arrays["count"] < 0, "count", "count >= 0")
        _refuse((arrays["count"] == 0) & (arrays["total"] != 0), "total", "total == 0 where count == 0")

    def scores(self) -> np.ndarray:
        """Mean margin per example as float64 (``nan`` never presented)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


class DataMap(_Tracker):
    """Data maps (Swayamdipta et al. 2020): confidence, variability and correctness over training.

    ``scores()`` returns a dict with ``confidence`` (mean true-class probability),
    ``variability`` (its population standard deviation) and ``correctness`` (fraction of
    presentations classified correctly). Easy-to-learn examples have high confidence and low
    variability, hard-to-learn ones low confidence and low variability, ambiguous ones high
    variability.

    >>> import torch
    >>> tracker = DataMap(1)
    >>> for logit in (100.0, -100.0):
    ...     tracker.update([0], torch.tensor([[logit, 0.0]]), torch.tensor([0]))
    >>> {k: round(float(v[0]), 3) for k, v in tracker.scores().items()}
    {'confidence': 0.5, 'variability': 0.5, 'correctness': 0.5}
    """

    _state_dtypes = {"confidence_sum": torch.float64, "confidence_sq_sum": torch.float64, "correct": torch.int64,
                     "count": torch.int64}

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.confidence_sum = np.zeros(self.n, dtype=np.float64)
        self.confidence_sq_sum = np.zeros(self.n, dtype=np.float64)
        self.correct = np.zeros(self.n, dtype=np.int64)
        self.count = np.zeros(self.n, dtype=np.int64)

    def _measure(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"confidence": functional.confidence(logits, targets).double(),
                "correct": logits.argmax(dim=1) == targets}

    def _observe(self, indices: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self.confidence_sum[indices] += values["confidence"]
        self.confidence_sq_sum[indices] += values["confidence"] ** 2
        self.correct[indices] += values["correct"]
        self.count[indices] += 1

    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        count, total, squares = arrays["count"], arrays["confidence_sum"], arrays["confidence_sq_sum"]
        _refuse(count < 0, "count", "count >= 0")
        _refuse((arrays["correct"] < 0) | (arrays["correct"] > count), "correct", "0 <= correct <= count")
        # confidences lie in [0, 1], so c**2 <= c and the float64 sums keep that order exactly
        _refuse((total < 0) | (total > count), "confidence_sum", "0 <= confidence_sum <= count")
        _refuse((squares < 0) | (squares > total), "confidence_sq_sum", "0 <= confidence_sq_sum <= confidence_sum")

    def scores(self) -> dict[str, np.ndarray]:
        """``{"confidence", "variability", "correctness"}`` arrays of float64 (``nan`` never presented)."""
        seen = self.count > 0
        count = np.maximum(self.count, 1)
        mean = self.confidence_sum / count
        # confidences lie in [0, 1], so E[c²] - E[c]² in float64 loses nothing that matters
        variance = np.maximum(self.confidence_sq_sum / count - mean**2, 0.0)
        result = {"confidence": mean, "variability": np.sqrt(variance), "correctness": self.correct / count}
        return {key: np.where(seen, value, np.nan) for key, value in result.items()}
