"""Ghost per-example gradients: inner products of per-example gradients without materialising them.

Gradient balancing needs only inner products of per-example gradients: the batch Gram
``<g_i, g_j>``, products ``<v, g_j>`` with a few parameter-shaped vectors (the running sum,
the stale mean) and weighted sums ``sum_j w_j g_j``. For a linear layer with inputs ``A``
and output gradients ``D``, ``g_j = D_j^T A_j``, so each of these costs about one matrix
product of the weight's size (the "ghost norm" trick of DP training, Goodfellow 2015;
Li et al. 2021). :class:`GhostGrads` captures ``A`` and ``D`` with hooks during an ordinary
``loss.backward()``; :class:`GhostBatch` answers the three questions from them. Where a
layer's inputs have many rows per example (long sequences, convolution patches), the layer
materialises its own ``B`` per-example gradients instead, if that is cheaper
(:func:`dataorder.ghost.factors.prefer_dense`).

With ``GhostGrads(model, sketch=k)`` the same captured factors give instead a Kronecker
sketch of each weight's per-example gradient (at most ``k × k`` values per weight, unbiased
inner products) as dense rows, at the cost of projecting the factors
(:mod:`~dataorder.ghost.sketch`).

The package is split by job: :mod:`~dataorder.ghost.factors` holds the per-layer kernels,
:mod:`~dataorder.ghost.rules` the per-module rules that build them (and
:func:`register_ghost_rule`), :mod:`~dataorder.ghost.sketch` the sketches and
:mod:`~dataorder.ghost.projections` the arithmetic of their projections,
:mod:`~dataorder.ghost.batch` the batch the kernels answer for, :mod:`~dataorder.ghost.capture`
the hooks.

Supported exactly: ``nn.Linear`` (any number of leading dims), ``nn.Conv1d``/``nn.Conv2d``
(``groups=1``, numeric padding, zero padding mode), ``nn.Embedding`` (dense, ``max_norm``
included, not ``scale_grad_by_freq``), ``nn.LayerNorm`` and ``nn.GroupNorm`` affine
parameters, biases, transformers' ``Conv1D``, and tied weights. Any other module with
parameters of its own that returns one tensor falls back to ``torch.func`` per-example
gradients for that module only (materialised, ``B × d_module``), with a one-time warning
that names it; :func:`register_ghost_rule` adds an exact rule. A module returning a tuple
(``nn.LSTM``, ``nn.MultiheadAttention``) has no one output gradient to capture: with its
parameters selected, its forward raises :class:`UnsupportedLayerError`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> ghost = GhostGrads(model)
    >>> x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> [batch] = ghost.collect()
    >>> batch.gram().shape
    torch.Size([5, 5])
    >>> torch.allclose(batch.gram(), batch.materialize() @ batch.materialize().T, atol=1e-5)
    True
"""

from dataorder.ghost.batch import GhostBatch
from dataorder.ghost.capture import GhostGrads
from dataorder.ghost.errors import RepeatedBackwardError, UnsupportedLayerError
from dataorder.ghost.rules import register_ghost_rule

__all__ = ["GhostBatch", "GhostGrads", "RepeatedBackwardError", "UnsupportedLayerError", "register_ghost_rule"]
