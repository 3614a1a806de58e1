"""The fast forms of a sketch's projections: the same values as the plain products, to their rounding."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dataorder.ghost import GhostGrads, projections
from dataorder.ordering import GraBSampler


@pytest.fixture
def bf16(force_projections):
    force_projections(torch.bfloat16)


GEOMETRIES = [  # kernel, dilation, padding, stride; input (C, H, W)
    (((3, 3), (1, 1), (1, 1), (1, 1)), (16, 6, 5)),
    (((3, 3), (1, 1), (0, 0), (1, 1)), (16, 7, 7)),
    (((5, 3), (1, 1), (2, 0), (1, 1)), (20, 9, 6)),
    (((3, 3), (2, 1), (2, 1), (1, 1)), (16, 8, 8)),
    (((1, 1), (1, 1), (0, 0), (1, 1)), (32, 4, 4)),
    (((3, 3), (1, 1), (1, 1), (2, 2)), (16, 8, 8)),  # strided: a convolution
]


@pytest.mark.parametrize("geometry, shape", GEOMETRIES)
def test_patch_projection_equals_the_convolution_with_its_kernel(geometry, shape):
    generator = torch.Generator().manual_seed(0)
    (kh, kw), dilation, padding, stride = geometry
    kernel = torch.randn(4, shape[0], kh, kw, generator=generator)
    x = torch.randn(3, *shape, generator=generator)
    patches = projections.PatchMap.of(kernel, geometry)
    assert (patches.stacked is not None) == (stride == (1, 1))  # 4 outputs, ≥ 16 channels, on the CPU
    reference = F.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation).flatten(2)
    got = patches(x)
    assert got.shape == reference.shape
    assert torch.allclose(got, reference, atol=1e-5 * float(reference.abs().max()))


def test_shifted_products_are_kept_to_few_outputs_and_enough_channels():
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
    assert projections.PatchMap.of(torch.randn(4, 16, 3, 3), geometry).stacked is not None
    assert projections.PatchMap.of(torch.randn(16, 16, 3, 3), geometry).stacked is None  # k_in > 8
    assert projections.PatchMap.of(torch.randn(4, 3, 3, 3), geometry).stacked is None  # 3 channels


@pytest.mark.parametrize("geometry, shape", GEOMETRIES)
def test_bf16_patch_projection_is_within_its_rounding(geometry, shape, bf16):
    generator = torch.Generator().manual_seed(1)
    (kh, kw), dilation, padding, stride = geometry
    kernel = torch.randn(4, shape[0], kh, kw, generator=generator)
    x = torch.randn(3, *shape, generator=generator)
    got = projections.PatchMap.of(kernel, geometry)(x)
    reference = F.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation).flatten(2)
    assert got.dtype == torch.float32
    assert torch.allclose(got, reference, atol=2e-2 * float(reference.abs().max()))
    assert not torch.equal(got, reference)  # the products did run in bfloat16


def test_row_map_runs_large_products_in_bf16_and_small_ones_in_float32(monkeypatch):
    monkeypatch.setattr(projections, "PROJECTION_DTYPE", torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(16, 128, generator=generator)
    rows = projections.RowMap.of(matrix)
    assert rows.low.dtype == torch.bfloat16
    small = torch.randn(8, 128, generator=generator)  # 16·8·128 multiply-adds: float32
    assert torch.equal(rows.right(small), F.linear(small, matrix))
    large = torch.randn(1024, 128, generator=generator)  # 2.1M multiply-adds: bfloat16
    got, reference = rows.right(large), F.linear(large, matrix)
    assert got.dtype == torch.float32 and not torch.equal(got, reference)
    assert torch.allclose(got, reference, atol=2e-2 * float(reference.abs().max()))
    left = rows.left(large.T[None].contiguous())
    assert torch.allclose(left, reference.T[None], atol=2e-2 * float(reference.abs().max()))


def test_float32_and_an_unknown_dtype(monkeypatch):
    monkeypatch.setattr(projections, "PROJECTION_DTYPE", torch.float32)
    assert projections.low_precision_dtype(torch.device("cpu")) is None
    assert projections.RowMap.of(torch.randn(2, 3)).low is None
    monkeypatch.setattr(projections, "PROJECTION_DTYPE", torch.float16)
    with pytest.raises(ValueError, match="PROJECTION_DTYPE must be None, torch.float32 or torch.bfloat16"):
        projections.low_precision_dtype(torch.device("cpu"))


def test_a_bad_dtype_is_refused_at_attach_and_leaves_no_hooks(monkeypatch):
    monkeypatch.setattr(projections, "PROJECTION_DTYPE", "bf16")
    model = nn.Linear(3, 2)
    sampler = GraBSampler(4)
    with pytest.raises(ValueError, match="PROJECTION_DTYPE must be None"):
        sampler.attach(model, sketch=2)
    assert not model._forward_hooks and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="needs sampler.attach"):
        sampler.step()  # nothing was attached


def test_auto_keeps_float32_off_the_cpu():
    assert projections.low_precision_dtype(torch.device("meta")) is None


class Net(nn.Module):
    """A sequence linear layer, an embedding and a stride-1 convolution: every fast form."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.mix = nn.Linear(24, 40)
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Linear(40 + 12, 3)

    def forward(self, tokens, image):
        text = self.mix(self.embed(tokens)).mean(dim=1)
        return self.head(torch.cat([text, self.conv(image).mean(dim=(2, 3))], dim=1))


def sketch_rows(k, seed=0):
    torch.manual_seed(0)
    model = Net()
    generator = torch.Generator().manual_seed(3)
    tokens, image = torch.randint(0, 50, (6, 10), generator=generator), torch.randn(6, 16, 5, 5, generator=generator)
    ghost = GhostGrads(model, sketch=k, seed=seed)
    F.cross_entropy(model(tokens, image), torch.arange(6) % 3).backward()
    [rows] = ghost.collect_sketch()
    ghost.remove()
    return rows


def test_bf16_sketch_rows_are_deterministic_and_near_the_float32_ones(monkeypatch, force_projections):
    monkeypatch.setattr(projections, "PROJECTION_DTYPE", torch.float32)
    reference = sketch_rows(4)
    force_projections(torch.bfloat16)
    first, again = sketch_rows(4), sketch_rows(4)
    assert torch.equal(first, again)
    assert not torch.equal(first, reference)
    assert torch.allclose(first, reference, atol=2e-2 * float(reference.abs().max()))


class Mlp(nn.Module):
    """Linear layers on sequences and on rows, a bias longer than k², a side kept exact."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(12, 40), nn.Linear(40, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))).mean(dim=1))


def autocast_rows(k, to_float32):
    """Sketch rows of one bf16-autocast step; ``to_float32``: the captured tensors widened first (the old way)."""
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(1))
    ghost = GhostGrads(model, sketch=k)
    add_linear, seen = ghost._sketcher.add_linear, set()

    def spy(target, weight, bias, a, d, shape):
        seen.update({a.dtype, d.dtype})
        return add_linear(target, weight, bias, a.float() if to_float32 else a, d.float() if to_float32 else d, shape)
    ghost._sketcher.add_linear = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.arange(5) % 3)
    loss.backward()
    [rows] = ghost.collect_sketch()
    ghost.remove()
    assert torch.bfloat16 in seen                          # the layers' captures really are bf16
    return rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [4, 16])
def test_autocast_inputs_are_projected_as_captured_with_the_same_rows(dtype, k, force_projections):
    """bf16 → float32 → bf16 is exact, so projecting a bf16 capture as it is changes no bit (and skips two copies)."""
    force_projections(dtype)
    rows = autocast_rows(k, to_float32=False)
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    assert torch.equal(rows, autocast_rows(k, to_float32=True))


def test_a_row_map_takes_bf16_inputs_on_both_paths(force_projections):
    x = torch.randn(6, 30).bfloat16()
    matrix = torch.randn(4, 30)
    small = projections.RowMap(matrix)                     # no low copy: float32 product
    assert torch.equal(small.right(x), F.linear(x.float(), matrix))
    assert torch.equal(small.left(x.T[None]), torch.matmul(matrix, x.T[None].float()))
    force_projections(torch.bfloat16)
    low = projections.RowMap.of(matrix)
    assert torch.equal(low.right(x), F.linear(x, matrix.bfloat16()).float())
