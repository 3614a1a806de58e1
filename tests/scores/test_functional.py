"""Functional scores against direct formulas; GraNd against a per-example backward loop."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from torch import nn

from dataorder.grads import PerExampleGrads
from dataorder.scores import functional as S

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0], [1.0, 1.0, 1.0], [-2.0, 0.5, 4.0]])
TARGETS = torch.tensor([0, 2, 1, 2])


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def reference(name: str) -> np.ndarray:
    z, y = LOGITS.double().numpy(), TARGETS.numpy()
    p = softmax_rows(z)
    rows = np.arange(len(y))
    if name == "loss":
        return -np.log(p[rows, y])
    if name == "confidence":
        return p[rows, y]
    if name == "margin":
        return np.array([z[i, y[i]] - max(z[i, k] for k in range(z.shape[1]) if k != y[i]) for i in rows])
    if name == "el2n":
        return np.sqrt(((p - np.eye(z.shape[1])[y]) ** 2).sum(axis=1))
    if name == "entropy":
        return -(p * np.log(p)).sum(axis=1)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["loss", "confidence", "margin", "el2n", "entropy"])
def test_scores_match_direct_formulas(name):
    got = getattr(S, name)(LOGITS, TARGETS)
    assert got.shape == (4,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference(name), rtol=1e-5, atol=1e-6)


def test_known_values_by_hand():
    # uniform over 3 classes: loss log 3, confidence 1/3, margin 0, entropy log 3, el2n sqrt(4/9 + 2/9)
    uniform = torch.zeros(1, 3)
    target = torch.tensor([1])
    assert math.isclose(S.loss(uniform, target).item(), math.log(3), rel_tol=1e-6)
    assert math.isclose(S.confidence(uniform, target).item(), 1 / 3, rel_tol=1e-6)
    assert S.margin(uniform, target).item() == 0.0
    assert math.isclose(S.entropy(uniform).item(), math.log(3), rel_tol=1e-6)
    assert math.isclose(S.el2n(uniform, target).item(), math.sqrt(6) / 3, rel_tol=1e-6)
    # a class at -inf contributes nothing to the entropy (no nan)
    assert math.isclose(S.entropy(torch.tensor([[0.0, 0.0, float("-inf")]])).item(), math.log(2), rel_tol=1e-6)


def test_directions_easy_versus_hard():
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    target = torch.tensor([0])
    for harder_when_higher in (S.loss, S.el2n):
        assert harder_when_higher(hard, target) > harder_when_higher(easy, target)
    for easier_when_higher in (S.confidence, S.margin):
        assert easier_when_higher(easy, target) > easier_when_higher(hard, target)


def test_scores_are_detached_and_accept_arrays():
    logits = LOGITS.clone().requires_grad_(True)
    assert not S.el2n(logits, TARGETS).requires_grad
    np.testing.assert_allclose(S.loss(LOGITS.numpy(), TARGETS.numpy()).numpy(), reference("loss"), rtol=1e-5)


@pytest.mark.parametrize(
    ("logits", "targets", "message"),
    [
        (torch.zeros(3), torch.tensor([0, 0, 0]), "shape \\(batch, classes\\)"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "class ids in \\[0, 3\\)"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), "class ids"),
        (torch.zeros(2, 3), torch.tensor([0]), "one target per row"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), "float tensor"),
    ],
)
def test_bad_inputs_raise(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        S.loss(logits, targets)


def test_margin_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        S.margin(torch.zeros(2, 1), torch.tensor([0, 0]))


def loop_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None) -> np.ndarray:
    """Reference: one backward per example, norm over the chosen parameters."""
    norms = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad.flatten() for name, p in model.named_parameters() if names is None or name in names]
        norms.append(torch.cat(grads).norm().item())
    model.zero_grad(set_to_none=True)
    return np.array(norms)


@pytest.mark.parametrize("subset", [None, ["2.weight", "2.bias"]])
def test_grand_matches_per_example_backward_loop(subset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    expected = loop_gradient_norms(model, x, y, subset)
    result = PerExampleGrads(model, nn.functional.cross_entropy, params=subset)(x, y)
    np.testing.assert_allclose(S.grand(result).numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(S.grand(result.grads).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_grand_on_a_dict_restricted_to_a_subset():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(p, xi, yi):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    last = ["2.weight", "2.bias"]
    expected = loop_gradient_norms(model, x, y, last)
    np.testing.assert_allclose(S.grand(grads, params=last).numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(S.grand(grads, params=lambda name, g: name.startswith("2.")).numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(S.grand(grads).numpy(), loop_gradient_norms(model, x, y, None), rtol=1e-4)


def test_grand_rejects_bad_arguments():
    with pytest.raises(TypeError, match="PerExampleGrads"):
        S.grand(torch.ones(2, 3), params=["w"])
    with pytest.raises(ValueError, match="unknown parameter 'b'"):
        S.grand({"w": torch.ones(2, 3)}, params=["w", "b"])
    with pytest.raises(ValueError, match="selects none"):
        S.grand({"w": torch.ones(2, 3)}, params=lambda name, g: False)
    with pytest.raises(ValueError, match="selects none"):
        S.grand({"w": torch.ones(2, 3)}, params=[])
    with pytest.raises(TypeError, match="list"):
        S.grand({"w": torch.ones(2, 3)}, params="w")
    with pytest.raises(TypeError, match="got str"):
        S.grand("nope")


class SharedTwice(nn.Module):
    """Applies one Linear twice: its per-example gradient sums the two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


class Sequence3d(nn.Module):
    """A Linear over a (B, T, F) input: per-example gradients sum over T."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(16, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x.reshape(len(x), 2, 16))).mean(dim=1))


class TiedWeights(nn.Module):
    """One weight shared by two Linears: the ghost path sums both uses exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def conv2d_net(**conv):
    return lambda: nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 3, **conv), nn.Tanh(), nn.Flatten(),
                                 nn.LazyLinear(3))


@pytest.mark.parametrize(("make", "subset", "fallback"), [
    (lambda: nn.Sequential(nn.Linear(32, 7), nn.Tanh(), nn.Linear(7, 3)), None, False),         # ghost: linear
    (lambda: nn.Sequential(nn.Linear(32, 7), nn.Tanh(), nn.Linear(7, 3)), ["0.bias", "2.weight"], False),
    (lambda: nn.Sequential(nn.Linear(32, 7, bias=False), nn.ReLU(), nn.Linear(7, 3)), None, False),
    (conv2d_net(kernel_size=3), None, False),                                                    # ghost: conv
    (conv2d_net(kernel_size=2, stride=2, padding=1, dilation=1), None, False),
    (conv2d_net(kernel_size=(3, 2), dilation=(1, 2), padding=(1, 0), bias=False), None, False),
    (lambda: nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 40, 4), nn.Flatten(), nn.Linear(40, 3)),
     None, False),                                                              # one patch: the T×T form
    (lambda: nn.Sequential(nn.Unflatten(1, (4, 8)), nn.Conv1d(4, 3, 3, stride=2, padding=1), nn.Flatten(),
                           nn.Linear(12, 3)), ["1.weight"], False),
    (lambda: nn.Sequential(nn.Linear(32, 6), nn.LayerNorm(6), nn.Linear(6, 3)), None, False),
    (lambda: nn.Sequential(nn.Linear(32, 6), nn.LayerNorm(6), nn.Linear(6, 3)), ["2.weight"], False),
    (SharedTwice, None, False),
    (Sequence3d, None, False),
    (TiedWeights, None, False),                                                       # tied: ghost, exact
])
def test_grad_norms_match_the_loop_on_every_path(make, subset, fallback, monkeypatch):
    import dataorder.grads
    from dataorder.scores.gradnorm import grad_norms

    used: list[bool] = []
    real = dataorder.grads.PerExampleGrads
    monkeypatch.setattr(dataorder.grads, "PerExampleGrads", lambda *a, **k: used.append(True) or real(*a, **k))
    torch.manual_seed(3)
    model = make()
    x, y = torch.randn(9, 32), torch.randint(0, 3, (9,))
    model(x)  # materialise lazy layers
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norms, logits = grad_norms(model, x, y, subset)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())   # .grad untouched
    assert torch.allclose(logits, model(x).detach())
    np.testing.assert_allclose(norms.numpy(), loop_gradient_norms(model, x, y, subset), rtol=1e-4, atol=1e-7)
    assert bool(used) == fallback


def test_grad_norms_skip_frozen_parameters():
    from dataorder.scores.gradnorm import grad_norms

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    expected = loop_gradient_norms(model, x, y, ["2.weight", "2.bias"])
    np.testing.assert_allclose(grad_norms(model, x, y)[0].numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("module", ["functional", "dynamics", "aggregate", "io", "gradnorm"])
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(f"dataorder.scores.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("score", ["loss", "confidence", "margin", "el2n", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_scored_in_float32(score, dtype):
    torch.manual_seed(0)
    logits = torch.randn(200, 10) * 3
    targets = logits.argmax(1)
    logits[torch.arange(200), targets] += 8          # confident, as a trained model's are
    half = logits.to(dtype)
    got = getattr(S, score)(half, targets)
    assert got.dtype == torch.float32
    exact = getattr(S, score)(half.double(), targets)   # the exact score of those same logits
    np.testing.assert_allclose(got.double().numpy(), exact.numpy(), rtol=1e-4, atol=1e-6)
    if score in ("loss", "el2n"):
        assert (got > 0).all()                          # bfloat16 arithmetic rounds these to 0


@pytest.mark.parametrize("score", ["loss", "margin", "el2n"])
def test_float64_logits_stay_float64(score):
    assert getattr(S, score)(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1])).dtype == torch.float64


def test_grand_dtype_does_not_depend_on_the_dict_order():
    big = torch.full((2, 3), 3e4, dtype=torch.float16)
    small = torch.ones(2, 3)
    forward, backward = S.grand({"a": big, "b": small}), S.grand({"b": small, "a": big})
    assert forward.dtype == backward.dtype == torch.float32
    assert torch.equal(forward, backward) and torch.isfinite(forward).all()
    np.testing.assert_allclose(forward.numpy(), math.sqrt(3 * 3e4**2 + 3), rtol=1e-6)
    assert S.grand({"a": small, "b": small.double()}).dtype == torch.float64
    assert S.grand(big).dtype == torch.float32 and torch.isfinite(S.grand(big)).all()


def test_grand_params_take_the_forms_per_example_grads_takes():
    grads = {"w": torch.ones(2, 3, 3), "b": torch.ones(2, 3)}
    by_name = S.grand(grads, params=["b"])
    by_predicate = S.grand(grads, params=lambda name, g: g.dim() == 2)
    assert torch.equal(by_name, by_predicate)
    with pytest.raises(TypeError, match="must list parameter names"):
        S.grand(grads, params=[1])
    with pytest.raises(TypeError, match="predicate"):
        S.grand(grads, params=3)


def test_empty_batches_give_empty_results():
    from dataorder.grads import CountSketch, flatten_per_example

    assert S.grand({"w": torch.ones(0, 2, 2), "b": torch.ones(0, 2)}).shape == (0,)
    assert S.grand(torch.ones(0, 4)).shape == (0,)
    assert S.loss(torch.empty(0, 3), torch.empty(0, dtype=torch.long)).shape == (0,)
    assert flatten_per_example({"w": torch.ones(0, 2, 2), "b": torch.ones(0, 3)}).shape == (0, 7)
    assert CountSketch(7, 3).sketch_blocks([torch.ones(0, 2, 2), torch.ones(0, 3)]).shape == (0, 3)
    assert CountSketch(7, 3)(torch.ones(0, 7)).shape == (0, 3)
