"""Example-difficulty scores: per-batch functions, training-dynamics trackers, aggregation.

* :mod:`dataorder.scores.functional` — ``loss``, ``confidence``, ``margin``, ``el2n``,
  ``entropy``, ``grand``: one value per example of a batch.
* :mod:`dataorder.scores.dynamics` — ``Forgetting``, ``AUM``, ``DataMap``: trackers fed
  during training.
* :mod:`dataorder.scores.aggregate` — ``aggregate`` over runs and their ``consistency``.
* :mod:`dataorder.scores.io` — ``load_scores`` and ``add_scores_column`` for the files that
  ``dataorder score`` writes; :mod:`dataorder.scores.runner` is the loop behind that command.

:data:`HIGHER_MEANS` says, for every column ``dataorder score`` writes, whether a higher
value marks a harder or an easier example.

>>> from dataorder.scores import HIGHER_MEANS
>>> HIGHER_MEANS["el2n"], HIGHER_MEANS["aum"]
('harder', 'easier')
"""

from __future__ import annotations

from dataorder.scores.aggregate import aggregate, consistency
from dataorder.scores.dynamics import AUM, DataMap, Forgetting
from dataorder.scores.functional import confidence, el2n, entropy, grand, loss, margin
from dataorder.scores.io import HIGHER_MEANS, add_scores_column, load_scores

__all__ = [
    "AUM",
    "DataMap",
    "Forgetting",
    "HIGHER_MEANS",
    "add_scores_column",
    "aggregate",
    "confidence",
    "consistency",
    "el2n",
    "entropy",
    "grand",
    "load_scores",
    "loss",
    "margin",
]
