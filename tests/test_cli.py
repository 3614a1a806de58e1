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


def test_without_the_cli_extra_every_command_says_which_extra_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert main(["score", "--help"]) == 2
    err = capsys.readouterr().err
    assert err == "dataorder score: the command line needs the [cli] extra (missing tqdm): " \
                  "pip install 'dataorder[cli]'\n"


def test_library_errors_become_one_line_at_the_boundary(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: {a: 1, b: [\n")
    assert main(["schedule", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dataorder schedule: error: ")


def test_the_cli_modules_do_not_import_each_other_in_a_cycle():
    code = "import dataorder.cli.commands.score, dataorder.cli.commands.schedule; import dataorder.cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
