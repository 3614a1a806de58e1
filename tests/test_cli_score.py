"""`dataorder score` end to end: digits, a parquet file, crash-and-resume, and each bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataorder.cli import main
from dataorder.scores import load_scores, runner

FAST = ["--model", "logreg", "--runs", "2", "--epochs", "2", "--score-epoch", "1", "--no-progress"]


def score(*args: str) -> int:
    return main(["score", *args])


def test_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    assert score("--data", "digits", "--scores", "el2n,grand,loss,forgetting,aum,datamap", *FAST,
                 "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "digits, 1347 examples, 2 runs (2 computed, 0 reused)" in printed and "el2n" in printed
    assert {p.name for p in out.iterdir()} == {"manifest.json", "runs", "scores.parquet", "consistency.json",
                                               "scores.png"}
    table = pq.read_table(out / "scores.parquet")
    assert table.num_rows == 1347
    assert {"index", "el2n", "grand", "loss", "forgetting", "aum", "datamap_confidence", "datamap_variability",
            "datamap_correctness", "el2n_run0", "el2n_run1", "grand_run1"} <= set(table.column_names)
    el2n = load_scores(out, "el2n")
    assert el2n.shape == (1347,) and np.all((el2n >= 0) & (el2n <= np.sqrt(2)))
    report = json.loads((out / "consistency.json").read_text())
    assert -1 <= report["el2n"]["mean_pairwise"]["spearman"] <= 1


def write_parquet(path, n=80, seed=0, label="label"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    pq.write_table(pa.table({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "f3": x[:, 3], label: y}), path)
    return x, y


def test_parquet_file_end_to_end_with_a_label_column(tmp_path):
    data = tmp_path / "table.parquet"
    write_parquet(data, label="y")
    out = tmp_path / "out"
    assert score("--data", str(data), "--label-column", "y", "--scores", "el2n,aum", *FAST, "--out", str(out)) == 0
    assert load_scores(out, "aum").shape == (80,)
    assert json.loads((out / "manifest.json").read_text())["dataset"]["name"] == "table.parquet"


def test_crash_after_the_first_run_and_rerun_gives_the_identical_parquet(tmp_path, monkeypatch):
    data = tmp_path / "table.parquet"
    write_parquet(data)
    args = ["--data", str(data), "--scores", "el2n,loss,forgetting", *FAST]
    assert score(*args, "--out", str(tmp_path / "clean")) == 0
    real = runner.train_and_score
    started: list[int] = []

    def die_on_second_run(*a, **k):
        if started:
            raise KeyboardInterrupt  # as if the process were killed between runs
        started.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "train_and_score", die_on_second_run)
    assert score(*args, "--out", str(tmp_path / "crashed")) == 130
    assert not (tmp_path / "crashed" / "scores.parquet").exists()
    monkeypatch.setattr(runner, "train_and_score", real)
    assert score(*args, "--out", str(tmp_path / "crashed")) == 0
    assert (tmp_path / "crashed" / "scores.parquet").read_bytes() == \
        (tmp_path / "clean" / "scores.parquet").read_bytes()


def bad_npz(tmp_path, **columns):
    path = tmp_path / "bad.npz"
    np.savez(path, **columns)
    return str(path)


def truncated(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, x=X, label=Y)
    else:
        pq.write_table(pa.table({"x": X[:, 0], "label": Y}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


def renamed(tmp_path, name):
    """A parquet file under another suffix."""
    path = tmp_path / name
    pq.write_table(pa.table({"x": X[:, 0], "label": Y}), path)
    return str(path)


def csv(tmp_path, text):
    path = tmp_path / "table.csv"
    path.write_text(text)
    return str(path)


X = np.random.default_rng(0).normal(size=(20, 3))
Y = np.arange(20) % 3


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda tmp: ["--data", str(tmp / "missing.parquet")], "data not found"),
    (lambda tmp: ["--data", bad_npz(tmp, x=X, target=Y)], "no label column 'label'"),
    (lambda tmp: ["--data", bad_npz(tmp, x=X, label=Y - 1)], "labels out of range"),
    (lambda tmp: ["--data", bad_npz(tmp, x=X, label=Y), "--num-classes", "2"], "labels out of range"),
    (lambda tmp: ["--data", bad_npz(tmp, x=np.where(np.eye(20, 3) > 0, np.nan, X), label=Y)], "NaN"),
    (lambda tmp: ["--data", "digits", "--model", "no_such_pkg.models:make"], "cannot import model factory"),
    (lambda tmp: ["--data", "digits", "--model", "dataorder.models:no_such_factory"], "no callable"),
    (lambda tmp: ["--data", "digits", "--scores", "el2n,vibes"], "--scores: unknown score(s) vibes"),
    # issue 13, failure 5: each of these was a traceback
    (lambda tmp: ["--data", truncated(tmp, "t.npz")], "cannot read"),
    (lambda tmp: ["--data", truncated(tmp, "t.parquet")], "cannot read"),
    (lambda tmp: ["--data", renamed(tmp, "t.npz")], "cannot read"),
    (lambda tmp: ["--data", renamed(tmp, "t.csv")], "--data"),
    (lambda tmp: ["--data", csv(tmp, "a,a,label\n1,2,0\n3,4,1\n")], "duplicate column names ['a']"),
    (lambda tmp: ["--data", bad_npz(tmp, x=X, label=np.where(Y == 0, 2**63 - 1, Y))], "labels out of range"),
    (lambda tmp: ["--data", bad_npz(tmp, x=X, label=np.where(Y == 0, 2**63 + 5, Y).astype(np.uint64))],
     "labels out of range"),
    (lambda tmp: ["--data", bad_npz(tmp, x=X, label=np.where(Y == 0, 9.2e18, Y))], "labels out of range"),
    (lambda tmp: ["--data", bad_npz(tmp, big=np.where(np.eye(20, 3) > 0, 1e39, X), label=Y)],
     "feature column 'big' has values beyond float32's range"),
    (lambda tmp: ["--data", "digits", "--seed", str(2**64)], "--seed + runs - 1 must be < 2**64"),
    (lambda tmp: ["--data", "digits", "--seed", str(2**64 - 2), "--runs", "3"], "--seed + runs - 1 must be"),
    (lambda tmp: ["--data", "digits", "--lr", "1e38"], "lower the learning rate (--lr 1e+38)"),
    (lambda tmp: ["--data", "digits", "--epochs", "2", "--score-epoch", "3"], "--score-epoch (3) must be <="),
    (lambda tmp: ["--data", "digits", "--runs", "0"], "--runs must be an int >= 1"),
    (lambda tmp: ["--data", "digits", "--momentum", "nan"], "--momentum must be a finite number >= 0"),
    (lambda tmp: ["--data", "digits", "--device", "tpu"], "--device"),
    (lambda tmp: ["--data", "digits", "--scores", "grand", "--grand-params", "nothing_here"], "matches no parameter"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, capsys, make_args, message):
    out = tmp_path / "out"
    args = [*FAST, *make_args(tmp_path), "--out", str(out)]
    assert score(*args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("dataorder score: error: ") and message in error, error
    assert not (out / "scores.parquet").exists()
    if (out / "manifest.json").exists():  # only a job that started (diverged) leaves its manifest
        assert json.loads((out / "manifest.json").read_text())["complete"] is False


def test_an_out_under_a_regular_file_is_one_line_and_seeds_are_checked_before_any_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    assert score("--data", "digits", *FAST, "--out", str(blocker / "out")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a file, not a directory" in error and blocker.read_text() == "keep"
    assert score("--data", "digits", *FAST, "--seed", str(2**64), "--out", str(tmp_path / "seeded")) == 2
    assert not (tmp_path / "seeded").exists()


def test_a_diverged_run_exits_2_naming_lr_and_nothing_is_marked_complete(tmp_path, capsys):
    out = tmp_path / "out"
    assert score("--data", "digits", *FAST, "--scores", "el2n,aum", "--lr", "1e38", "--out", str(out)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "diverged" in error and "--lr" in error
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not (out / "scores.parquet").exists() and not list((out / "runs").iterdir())
    assert score("--data", "digits", *FAST, "--scores", "el2n,aum", "--out", str(out)) == 2  # settings differ
    assert "other settings (lr 1e+38 -> 0.05)" in capsys.readouterr().err


def test_out_holding_another_datasets_results_is_refused(tmp_path, capsys):
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet(first, seed=0)
    write_parquet(second, seed=1)
    out = tmp_path / "out"
    assert score("--data", str(first), "--scores", "loss", *FAST, "--out", str(out)) == 0
    capsys.readouterr()
    before = (out / "scores.parquet").read_bytes()
    assert score("--data", str(second), "--scores", "loss", *FAST, "--out", str(out)) == 2
    error = capsys.readouterr().err
    assert "holds scores of a different dataset (a.parquet, 80 examples)" in error and error.count("\n") == 1
    assert (out / "scores.parquet").read_bytes() == before          # the old results stay intact


@pytest.mark.slow
def test_sigkill_during_the_second_run_then_rerun_gives_the_identical_parquet(tmp_path):
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "dataorder", "score", "--data", "digits", "--model", "mlp", "--scores",
               "el2n,aum", "--runs", "2", "--epochs", "8", "--score-epoch", "4", "--no-progress", "--out"]
    subprocess.run([*command, str(tmp_path / "clean")], check=True, timeout=600, capture_output=True)
    crashed = tmp_path / "crashed"
    process = subprocess.Popen([*command, str(crashed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (crashed / "runs" / "run0.npz").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup handlers run
    process.wait(timeout=60)
    if (crashed / "runs" / "run1.npz").exists():
        pytest.skip("the job finished its second run before it could be killed")
    assert (crashed / "runs" / "run0.npz").exists() and not (crashed / "scores.parquet").exists()
    rerun = subprocess.run([*command, str(crashed)], check=True, timeout=600, capture_output=True, text=True)
    assert "(1 computed, 1 reused)" in rerun.stdout
    assert (crashed / "scores.parquet").read_bytes() == (tmp_path / "clean" / "scores.parquet").read_bytes()


def one_line_and_no_output(capsys, out) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("dataorder score: error: ") and "Traceback" not in error, error
    assert not out.exists()
    return error


@pytest.mark.parametrize("flag, value, applies", [
    ("--num-classes", "3", "numeric or image data files"),
    ("--label-column", "y", "a data file"),
    ("--image-size", "8", "image data"),
    ("--context", "8", "text data"),
    ("--tokenizer", "pkg.mod:encode", "text data"),
    ("--text-column", "body", "text data"),
    ("--windows", "truncate", "text data"),
    ("--reference-split", "0.1", "text"),
])
def test_a_data_flag_that_does_not_apply_to_digits_is_refused(tmp_path, capsys, flag, value, applies):
    out = tmp_path / "out"
    assert score("--data", "digits", *FAST, flag, value, "--out", str(out)) == 2
    error = one_line_and_no_output(capsys, out)
    assert f"{flag} applies to {applies}" in error and "digits is the built-in dataset" in error


@pytest.mark.parametrize("flag, value", [("--context", "8"), ("--image-size", "8"), ("--windows", "truncate")])
def test_a_data_flag_that_does_not_apply_to_a_numeric_file_is_refused(tmp_path, capsys, flag, value):
    data = tmp_path / "table.parquet"
    write_parquet(data)
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, flag, value, "--out", str(out)) == 2
    error = one_line_and_no_output(capsys, out)
    assert f"{flag} applies to " in error and "table.parquet is numeric data" in error


@pytest.mark.parametrize("flag", ["--lr", "--momentum", "--weight-decay"])
def test_float_flags_beyond_float32_are_refused_before_any_file(tmp_path, capsys, flag):
    out = tmp_path / "out"
    assert score("--data", "digits", *FAST, flag, "1e39", "--out", str(out)) == 2
    error = one_line_and_no_output(capsys, out)
    assert f"{flag} must be a finite number" in error and "<= 3.4e+38" in error


def test_grand_params_with_one_unknown_name_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert score("--data", "digits", *FAST, "--scores", "grand", "--grand-params", "1.weight,nosuch",
                 "--out", str(out)) == 2
    assert "'nosuch' matches no parameter" in one_line_and_no_output(capsys, out)


def test_resuming_with_the_same_scores_in_another_order_reuses_the_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert score("--data", "digits", *FAST, "--scores", "el2n,loss", "--out", str(out)) == 0
    capsys.readouterr()
    assert score("--data", "digits", *FAST, "--scores", "loss,el2n", "--out", str(out)) == 0
    assert "(0 computed, 2 reused)" in capsys.readouterr().out


def test_a_built_in_model_that_does_not_fit_the_data_says_what_it_takes(tmp_path, capsys):
    data = tmp_path / "table.parquet"
    write_parquet(data)
    assert score("--data", str(data), "--model", "lm-tiny", "--runs", "1", "--epochs", "1", "--score-epoch", "1",
                 "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm-tiny takes byte-token text" in err[0]
    assert not (tmp_path / "out").exists()
