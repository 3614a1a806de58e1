"""Combine one score over several training runs, and measure how stable its ranking is.

A difficulty score from one run is noisy: different seeds rank examples differently
(Kwok et al. 2024). :func:`aggregate` averages runs; :func:`consistency` reports rank
correlations (Spearman and Kendall, from ``scipy.stats``) between runs and between averages
of disjoint groups of runs, so a user can see how many runs a stable ranking needs.

Example::

    >>> import numpy as np
    >>> runs = np.array([[0.1, 0.5, 0.9], [0.2, 0.4, 1.0]])
    >>> aggregate(runs).round(2).tolist()
    [0.15, 0.45, 0.95]
    >>> consistency(runs)["mean_pairwise"]["spearman"]
    1.0
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["aggregate", "consistency", "spearman_brown"]

_HOW = ("mean", "median")


def _check_how(how: Any) -> str:
    """``how`` if it is one of :data:`_HOW` (the one check, for ``aggregate`` and ``consistency``)."""
    if not isinstance(how, str) or how not in _HOW:
        raise ValueError(f"how must be one of {_HOW}, got {how!r}")
    return how


def _host(values: Any) -> Any:
    """A torch tensor (any dtype, bfloat16 included) as a float64 numpy array; anything else as is."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return values


def _as_runs(runs: Any) -> np.ndarray:
    """``runs`` as a float64 (R, n) array: a 2-D array or a sequence of equal-length 1-D arrays."""
    runs = _host(runs)
    if isinstance(runs, (list, tuple)):
        runs = [_host(run) for run in runs]
    try:
        array = np.asarray(runs, dtype=np.float64)
    except ValueError as error:
        reason = str(error).split(". ")[0]
        raise ValueError(f"runs must be R arrays of equal length n (an (R, n) array): {reason}") from None
    except TypeError:
        raise TypeError(f"runs must hold real numbers (an (R, n) array of floats), got {type(runs).__name__} "
                        "with entries that are not") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"runs must be an (R, n) array with R >= 1 runs of n >= 1 examples, got shape {array.shape}")
    return array


def aggregate(runs: Any, how: str = "mean") -> np.ndarray:
    """One score per example from ``runs`` of shape (R, n): their ``"mean"`` or ``"median"``.

    ``nan`` (an example a run never saw) propagates; ``inf`` (never learned, for
    forgetting) stays ``inf`` under the mean and counts as the largest value under the median.

    >>> aggregate([[1.0, 2.0], [3.0, 2.0], [8.0, 2.0]], how="median").tolist()
    [3.0, 2.0]
    """
    _check_how(how)
    array = _as_runs(runs)
    return array.mean(axis=0) if how == "mean" else np.median(array, axis=0)


def _correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman's rho and Kendall's tau-b over the examples scored in both (not ``nan`` in either).

    ``nan`` where undefined (fewer than two such examples; a constant input). ``inf`` is kept
    and ranks as the largest value.
    """
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    if len(a) < 2:
        return {"spearman": math.nan, "kendall": math.nan}
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return {"spearman": float(stats.spearmanr(a, b).statistic),
                "kendall": float(stats.kendalltau(a, b).statistic)}


def spearman_brown(r: float, k: float) -> float:
    """Predicted correlation between two averages of ``k`` runs, given the single-run correlation ``r``.

    The Spearman–Brown formula ``k r / (1 + (k - 1) r)``; for rank correlations it is an
    approximation. ``r`` must be in ``[-1, 1]`` (or ``nan``, which gives ``nan``) and ``k >= 1``;
    where the formula is undefined (``r = -1 / (k - 1)``) the result is ``nan``.

    >>> round(spearman_brown(0.5, 3), 3)
    0.75
    >>> spearman_brown(-1.0, 2)
    nan
    """
    r, k = _real(r, "r"), _real(k, "k")
    if not (math.isnan(r) or -1.0 <= r <= 1.0):
        raise ValueError(f"r must be a correlation in [-1, 1], got {r}")
    if not 1.0 <= k < math.inf:
        raise ValueError(f"k must be a number of runs >= 1, got {k}")
    denominator = 1.0 + (k - 1.0) * r
    return k * r / denominator if denominator else math.nan


def _real(value: Any, name: str) -> float:
    """``value`` as a float if it is a real number (not a bool or a string)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _runs_needed(r: float, target: float) -> float | None:
    """Smallest k with ``spearman_brown(r, k) >= target`` (None if r <= 0 or undefined)."""
    if not math.isfinite(r) or r <= 0:
        return None
    if r >= target:
        return 1
    return math.ceil(target * (1 - r) / (r * (1 - target)) - 1e-9)


def consistency(runs: Any, how: str = "mean", target: float = 0.9) -> dict[str, Any]:
    """Rank agreement of a score across runs (R, n).

    Returns a dict of plain Python values:

    * ``pairwise``: R×R matrices of Spearman and Kendall correlations between runs;
    * ``mean_pairwise``: their off-diagonal means (how well one run predicts another);
    * ``split_half``: correlation between the ``how``-aggregate of the first ``R//2`` runs
      and that of the remaining runs;
    * ``by_runs``: for ``k = 1 .. R//2``, correlation between aggregates of the disjoint
      groups ``runs[:k]`` and ``runs[k:2k]`` — how agreement grows with the number of runs;
    * ``runs_for_target``: the number of runs whose average is predicted (Spearman–Brown,
      from the mean pairwise Spearman) to reach Spearman ``target`` with another such average.

    Each correlation uses the examples scored in both of the compared runs or aggregates:
    an example that is ``nan`` in one (never presented in that run) is left out of that pair
    only, so one unseen example does not make every correlation ``nan``. Undefined entries
    (one run; a constant score; fewer than two examples in common) are ``nan``.

    >>> import numpy as np
    >>> result = consistency(np.array([[1.0, 2, 3, 4], [1, 3, 2, 4], [2, 1, 3, 4]]))
    >>> round(result["pairwise"]["spearman"][0][1], 3)
    0.8
    >>> [entry["runs"] for entry in result["by_runs"]]
    [1]
    """
    if not 0 < _real(target, "target") < 1:
        raise ValueError(f"target must be in (0, 1), got {target}")
    _check_how(how)
    array = _as_runs(runs)
    count = len(array)
    pairwise = {name: np.eye(count) for name in ("spearman", "kendall")}
    for i in range(count):
        for j in range(i + 1, count):
            for name, value in _correlations(array[i], array[j]).items():
                pairwise[name][i, j] = pairwise[name][j, i] = value
    off_diagonal = ~np.eye(count, dtype=bool)
    mean_pairwise = {name: float(matrix[off_diagonal].mean()) if count > 1 else math.nan
                     for name, matrix in pairwise.items()}
    half = count // 2
    if half:
        split_half = _correlations(aggregate(array[:half], how), aggregate(array[half:], how))
    else:
        split_half = {"spearman": math.nan, "kendall": math.nan}
    by_runs = [{"runs": k, **_correlations(aggregate(array[:k], how), aggregate(array[k:2 * k], how))}
               for k in range(1, half + 1)]
    return {
        "runs": count,
        "examples": int(array.shape[1]),
        "aggregate": how,
        "pairwise": {name: matrix.tolist() for name, matrix in pairwise.items()},
        "mean_pairwise": mean_pairwise,
        "split_half": split_half,
        "by_runs": by_runs,
        "target": target,
        "runs_for_target": _runs_needed(mean_pairwise["spearman"], target),
    }
