"""The exact path's dense rows (``GhostGrads(model, dense=True)``, what ``attach(model)`` uses for a
small model): the exact per-example gradients, interchangeable with the ghost products."""

import pytest
import torch
from torch import nn

from dataorder.ghost import GhostGrads
from dataorder.ordering import GraBSampler, sources
from reference_grads import per_example_grads

ce = nn.functional.cross_entropy


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))


def batch(size=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 1, 5, 5, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def test_dense_rows_are_the_exact_per_example_gradients():
    model, (x, y) = small_model(), batch()
    dense, factored = GhostGrads(model, dense=True), GhostGrads(model)
    ce(model(x), y).backward()
    [rows], [products] = dense.collect_sketch(), factored.collect()
    assert rows.shape == (6, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(rows, products.materialize(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows, per_example_grads(model, x, y), rtol=1e-4, atol=1e-6)


def test_a_second_backward_adds_its_gradients_as_on_the_factored_path():
    model, (x, y) = small_model(), batch()
    dense, factored = GhostGrads(model, dense=True), GhostGrads(model)
    out = model(x)
    ce(out, y).backward(retain_graph=True)
    (2 * out.square().mean()).backward()
    [both], [products] = dense.collect_sketch(), factored.collect()
    torch.testing.assert_close(both, products.materialize(), rtol=1e-5, atol=1e-6)
    ce(model(x), y).backward()
    [first] = dense.collect_sketch()
    (2 * model(x).square().mean()).backward()
    [second] = dense.collect_sketch()
    torch.testing.assert_close(both, first + second, rtol=1e-5, atol=1e-6)
    factored.remove()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"dense": True, "sketch": 4}, ValueError, "takes neither sketch=k nor keep_outputs=True"),
    ({"dense": True, "keep_outputs": True}, ValueError, "takes neither sketch=k nor keep_outputs=True"),
    ({"dense": 1}, TypeError, "dense must be a bool, got 1"),
])
def test_dense_with_what_it_cannot_take_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        GhostGrads(small_model(), **kwargs)


def test_the_exact_source_is_chosen_by_the_selected_values():
    model = nn.Linear(63, 64)  # 63 * 64 + 64 = 4096 values: DENSE_EXACT_MAX exactly
    assert type(sources.exact_source(model)).__name__ == "ExactRowsSource"
    assert type(sources.exact_source(nn.Linear(64, 64))).__name__ == "GhostSource"
    assert type(sources.exact_source(nn.Linear(64, 64), params=["bias"])).__name__ == "ExactRowsSource"


def test_a_state_saved_on_dense_rows_resumes_on_the_ghost_products(monkeypatch):
    n, size = 24, 4
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 1, 5, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)

    def run(sampler, model, epochs, start=0):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for epoch in range(start, epochs):
            sampler.set_epoch(epoch)
            order = list(sampler)
            for first in range(0, n, size):
                idx = order[first:first + size]
                optimizer.zero_grad()
                ce(model(x[idx]), y[idx]).backward()
                sampler.step()
                optimizer.step()
        return model

    whole_model = small_model()
    whole = GraBSampler(n, seed=5).attach(whole_model)
    run(whole, whole_model, 3)
    first_model = small_model()
    first = GraBSampler(n, seed=5).attach(first_model)
    run(first, first_model, 2)
    state, weights = first.state_dict(), first_model.state_dict()
    monkeypatch.setattr(sources, "DENSE_EXACT_MAX", -1)  # the resumed run balances from the products
    resumed_model = small_model()
    resumed_model.load_state_dict(weights)
    resumed = GraBSampler(n, seed=5).attach(resumed_model)
    assert type(resumed._source).__name__ == "GhostSource"
    resumed.load_state_dict(state)
    run(resumed, resumed_model, 3, start=2)
    resumed.set_epoch(3), whole.set_epoch(3)
    assert list(resumed) == list(whole)
    for name, value in whole.state_dict()["tensors"].items():
        torch.testing.assert_close(resumed.state_dict()["tensors"][name], value, rtol=1e-4, atol=1e-6)
