"""The ghost path under the ways training loops actually call it: submodule calls, odd inputs, misuse."""

import warnings

import pytest
import torch
from torch import nn

from dataorder.ghost import GhostGrads, RepeatedBackwardError, UnsupportedLayerError
from dataorder.grads import PerExampleGrads
from dataorder.ordering import GraBSampler

# every test runs on both sources of the exact path (conftest.exact_source)
pytestmark = pytest.mark.usefixtures("exact_source")

ce = nn.functional.cross_entropy


def captured_rows(ghost):
    """The per-example rows of every forward captured since the last call, on either path."""
    if ghost.sketch is None and not ghost.dense:
        return [batch.materialize() for batch in ghost.collect()]
    return ghost.collect_sketch()


# -- a model whose root is never called: forwards are told apart by their backwards -----------------

def submodules(twice=False):
    torch.manual_seed(1)
    parts = {"enc": nn.Linear(5, 7), "head": nn.Linear(7, 3)}
    if twice:
        parts["mix"] = nn.Linear(7, 7)
    return nn.ModuleDict(parts)


def through(parts, x):
    """The loop's forward, calling the submodules directly (as a LightningModule's training_step does)."""
    h = torch.tanh(parts["enc"](x))
    if "mix" in parts:
        h = torch.tanh(parts["mix"](torch.tanh(parts["mix"](h))))  # one module, two calls in one forward
    return parts["head"](h)


class Whole(nn.Module):
    def __init__(self, parts):
        super().__init__()
        self.parts = parts

    def forward(self, x):
        return through(self.parts, x)


@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("sketch", [None, 16])  # 16 covers every side: the sketch rows are exact
def test_micro_batches_through_submodule_calls_are_told_apart_by_their_backwards(sketch, twice):
    parts = submodules(twice)
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    dense = PerExampleGrads(Whole(parts), ce)
    reference = [dense(x[:3], y[:3]).grads, dense(x[3:], y[3:]).grads]
    parts.zero_grad()
    ghost = GhostGrads(parts, sketch=sketch)
    for rows in (slice(0, 3), slice(3, 6)):
        ce(through(parts, x[rows]), y[rows]).backward()
    got = captured_rows(ghost)
    assert len(got) == 2
    for rows, expected in zip(got, reference):
        assert torch.allclose(rows, expected, atol=1e-5)


@pytest.mark.parametrize("sketch", [None, 16])
def test_grab_over_submodule_calls_with_accumulation_equals_the_dense_path(sketch):
    torch.manual_seed(0)
    n, batch = 24, 6
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))

    def orders(ghost):
        parts = submodules()
        sampler = GraBSampler(n, seed=3)
        dense = PerExampleGrads(Whole(parts), ce)
        if ghost:
            sampler.attach(parts, sketch=sketch)
        seen = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = sampler.global_order()
            seen.append(order.tolist())
            for start in range(0, n, batch):
                index = order[start:start + batch]
                for xs, ys in zip(x[index].chunk(2), y[index].chunk(2)):  # two micro-batches per step
                    if ghost:
                        ce(through(parts, xs), ys).backward()
                    else:
                        sampler.step(dense(xs, ys).grads)
                if ghost:
                    sampler.step()
                    assert sampler.steps_position == start + batch
                parts.zero_grad()
        sampler.set_epoch(3)
        return seen + [sampler.global_order().tolist()]

    assert orders(ghost=True) == orders(ghost=False)


@pytest.mark.parametrize("length", [5, 3])  # 3 == the micro-batch size
@pytest.mark.parametrize("sketch", [None, 64])
def test_positions_through_submodule_calls_are_left_out_by_the_first_call_s_batch(sketch, length):
    torch.manual_seed(1)
    parts = nn.ModuleDict({"tok": nn.Embedding(9, 4), "pos": nn.Embedding(length, 4), "head": nn.Linear(4, 3)})

    def forward(tokens):
        return parts["head"]((parts["tok"](tokens) + parts["pos"](torch.arange(tokens.shape[1]))).mean(dim=1))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = parts

        def forward(self, tokens):
            return forward(tokens)

    torch.manual_seed(0)
    tokens, y = torch.randint(0, 9, (6, length)), torch.randint(0, 3, (6,))
    dense = PerExampleGrads(Model(), ce, params=lambda name, p: ".pos." not in name)
    reference = [dense(tokens[:3], y[:3]).grads, dense(tokens[3:], y[3:]).grads]
    parts.zero_grad()
    ghost = GhostGrads(parts, sketch=sketch)
    with pytest.warns(UserWarning, match="Embedding 'pos' .* shared by the whole batch"):
        for rows in (slice(0, 3), slice(3, 6)):
            ce(forward(tokens[rows]), y[rows]).backward()
        got = captured_rows(ghost)
    assert len(got) == 2
    for rows, expected in zip(got, reference):
        assert torch.allclose(rows, expected, atol=1e-5)


# -- an embedding fed one index per example is not a position table ---------------------------------

class Conditioned(nn.Module):
    """Tokens ``(B, T)`` and one class label per example ``(B,)``, each embedded."""

    def __init__(self):
        super().__init__()
        self.tok, self.cls, self.head = nn.Embedding(10, 4), nn.Embedding(3, 4), nn.Linear(4, 3)

    def forward(self, tokens, labels):
        return self.head(self.tok(tokens).mean(dim=1) + self.cls(labels))


def conditioned_reference(model, tokens, labels, y):
    class Packed(nn.Module):  # PerExampleGrads takes one input tensor
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, packed):
            return self.inner(packed[:, :-1], packed[:, -1])

    return PerExampleGrads(Packed(), ce)(torch.cat([tokens, labels[:, None]], dim=1), y).grads


@pytest.mark.parametrize("sketch", [None, 16])
def test_labels_equal_to_arange_b_are_per_example_when_the_sequence_is_longer(sketch):
    torch.manual_seed(0)
    model = Conditioned()
    tokens, labels, y = torch.randint(0, 10, (2, 5)), torch.tensor([0, 1]), torch.tensor([2, 0])
    reference = conditioned_reference(model, tokens, labels, y)
    model.zero_grad()
    ghost = GhostGrads(model, sketch=sketch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out
        ce(model(tokens, labels), y).backward()
        [rows] = captured_rows(ghost)
    assert torch.allclose(rows, reference, atol=1e-5)


@pytest.mark.parametrize("sketch", [None, 16])
def test_no_module_is_newly_left_out_after_the_first_step(sketch):
    torch.manual_seed(0)
    model = Conditioned()
    tokens, y = torch.randint(0, 10, (2, 2)), torch.tensor([2, 0])  # T == B: labels [0, 1] look like arange(T)
    sampler = GraBSampler(8, seed=0).attach(model, sketch=sketch)
    sampler.set_epoch(0)
    ghost = sampler._source.ghost
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels in ([2, 2], [0, 1], [1, 2], [0, 1]):
            labels = torch.tensor(labels)
            ce(model(tokens, labels), y).backward()
            sampler.step()
            model.zero_grad()
        assert sampler.steps_position == 8
        ce(model(tokens, torch.tensor([0, 1])), y).backward()
        [rows] = captured_rows(ghost)
    model.zero_grad()
    assert torch.allclose(rows, conditioned_reference(model, tokens, torch.tensor([0, 1]), y), atol=1e-5)


# -- misuse of the sketched path, empty batches, forwards with no backward --------------------------

def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_the_redo_a_refused_second_backward_asks_for_balances_the_batch_once():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    sampler = GraBSampler(24, seed=3).attach(model, sketch=16)
    sampler.set_epoch(0)
    loss = ce(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RepeatedBackwardError, match=r"rows were dropped; run the forward and a single backward "
                                                    r"again, then step\(\)"):
        loss.backward()
    model.zero_grad()
    ce(model(x), y).backward()  # what the message asks for
    sampler.step()
    assert sampler.steps_position == 6


@pytest.mark.parametrize("sketch", [None, 16])
def test_an_empty_batch_is_a_value_error_naming_it(sketch):
    model, x, y = mlp(), torch.randn(6, 5), torch.randint(0, 3, (6,))
    ghost = GhostGrads(model, sketch=sketch)
    ce(model(x[:0]), y[:0]).backward()
    with pytest.raises(ValueError, match=r"^an empty batch .*skip it"):
        captured_rows(ghost)
    ghost.remove()
    sampler = GraBSampler(24, seed=3).attach(model, sketch=sketch)
    sampler.set_epoch(0)
    ce(model(x[:0]), y[:0]).backward()
    with pytest.raises(ValueError, match=r"^an empty batch .*skip it"):
        sampler.step()
    ce(model(x), y).backward()  # the empty batch was dropped
    sampler.step()
    assert sampler.steps_position == 6


@pytest.mark.parametrize("sketch", [None, 16])
def test_forwards_with_no_backward_leave_nothing_growing(sketch):
    model = mlp()
    ghost = GhostGrads(model, sketch=sketch)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    for _ in range(3000):
        with torch.no_grad():
            model(x)
    for _ in range(3000):
        model(x)  # evaluation without torch.no_grad(): its graph is dropped right away
    sizes = {name: len(value) for name, value in vars(ghost).items() if isinstance(value, (dict, list, set))}
    assert max(sizes.values()) <= 300, sizes
    ce(model(x), y).backward()
    [rows] = captured_rows(ghost)
    model.zero_grad()
    assert torch.allclose(rows, PerExampleGrads(model, ce)(x, y).grads, atol=1e-5)


# -- arguments and layers the ghost path cannot take ------------------------------------------------

def test_a_single_parameter_name_is_refused_with_the_list_to_write():
    model = mlp()
    for make in (lambda: GhostGrads(model, params="0.weight"),
                 lambda: GraBSampler(8).attach(model, params="0.weight"),
                 lambda: PerExampleGrads(model, ce, params="0.weight")):
        with pytest.raises(TypeError, match=r"a single name goes in a list, params=\['0.weight'\]"):
            make()


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(5, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(dim=1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(5, 1, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


@pytest.mark.parametrize("model_class, name", [(Recurrent, "LSTM 'rnn'"), (Attention, "MultiheadAttention 'attn'")])
@pytest.mark.parametrize("sketch", [None, 16])
def test_a_module_returning_a_tuple_is_refused_at_its_forward_with_the_fix(model_class, name, sketch):
    torch.manual_seed(0)
    model, x, y = model_class(), torch.randn(4, 3, 5), torch.randint(0, 3, (4,))
    ghost = GhostGrads(model, sketch=sketch)
    with pytest.raises(UnsupportedLayerError, match=rf"^{name} returns a tuple, .*leave its parameters out with "
                                                    r"params=, or .*step\(PerExampleGrads\(\.\.\.\)\.grads\)$"):
        model(x)
    assert PerExampleGrads(model, ce)(x, y).grads.shape[0] == 4  # torch.func may still run the model
    ghost.remove()
    model.zero_grad()
    head_only = GhostGrads(model, sketch=sketch, params=lambda n, p: n.startswith("head."))
    ce(model(x), y).backward()
    [rows] = captured_rows(head_only)
    head = PerExampleGrads(model, ce, params=lambda n, p: n.startswith("head."))(x, y).grads
    assert torch.allclose(rows, head, atol=1e-5)


@pytest.mark.parametrize("sketch", [None, 16])  # 16 covers every side of the (10, 4) table
def test_an_embedding_with_max_norm_gets_the_exact_rule(sketch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 3))
    tokens, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,))
    table = model[0].weight.detach().clone()
    ghost = GhostGrads(model, sketch=sketch, params=["0.weight"])
    looked_up = {}
    model[0].register_forward_hook(lambda module, inputs, output: looked_up.update(out=output))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch.func fallback
        out = model(tokens)
        looked_up["out"].retain_grad()
        ce(out, y).backward()
        [rows] = captured_rows(ghost)
    assert not torch.equal(model[0].weight, table)  # the forward renormalised some rows in place
    per_output = looked_up["out"].grad * len(tokens)  # the loss is a mean over the batch
    reference = torch.stack([torch.zeros(10, 4).index_add_(0, tokens[j], per_output[j]) for j in range(len(tokens))])
    assert torch.allclose(rows, reference.reshape(len(tokens), -1), atol=1e-6)
    assert torch.allclose(rows.mean(dim=0), model[0].weight.grad.reshape(-1), atol=1e-6)


class _Gain(nn.Module):
    """out = x * weight + bias, elementwise: a layer for user rules."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.weight + self.bias


def _gain_rule_returning(made):
    from dataorder.ghost.factors import DenseFactors

    def rule(module, names, inputs, grad_output):
        good = {names["weight"]: inputs[0] * grad_output, names["bias"]: grad_output}
        return made(DenseFactors, names, good, inputs[0], grad_output)
    return rule


BAD_RULES = [  # (what the rule returns, the error, a pattern of its message)
    (lambda D, names, good, x, d: [D(good), D({names["bias"]: d})], ValueError, r"\['g.bias'\] more than once"),
    (lambda D, names, good, x, d: D({names["weight"]: good[names["weight"]]}), ValueError,
     r"must cover each of \['g.bias', 'g.weight'\] once"),
    (lambda D, names, good, x, d: D({**good, names["weight"]: good[names["weight"]][:, :3]}), ValueError,
     r"returned a \(5, 3\) block for 'g.weight': a DenseFactors block is \(B, \*param.shape\) = \(5, 4\)"),
    (lambda D, names, good, x, d: good, TypeError, "returned a dict: a rule returns DenseFactors"),
]


@pytest.mark.parametrize("sketch", [None, 8])
@pytest.mark.parametrize("made, error, match", BAD_RULES)
def test_a_registered_rule_returning_wrong_factors_is_refused_naming_the_rule_and_module(made, error, match, sketch):
    from dataorder.ghost.rules import _RULES, register_ghost_rule

    register_ghost_rule(_Gain, _gain_rule_returning(made))
    try:
        model = nn.Sequential()
        model.add_module("g", _Gain(4))
        sampler = GraBSampler(10).attach(model, sketch=sketch)
        with pytest.raises(error, match=match):
            model(torch.randn(5, 4)).square().mean().backward()
            sampler.step()
        assert sampler.steps_position == 0
    finally:
        del _RULES[_Gain]
