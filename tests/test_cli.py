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


def test_bench_on_a_folder_without_scripts_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no benchmark scripts" in err[0]


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


CORE_WITHOUT_EXTRAS = """
import importlib, pkgutil, sys
BLOCKED = {"sklearn", "datasets", "tqdm", "matplotlib", "pyarrow", "pandas"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import dataorder, dataorder.samplers, dataorder.ghost
names = ["dataorder.samplers." + m.name for m in pkgutil.iter_modules(dataorder.samplers.__path__)]
names += ["dataorder.ghost." + m.name for m in pkgutil.iter_modules(dataorder.ghost.__path__)]
names += ["dataorder.grads", "dataorder.schedules", "dataorder.scores", "dataorder.scores.gradnorm",
          "dataorder.distributed", "dataorder.errors"]
for name in names:
    importlib.import_module(name)
for name in dataorder.__all__:
    getattr(dataorder, name)
from dataorder.errors import MissingExtraError
from dataorder.data import load_digits_split
try:
    load_digits_split()
except MissingExtraError as error:
    print(error)
from dataorder.cli import main
sys.exit(main(["score", "--help"]))
"""


def test_the_core_imports_without_the_extras_and_the_cli_names_the_extra():
    out = subprocess.run([sys.executable, "-c", CORE_WITHOUT_EXTRAS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "the built-in digits dataset needs the optional package 'sklearn': " \
                         "pip install 'dataorder[cli]'\n"
    assert out.stderr.endswith("pip install 'dataorder[cli]'\n") and out.stderr.count("\n") == 1


def one_line_error(capsys, command: str) -> str:
    """The stderr of a failed command: one line, its prefix, no traceback; nothing on stdout."""
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err, captured
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"dataorder {command}: error: "), captured.err
    return captured.err


@pytest.mark.parametrize("argv, command, message", [
    (["compare", "--nope"], "compare", "unrecognized arguments: --nope"),
    (["compare", "--epochs", "x"], "compare", "argument --epochs: invalid int value: 'x'"),
    (["score", "--data", "digits"], "score", "the following arguments are required: --out"),
    (["schedule", "draw", "x.yaml"], "schedule", "argument action: invalid choice: 'draw'"),
])
def test_argparse_errors_are_one_line_naming_the_subcommand_and_its_help(argv, command, message, capsys):
    assert main(argv) == 2
    err = one_line_error(capsys, command)
    assert message in err and f"'dataorder {command} --help'" in err


def test_an_unknown_command_is_one_line_pointing_to_the_top_level_help(capsys):
    assert main(["nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dataorder: error: ") and "'dataorder --help'" in err


def test_argparse_errors_from_the_console_script_are_one_line():
    out = subprocess.run([sys.executable, "-m", "dataorder", "compare", "--nope"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert out.stderr.startswith("dataorder compare: error: unrecognized arguments: --nope")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e39"], "--lr must be a finite number > 0 and <= 3.4e+38"),
    (["--momentum", "1e39"], "--momentum must be a finite number >= 0 and <= 3.4e+38"),
    (["--weight-decay", "1e39"], "--weight-decay must be a finite number >= 0 and <= 3.4e+38"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
    (["--orders", "rr,so,rr"], "--orders names rr twice"),
    (["--augment", "qmc,qmc"], "--augment names qmc twice"),
])
def test_compare_refuses_before_anything_trains(argv, message, capsys):
    assert main(["compare", "--epochs", "1", "--seeds", "1", "--quiet", *argv]) == 2
    assert message in one_line_error(capsys, "compare")


def test_compare_refuses_cuda_where_there_is_none_with_the_check_score_uses(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["compare", "--epochs", "1", "--seeds", "1"], ["score", "--out", "unused"]):
        assert main([*command, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available here; use --device cpu" in one_line_error(capsys, command[0])
    assert not Path("unused").exists()


def test_a_diverged_compare_run_is_one_line_naming_the_ordering_the_seed_and_lr(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert main(["compare", "--orders", "rr", "--epochs", "1", "--seeds", "1", "--quiet", "--lr", "1e30",
                 "--plot", str(plot)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1
    assert captured.err.startswith("dataorder compare: error: rr seed 0 diverged (full-train loss nan at epoch 1)")
    assert "lower the learning rate (--lr 1e+30)" in captured.err
    assert not plot.exists()
