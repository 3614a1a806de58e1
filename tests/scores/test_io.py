"""The scores file: bad files and clashing names are refused with one line naming the file or column."""

from __future__ import annotations

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from dataorder.scores.io import ScoresFileError, load_scores, read_metadata, write_scores  # noqa: E402


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "scores.parquet"
    write_scores(path, {"el2n": np.array([[0.1, 0.3], [0.3, 0.5]])}, {"note": 1})
    return path


def _one_line(error):
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_good_file_round_trips(good):
    assert load_scores(good).tolist() == [0.2, 0.4]
    assert load_scores(good, "el2n", run=1).tolist() == [0.3, 0.5]
    assert read_metadata(good) == {"note": 1}


@pytest.mark.parametrize("content", [b"", b"not parquet at all", "truncated"])
def test_unreadable_files_name_the_path(good, tmp_path, content):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content == "truncated" else content)
    for read in (lambda: load_scores(bad, "el2n"), lambda: read_metadata(bad)):
        with pytest.raises(ScoresFileError) as info:
            read()
        assert str(bad) in _one_line(info)


@pytest.mark.parametrize(("table", "message"), [
    ({"el2n": [1.0, 2.0]}, "no integer 'index' column"),
    ({"index": [0, 1], "el2n": ["a", "b"]}, "column 'el2n' holds string"),
    ({"index": [0, 1], "el2n": [[1.0], [2.0]]}, "column 'el2n' holds list"),
    ({"index": [1, 0], "el2n": [1.0, 2.0]}, "not 0..n-1"),
])
def test_foreign_tables_are_refused_naming_the_file(tmp_path, table, message):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(ScoresFileError, match=message) as info:
        load_scores(path, "el2n")
    assert str(path) in _one_line(info)


@pytest.mark.parametrize(("text", "message"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON list")])
def test_bad_metadata_is_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"index": [0, 1], "el2n": [1.0, 2.0]}).replace_schema_metadata({"dataorder": text}), path)
    with pytest.raises(ScoresFileError, match=message) as info:
        read_metadata(path)
    assert str(path) in _one_line(info)


@pytest.mark.parametrize(("runs", "error", "named"), [
    ({"index": np.array([[5.0, 6.0]])}, ValueError, "'index'"),
    ({"el2n": np.array([[1.0, 2.0]]), "el2n_run0": np.array([[7.0, 8.0]])}, ValueError, "'el2n_run0'"),
    ({"el2n": np.array([[1.0, 2.0]]), "el2n_run7": np.array([[7.0, 8.0]])}, ValueError, "'el2n_run7'"),
    ({3: np.array([[1.0]])}, TypeError, "3"),
])
def test_write_refuses_clashing_score_names_up_front(tmp_path, runs, error, named):
    path = tmp_path / "scores.parquet"
    with pytest.raises(error, match=named) as info:
        write_scores(path, runs, {})
    _one_line(info)
    assert not path.exists()


@pytest.mark.parametrize("metadata", [None, {"n": np.int64(3)}])
def test_write_refuses_metadata_that_is_not_a_json_dict(tmp_path, metadata):
    path = tmp_path / "scores.parquet"
    with pytest.raises(TypeError, match="metadata must be"):
        write_scores(path, {"a": np.array([[1.0]])}, metadata)
    assert not path.exists()


def test_load_refuses_the_index_column_and_non_str_columns(good):
    with pytest.raises(ValueError, match="example ids"):
        load_scores(good, "index")
    with pytest.raises(TypeError, match="column must be"):
        load_scores(good, 3)
