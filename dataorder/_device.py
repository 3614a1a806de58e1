"""Moving a balancing step's small arrays between the host and the gradients' device.

A step of the gradient orders crosses the host/device boundary twice: its products come to
the host (:func:`download`, the one transfer that waits for the device, since the host's
sign recursion needs them) and the signs go back (:func:`upload`). On CUDA the upload goes
through pinned memory without blocking, so the host goes on with the sampler's bookkeeping
while the device applies the signs: a step synchronises once.

>>> import numpy as np, torch
>>> upload(np.array([1.0, -1.0]), torch.device("cpu"), torch.float32)
tensor([ 1., -1.])
>>> download(torch.tensor([1.5, 2.0]))
array([1.5, 2. ])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["download", "upload"]


def upload(host: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``host`` as a ``dtype`` tensor on ``device``; from pinned memory without blocking on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(host))
    if device.type == "cuda":
        # the caching host allocator keeps the pinned block alive until the copy has run
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


def download(tensor: Tensor) -> np.ndarray:
    """``tensor`` as a float64 host array: the step's one transfer that waits for the device."""
    return tensor.detach().to("cpu", torch.float64).numpy()
