"""Tests for dataorder.grads: PerExampleGrads, CountSketch, flatten_per_example."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dataorder.grads import (
    CountSketch,
    PerExampleGrads,
    PerExampleResult,
    flatten_per_example,
)
from dataorder.models import LeNet

ROOT = Path(__file__).resolve().parents[1]


def small_mlp(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(dropout), nn.Linear(10, 4))
    return model.to(dtype)


def batch(n: int = 7, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator, dtype=dtype), torch.randint(4, (n,), generator=generator)


def loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None):
    """Per-example losses and flattened gradients by one loss.backward() per example."""
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    losses, rows = [], []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        losses.append(loss.detach())
        rows.append(torch.cat([p.grad.reshape(-1) for _, p in named]))
    model.zero_grad(set_to_none=True)
    return torch.stack(losses), torch.stack(rows)


# --- equivalence with the per-example loop and with loss.backward() ---------------------------


def test_matches_per_example_backward_loop() -> None:
    model, (x, y) = small_mlp(), batch()
    ref_losses, ref_grads = loop_reference(model, x, y)
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    assert isinstance(out, PerExampleResult)
    assert out.grads.shape == (7, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(out.grads, ref_grads)
    torch.testing.assert_close(out.losses, ref_losses)
    torch.testing.assert_close(out.outputs, model(x).detach())
    assert not out.grads.requires_grad and not out.losses.requires_grad and not out.outputs.requires_grad


def test_matches_loop_on_lenet_float32() -> None:
    torch.manual_seed(0)
    model = LeNet(1, 3, size=8)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    _, ref_grads = loop_reference(model, x, y)
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    torch.testing.assert_close(out.grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_grad_is_batch_mean_and_accumulates() -> None:
    model, reference = small_mlp(), small_mlp()
    (xa, ya), (xb, yb) = batch(seed=1), batch(n=5, seed=2)
    per_example = PerExampleGrads(model, F.cross_entropy)
    out = per_example(xa, ya)
    F.cross_entropy(reference(xa), ya).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # .grad of the flattened mean is the mean of the per-example rows
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), out.grads.mean(0))
    per_example(xb, yb)
    F.cross_entropy(reference(xb), yb).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_zero_grad_and_optimizer_step_work() -> None:
    model, reference = small_mlp(), small_mlp()
    x, y = batch()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    per_example = PerExampleGrads(model, F.cross_entropy)
    for _ in range(2):
        per_example(x, y)
        opt.step()
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
        assert p.grad is None


# --- parameter selection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [["3.bias", "3.weight"], lambda name, p: name.startswith("3.")],
    ids=["names", "predicate"],
)
def test_params_subset(params) -> None:
    model, (x, y) = small_mlp(), batch()
    _, ref_grads = loop_reference(model, x, y, names={"3.weight", "3.bias"})
    per_example = PerExampleGrads(model, F.cross_entropy, params=params)
    assert per_example.param_names == ("3.weight", "3.bias")  # named_parameters() order
    assert per_example.dim == 10 * 4 + 4
    out = per_example(x, y)
    torch.testing.assert_close(out.grads, ref_grads)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    torch.testing.assert_close(model[3].bias.grad, ref_grads[:, -4:].mean(0))


def test_frozen_parameters_are_left_out_by_default() -> None:
    model, (x, y) = small_mlp(), batch()
    model[0].requires_grad_(False)
    per_example = PerExampleGrads(model, F.cross_entropy)
    assert per_example.param_names == ("3.weight", "3.bias")
    out = per_example(x, y)
    assert out.grads.shape == (7, 44) and model[0].weight.grad is None


def test_chunk_size_gives_same_result() -> None:
    model, (x, y) = small_mlp(), batch()
    full = PerExampleGrads(model, F.cross_entropy)(x, y)
    model.zero_grad(set_to_none=True)
    chunked = PerExampleGrads(model, F.cross_entropy, chunk_size=3)(x, y)
    torch.testing.assert_close(chunked.grads, full.grads)
    torch.testing.assert_close(chunked.losses, full.losses)


def test_automatic_chunks_and_sketch_chunks_give_same_result(monkeypatch) -> None:
    model, (x, y) = small_mlp(), batch()
    full = PerExampleGrads(model, F.cross_entropy, sketch_dim=8)(x, y)
    grad_once = model[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    chunked = PerExampleGrads(model, F.cross_entropy, sketch_dim=8, chunk_size=2)(x, y)
    torch.testing.assert_close(chunked.grads, full.grads)
    torch.testing.assert_close(model[0].weight.grad, grad_once)
    monkeypatch.setattr("dataorder.grads._CHUNK_BYTES", 1)  # automatic chunks of one example
    model.zero_grad(set_to_none=True)
    auto = PerExampleGrads(model, F.cross_entropy)(x, y)
    torch.testing.assert_close(auto.grads, loop_reference(model, x, y)[1])
    torch.testing.assert_close(auto.outputs, full.outputs)


def test_buffers_are_used() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 4).double()
            self.register_buffer("scale", torch.tensor(3.0, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale

    torch.manual_seed(0)
    model, (x, y) = Scaled(), batch()
    _, ref_grads = loop_reference(model, x, y)
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    torch.testing.assert_close(out.grads, ref_grads)
    torch.testing.assert_close(out.outputs, model(x).detach())


# --- dropout and batch norm ---------------------------------------------------------------------


def test_dropout_draws_a_mask_per_example() -> None:
    model = small_mlp(dropout=0.5)
    x = torch.randn(1, 6, dtype=torch.float64).expand(8, 6)
    y = torch.zeros(8, dtype=torch.long)
    torch.manual_seed(3)
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    # independent masks: identical examples get (almost all) different outputs and gradients
    assert len(torch.unique(out.outputs, dim=0)) > 4
    assert len(torch.unique(out.grads, dim=0)) > 4
    model.eval()  # no dropout: identical examples give identical gradients
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    torch.testing.assert_close(out.grads, out.grads[:1].expand_as(out.grads))


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4)).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model


def test_batchnorm_in_train_mode_raises_and_writes_nothing() -> None:
    model, (x, y) = bn_model(), batch()
    with pytest.raises(ValueError, match="BatchNorm1d '1'.*eval.*GroupNorm"):
        PerExampleGrads(model, F.cross_entropy)(x, y)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    model[1].track_running_stats, model[1].running_mean, model[1].running_var = False, None, None
    with pytest.raises(ValueError, match="batch statistics"):
        PerExampleGrads(model, F.cross_entropy)(x, y)


def test_batchnorm_in_eval_mode_matches_loop() -> None:
    model, (x, y) = bn_model(), batch()
    model.eval()
    _, ref_grads = loop_reference(model, x, y)
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    torch.testing.assert_close(out.grads, ref_grads)


# --- sketches -----------------------------------------------------------------------------------


def sketch_mean_z(sketch_fn, x: torch.Tensor, y: torch.Tensor, k: int, trials: int) -> float:
    """|mean over seeds of <Sx, Sy> - <x, y>| in units of its exact standard error."""
    estimates = torch.tensor([float(sketch_fn(seed)(x) @ sketch_fn(seed)(y)) for seed in range(trials)])
    pair = torch.outer(x, y)
    pair = pair + pair.T
    variance = float(torch.triu(pair, diagonal=1).pow(2).sum()) / k  # (1/k) Σ_{i<j} (x_i y_j + x_j y_i)²
    return abs(float(estimates.mean()) - float(x @ y)) / math.sqrt(variance / trials)


def test_sketched_inner_products_are_unbiased() -> None:
    d, k, trials = 50, 8, 1000
    generator = torch.Generator().manual_seed(0)
    # Positive entries make a sign-free sketch strongly biased, so the test can see it.
    x = torch.rand(d, generator=generator, dtype=torch.float64) + 0.5
    y = torch.rand(d, generator=generator, dtype=torch.float64) + 0.5

    def real(seed):
        return CountSketch(d, k, seed=seed)

    def unsigned(seed):
        s = CountSketch(d, k, seed=seed)
        return lambda v: torch.zeros(k, dtype=v.dtype).index_add_(0, s.buckets, v)

    def rescaled(seed):
        s = CountSketch(d, k, seed=seed)
        return lambda v: s(v) * 1.1

    assert sketch_mean_z(real, x, y, k, trials) < 4.0
    # the same criterion rejects a sketch without signs or with a wrong scale
    assert sketch_mean_z(unsigned, x, y, k, trials) > 20.0
    assert sketch_mean_z(rescaled, x, y, k, trials) > 4.0


def test_count_sketch_is_seeded_and_stores_vectors_only() -> None:
    x = torch.randn(3, 40)
    a, b, c = CountSketch(40, 6, seed=1), CountSketch(40, 6, seed=1), CountSketch(40, 6, seed=2)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert a.buckets.shape == a.signs.shape == (40,)
    assert set(a.signs.tolist()) == {-1.0, 1.0}
    # each coordinate lands in exactly one bucket with its sign
    dense = torch.zeros(40, 6)
    dense[torch.arange(40), a.buckets] = a.signs
    torch.testing.assert_close(a(x), x @ dense)
    assert a(torch.randn(2, 5, 40)).shape == (2, 5, 6)


def test_count_sketch_half_precision_accumulates_in_float32() -> None:
    sketch, x = CountSketch(64, 8, seed=0), torch.randn(4, 64)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        out = sketch(low)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, sketch(low.float()))
    assert sketch(x.double()).dtype == torch.float64


def test_per_example_grads_sketch_equals_count_sketch_of_full_grads() -> None:
    model, (x, y) = small_mlp(), batch()
    full = PerExampleGrads(model, F.cross_entropy)(x, y)
    sketched = PerExampleGrads(model, F.cross_entropy, sketch_dim=16, seed=5)
    out = sketched(x, y)
    assert out.grads.shape == (7, 16) and sketched.dim == 16
    torch.testing.assert_close(out.grads, CountSketch(full.grads.shape[1], 16, seed=5)(full.grads))
    # .grad still holds the exact (unsketched) mean, accumulated twice now
    torch.testing.assert_close(model[3].bias.grad, 2 * full.grads[:, -4:].mean(0))


# --- flatten_per_example ------------------------------------------------------------------------


def test_flatten_per_example_follows_dict_order() -> None:
    b = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3)
    w = 100 + torch.arange(2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2)
    flat = flatten_per_example({"b": b, "w": w})
    expected = torch.tensor([[0, 1, 2, 100, 101, 102, 103], [3, 4, 5, 104, 105, 106, 107]], dtype=torch.float32)
    torch.testing.assert_close(flat, expected)
    torch.testing.assert_close(flatten_per_example({"w": w, "b": b})[:, :4], expected[:, 3:])


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sketch_dim": 0}, ValueError, "sketch_dim"),
        ({"sketch_dim": -3}, ValueError, "sketch_dim"),
        ({"sketch_dim": 2.5}, TypeError, "sketch_dim"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"params": ["0.weight", "nope"]}, ValueError, "unknown parameter 'nope'"),
        ({"params": []}, ValueError, "selects no trainable parameter"),
        ({"params": lambda name, p: False}, ValueError, "selects no trainable parameter"),
        ({"params": "0.weight"}, TypeError, "list of parameter names"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        PerExampleGrads(small_mlp(), F.cross_entropy, **kwargs)


def test_naming_a_frozen_parameter_errors() -> None:
    model = small_mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        PerExampleGrads(model, F.cross_entropy, params=["0.weight"])


def test_bad_call_inputs() -> None:
    model, (x, y) = small_mlp(), batch()
    per_example = PerExampleGrads(model, F.cross_entropy)
    with pytest.raises(ValueError, match="same batch size"):
        per_example(x, y[:3])
    with pytest.raises(ValueError, match="scalar"):
        PerExampleGrads(model, lambda out, t: F.cross_entropy(out, t, reduction="none"))(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_bad_sketch_inputs() -> None:
    sketch = CountSketch(10, 3)
    with pytest.raises(ValueError, match="dim_out"):
        CountSketch(10, 0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 10\)"):
        sketch(torch.randn(2, 9))
    with pytest.raises(TypeError, match="floating-point"):
        sketch(torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty dict"):
        flatten_per_example({})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_keeps_tensors_on_device() -> None:
    model, (x, y) = small_mlp(), batch()
    _, ref_grads = loop_reference(model, x, y)
    model.cuda()
    out = PerExampleGrads(model, F.cross_entropy, sketch_dim=8)(x.cuda(), y.cuda())
    assert out.grads.is_cuda and out.losses.is_cuda and out.outputs.is_cuda and model[0].weight.grad.is_cuda
    full = PerExampleGrads(model, F.cross_entropy)(x.cuda(), y.cuda())
    torch.testing.assert_close(full.grads.cpu(), ref_grads)


def test_benchmark_quick_runs(tmp_path: Path) -> None:
    output = tmp_path / "r.md"
    script = ROOT / "benchmarks" / "per_example_grads.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", "--output", str(output)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "loop / torch.func" in result.stdout
    assert "| MLP | 85,002 |" in output.read_text() and "| LeNet | 62,006 |" in output.read_text()


def test_grad_is_the_mean_of_per_example_gradients_and_the_documented_fixes_match_backward():
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    # ignore_index: .grad is the mean over all B of the per-example gradients (the ignored one's is 0)
    y = torch.tensor([0, -100, 1, 1])
    model.zero_grad(set_to_none=True)
    out = PerExampleGrads(model, F.cross_entropy)(x, y)
    assert torch.allclose(out.grads[1], torch.zeros_like(out.grads[1]))
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(flat, out.grads.mean(0), atol=1e-6)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert not torch.allclose(model.weight.grad, flat[:6].view(2, 3))   # differs, as documented
    keep = y != -100                                                      # the fix: drop them first
    model.zero_grad(set_to_none=True)
    PerExampleGrads(model, F.cross_entropy)(x[keep], y[keep])
    fixed = model.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert torch.allclose(fixed, model.weight.grad, atol=1e-6)
    # class weights: per example the weight cancels; reduction="sum" keeps it, then rescale by B / sum of weights
    weight, y = torch.tensor([1.0, 5.0]), torch.tensor([0, 1, 1, 0])
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, weight=weight).backward()
    expected = model.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    PerExampleGrads(model, lambda o, t: F.cross_entropy(o, t, weight=weight))(x, y)
    assert not torch.allclose(model.weight.grad, expected)
    model.zero_grad(set_to_none=True)
    PerExampleGrads(model, lambda o, t: F.cross_entropy(o, t, weight=weight, reduction="sum"))(x, y)
    assert torch.allclose(model.weight.grad * len(y) / weight[y].sum(), expected, atol=1e-6)
