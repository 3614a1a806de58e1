import os

import pytest
import torch

# Keep tests deterministic and light on a shared 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"


@pytest.fixture(params=["auto", "factored", "dense"])
def ghost_form(request, monkeypatch):
    """Run a ghost test with each layer's form as chosen, all factored, or all dense.

    "factored" also groups every weighted sum of several rows by weight column.
    """
    from dataorder.ghost import factors

    if request.param != "auto":
        monkeypatch.setattr(factors, "_dense_is_cheaper", lambda *costs: request.param == "dense")
    if request.param == "factored":
        monkeypatch.setattr(factors, "GROUPED_MIN_SAVING", -(2 ** 62))
    return request.param


@pytest.fixture(params=["rows", "products"])
def exact_source(request, monkeypatch):
    """Run a test of the exact path (``attach(model, sketch=None)``) on each of its sources:
    dense rows built in the backward (what a small model gets), and the ghost products (what a
    model above ``DENSE_EXACT_MAX`` values gets)."""
    from dataorder.ordering import sources

    if request.param == "products":
        monkeypatch.setattr(sources, "DENSE_EXACT_MAX", -1)
    return request.param


@pytest.fixture
def force_projections(monkeypatch):
    """``force_projections(dtype)``: every sketch projection in ``dtype``, whatever its size
    (bfloat16 is emulated on a CPU without it)."""
    from dataorder.ghost import projections

    def force(dtype):
        monkeypatch.setattr(projections, "PROJECTION_DTYPE", dtype)
        monkeypatch.setattr(projections, "LOW_PRECISION_MIN_MACS", 0)
        monkeypatch.setattr(projections, "LOW_PRECISION_MIN_CONV_MACS", 0)
    return force
