"""Readers for user data: HF save_to_disk directories, parquet, csv, npz; and their validation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataorder.data import fingerprint, load_digits_split, load_split, read_examples

X = np.array([[0.5, 1.0], [1.5, -2.0], [2.5, 3.0], [3.5, 0.0]], dtype=np.float32)
Y = np.array([2, 0, 1, 2])


def check(split, x=X, y=Y, classes=3):
    np.testing.assert_array_equal(split.x_train.numpy(), x)
    np.testing.assert_array_equal(split.y_train.numpy(), y)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.num_classes == classes
    assert len(split.x_test) == 0 and split.x_test.shape[1:] == split.x_train.shape[1:]


def test_parquet_scalar_columns(tmp_path):
    path = tmp_path / "toy.parquet"
    pq.write_table(pa.table({"a": X[:, 0], "label": Y, "b": X[:, 1].astype(np.float64)}), path)
    check(read_examples(str(path)))


def test_parquet_list_columns_are_flattened_in_order(tmp_path):
    path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"pixels": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], "extra": [9, 10, 11, 12],
                             "y": Y}), path)
    split = read_examples(str(path), label_column="y")
    check(split, x=np.array([[1, 2, 9], [3, 4, 10], [5, 6, 11], [7, 8, 12]], dtype=np.float32))


def test_parquet_nested_lists_keep_their_shape(tmp_path):
    path = tmp_path / "images.parquet"
    images = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    pq.write_table(pa.table({"image": images.tolist(), "label": Y}), path)
    check(read_examples(str(path)), x=images)


def test_csv(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("a,b,label\n" + "".join(f"{a},{b},{y}\n" for (a, b), y in zip(X, Y)))
    check(read_examples(str(path)))


def test_npz_image_array_keeps_shape(tmp_path):
    path = tmp_path / "toy.npz"
    images = np.random.default_rng(0).normal(size=(4, 1, 3, 3)).astype(np.float32)
    np.savez(path, x=images, label=Y)
    check(read_examples(str(path)), x=images)


def test_hf_save_to_disk_with_classlabel(tmp_path):
    import datasets

    features = datasets.Features({"a": datasets.Value("float32"), "b": datasets.Value("float32"),
                                  "label": datasets.ClassLabel(num_classes=5)})
    data = datasets.Dataset.from_dict({"a": X[:, 0], "b": X[:, 1], "label": Y}, features=features)
    data.save_to_disk(str(tmp_path / "hf"))
    check(read_examples(str(tmp_path / "hf")), classes=5)           # ClassLabel size, not max + 1
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dd"))
    check(read_examples(str(tmp_path / "dd")), classes=5)


def test_hf_list_feature(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"x": X.tolist(), "label": Y.tolist()}).save_to_disk(str(tmp_path / "hf"))
    check(read_examples(str(tmp_path / "hf")))


def test_load_split_digits_is_the_builtin_split():
    assert torch.equal(load_split("digits").x_train, load_digits_split().x_train)


def test_num_classes_override_and_whole_float_labels(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x=X, label=Y.astype(np.float64))
    check(read_examples(str(path), num_classes=7), classes=7)


@pytest.mark.parametrize(("columns", "kwargs", "error", "message"), [
    ({"a": X[:, 0]}, {}, ValueError, "no label column 'label'.*columns are \\['a'\\]"),
    ({"a": X[:, 0], "label": np.array([0, 1, -1, 2])}, {}, ValueError, "labels out of range.*found -1"),
    ({"a": X[:, 0], "label": Y}, {"num_classes": 2}, ValueError, "labels out of range.*found 2 but there are 2"),
    ({"a": X[:, 0], "label": np.array([0.0, 1.5, 1.0, 0.0])}, {}, ValueError, "non-integer"),
    ({"a": np.array([1.0, np.nan, 0.0, 2.0]), "label": Y}, {}, ValueError, "'a' has NaN or infinite.*row 1"),
    ({"a": np.array([1.0, 0.0, np.inf, 2.0]), "label": Y}, {}, ValueError, "row 2"),
    ({"label": Y}, {}, ValueError, "no feature columns"),
])
def test_bad_npz_inputs(tmp_path, columns, kwargs, error, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **columns)
    with pytest.raises(error, match=message):
        read_examples(str(path), **kwargs)


def test_bad_table_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data not found"):
        read_examples(str(tmp_path / "missing.parquet"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="expected a .parquet"):
        read_examples(str(tmp_path / "notes.txt"))
    (tmp_path / "text.csv").write_text("word,label\nhi,0\nho,1\n")
    with pytest.raises(ValueError, match="'word' is not numeric"):
        read_examples(str(tmp_path / "text.csv"))
    pq.write_table(pa.table({"v": [[1.0], [1.0, 2.0]], "label": [0, 1]}), tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="different lengths"):
        read_examples(str(tmp_path / "ragged.parquet"))
    pq.write_table(pa.table({"v": [1.0, None], "label": [0, 1]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match="NaN"):
        read_examples(str(tmp_path / "null.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read"):
        read_examples(str(tmp_path / "broken.parquet"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        read_examples(str(tmp_path / "plain_dir"))


def test_fingerprint_tracks_content_shape_and_labels():
    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0])
    base = fingerprint(x, y)
    assert base == fingerprint(x.clone(), y.clone())
    assert base != fingerprint(x.reshape(2, 3), y)
    assert base != fingerprint(x, torch.tensor([0, 1, 1]))
    assert base != fingerprint(x + 1e-3, y)
