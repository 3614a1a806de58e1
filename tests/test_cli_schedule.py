"""``dataorder schedule show|plot``."""

from __future__ import annotations

import re

import pytest

from dataorder.cli import main
from dataorder.schedules import BatchCounts, Schedule

CONFIG = """\
sources: {web: 0.70, code: 0.15, math: 0.10, books: 0.05}
schedule:
  - {at: 0.85, weights: {web: 0.35, code: 0.30, math: 0.25, books: 0.10}, transition: linear, over: 0.05}
run: {num_samples: 100000, batch_size: 64, tokens_per_sample: 2048}
"""


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(CONFIG)
    return path


def rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}


def test_show_prints_weights_at_breakpoints_and_exact_counts(config, capsys):
    assert main(["schedule", "show", str(config)]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert table["0.000"] == ["0", "0.7000", "0.1500", "0.1000", "0.0500"]
    assert table["0.875"][1:] == ["0.5250", "0.2250", "0.1750", "0.0750"]
    assert table["0.900"][0] == "1,406"  # step = 0.9 * 100000 / 64
    expected = BatchCounts(Schedule.from_yaml(CONFIG), 100_000, 64).total()
    for name, count in zip(["web", "code", "math", "books"], expected):
        samples, share, tokens = table[name]
        assert int(samples.replace(",", "")) == count
        assert int(tokens.replace(",", "")) == count * 2048
    assert table["total"][0] == "100,000"


def test_show_flags_override_the_run_and_custom_points(config, capsys):
    assert main(["schedule", "show", str(config), "--num-samples", "1000", "--batch-size", "10", "--at", "0.5"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["0.500"] == ["50", "0.7000", "0.1500", "0.1000", "0.0500"]
    assert table["total"][0] == "1,000"


def test_show_without_a_run_prints_mean_weights(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text("sources: {a: 1, b: 3}\n")
    assert main(["schedule", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note:" in out and "sum to 4" in out
    assert "mean weights over the run: a 0.2500, b 0.7500" in out


def test_plot_writes_a_png(config, tmp_path, capsys):
    out = tmp_path / "mix.png"
    assert main(["schedule", "plot", str(config), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_errors_are_one_line_usage_errors(config, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: {a: 1}\nschedule:\n  - {at: 2, weights: {a: 1}}\n")
    assert main(["schedule", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bad.yaml line 3 \(schedule\[0\]\): at=2.0 is outside \[0, 1\]", err)
    assert main(["schedule", "show", str(tmp_path / "missing.yaml")]) == 2
    assert "no schedule file" in capsys.readouterr().err
    assert main(["schedule", "show", str(config), "--at", "x"]) == 2
    assert "--at must be comma-separated numbers" in capsys.readouterr().err
    assert main(["schedule", "show", str(config), "--num-samples", "-5"]) == 2
    assert "--num-samples must be > 0" in capsys.readouterr().err


def test_show_over_a_huge_run_counts_every_sample(config, capsys):
    assert main(["schedule", "show", str(config), "--num-samples", str(10**18), "--batch-size", "1024"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["total"][0] == f"{10**18:,}"


@pytest.mark.parametrize(("text", "message"), [
    ("sources: {a: 1}\nrun: {num_samples: 1180591620717411303424, batch_size: 8}", "<= 2**62"),
    ("sources: {a: 1.0e+308, b: 1.0e+308}", "too large to normalise"),
    ("sources: {a: 1e308, b: 1}", "YAML reads 1e9 as text"),
    ("sources: {a: 1, a: 2}", "duplicate key 'a'"),
    ("sources: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
    ("sources: {a: 1, b: [\n", "not valid YAML"),
])
def test_hostile_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert main(["schedule", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and len(err) < 400, err


def test_flag_sizes_beyond_2_to_the_62_are_one_line_errors(config, capsys):
    assert main(["schedule", "show", str(config), "--num-samples", str(2**70)]) == 2
    assert "--num-samples: num_samples must be a positive int <= 2**62" in capsys.readouterr().err


def schedule_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("dataorder schedule: error: "), captured.err
    return captured.err


def test_plot_never_overwrites_its_input(tmp_path, capsys):
    config = tmp_path / "mix.png"  # a YAML schedule under a .png name
    config.write_text(CONFIG)
    assert main(["schedule", "plot", str(config)]) == 0
    assert config.read_text() == CONFIG
    written = tmp_path / "mix.mix.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(written) in capsys.readouterr().out
    assert main(["schedule", "plot", str(config), "--out", str(config)]) == 2
    assert "--out: " in schedule_error(capsys) and config.read_text() == CONFIG


def test_plot_out_without_a_suffix_reports_the_png_written(config, tmp_path, capsys):
    assert main(["schedule", "plot", str(config), "--out", str(tmp_path / "noext")]) == 0
    assert capsys.readouterr().out.strip() == f"saved the mixture plot to {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").exists() and not (tmp_path / "noext").exists()


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "is a folder: give a file name"),
    ("{tmp}/missing/mix.png", "missing is not a folder"),
    ("{tmp}/mix.txt", "cannot save a figure as .txt"),
    ("/proc/mix.png", "/proc does not take new files here"),
])
def test_plot_out_errors_name_out_and_write_nothing(config, tmp_path, capsys, out, message):
    before = set(tmp_path.iterdir())
    assert main(["schedule", "plot", str(config), "--out", out.format(tmp=tmp_path)]) == 2
    err = schedule_error(capsys)
    assert err.startswith("dataorder schedule: error: --out: ") and message in err
    assert set(tmp_path.iterdir()) == before


def test_unreadable_files_are_named_in_one_line(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"sources: {a: 1}\n\xff\xfe\x00")
    assert main(["schedule", "show", str(binary)]) == 2
    assert f"{binary} is not a text file (byte 16 is not UTF-8)" in schedule_error(capsys)
    assert main(["schedule", "show", "/proc/self/mem"]) == 2
    assert "cannot read the schedule file /proc/self/mem: " in schedule_error(capsys)


def test_tokens_per_sample_is_bounded_so_token_counts_stay_finite(config, tmp_path, capsys):
    assert main(["schedule", "show", str(config), "--tokens-per-sample", "1e308"]) == 2
    assert "--tokens-per-sample: tokens_per_sample must be a positive number <= 2**62" in schedule_error(capsys)
    huge = tmp_path / "huge.yaml"
    huge.write_text("sources: {a: 1}\nrun: {num_samples: 10, tokens_per_sample: 1.0e+308}\n")
    assert main(["schedule", "show", str(huge)]) == 2
    assert "tokens_per_sample must be a positive number <= 2**62" in schedule_error(capsys)
    assert main(["schedule", "show", str(config), "--tokens-per-sample", str(2**62)]) == 0
    assert "inf" not in capsys.readouterr().out


def test_out_is_refused_for_show(config, capsys):
    assert main(["schedule", "show", str(config), "--out", "x.png"]) == 2
    assert "--out is the file of schedule plot" in schedule_error(capsys)
