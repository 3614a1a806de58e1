"""Smoke runs of the benchmark scripts with ``--quick`` (slow: each spawns Python and times models)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run_quick(script: str, *extra: str, timeout: float) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *extra], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_grab_overhead_quick_times_both_paths() -> None:
    out = run_quick("grab_overhead.py", timeout=120)
    assert "GraB step (mean, sketch_dim=1024)" in out  # the materialised table is still there
    for row in ("ghost GraB step (mean)", "ghost GraB step (pair)", "vmap GraB step (mean)"):
        assert row in out
    for model in ("MLP 64-256-256-10", "LeNet 3x32x32", "Transformer 2L d128 T32"):
        assert f"{model}, mean:" in out
    assert "MLP ghost vs vmap (mean):" in out
    assert "plain + bare mean-balance products (floor)" in out


@pytest.mark.slow
def test_grab_overhead_large_models_run_small() -> None:
    out = run_quick("grab_overhead.py", "--only", "ghost", "--large", timeout=180)
    for model in ("ResNet-18 (GroupNorm) width 8", "Block stack 2L d64 T32"):
        assert f"{model}, mean:" in out


@pytest.mark.slow
def test_sketch_overhead_quick_runs_the_gpu_rows_models_small() -> None:
    out = run_quick("sketch_overhead.py", "--large", "--only", "LM-768", "ResNet-18", timeout=180)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["LM-768"], ["ResNet-18"])]
    steps = [(row[0], " ".join(row[3:5] if row[4] in ("ghost", "k=16") else row[3:4])) for row in rows]
    assert steps == [(model, step) for model in ("LM-768", "ResNet-18")
                     for step in ("plain", "exact ghost", "sketch k=16")]
    assert all(row[-1] == "-" for row in rows)  # no CUDA here: no synchronisations to count


@pytest.mark.parametrize("script", ["sketch_overhead.py", "grab_overhead.py"])
def test_an_unknown_device_is_a_one_line_usage_error(script) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--device", "gpu0"], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("unknown device 'gpu0': use cpu, cuda or cuda:N")


@pytest.mark.parametrize("script, argv, message", [
    ("time_to_quality.py", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("time_to_quality.py", ["--threads", "0"], "--threads must be >= 1, got 0"),
    ("time_to_quality.py", ["--orders", "rr,bogus"], "--orders: unknown ordering 'bogus'"),
    ("time_to_quality.py", ["--lr-schedule", "linear"], "--lr-schedule: invalid choice: 'linear'"),
    ("exact_rows.py", ["--hidden", "32,x"], "--hidden and --batches take comma-separated ints"),
    ("exact_rows.py", ["--batches", "0"], "--batches must be >= 1, got 0"),
])
def test_bad_arguments_are_one_usage_line_before_anything_is_timed(script, argv, message) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert message in result.stderr.strip().splitlines()[-1]


def test_grab_overhead_grouping_table() -> None:
    out = run_quick("grab_overhead.py", "--only", "ghost", "--grouping", "--grouping-batch", "32", timeout=120)
    rows = [line for line in out.splitlines() if line.strip().startswith("MLP 512-1024-1024-10")]
    assert len(rows) == 4 and sum("grouped by weight column" in row for row in rows) == 2


@pytest.mark.slow
def test_distributed_quick_reports_every_variant() -> None:
    out = run_quick("distributed.py", timeout=180)
    assert "d = 9610, sketch k = 1024, ghost factors per example = 330" in out
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("2 ")]
    assert [line[1:-4] for line in lines] == [["ddp+rr"], ["cd-grab", "full"], ["cd-grab", "sketch"],
                                             ["cd-grab", "sketch,", "1", "pass"], ["cd-grab", "ghost"]]
    # analytic bytes per rank at W=2, d=9610, B=16: all-reduce 2·d·4·½; all-gather B·k·4, where
    # the ghost path gathers each linear layer's input and output gradient: (64 + 128) + (128 + 10)
    kib = [float(line[-2]) for line in lines]
    assert kib == [round(9610 * 4 / 1024, 1), round(16 * 9610 * 4 / 1024, 1),
                   round((9610 * 4 + 16 * 1024 * 4) / 1024, 1), round((9610 * 4 + 16 * 1024 * 4) / 1024, 1),
                   round((9610 * 4 + 16 * 330 * 4) / 1024, 1)]


@pytest.mark.slow
def test_time_to_quality_quick_reports_every_workload() -> None:
    from dataorder.training import WORKLOADS

    out = run_quick("time_to_quality.py", timeout=120)
    for name, workload in WORKLOADS.items():
        assert f"\n{name}: {workload.model} on " in out
    assert "stdlib corpus " in out and "context 128" in out  # the corpus fingerprint and selection
    tables = [line.split() for line in out.splitlines() if line.strip().startswith(("rr ", "grab "))]
    assert len(tables) == 2 * len(WORKLOADS)
    assert all(row[1:3] == ["1.000", "1/1"] for row in tables if row[0] == "rr")
    assert "best GraB-family ordering per workload" in out


@pytest.mark.slow
def test_exact_rows_quick_times_both_sources() -> None:
    out = run_quick("exact_rows.py", timeout=120)
    [row] = [line.split() for line in out.splitlines() if line.split()[:1] == ["64-10"]]
    assert row[1:3] == ["650", "16"] and row[-2:] == ["dense", "rows"]  # logreg: 650 values, under the threshold
    assert all(float(ratio) > 0 for ratio in row[4:6])

