"""Comparing sampler states in tests."""

import torch


def same_state(a, b) -> bool:
    """Whether two ``state_dict()`` values are equal: same keys, types, tensor dtypes, devices and values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    return type(a) is type(b) and a == b
