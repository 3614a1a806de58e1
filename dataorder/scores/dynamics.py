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

from typing import Any

import numpy as np
import torch

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


class _Tracker:
    """Shared validation and bookkeeping; subclasses define ``_observe`` and ``scores``."""

    _state_names: tuple[str, ...] = ()

    def __init__(self, n: int) -> None:
        self.n = dataset_length(n, "n")

    def update(self, indices: Any, logits: Any, targets: Any) -> None:
        """Record one presentation of each example ``indices[i]`` with ``logits[i]`` and ``targets[i]``."""
        logits, targets = functional._check(logits, targets, min_classes=2)
        indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
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

    def state_dict(self) -> dict[str, Any]:
        """The tracker's arrays (copies), for checkpointing mid-training."""
        return {"tracker": type(self).__name__, "n": self.n,
                **{name: getattr(self, name).copy() for name in self._state_names}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; on a mismatch raise ``ValueError`` and change nothing."""
        if state.get("tracker") != type(self).__name__ or state.get("n") != self.n:
            raise ValueError(f"state is from {state.get('tracker')} with n={state.get('n')}; this is "
                             f"{type(self).__name__} with n={self.n}")
        arrays = {name: np.asarray(state[name]) for name in self._state_names}
        for name, array in arrays.items():
            if array.shape != getattr(self, name).shape:
                raise ValueError(f"state[{name!r}] has shape {array.shape}, expected {getattr(self, name).shape}")
        for name, array in arrays.items():
            setattr(self, name, array.astype(getattr(self, name).dtype, copy=True))

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

    _state_names = ("last_correct", "forgets", "ever_correct", "presentations")

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

    _state_names = ("total", "count")

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.total = np.zeros(self.n, dtype=np.float64)
        self.count = np.zeros(self.n, dtype=np.int64)

    def _measure(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"margin": functional.margin(logits, targets)}

    def _observe(self, indices: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self.total[indices] += values["margin"]
        self.count[indices] += 1

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

    _state_names = ("confidence_sum", "confidence_sq_sum", "correct", "count")

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

    def scores(self) -> dict[str, np.ndarray]:
        """``{"confidence", "variability", "correctness"}`` arrays of float64 (``nan`` never presented)."""
        seen = self.count > 0
        count = np.maximum(self.count, 1)
        mean = self.confidence_sum / count
        # confidences lie in [0, 1], so E[c²] - E[c]² in float64 loses nothing that matters
        variance = np.maximum(self.confidence_sq_sum / count - mean**2, 0.0)
        result = {"confidence": mean, "variability": np.sqrt(variance), "correctness": self.correct / count}
        return {key: np.where(seen, value, np.nan) for key, value in result.items()}
