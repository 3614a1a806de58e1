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


# -- time to quality in compare's table -------------------------------------------------------

def test_compare_table_has_the_time_to_quality_columns(capsys):
    assert main(["compare", "--orders", "rr,so", "--epochs", "2", "--seeds", "2", "--batch-size", "64",
                 "--evals-per-epoch", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[1]
    for column in ("time→rr", "epochs→rr", "cost/ep", "won", "test loss"):
        assert column in header
    rr = captured.out.splitlines()[2]
    assert rr.split()[0] == "rr"
    assert rr.split()[-5:] == ["1.000", "2", "(2)", "1.000", "0/2"]  # rr against itself: reached at its end
    assert captured.err == ""  # no progress bar when stderr is not a terminal


def test_compare_lr_schedule_flag_reaches_the_run_and_the_header(capsys, monkeypatch):
    from dataorder import training

    seen = []
    real = training.train_run
    monkeypatch.setattr(training, "train_run", lambda *a, **kw: seen.append(kw.get("lr_schedule")) or real(*a, **kw))
    assert main(["compare", "--orders", "rr", "--epochs", "1", "--seeds", "1", "--batch-size", "64",
                 "--lr-schedule", "cosine", "--quiet"]) == 0
    assert "lr 0.5 (cosine to 0), momentum" in capsys.readouterr().out.splitlines()[0]
    assert seen == [None, "cosine"]  # the untimed warm-up (two batches), then the timed run
    assert main(["compare", "--lr-schedule", "linear"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dataorder compare: error:") and "--lr-schedule: invalid choice: 'linear'" in err
    assert len(err.strip().splitlines()) == 1


def test_compare_lr_schedule_choices_are_the_training_loops():
    import argparse

    from dataorder.cli.commands.compare import configure
    from dataorder.training import LR_SCHEDULES

    parser = argparse.ArgumentParser()
    configure(parser)
    assert tuple(next(a for a in parser._actions if a.dest == "lr_schedule").choices) == LR_SCHEDULES


def test_progress_bar_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    import sys

    from dataorder.cli.commands.compare import _progress

    assert _progress(3, quiet=False).disable  # pytest's stderr is not a TTY
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = _progress(3, quiet=False)
    assert not bar.disable
    bar.close()
    assert _progress(3, quiet=True).disable


def test_plot_draws_loss_against_epochs_and_wall_clock(tmp_path, monkeypatch):
    import matplotlib.figure

    from dataorder.cli.commands.compare import plot_curves
    from dataorder.training import RunResult

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, path, **kw: saved.append([(a.get_xlabel(), a.get_lines()) for a in self.axes]))
    results = {"rr": [RunResult("rr", 0, [2.0, 1.0], [0, 1], [0.0, 3.0])],
               "grab": [RunResult("grab", 0, [2.0, 0.8], [0, 1], [0.0, 5.0])]}
    plot_curves(results, str(tmp_path / "x.png"))
    (epoch_label, epoch_lines), (time_label, time_lines) = saved[0]
    assert epoch_label == "epoch" and "wall-clock" in time_label
    grab = [line for line in time_lines if line.get_label() == "grab"][0]
    assert list(grab.get_xdata()) == [0.0, 5.0] and list(grab.get_ydata()) == [2.0, 0.8]


@pytest.mark.parametrize("argv", [["--data", "digits", "--model", "lm-tiny"], ["--data", "stdlib-lm", "--model", "mlp"],
                                  ["--orders", "rr,grab-sketch:0"], ["--evals-per-epoch", "0"],
                                  ["--data", "patterns32", "--augment", "qmc"]])
def test_compare_usage_errors(argv, capsys):
    assert main(["compare", "--epochs", "1", "--seeds", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dataorder compare: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("plot, message", [("{tmp}/missing/curves.png", "missing is not a folder"),
                                           ("{tmp}", "is a folder: give a file name"),
                                           ("{tmp}/curves.txt", "cannot save a figure as .txt"),
                                           ("/proc/curves.png", "/proc does not take new files here"),
                                           ("{tmp}/folder.png/", "is a folder: give a file name")])
def test_a_plot_that_cannot_be_saved_is_refused_before_anything_trains(plot, message, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    assert main(["compare", "--epochs", "1", "--seeds", "1", "--plot", plot.format(tmp=tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""                              # no header, no table: nothing was trained
    assert captured.err.startswith("dataorder compare: error: --plot: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compare_runs_the_stdlib_lm(tmp_path, capsys):
    plot = tmp_path / "lm.png"
    assert main(["compare", "--data", "stdlib-lm", "--orders", "rr,grab", "--epochs", "1", "--seeds", "1",
                 "--evals-per-epoch", "2", "--plot", str(plot), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "model lm-tiny" in out and "stdlib corpus " in out
    rows = rows_of(out.split("saved")[0])
    assert set(rows) == {"rr", "grab"} and float(rows["rr"][1]) < 5.55  # below a uniform byte guess
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_without_a_suffix_is_a_png_reported_by_the_name_written(tmp_path, capsys):
    assert main(["compare", "--orders", "rr", "--epochs", "1", "--seeds", "1", "--quiet", "--plot",
                 str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"saved loss curves to {tmp_path / 'curves.png'}"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "curves").exists()
