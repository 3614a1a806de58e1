"""Gradient-driven orders: GraB (mean, pair, recursive balance; CD-GraB under torch.distributed) and herding.

A step flows one way: a *source* gives the step's rows (:mod:`~dataorder.ordering.sources`:
dense ``step(grads)``, the exact ghost path, the sketched ghost path), a *rule* turns them
into signs and holds its tensors (:mod:`~dataorder.ordering.rules`, math in
:mod:`~dataorder.ordering.kernels`), the *sampler* keeps the order
(:mod:`~dataorder.ordering.sampler`).

>>> from dataorder.ordering import GraBSampler
>>> GraBSampler(10, balance="pair").balance
'pair'

A step refused for NaN/inf or an overflow raises :class:`NonFiniteError`, one on a device
without data :class:`UnsupportedDeviceError` (both ``ValueError``), and changes nothing.
"""

from dataorder.ordering.grab import BALANCES, GraBSampler
from dataorder.ordering.herding import HerdingSampler
from dataorder.ordering.rules import NonFiniteError
from dataorder.ordering.sampler import GradientOrderSampler
from dataorder.ordering.sources import UnsupportedDeviceError

__all__ = ["BALANCES", "GraBSampler", "GradientOrderSampler", "HerdingSampler", "NonFiniteError",
           "UnsupportedDeviceError"]
