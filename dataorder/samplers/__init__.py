"""Samplers: one module per family (see DESIGN.md); the sampler classes are re-exported here.

``from dataorder.samplers import RandomReshuffling, GraBSampler`` works as
``torch.utils.data`` does for its samplers. The gradient-driven samplers (GraB, herding) and
the families that need numba or pyarrow are imported on first use, so ``import
dataorder.samplers`` stays light.

>>> from dataorder.samplers import RandomReshuffling
>>> len(RandomReshuffling(10))
10
>>> from dataorder.samplers import AdaptiveMixtureSampler, LateObservationError
>>> issubclass(LateObservationError, ValueError)
True
"""

from __future__ import annotations

import importlib
from typing import Any

from dataorder.samplers._state import StateError, StateTypeError
from dataorder.samplers.base import IndexSampler
from dataorder.samplers.shuffle import FlipFlop, RandomReshuffling, ShuffleOnce, WithReplacement

__all__ = [
    "AdaptiveMixtureSampler",
    "CurriculumSampler",
    "FlipFlop",
    "GraBSampler",
    "HerdingSampler",
    "IndexSampler",
    "LateObservationError",
    "MixtureSampler",
    "QMCAugment",
    "RandomReshuffling",
    "ShuffleOnce",
    "StateError",
    "StateTypeError",
    "StratifiedBatchSampler",
    "WithReplacement",
]

#: Lazily imported names -> the modules that may define them, tried in order.
_LAZY = {
    "CurriculumSampler": ("dataorder.samplers.curriculum",),
    "MixtureSampler": ("dataorder.samplers.mixture",),
    "AdaptiveMixtureSampler": ("dataorder.samplers.adaptive",),
    "LateObservationError": ("dataorder.samplers.adaptive",),
    "QMCAugment": ("dataorder.samplers.qmc",),
    "StratifiedBatchSampler": ("dataorder.samplers.stratified",),
    "GraBSampler": ("dataorder.ordering",),
    "HerdingSampler": ("dataorder.ordering",),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module_name in _LAZY[name]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:  # the module exists but one of its imports is missing
                raise
            continue
        if hasattr(module, name):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (looked in {', '.join(_LAZY[name])})")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
