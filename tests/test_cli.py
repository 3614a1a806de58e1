import subprocess
import sys

from pathlib import Path

import pytest

from dataorder.cli import main


def test_compare_prints_one_row_per_ordering(capsys):
    assert main(["compare", "--orders", "rr,so", "--epochs", "1", "--seeds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"rr", "so"}
    assert rows["rr"].split()[4] == "1.000"  # rr's ratio to itself


@pytest.mark.parametrize("argv, message", [
    (["compare", "--orders", "rr,nope"], "unknown nope"),
    (["compare", "--epochs", "0"], "--epochs"),
    (["compare", "--lr", "-1"], "--lr"),
])
def test_compare_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bench_lists_and_rejects_unknown(capsys):
    folder = str(Path(__file__).parents[1] / "benchmarks")
    assert main(["bench", "--dir", folder, "--list"]) == 0
    assert "sampler_throughput" in capsys.readouterr().out.split()
    assert main(["bench", "--dir", folder, "no_such_bench"]) == 2


def test_console_script_module_entry():
    out = subprocess.run([sys.executable, "-m", "dataorder", "--help"], capture_output=True, text=True, check=True)
    assert "compare" in out.stdout and "score" in out.stdout
