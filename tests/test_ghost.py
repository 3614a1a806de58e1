import warnings

import pytest
import torch
from torch import nn

from dataorder.ghost import GhostGrads
from reference_grads import per_example_grads


class TokenClassifier(nn.Module):
    """A small transformer block made of supported layers: embedding, layer norm, attention from Linears, MLP."""

    def __init__(self, vocab=11, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.proj(attn @ v)
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


class Scale(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.weight


def ce(out, y):
    return nn.functional.cross_entropy(out, y)


CASES = {
    "linear2d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
                 lambda g: torch.randn(7, 6, generator=g)),
    "linear3d_small_T": (lambda: nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 40, 3)),
                         lambda g: torch.randn(7, 2, 6, generator=g)),
    "linear3d_long_T": (lambda: nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 30, 3)),
                        lambda g: torch.randn(7, 30, 3, generator=g)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
                                     nn.Conv2d(4, 3, 2, dilation=2), nn.Flatten(), nn.LazyLinear(3)),
               lambda g: torch.randn(5, 2, 9, 9, generator=g)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=2, stride=2), nn.ReLU(),
                                     nn.Conv1d(4, 2, 2, padding=1, dilation=2), nn.Flatten(), nn.LazyLinear(3)),
               lambda g: torch.randn(6, 3, 10, generator=g)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                        nn.LazyLinear(3)),
                  lambda g: torch.randn(5, 2, 6, 6, generator=g)),
    "transformer": (lambda: TokenClassifier(), lambda g: torch.randint(0, 11, (6, 9), generator=g)),
}


def build(case, seed=0):
    torch.manual_seed(seed)
    make_model, make_x = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    x = make_x(generator)
    model = make_model()
    model(x)  # materialise lazy layers
    y = torch.randint(0, 3, (len(x),), generator=generator)
    return model, x, y


def captured(model, x, y):
    ghost = GhostGrads(model)
    ce(model(x), y).backward()
    [batch] = ghost.collect()
    ghost.remove()
    return batch


@pytest.mark.parametrize("case", sorted(CASES))
def test_ghost_products_equal_materialised(case, ghost_form):
    model, x, y = build(case)
    reference = per_example_grads(model, x, y).double()
    batch = captured(model, x, y)
    assert torch.allclose(batch.materialize().double(), reference, rtol=1e-4, atol=1e-5)
    assert torch.allclose(batch.gram().double(), reference @ reference.T, rtol=1e-4, atol=1e-4)
    assert torch.allclose(batch.sq_norms().double(), reference.square().sum(dim=1), rtol=1e-4, atol=1e-5)
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(2, reference.shape[1], generator=generator)
    assert torch.allclose(batch.dots(flat).double(), flat.double() @ reference.T, rtol=1e-4, atol=1e-4)
    weights = torch.randn(len(x), generator=generator)
    summed = batch.weighted_sum(weights)
    flat_sum = torch.cat([summed[n].reshape(-1) for n, _ in model.named_parameters()]).double()
    assert torch.allclose(flat_sum, weights.double() @ reference, rtol=1e-4, atol=1e-5)


def test_embedding_with_padding_and_repeats(ghost_form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 2))
    x = torch.tensor([[1, 1, 0, 2], [3, 0, 0, 3], [4, 4, 4, 4]])
    y = torch.tensor([0, 1, 1])
    reference = per_example_grads(model, x, y)
    batch = captured(model, x, y)
    assert torch.allclose(batch.gram(), reference @ reference.T, atol=1e-5)
    assert torch.allclose(batch.sq_norms(), reference.square().sum(dim=1), atol=1e-5)
    assert torch.allclose(batch.materialize(), reference, atol=1e-6)


def test_unsupported_module_falls_back_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Scale(4), nn.Linear(4, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    ghost = GhostGrads(model)
    with pytest.warns(UserWarning, match=r"Scale \('1'\)"):
        ce(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        model.zero_grad()
        ce(model(x), y).backward()
    batches = ghost.collect()
    assert len(batches) == 2
    reference = per_example_grads(model, x, y)
    assert torch.allclose(batches[1].gram(), reference @ reference.T, atol=1e-5)


def test_micro_batches_come_back_in_order_and_eval_passes_are_skipped():
    model, x, y = build("linear2d")
    ghost = GhostGrads(model)
    ce(model(x[:3]), y[:3]).backward()
    model(x)  # grad enabled but no backward: ignored
    with torch.no_grad():
        model(x)
    ce(model(x[3:]), y[3:]).backward()
    first, second = ghost.collect()
    assert (first.batch_size, second.batch_size) == (3, 4)
    reference = per_example_grads(model, x, y)
    assert torch.allclose(second.materialize(), reference[3:], atol=1e-6)
    assert ghost.collect() == []


def test_module_called_twice_sums_its_contributions(ghost_form):
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = shared, nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    reference = per_example_grads(model, x, y)
    batch = captured(model, x, y)
    assert torch.allclose(batch.gram(), reference @ reference.T, atol=1e-5)


def test_param_selection_and_errors():
    model, x, y = build("linear2d")
    ghost = GhostGrads(model, params=["2.weight", "2.bias"])
    ce(model(x), y).backward()
    [batch] = ghost.collect()
    reference = per_example_grads(model, x, y)[:, -(5 * 3 + 3):]
    assert torch.allclose(batch.materialize(), reference, atol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        GhostGrads(model, params=["nope"])
    with pytest.raises(ValueError, match="no trainable"):
        GhostGrads(model, params=lambda name, p: False)


def test_tied_linear_weights_are_the_exact_sum_of_both_uses(ghost_form):
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    reference = per_example_grads(tied, x, y)
    batch = captured(tied, x, y)
    assert batch.names == [name for name, _ in tied.named_parameters()]
    assert torch.allclose(batch.materialize(), reference, atol=1e-6)
    assert torch.allclose(batch.gram(), reference @ reference.T, atol=1e-5)
    weights = torch.randn(2, 6)
    assert torch.allclose(batch.weighted_sums(weights), weights @ reference, atol=1e-5)


@pytest.mark.parametrize("case", ["linear2d", "linear3d_long_T", "conv2d", "transformer"])
def test_select_weighted_sums_and_flat_layout(case, ghost_form):
    model, x, y = build(case)
    reference = per_example_grads(model, x, y)
    batch = captured(model, x, y)
    assert batch.dim == reference.shape[1]
    assert torch.allclose(batch.select([2, 0]).materialize(), reference[[2, 0]], atol=1e-6)
    weights = torch.randn(3, len(x), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(batch.weighted_sums(weights), weights @ reference, atol=1e-5)
    flat = torch.randn(2, batch.dim)
    assert torch.equal(batch.flatten(batch.unflatten(flat), 2), flat)


def test_input_without_the_batch_dimension_is_left_out_with_a_warning():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(3, 4), nn.Linear(4, 2)

        def forward(self, tokens):
            h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))  # shared by every example
            return self.head(h.mean(dim=1))

    model = Positions()
    ghost = GhostGrads(model)
    tokens, y = torch.randint(0, 9, (5, 3)), torch.randint(0, 2, (5,))
    ce(model(tokens), y).backward()
    with pytest.warns(UserWarning, match="Embedding 'pos' .* shared by the whole batch"):
        [batch] = ghost.collect()
    assert batch.names == ["tok.weight", "head.weight", "head.bias"]
    reference = per_example_grads(model, tokens, y)
    kept = torch.cat([reference[:, :9 * 4], reference[:, (9 + 3) * 4:]], dim=1)
    assert torch.allclose(batch.materialize(), kept, atol=1e-6)


def test_wrong_widths_and_weight_shapes_are_clear_errors():
    model, x, y = build("linear2d")
    batch = captured(model, x, y)
    with pytest.raises(ValueError, match=f"width d={batch.dim}"):
        batch.dots(torch.zeros(2, batch.dim + 1))
    targets = torch.zeros(2, batch.dim)
    with pytest.raises(ValueError, match=r"weights must be \(N, B\) = \(2, 7\)"):
        batch.add_weighted_(targets, torch.ones(2, 6))
    assert torch.equal(targets, torch.zeros(2, batch.dim))  # nothing was written


def test_parameter_registered_on_a_module_and_its_child_counts_once():
    class Head(nn.Module):  # HF's BertLMPredictionHead: self.bias is also decoder.bias
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(4, 3)
            self.bias = self.decoder.bias

        def forward(self, x):
            return self.decoder(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Head())
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    ghost = GhostGrads(model)
    assert ghost.tied == set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Head itself is no use of the bias: no fallback for it
        ce(model(x), y).backward()
    [batch] = ghost.collect()
    assert torch.allclose(batch.materialize(), per_example_grads(model, x, y), atol=1e-6)


def test_group_norm_rule_gives_the_same_gradients_with_and_without_the_saved_statistics():
    from dataorder.ghost.rules import norm_rule, saved_statistics

    torch.manual_seed(0)
    norm = nn.GroupNorm(3, 6)
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    out = norm(x)
    delta = torch.randn_like(out)
    names = {"weight": "w", "bias": "b"}
    saved = saved_statistics(norm, out)
    assert len(saved) == 2
    fused, recomputed = norm_rule(norm, names, (x, *saved), delta), norm_rule(norm, names, (x,), delta)
    normalized = nn.functional.group_norm(x, 3, None, None, norm.eps)
    for got in (fused.grads, recomputed.grads):
        assert torch.allclose(got["w"], (normalized * delta).sum(dim=(2, 3)), atol=1e-4)
        assert torch.allclose(got["b"], delta.sum(dim=(2, 3)), atol=1e-5)
    assert saved_statistics(nn.GroupNorm(3, 6), x) == ()  # no norm's node behind it: recomputed


@pytest.mark.parametrize("normalized_shape", [(6,), (3, 6)])
def test_layer_norm_rule_gives_the_same_gradients_with_and_without_the_saved_statistics(normalized_shape):
    from dataorder.ghost.rules import norm_rule, saved_statistics

    torch.manual_seed(0)
    norm = nn.LayerNorm(normalized_shape)
    x = torch.randn(4, 5, 3, 6) * 3 + 2
    out = norm(x)
    delta = torch.randn_like(out)
    names = {"weight": "w", "bias": "b"}
    saved = saved_statistics(norm, out)
    assert [tuple(t.shape) for t in saved] == [(4, 5, 3, 1) if len(normalized_shape) == 1 else (4, 5, 1, 1)] * 2
    reduce = tuple(range(1, x.dim() - len(normalized_shape)))
    normalized = nn.functional.layer_norm(x, normalized_shape, None, None, norm.eps)
    for got in (norm_rule(norm, names, (x, *saved), delta).grads, norm_rule(norm, names, (x,), delta).grads):
        assert torch.allclose(got["w"], (normalized * delta).sum(dim=reduce), atol=1e-4)
        assert torch.allclose(got["b"], delta.sum(dim=reduce), atol=1e-5)


@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 2)),
                                                       ((3, 2), (2, 0), (2, 1))])
def test_per_example_conv_gradients_equal_one_backward_per_example(stride, padding, dilation):
    from dataorder.ghost.factors import _conv_per_example

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=stride, padding=padding, dilation=dilation, bias=False)
    x = torch.randn(4, 3, 9, 8)
    delta = torch.randn_like(conv(x))
    expected = []
    for j in range(len(x)):
        conv.zero_grad()
        (conv(x[j:j + 1]) * delta[j:j + 1]).sum().backward()
        expected.append(conv.weight.grad.clone())
    got = _conv_per_example(x, delta, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
