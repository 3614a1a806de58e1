"""`dataorder score` on a text column: windows, per-document LM scores, the reference split, resume, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataorder.cli import main
from dataorder.models import ByteLM
from dataorder.scores import load_scores
from dataorder.scores.text import (TextInputError, TextTask, document_scores, make_windows, reference_split,
                                   scored_documents, tokenize)

FAST = ["--runs", "2", "--score-epoch", "1", "--epochs", "1", "--context", "16", "--batch-size", "32",
        "--no-progress"]
WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "(", ")", "the", "of", "and", "data"]


def documents(n=200, seed=0) -> list[str]:
    """Short documents: a run of words, some repetitive (easy), some random (hard)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(3, 12))
        words = [WORDS[i % 3]] * length if i % 4 == 0 else list(rng.choice(WORDS, size=length))
        docs.append(" ".join(words) + "\n")
    return docs


def write_docs(path, docs, **extra):
    pq.write_table(pa.table({"text": docs, **extra}), path)
    return path


def score(*args: str) -> int:
    return main(["score", *args])


# -- windows and the math ------------------------------------------------------------------------
def test_split_windows_predict_every_token_once_and_truncate_keeps_the_first():
    tokens = [np.arange(1, 11), np.arange(1, 4)]
    split = make_windows(tokens, context=4)
    assert split.document.tolist() == [0, 0, 0, 1]
    assert split.mask.sum(1).tolist() == [4, 4, 1, 2]  # 9 and 2 targets
    targets = split.tokens[:, 1:][split.mask]
    assert targets.tolist() == list(range(2, 11)) + [2, 3]
    truncated = make_windows(tokens, context=4, mode="truncate")
    assert truncated.document.tolist() == [0, 1] and truncated.tokens[0].tolist() == [1, 2, 3, 4, 5]


def test_document_scores_are_the_mean_token_loss():
    torch.manual_seed(0)
    model = ByteLM(context=4, dim=8, layers=1, heads=2)
    tokens, _ = tokenize(["hello world", "abc"])
    windows = make_windows(tokens, context=4)
    scores = document_scores(model, windows, batch_size=1)
    ids = torch.tensor(tokens[0], dtype=torch.long)
    losses = []
    torch.set_grad_enabled(False)
    for start in range(0, len(ids) - 1, 4):
        chunk = ids[start:start + 5]
        logits = model.eval()(chunk[:-1][None])[0]
        losses.append(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none"))
    torch.set_grad_enabled(True)
    assert scores["loss"][0] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    assert np.all((scores["el2n"] > 0) & (scores["el2n"] <= np.sqrt(2)))


def test_reference_split_is_seeded_and_recorded():
    assert reference_split(200, 0.1, seed=3).tolist() == reference_split(200, 0.1, seed=3).tolist()
    assert len(reference_split(200, 0.1, seed=3)) == 20
    assert reference_split(200, 0.1, seed=3).tolist() != reference_split(200, 0.1, seed=4).tolist()
    task = TextTask.build(documents(50), context=8, reference_fraction=0.2, seed=1)
    assert task.info["reference_split"]["reference_documents"] == reference_split(50, 0.2, 1).tolist()


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_end_to_end_without_a_label_column(tmp_path, capsys):
    data = write_docs(tmp_path / "docs.parquet", documents())
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, "--out", str(out)) == 0
    assert "docs.parquet, 200 examples, 2 runs" in capsys.readouterr().out
    loss, el2n = load_scores(out, "loss"), load_scores(out, "el2n")
    assert loss.shape == el2n.shape == (200,) and np.all(np.isfinite(loss)) and np.all(loss > 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["modality"] == "text" and manifest["settings"]["model"] == "lm-tiny"
    assert manifest["dataset"]["tokenizer"] == "bytes" and manifest["dataset"]["context"] == 16
    # repetitive documents are easier for the LM than random word salad
    repetitive = np.arange(200) % 4 == 0
    assert loss[repetitive].mean() < loss[~repetitive].mean()


def test_reference_split_scores_only_the_rest(tmp_path):
    data = write_docs(tmp_path / "docs.parquet", documents())
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, "--reference-split", "0.1", "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reference = manifest["dataset"]["reference_split"]["reference_documents"]
    assert len(reference) == 20 and reference == reference_split(200, 0.1, seed=0).tolist()
    loss = pq.read_table(out / "scores.parquet").column("loss").to_numpy()
    assert np.isnan(loss[reference]).all()
    rest = scored_documents(manifest)
    assert len(rest) == 180 and np.isfinite(loss[rest]).all()


@pytest.mark.slow
def test_crash_and_resume_is_byte_identical(tmp_path, interrupt_second_text_run):
    data = write_docs(tmp_path / "docs.parquet", documents(120))
    args = ["--data", str(data), *FAST]
    assert score(*args, "--out", str(tmp_path / "clean")) == 0
    interrupt_second_text_run.arm()
    assert score(*args, "--out", str(tmp_path / "crashed")) == 130
    assert not (tmp_path / "crashed" / "scores.parquet").exists()
    interrupt_second_text_run.disarm()
    assert score(*args, "--out", str(tmp_path / "crashed")) == 0
    assert (tmp_path / "crashed" / "scores.parquet").read_bytes() == (tmp_path / "clean" / "scores.parquet").read_bytes()


def test_a_tokenizer_callable(tmp_path, monkeypatch):
    (tmp_path / "my_tokens.py").write_text(
        "def words(text):\n    return [hash(w) % 50 for w in text.split()] + [50]\n"
        "def broken(text):\n    raise RuntimeError('no vocabulary loaded')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    data = write_docs(tmp_path / "docs.parquet", documents(60))
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, "--tokenizer", "my_tokens:words", "--context", "4", "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["tokenizer"] == "my_tokens:words" and manifest["dataset"]["vocab"] == 51


# -- bad inputs: one line, nothing written ---------------------------------------------------------
@pytest.mark.parametrize("case, match", [
    ("empty", "row 3: the document is empty"),
    ("one_token", "document 1 has 1 token"),
    ("tokenizer", "--tokenizer my_bad_tokens:broken failed on document 0: RuntimeError: no vocabulary"),
    ("mixed", "mixes modalities"),
    ("scores", "--scores aum,forgetting: not available for text"),
    ("reference", "--reference-split must be a fraction"),
])
def test_bad_text_inputs_fail_in_one_line_and_write_nothing(case, match, tmp_path, capsys, monkeypatch):
    (tmp_path / "my_bad_tokens.py").write_text("def broken(text):\n    raise RuntimeError('no vocabulary loaded')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    docs = documents(20)
    extra, flags = {}, []
    if case == "empty":
        docs[3] = "  \n"
    elif case == "one_token":
        docs[1] = "x"
    elif case == "tokenizer":
        flags = ["--tokenizer", "my_bad_tokens:broken"]
    elif case == "mixed":
        extra = {"length": np.arange(20, dtype=np.float64)}
    elif case == "scores":
        flags = ["--scores", "grand,aum,forgetting"]
    else:
        flags = ["--reference-split", "1.5"]
    data = write_docs(tmp_path / "docs.parquet", docs, **extra)
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, *flags, "--out", str(out)) == 2
    error = capsys.readouterr().err.strip()
    assert match in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_text_input_error_is_typed():
    with pytest.raises(TextInputError):
        tokenize([""])
    assert issubclass(TextInputError, ValueError)
