"""Streaming text scoring: windows cut a batch at a time equal the all-at-once ones, exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataorder.cli import main
from dataorder.data import fingerprint
from dataorder.models import ByteLM
from dataorder.scores.text import (TextInputError, TextTask, document_scores, make_windows, score_documents,
                                   tokenize, window_batches)
from dataorder.scores.text import _stored_batches  # the stored-windows side of the one batching rule

CONTEXT = 4


def texts(n=30, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcd efg\n"), size=int(rng.integers(2, 40)))) for _ in range(n)]


def words(text: str) -> list[int]:
    """A tokenizer with ids above 255 (int32 windows)."""
    return [300 + ord(c) for c in text]


def model() -> ByteLM:
    torch.manual_seed(0)
    return ByteLM(context=CONTEXT, dim=8, layers=1, heads=2, vocab_size=600)


@pytest.mark.parametrize("mode", ["split", "truncate"])
@pytest.mark.parametrize("batch_size", [1, 5, 256])
@pytest.mark.parametrize("scores", [("loss", "el2n"), ("loss", "el2n", "grand")])
def test_streamed_scores_equal_the_all_at_once_ones_exactly(mode, batch_size, scores):
    lm, docs = model(), texts()
    stored = document_scores(lm, make_windows(tokenize(docs)[0], CONTEXT, mode), batch_size, scores=scores)
    streamed = score_documents(lm, iter(docs), context=CONTEXT, windows=mode, batch_size=batch_size, scores=scores)
    assert list(streamed) == list(scores)
    for name in scores:
        np.testing.assert_array_equal(streamed[name], stored[name], err_msg=name)


def test_streaming_with_a_tokenizer_callable():
    lm, docs = model(), texts()
    stored = document_scores(lm, make_windows(tokenize(docs, words)[0], CONTEXT), 7)
    streamed = score_documents(lm, docs, context=CONTEXT, tokenizer=words, batch_size=7)
    np.testing.assert_array_equal(streamed["loss"], stored["loss"])


@pytest.mark.parametrize("whole", [False, True])
def test_window_batches_are_the_stored_windows_batches(whole):
    tokens = tokenize(texts())[0]
    windows = make_windows(tokens, CONTEXT)
    cut = list(window_batches(tokens, CONTEXT, batch_size=6, whole_documents=whole))
    stored = list(_stored_batches(windows, 6, whole))
    assert len(cut) == len(stored)
    for a, b in zip(cut, stored):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and a.whole == b.whole
        np.testing.assert_array_equal(a.document, b.document)
        np.testing.assert_array_equal(a.weight, b.weight)
    every = torch.cat([batch.tokens for batch in cut])
    assert torch.equal(every, windows.tokens)  # all windows, in order, each once
    if whole:  # no document split across batches unless it is longer than a batch
        sizes = np.bincount(windows.document.numpy())
        for batch in cut:
            if batch.whole:
                assert all((batch.document == d).sum() == sizes[d] for d in np.unique(batch.document))
            else:
                assert len(np.unique(batch.document)) == 1 and sizes[batch.document[0]] > 6


def test_window_batches_read_the_documents_lazily():
    forever = (np.arange(10) for _ in itertools.count())  # an endless stream of documents
    first = next(window_batches(forever, CONTEXT, batch_size=8))
    assert first.tokens.shape == (8, CONTEXT + 1)


@pytest.mark.parametrize("tokenizer", [None, "tests.scores.test_text_stream:words"])
@pytest.mark.parametrize("fraction", [None, 0.3])
def test_task_fingerprint_streams_the_all_windows_digest(tokenizer, fraction):
    docs = texts(40)
    task = TextTask.build(docs, context=CONTEXT, tokenizer=tokenizer, reference_fraction=fraction, seed=2)
    every = make_windows(tokenize(docs, None if tokenizer is None else words)[0], CONTEXT)
    assert task.fingerprint(chunk=7) == fingerprint(every.tokens, every.document)
    assert task.info["windows"] == len(every.document)


def test_a_reference_split_task_holds_only_the_reference_windows():
    docs = texts(40)
    task = TextTask.build(docs, context=CONTEXT, reference_fraction=0.25, seed=1)
    every = make_windows(tokenize(docs)[0], CONTEXT)
    reference = np.isin(every.document.numpy(), task.reference)
    assert torch.equal(task.x, every.tokens[reference]) and torch.equal(task.y, every.document[reference])
    for streamed, stored in zip(task.batches(5), _stored_batches(every, 5, False)):  # scoring sees every document
        assert torch.equal(streamed.tokens, stored.tokens)


def test_bad_streamed_input_is_refused():
    with pytest.raises(TextInputError, match="document 1 has 1 token"):
        score_documents(model(), ["ab", "x"], context=CONTEXT)
    with pytest.raises(TextInputError, match="batch_size"):
        score_documents(model(), ["ab"], context=CONTEXT, batch_size=0)
    with pytest.raises(TextInputError, match="not available for text"):
        score_documents(model(), ["ab"], context=CONTEXT, scores=("aum",))


def test_reference_split_crash_and_resume_is_byte_identical(tmp_path, interrupt_second_text_run):
    data = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts(40)}), data)
    args = ["score", "--data", str(data), "--runs", "2", "--score-epoch", "1", "--epochs", "1", "--context", "8",
            "--batch-size", "16", "--score-batch-size", "8", "--scores", "loss,grand", "--reference-split", "0.3",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    interrupt_second_text_run.arm()
    assert main([*args, "--out", str(tmp_path / "crashed")]) == 130
    interrupt_second_text_run.disarm()
    assert main([*args, "--out", str(tmp_path / "crashed")]) == 0
    clean, resumed = (tmp_path / name / "scores.parquet" for name in ("clean", "crashed"))
    assert resumed.read_bytes() == clean.read_bytes()


def test_parquet_documents_are_read_in_batches_on_every_pass(tmp_path, monkeypatch):
    from dataorder.modalities import TextColumn, load_texts

    docs = [f"document {i} says {'x' * (i % 7)}\n" for i in range(1000)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=128)
    monkeypatch.setattr(TextColumn, "CHUNK_ROWS", 100)
    name, texts = load_texts(path)
    assert name == "docs.parquet" and len(texts) == 1000
    assert list(texts) == docs and list(texts) == docs  # a second pass re-reads the file
    assert texts[0] == docs[0] and texts[-1] == docs[-1] and texts[5:8] == docs[5:8]
    with pytest.raises(IndexError):
        texts[1000]
    chunks = list(texts._chunks())
    assert max(len(chunk) for chunk in chunks) == 100 and sum(len(chunk) for chunk in chunks) == 1000


def test_a_parquet_file_damaged_past_its_footer_fails_in_one_line(tmp_path):
    from dataorder.modalities import load_texts

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"doc {i} " * 20 for i in range(2000)]}), path, compression="snappy")
    raw = bytearray(path.read_bytes())
    raw[200:4000] = b"\xff" * 3800  # data pages, not the footer: the schema still reads
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="cannot read .* as parquet"):
        load_texts(path)
