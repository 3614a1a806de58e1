"""Sketched ghost rows: unbiased per layer type, exact when k covers every side, deterministic."""

import functools
import itertools
import warnings

import pytest
import torch
from torch import nn

from dataorder.ghost import GhostGrads, UnsupportedLayerError, register_ghost_rule
from dataorder.ghost import rules, sketch
from dataorder.ghost.factors import DenseFactors
from dataorder.ordering import GraBSampler
from reference_grads import per_example_grads


class TiedLM(nn.Module):
    """GPT-2's shape in miniature: token embedding and output head share one weight."""

    def __init__(self, vocab=12, dim=6):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens)))).mean(dim=1)


class Positions(nn.Module):
    """nanoGPT's positions: ``self.pos(arange(T))``, shared by every example."""

    def __init__(self, vocab=9, dim=4, length=5):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(vocab, dim), nn.Embedding(length, dim), nn.Linear(dim, 3)

    def forward(self, tokens):
        return self.head((self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))).mean(dim=1))


class PositionIds(Positions):
    """HF's positions: ``position_ids`` of shape ``(1, T)``."""

    def forward(self, tokens):
        return self.head((self.tok(tokens) + self.pos(torch.arange(tokens.shape[1])[None])).mean(dim=1))


CASES = {  # name -> (model, input); k = 3 projects every side here except the small ones
    "linear2d": (lambda: nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)),
                 lambda g: torch.randn(5, 12, generator=g)),
    "linear_seq": (lambda: nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)),
                   lambda g: torch.randn(5, 4, 7, generator=g)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)),
               lambda g: torch.randn(5, 3, 6, generator=g)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(5 * 9, 3)), lambda g: torch.randn(5, 2, 6, 6, generator=g)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(18, 3)),
                  lambda g: torch.randint(0, 20, (5, 3), generator=g)),
    "norms": (lambda: nn.Sequential(nn.Conv2d(1, 12, 1), nn.GroupNorm(3, 12), nn.Flatten(), nn.LayerNorm(48),
                                    nn.Linear(48, 3)), lambda g: torch.randn(5, 1, 2, 2, generator=g)),
    "tied": (TiedLM, lambda g: torch.randint(0, 12, (5, 4), generator=g)),
}


def build(case):
    torch.manual_seed(0)
    make_model, make_x = CASES[case]
    generator = torch.Generator().manual_seed(1)
    x = make_x(generator)
    model = make_model()
    y = torch.randint(0, 3, (len(x),), generator=generator)
    return model, x, y


@functools.cache
def reference_of(case):
    """The torch.func per-example gradients of ``build(case)``, computed once per case."""
    return per_example_grads(*build(case))


def sketch_rows(model, x, y, k, seed):
    ghost = GhostGrads(model, sketch=k, seed=seed)
    nn.functional.cross_entropy(model(x), y).backward()
    [rows] = ghost.collect_sketch()
    ghost.remove()
    model.zero_grad()
    return rows.double()


@pytest.mark.parametrize("side_max, dtype", [(4096, torch.float32), (4096, torch.bfloat16), (4, torch.float32)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sketched_inner_products_are_unbiased(case, side_max, dtype, monkeypatch, force_projections):
    """Gaussian maps in float32 and in bfloat16 products; CountSketch maps (hashes) for every long side."""
    monkeypatch.setattr(sketch, "DENSE_SIDE_MAX", side_max)
    force_projections(dtype)
    model, x, y = build(case)
    reference = reference_of(case).double()
    exact = reference @ reference.T
    ghost = GhostGrads(model)  # the exact factors, captured once and sketched with many seeds
    nn.functional.cross_entropy(model(x), y).backward()
    [(batch_size, factors, names)] = ghost._groups()
    ghost.remove()
    model.zero_grad()
    seeds = 300
    rows = [sketch.Sketcher(3, seed).rows(factors, ghost.shapes, names).double() * batch_size
            for seed in range(seeds)]
    # the public path (each call sketched during the backward) gives the same rows, seed 0
    assert torch.allclose(rows[0].float(), sketch_rows(model, x, y, 3, 0).float(), rtol=1e-5, atol=1e-6)
    assert rows[0].shape[1] < reference.shape[1]  # something was projected
    grams = torch.stack([r @ r.T for r in rows])
    # the mean of `seeds` independent estimates is within 5 standard errors of the truth
    error = (grams.mean(0) - exact).abs()
    bound = 5 * grams.std(0) / seeds ** 0.5 + 1e-6 * exact.abs().max()
    assert (error <= bound).all(), (error / bound).max()
    # and the estimate is informative: relative spread of the diagonal below 100%
    assert (grams.std(0).diagonal() / exact.diagonal()).max() < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_k_covering_every_side_gives_the_exact_rows(case, dtype, force_projections):
    force_projections(dtype)  # a side kept exact is never projected: no rounding reaches it
    model, x, y = build(case)
    reference = reference_of(case)
    rows = sketch_rows(model, x, y, 64, seed=5).float()
    assert torch.allclose(rows, reference, atol=1e-5)


def test_rows_are_deterministic_and_depend_on_the_seed():
    model, x, y = build("conv2d")
    first, again, other = (sketch_rows(model, x, y, 3, seed) for seed in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_projections_are_a_pure_function_of_seed_name_shape_and_axis():
    make = sketch.projection
    a = make(seed=3, name="layer.weight", shape=(50, 40), axis="rows", width=4)
    assert torch.equal(a.matrix, make(seed=3, name="layer.weight", shape=(50, 40), axis="rows", width=4).matrix)
    for other in (dict(seed=4, name="layer.weight"), dict(seed=3, name="other.weight")):
        assert not torch.equal(a.matrix, make(**other, shape=(50, 40), axis="rows", width=4).matrix)
    assert make(seed=3, name="w", shape=(50, 4), axis="cols", width=4).identity
    hashed = make(seed=3, name="w", shape=(5000, 8), axis="rows", width=4)  # a vocabulary: CountSketch
    assert hashed.matrix is None and set(hashed.signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(hashed.dense().abs().sum(0), torch.ones(5000))  # one ±1 per column


@pytest.mark.parametrize("balance", ["mean", "pair", "recursive"])
def test_grab_with_k_covering_every_side_equals_the_exact_path(balance):
    n, batch = 20, 5
    torch.manual_seed(0)
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    models = [nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    samplers = [GraBSampler(n, balance=balance, seed=2).attach(models[0]),
                GraBSampler(n, balance=balance, seed=2).attach(models[1], sketch=8)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for epoch in range(3):
        orders = []
        for model, sampler, optimizer in zip(models, samplers, optimizers):
            sampler.set_epoch(epoch)
            order = list(sampler)
            orders.append(order)
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                sampler.step()
                optimizer.step()
        assert orders[0] == orders[1]
    exact, sketched = (s.state_dict() for s in samplers)
    assert torch.equal(exact["order"], sketched["order"]) and torch.equal(exact["buckets"], sketched["buckets"])
    for name, value in exact["tensors"].items():
        assert torch.allclose(sketched["tensors"][name], value, atol=1e-5), name


def test_sketched_grab_balances_a_large_layer_on_few_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    sampler = GraBSampler(16, seed=0).attach(model, sketch=4)
    sampler.set_epoch(0)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for idx in (list(sampler)[:8], list(sampler)[8:]):
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        sampler.step()
    sums = sampler.state_dict()["tensors"]["sums"]
    assert sums.shape[1] == 16 + 16 + 16 + 10  # k² per weight and per long bias; a bias of ≤ k² values kept exact
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(16))


@pytest.mark.parametrize("model_class", [Positions, PositionIds])
@pytest.mark.parametrize("length", [5, 3])  # 5 == the batch size: the case that used to be silently wrong
def test_shared_input_module_is_left_out_with_one_warning(model_class, length):
    torch.manual_seed(0)
    model = model_class(length=length)
    tokens, y = torch.randint(0, 9, (5, length)), torch.randint(0, 3, (5,))
    reference = per_example_grads(model, tokens, y)
    kept = torch.cat([reference[:, :9 * 4], reference[:, (9 + length) * 4:]], dim=1)
    for k in (None, 64):
        ghost = GhostGrads(model, sketch=k)
        # the exact path finds out at collect(), the sketched one during the forward
        with pytest.warns(UserWarning, match="Embedding 'pos' .* shared by the whole batch"):
            nn.functional.cross_entropy(model(tokens), y).backward()
            [got] = ghost.collect_sketch() if k else [b.materialize() for b in ghost.collect()]
        assert torch.allclose(got, kept, atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per GhostGrads
            nn.functional.cross_entropy(model(tokens), y).backward()
            ghost.collect_sketch() if k else ghost.collect()
        ghost.remove()


def test_a_batch_of_one_keeps_its_positions():
    torch.manual_seed(0)
    model = PositionIds(length=4)
    tokens, y = torch.randint(0, 9, (1, 4)), torch.tensor([1])
    ghost = GhostGrads(model)
    nn.functional.cross_entropy(model(tokens), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [batch] = ghost.collect()
    assert torch.allclose(batch.materialize(), per_example_grads(model, tokens, y), atol=1e-6)


def test_batch_norm_in_train_mode_is_refused_at_construction():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"BatchNorm1d '1' uses batch statistics.*model.eval\(\)"):
        GhostGrads(model)
    with pytest.raises(UnsupportedLayerError, match="GroupNorm"):
        GraBSampler(8).attach(model, sketch=4)
    assert issubclass(UnsupportedLayerError, ValueError)
    model.eval()
    ghost = GhostGrads(model, keep_outputs=True)  # eval mode: running stats, examples independent
    model.train()
    with pytest.raises(UnsupportedLayerError):
        model(torch.randn(3, 4))  # switched back to train mode: refused before anything is recorded
    assert ghost.pending_outputs() == []


def test_register_ghost_rule_round_trip(monkeypatch):
    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))  # leave the registry as it was

    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x):
            return x * self.weight

    calls = []

    def scale_rule(module, names, inputs, grad_output):
        calls.append(module)
        return DenseFactors({names["weight"]: inputs[0] * grad_output})

    assert register_ghost_rule(Scale, scale_rule) is scale_rule
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 20), Scale(20), nn.Linear(20, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    reference = per_example_grads(model, x, y)
    ghost = GhostGrads(model, sketch=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rule: no torch.func fallback warning
        nn.functional.cross_entropy(model(x), y).backward()
    [rows] = ghost.collect_sketch()
    assert calls and torch.allclose(rows, reference, atol=1e-6)
    with pytest.raises(TypeError, match="module_type"):
        register_ghost_rule(int, scale_rule)
    with pytest.raises(TypeError, match="rule must be callable"):
        register_ghost_rule(Scale, None)


def test_argument_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="sketch must be a positive int"):
        GhostGrads(model, sketch=0)
    with pytest.raises(TypeError, match="sketch must be None"):
        GhostGrads(model, sketch=2.5)
    with pytest.raises(ValueError, match=r"GhostGrads\(model, sketch=k\)"):
        GhostGrads(model).collect_sketch()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sketched_grab_resumes_bit_exact_mid_epoch(dtype, force_projections):
    force_projections(dtype)
    n, batch = 24, 4
    torch.manual_seed(0)
    x, y = torch.randn(n, 12), torch.randint(0, 3, (n,))

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))

    def run(model, sampler, epochs, start_epoch=0, stop=None):
        """Train; with ``stop=(epoch, batch)`` return the sampler and model state before that batch."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)  # the current epoch: keeps a resumed position
            indices = iter(sampler)  # drawn batch by batch, as a DataLoader without prefetch does
            while True:
                if stop == (epoch, sampler.steps_position // batch):  # at a step boundary, nothing drawn
                    return sampler.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
                idx = list(itertools.islice(indices, batch))
                if not idx:
                    break
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                sampler.step()
                optimizer.step()
        return sampler.state_dict(), None

    model = make()
    full_state, _ = run(model, GraBSampler(n, seed=4).attach(model, sketch=3), epochs=3)
    model = make()
    saved, weights = run(model, GraBSampler(n, seed=4).attach(model, sketch=3), epochs=3, stop=(1, 2))
    state = torch.load(_round_trip(saved), weights_only=True)
    resumed_model = make()
    resumed_model.load_state_dict(weights)
    sampler = GraBSampler(n, seed=4).attach(resumed_model, sketch=3)
    sampler.load_state_dict(state)
    resumed_state, _ = run(resumed_model, sampler, epochs=3, start_epoch=1)
    assert torch.equal(resumed_state["order"], full_state["order"])
    assert torch.equal(resumed_state["buckets"], full_state["buckets"])
    for name, value in full_state["tensors"].items():
        assert torch.equal(resumed_state["tensors"][name], value), name


def _round_trip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_sketching_capture_keeps_no_factors_after_the_backward():
    import functools
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ghost = GhostGrads(model, sketch=4)
    hidden = {}
    model[1].register_forward_hook(lambda module, inputs, output: hidden.update(ref=weakref.ref(output)))
    last = {}
    model[2].register_forward_hook(lambda module, inputs, output: last.update(output=output))
    loss = nn.functional.cross_entropy(model(torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    gc.collect()
    assert hidden["ref"]() is None  # the second layer's input is gone once its backward ran
    # ... and the capture let go of it during the backward, while the graph is still alive
    records = [hook.args[0] for hook in last["output"]._backward_hooks.values() if isinstance(hook, functools.partial)]
    assert len(records) == 1 and records[0].inputs is None
    [rows] = ghost.collect_sketch()
    assert rows.shape == (5, 4 * 4 + 8 + 3 * 4 + 3)
    with pytest.raises(ValueError, match="collect_sketch"):
        ghost.collect()


def test_a_second_backward_through_one_forward_is_refused_and_drops_the_forward():
    from dataorder.ghost.errors import RepeatedBackwardError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    exact = GhostGrads(model)
    nn.functional.cross_entropy(model(x), y).backward()
    [batch] = exact.collect()
    exact.remove()
    sketched = GhostGrads(model, sketch=8)  # 8 covers every side: the rows are the exact gradients
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RepeatedBackwardError, match="retain_graph=True"):
        loss.backward()
    assert sketched.collect_sketch() == []  # dropped: the redo the error asks for is balanced once
    nn.functional.cross_entropy(model(x), y).backward()
    [rows] = sketched.collect_sketch()
    assert torch.allclose(rows, batch.materialize(), atol=1e-6)
