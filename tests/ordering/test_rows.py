import numpy as np
import pytest
import torch
from torch import nn

from dataorder.ghost import GhostGrads
from dataorder.ordering.sources import DenseRows, GhostRows


def ghost_and_dense(seed=0, batch=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    x, y = torch.randint(0, 7, (batch, 3)), torch.randint(0, 3, (batch,))
    ghost = GhostGrads(model)
    nn.functional.cross_entropy(model(x), y).backward()
    [captured] = ghost.collect()
    return GhostRows(captured), DenseRows(captured.materialize())


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("prefix_rows", [0, 1])
def test_ghost_rows_match_dense_rows(centre, prefix_rows):
    ghost, dense = ghost_and_dense()
    d = dense.shape[1]
    generator = torch.Generator().manual_seed(1)
    if centre:
        mean = torch.randn(d, generator=generator) * 0.1
        ghost, dense = ghost.centred(mean), dense.centred(mean)
    if prefix_rows:
        prefix = torch.randn(prefix_rows, d, generator=generator)
        ghost, dense = ghost.prepend(prefix), dense.prepend(prefix)
    assert ghost.shape == dense.shape
    sums = torch.randn(3, d, generator=generator)
    (ghost_products, ghost_peaks), (dense_products, dense_peaks) = ghost.products(sums), dense.products(sums)
    np.testing.assert_allclose(ghost_products, dense_products, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ghost_peaks, sums.abs().amax(dim=1).double().numpy())
    np.testing.assert_array_equal(dense_peaks, ghost_peaks)
    watched = torch.randn(5, d, generator=generator)
    np.testing.assert_array_equal(ghost.products(sums, watched)[1], watched.abs().amax(dim=1).double().numpy())
    weights = np.sign(np.random.default_rng(0).standard_normal((3, dense.shape[0])))
    ghost_sums, dense_sums = sums.clone(), sums.clone()
    ghost.add_weighted_to(ghost_sums, weights)
    dense.add_weighted_to(dense_sums, weights)
    assert torch.allclose(ghost_sums, dense_sums, atol=1e-4)
    for start in range(dense.shape[0] + 1):
        assert torch.allclose(ghost.tail(start), dense.tail(start), atol=1e-5)


def test_ghost_rows_are_centred_once():
    ghost, _ = ghost_and_dense()
    with pytest.raises(ValueError, match="centred once"):
        ghost.centred(torch.zeros(ghost.shape[1])).centred(torch.zeros(ghost.shape[1]))
