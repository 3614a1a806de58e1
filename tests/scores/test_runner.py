"""The train-and-score loop: scoring passes, determinism, output files, resume, distributed merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from dataorder.distributed import _free_port as free_port
from dataorder.models import build_model
from dataorder.scores import functional, load_scores, runner
from dataorder.scores.io import read_metadata
from dataorder.scores.runner import ScoreConfig, ScoreSetupError, score_dataset, score_model, train_and_score


def toy(n: int = 96, features: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, :classes] + 0.8 * torch.randn(n, classes, generator=generator)).argmax(dim=1)
    return x, y


FAST = dict(model="logreg", runs=2, epochs=2, score_epoch=1, batch_size=16, lr=0.1)


def test_score_model_matches_functional_scores_and_leaves_training_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = toy(20)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)           # a half-accumulated training gradient
    model.train()
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    scores = score_model(model, batches, ["el2n", "loss", "margin", "grand", "aum"], grand_params="last")
    assert sorted(scores) == ["el2n", "grand", "loss", "margin"]
    assert model.training and all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    with torch.no_grad():
        logits = model.eval()(x)
    np.testing.assert_allclose(scores["el2n"], functional.el2n(logits, y).numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores["margin"], functional.margin(logits, y).numpy(), rtol=1e-5, atol=1e-6)
    loop = []
    for i in range(len(y)):                         # GraNd over the last layer, one backward per example
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        loop.append(torch.cat([model[3].weight.grad.flatten(), model[3].bias.grad]).norm().item())
    np.testing.assert_allclose(scores["grand"], loop, rtol=1e-4)


def test_parameter_subset():
    model = build_model("mlp", (4,), 3)
    assert runner.parameter_subset(model, "all") is None
    assert runner.parameter_subset(model, "last") == ["5.weight", "5.bias"]
    assert runner.parameter_subset(model, "1,5.bias") == ["1.weight", "1.bias", "5.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        runner.parameter_subset(model, "head")


def test_a_run_is_a_pure_function_of_its_seed():
    x, y = toy()
    config = ScoreConfig(scores=("el2n", "forgetting", "aum", "datamap"), **FAST)
    first = train_and_score(x, y, 3, config, run=0)
    again = train_and_score(x, y, 3, config, run=0)
    other = train_and_score(x, y, 3, config, run=1)
    assert list(first) == ["el2n", "forgetting", "aum", "datamap_confidence", "datamap_variability",
                           "datamap_correctness"]
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["el2n"], other["el2n"])


def test_scoring_passes_do_not_disturb_training():
    x, y = toy()
    plain = train_and_score(x, y, 3, ScoreConfig(scores=("aum", "datamap"), **FAST), run=0)
    scored = train_and_score(x, y, 3, ScoreConfig(scores=("aum", "grand", "el2n", "datamap"), **FAST), run=0)
    assert np.array_equal(plain["aum"], scored["aum"])
    assert np.array_equal(plain["datamap_confidence"], scored["datamap_confidence"])


def test_score_epoch_zero_scores_the_initial_model():
    x, y = toy()
    config = ScoreConfig(scores=("el2n",), model="logreg", runs=1, epochs=1, score_epoch=0)
    scores = train_and_score(x, y, 3, config, run=0)
    torch.manual_seed(0)                            # run 0 uses seed 0 for the initial weights
    with torch.no_grad():
        expected = functional.el2n(build_model("logreg", (6,), 3)(x), y).numpy()
    np.testing.assert_allclose(scores["el2n"], expected, rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown score.*nope"):
        ScoreConfig(scores=("el2n", "nope"))
    with pytest.raises(ValueError, match="score_epoch \\(5\\) must be <= epochs \\(2\\)"):
        ScoreConfig(epochs=2, score_epoch=5)
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        ScoreConfig(runs=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        ScoreConfig(lr=0.0)


def test_output_files_follow_the_format_contract(tmp_path):
    x, y = toy()
    config = ScoreConfig(scores=("el2n", "loss", "forgetting", "datamap"), **FAST)
    result = score_dataset(x, y, 3, config, tmp_path / "out", name="toy", progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["consistency.json", "manifest.json", "runs", "scores.parquet",
                                                     "scores.png"]
    table = pq.read_table(out / "scores.parquet")
    columns = ["el2n", "loss", "forgetting", "datamap_confidence", "datamap_variability", "datamap_correctness"]
    assert table.column_names == ["index", *columns, *[f"{c}_run{r}" for c in columns for r in range(2)]]
    assert table.schema.field("index").type == "int64"
    np.testing.assert_array_equal(table.column("index").to_numpy(), np.arange(len(y)))
    for column in columns:
        runs = np.stack([table.column(f"{column}_run{r}").to_numpy() for r in range(2)])
        np.testing.assert_array_equal(table.column(column).to_numpy(), runs.mean(axis=0))
        np.testing.assert_array_equal(load_scores(out, column), runs.mean(axis=0))
    direct = train_and_score(x, y, 3, config, run=1)
    np.testing.assert_array_equal(load_scores(out / "scores.parquet", "el2n", run=1), direct["el2n"])
    report = json.loads((out / "consistency.json").read_text())
    assert set(report) == set(columns) and report["el2n"]["runs"] == 2
    assert report == json.loads(json.dumps(result.consistency, default=float).replace("NaN", "null"))
    metadata = read_metadata(out)
    assert metadata["complete"] and metadata["runs"] == 2 and metadata["dataset"]["examples"] == len(y)
    assert metadata["higher_means"]["el2n"] == "harder"
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="several scores"):
        load_scores(out)
    with pytest.raises(ValueError, match="no column 'aum'"):
        load_scores(out, "aum")


def test_crash_after_the_first_run_then_resume_gives_the_identical_parquet(tmp_path, monkeypatch):
    x, y = toy()
    config = ScoreConfig(scores=("el2n", "aum"), **{**FAST, "runs": 3})
    score_dataset(x, y, 3, config, tmp_path / "clean", progress=False, plot=False)

    real = runner.train_and_score
    calls: list[int] = []

    def crash_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated crash")
        calls.append(kwargs.get("run", args[4] if len(args) > 4 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_and_score", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(x, y, 3, config, tmp_path / "crashed", progress=False, plot=False)
    crashed = tmp_path / "crashed"
    assert [p.name for p in (crashed / "runs").iterdir()] == ["run0.npz"]
    assert not (crashed / "scores.parquet").exists()           # nothing looks complete
    assert json.loads((crashed / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr(runner, "train_and_score", real)
    result = score_dataset(x, y, 3, config, crashed, progress=False, plot=False)
    assert result.reused == [0] and result.computed == [1, 2]
    assert (crashed / "scores.parquet").read_bytes() == (tmp_path / "clean" / "scores.parquet").read_bytes()


def test_more_runs_reuse_finished_ones_and_stale_outputs_are_removed(tmp_path, monkeypatch):
    x, y = toy()
    config = ScoreConfig(scores=("loss",), **FAST)
    score_dataset(x, y, 3, config, tmp_path, progress=False, plot=False)
    grown = ScoreConfig(scores=("loss",), **{**FAST, "runs": 3})

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "train_and_score", fail)
    with pytest.raises(RuntimeError):
        score_dataset(x, y, 3, grown, tmp_path, progress=False, plot=False)
    assert not (tmp_path / "scores.parquet").exists() and not (tmp_path / "consistency.json").exists()
    monkeypatch.undo()
    result = score_dataset(x, y, 3, grown, tmp_path, progress=False, plot=False)
    assert result.reused == [0, 1] and result.computed == [2]
    assert pq.read_table(tmp_path / "scores.parquet").column_names[-1] == "loss_run2"


def test_out_holding_other_results_is_refused_before_anything_is_written(tmp_path):
    x, y = toy()
    config = ScoreConfig(scores=("loss",), **FAST)
    score_dataset(x, y, 3, config, tmp_path / "out", name="toy", progress=False, plot=False)
    before = (tmp_path / "out" / "scores.parquet").read_bytes()
    other_x, other_y = toy(seed=1)
    with pytest.raises(ScoreSetupError, match="different dataset \\(toy, 96 examples\\)"):
        score_dataset(other_x, other_y, 3, config, tmp_path / "out", progress=False, plot=False)
    with pytest.raises(ScoreSetupError, match="other settings \\(epochs 2 -> 3\\)"):
        score_dataset(x, y, 3, ScoreConfig(scores=("loss",), **{**FAST, "epochs": 3}), tmp_path / "out",
                      progress=False, plot=False)
    assert (tmp_path / "out" / "scores.parquet").read_bytes() == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ScoreSetupError, match="not empty"):
        score_dataset(x, y, 3, config, tmp_path / "busy", progress=False, plot=False)
    with pytest.raises(ScoreSetupError, match="cannot import model factory"):
        score_dataset(x, y, 3, ScoreConfig(scores=("loss",), **{**FAST, "model": "nowhere_xyz:make"}),
                      tmp_path / "fresh", progress=False, plot=False)
    assert not (tmp_path / "fresh").exists()


def test_a_factory_with_wrong_output_shape_is_refused():
    with pytest.raises(ScoreSetupError, match="expected \\(2, 3\\) logits"):
        runner.check_model("tests.scores.test_runner:two_outputs", (6,), 3)


def two_outputs(in_shape, num_classes):  # a model factory for the test above
    return nn.Linear(in_shape[0], 2)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_split_the_runs_and_rank_zero_writes_the_merged_result(tmp_path):
    x, y = toy()
    np.savez(tmp_path / "toy.npz", x=x.numpy(), label=y.numpy())
    args = ["--data", str(tmp_path / "toy.npz"), "--model", "logreg", "--scores", "el2n,aum", "--runs", "3",
            "--epochs", "2", "--score-epoch", "1", "--batch-size", "16", "--lr", "0.1", "--no-progress"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([sys.executable, "-m", "dataorder", "score", *args, "--out", str(tmp_path / "dist")],
                         env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "3 runs (3 computed" in outputs[0][0] and outputs[1][0] == ""   # only rank 0 reports
    merged = pq.read_table(tmp_path / "dist" / "scores.parquet")
    config = ScoreConfig(scores=("el2n", "aum"), **{**FAST, "runs": 3})
    for run in range(3):                                                  # rank 1 did run 1
        expected = train_and_score(x, y, 3, config, run=run)
        for column in ("el2n", "aum"):
            np.testing.assert_allclose(merged.column(f"{column}_run{run}").to_numpy(), expected[column],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scoring_benchmark_quick_smoke():
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "scoring.py")
    done = subprocess.run([sys.executable, bench, "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for heading in ("1. throughput", "2. peak memory", "3. data diet", "random 50%"):
        assert heading in done.stdout


# -- regressions: issue 13, failure 5 ------------------------------------------------------------


def test_divergence_is_caught_at_the_first_non_finite_batch_before_its_update(monkeypatch):
    x, y = toy()
    config = ScoreConfig(scores=("loss",), **{**FAST, "lr": 1e38, "momentum": 0.0, "weight_decay": 0.0})
    steps: list[int] = []
    real_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    with pytest.raises(runner.DivergedError, match="run 0 diverged .* lower the learning rate") as error:
        train_and_score(x, y, 3, config, run=0)
    # every batch before the bad one updated the model; the bad one did not (its loss came first)
    assert (error.value.epoch, error.value.batch) == (0, 2) and len(steps) == 2


def test_a_diverged_job_writes_no_run_and_is_not_marked_complete(tmp_path):
    x, y = toy()
    config = ScoreConfig(scores=("loss", "aum"), **{**FAST, "lr": 1e38})
    with pytest.raises(runner.DivergedError):
        score_dataset(x, y, 3, config, tmp_path, progress=False, plot=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False
    assert not (tmp_path / "scores.parquet").exists() and list((tmp_path / "runs").iterdir()) == []


def test_non_finite_scores_from_the_scoring_pass_are_divergence_too(monkeypatch):
    x, y = toy()
    monkeypatch.setitem(runner.FUNCTIONAL, "loss", lambda logits, targets: torch.full((len(targets),), float("nan")))
    with pytest.raises(runner.DivergedError, match="non-finite loss scores"):
        train_and_score(x, y, 3, ScoreConfig(scores=("loss",), **FAST), run=0)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_length"])
def test_a_damaged_run_file_is_recomputed_and_the_result_is_identical(tmp_path, damage):
    x, y = toy()
    config = ScoreConfig(scores=("loss",), **FAST)
    score_dataset(x, y, 3, config, tmp_path / "clean", progress=False, plot=False)
    out = tmp_path / "damaged"
    score_dataset(x, y, 3, config, out, progress=False, plot=False)
    run0 = out / "runs" / "run0.npz"
    if damage == "truncate":
        run0.write_bytes(run0.read_bytes()[: len(run0.read_bytes()) // 2])
    elif damage == "garbage":
        run0.write_bytes(b"not a zip at all")
    else:
        np.savez(run0, key=np.load(run0)["key"], loss=np.zeros(5))
    result = score_dataset(x, y, 3, config, out, progress=False, plot=False)
    assert result.computed == [0] and result.reused == [1]
    assert (out / "scores.parquet").read_bytes() == (tmp_path / "clean" / "scores.parquet").read_bytes()


def test_seeds_at_or_beyond_2_to_the_64_are_refused_by_the_config():
    ScoreConfig(runs=1, seed=2**64 - 1)  # the largest seed torch.manual_seed takes
    with pytest.raises(runner.ScoreConfigError, match="seed \\+ runs - 1 must be < 2\\*\\*64") as error:
        ScoreConfig(runs=2, seed=2**64 - 1)
    assert error.value.field == "seed"
    with pytest.raises(runner.ScoreConfigError):
        ScoreConfig(runs=1, seed=2**64)


def test_an_out_under_a_regular_file_is_refused_and_the_file_is_untouched(tmp_path):
    x, y = toy()
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    with pytest.raises(ScoreSetupError, match="is a file, not a directory"):
        score_dataset(x, y, 3, ScoreConfig(scores=("loss",), **FAST), blocker / "sub" / "out", progress=False)
    assert blocker.read_text() == "keep me"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temp_files_of_a_killed_job_are_removed_and_a_live_jobs_are_kept(tmp_path):
    x, y = toy()
    config = ScoreConfig(scores=("loss",), **FAST)
    score_dataset(x, y, 3, config, tmp_path, progress=False, plot=False)
    dead = dead_pid()
    stale = [tmp_path / "runs" / f".run1.npz.tmp{dead}", tmp_path / f".scores.parquet.tmp{dead}"]
    live = tmp_path / f".manifest.json.tmp{os.getppid()}"  # a running process (pytest's parent)
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    score_dataset(x, y, 3, config, tmp_path, progress=False, plot=False)
    assert not any(path.exists() for path in stale) and live.exists()


def test_a_directory_holding_only_the_empty_runs_of_a_job_killed_at_start_is_accepted(tmp_path):
    x, y = toy()
    (tmp_path / "out" / "runs").mkdir(parents=True)
    result = score_dataset(x, y, 3, ScoreConfig(scores=("loss",), **FAST), tmp_path / "out", progress=False,
                           plot=False)
    assert result.computed == [0, 1] and (tmp_path / "out" / "scores.parquet").exists()
    (tmp_path / "full" / "runs").mkdir(parents=True)
    (tmp_path / "full" / "runs" / "notes.txt").write_text("mine")
    with pytest.raises(ScoreSetupError, match="not empty"):
        score_dataset(x, y, 3, ScoreConfig(scores=("loss",), **FAST), tmp_path / "full", progress=False)


@pytest.mark.parametrize(("x", "y", "classes", "message"), [
    (torch.full((4, 2), float("inf")), torch.tensor([0, 1, 0, 1]), 2, "x: row 0 has NaN or infinite"),
    (torch.zeros(4, 2), torch.tensor([0, 1, 0, 2]), 2, "labels must be class ids in \\[0, 2\\), found 2"),
    (torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), 2**31, "num_classes must be an int"),
])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, x, y, classes, message):
    with pytest.raises(ValueError, match=message):
        score_dataset(x, y, classes, ScoreConfig(scores=("loss",), **FAST), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_grand_params_refuses_every_unknown_name_even_beside_a_known_one():
    model = build_model("logreg", (4,), 3)
    assert runner.parameter_subset(model, "1.weight") == ["1.weight"]
    with pytest.raises(ValueError, match="grand_params 'nosuch' matches no parameter"):
        runner.parameter_subset(model, "1.weight,nosuch")


def test_float_settings_beyond_float32_are_refused_naming_the_field():
    for name in ("lr", "momentum", "weight_decay"):
        with pytest.raises(runner.ScoreConfigError, match=f"^{name} must be a finite number .* <= 3.4e\\+38") as error:
            ScoreConfig(**{name: 1e39})
        assert error.value.field == name
    assert ScoreConfig(lr=1e38).lr == 1e38  # within float32: a learning rate that diverges, not a config error


def test_the_same_scores_in_another_order_reuse_the_finished_runs(tmp_path):
    x, y = toy()
    score_dataset(x, y, 3, ScoreConfig(scores=("el2n", "loss"), **FAST), tmp_path, progress=False, plot=False)
    result = score_dataset(x, y, 3, ScoreConfig(scores=("loss", "el2n"), **FAST), tmp_path, progress=False,
                           plot=False)
    assert result.reused == [0, 1] and result.computed == [] and result.columns == ["loss", "el2n"]
    assert pq.read_table(tmp_path / "scores.parquet").column_names[1:3] == ["loss", "el2n"]
    with pytest.raises(ScoreSetupError, match="other settings \\(scores"):  # another set is other settings
        score_dataset(x, y, 3, ScoreConfig(scores=("loss",), **FAST), tmp_path, progress=False, plot=False)
