"""dataorder: which training examples a PyTorch model sees, and in what order.

Public names are imported lazily, so ``import dataorder`` stays cheap (numba and the
datasets library load only when a name that needs them is used).

>>> import dataorder
>>> sampler = dataorder.RandomReshuffling(10, seed=0)
>>> len(sampler)
10
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # samplers
    "IndexSampler": "dataorder.samplers.base",
    "shard": "dataorder.samplers.base",
    "RandomReshuffling": "dataorder.samplers.shuffle",
    "ShuffleOnce": "dataorder.samplers.shuffle",
    "WithReplacement": "dataorder.samplers.shuffle",
    "FlipFlop": "dataorder.samplers.shuffle",
    "GraBSampler": "dataorder.ordering",
    "HerdingSampler": "dataorder.ordering",
    "StratifiedBatchSampler": "dataorder.samplers.stratified",
    "CurriculumSampler": "dataorder.samplers.curriculum",
    "prune": "dataorder.samplers.curriculum",
    "MixtureSampler": "dataorder.samplers.mixture",
    "AdaptiveMixtureSampler": "dataorder.samplers.adaptive",
    "QMCAugment": "dataorder.samplers.qmc",
    # gradients, schedules, scores
    "PerExampleGrads": "dataorder.grads",
    "register_ghost_rule": "dataorder.ghost.rules", "UnsupportedLayerError": "dataorder.ghost.errors",
    "Schedule": "dataorder.schedules",
    "Forgetting": "dataorder.scores.dynamics",
    "AUM": "dataorder.scores.dynamics",
    "DataMap": "dataorder.scores.dynamics",
    "aggregate": "dataorder.scores.aggregate",
    "consistency": "dataorder.scores.aggregate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dataorder' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
