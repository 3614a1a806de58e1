"""``dataorder compare`` with the gradient-balancing orderings."""

import pytest

from dataorder.cli import main
from dataorder.orderings import ORDERINGS, GradientOrdering, make_ordering


def rows_of(output):
    lines = output.splitlines()
    return {line.split()[0]: line.split() for line in lines[2:] if line.split()}


def test_every_balancing_ordering_is_registered():
    for name in ("grab", "pair", "recursive", "herding", "flipflop"):
        assert name in ORDERINGS
    assert make_ordering("recursive").make_sampler(10, seed=0).balance == "recursive"
    assert type(make_ordering("herding").make_sampler(10, seed=0)).__name__ == "HerdingSampler"


def test_compare_runs_all_balancing_orderings(capsys):
    orders = "rr,flipflop,grab,pair,recursive,herding"
    assert main(["compare", "--orders", orders, "--epochs", "2", "--seeds", "1", "--batch-size", "64"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert list(rows) == orders.split(",")
    for name, row in rows.items():
        loss, ratio = float(row[1]), float(row[4])
        assert 0 < loss < 2.3  # below the loss of a uniform guess over 10 classes
        assert ratio == pytest.approx(loss / float(rows["rr"][1]), abs=1e-3)


def test_compare_mlp_with_grab_and_plot(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    argv = ["compare", "--model", "mlp", "--orders", "rr,grab", "--epochs", "1", "--seeds", "1",
            "--batch-size", "64", "--plot", str(plot)]
    assert main(argv) == 0
    assert set(rows_of(capsys.readouterr().out.split("saved")[0])) == {"rr", "grab"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_ordering_sketches_large_models_for_herding():
    from torch import nn

    ordering = make_ordering("herding")
    assert isinstance(ordering, GradientOrdering)
    model = nn.Linear(100, 100)  # 10,100 parameters > 4096
    ordering.attach(model, nn.functional.cross_entropy, ordering.make_sampler(10, seed=0))
    assert ordering._per_example.dim == 1024


@pytest.mark.slow
def test_demo_shows_grab_beating_rr(capsys):
    assert main(["compare", "--data", "digits", "--model", "logreg", "--orders", "rr,so,grab",
                 "--epochs", "10", "--seeds", "3"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert float(rows["grab"][4]) < 1.0


@pytest.mark.parametrize("script", [
    "convergence.py",
    "grab_overhead.py",
    pytest.param("grab_memory.py", marks=pytest.mark.slow),  # ~10 s: a fresh process per n
])
def test_benchmark_quick_runs(script):
    import subprocess
    import sys
    from pathlib import Path

    folder = Path(__file__).parents[1] / "benchmarks"
    out = subprocess.run([sys.executable, str(folder / script), "--quick"], cwd=folder,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "machine:" in out.stdout


def test_grab_ordering_uses_the_ghost_path_by_default_and_vmap_on_request():
    from dataorder.orderings import make_ordering

    assert make_ordering("grab").ghost and make_ordering("pair").ghost
    assert not make_ordering("grab", grads="vmap").ghost
    assert not make_ordering("herding").ghost  # herding stores per-example gradients
