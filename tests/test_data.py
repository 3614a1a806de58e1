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


# -- regressions: issue 13, failure 5 (readers) ---------------------------------------------------


def test_duplicate_column_names_are_refused_naming_them(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a,label\n1,2,3,0\n4,5,6,1\n")
    with pytest.raises(ValueError, match=r"duplicate column names \['a'\]"):
        read_examples(str(path))


@pytest.mark.parametrize("name", ["t.npz", "t.parquet", "t.csv"])
def test_truncated_or_renamed_files_are_a_value_error(tmp_path, name):
    source = tmp_path / "source.npz"
    np.savez(source, a=X[:, 0], label=Y)
    truncated = tmp_path / name
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # an npz cut short, or renamed
    with pytest.raises(ValueError, match="cannot read|not numeric|no label column"):
        read_examples(str(truncated))


def test_a_damaged_save_to_disk_directory_is_a_value_error(tmp_path):
    import datasets

    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"a": X[:, 0].tolist(), "label": Y.tolist()}).save_to_disk(str(folder))
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:40])
    with pytest.raises(ValueError, match="hf"):
        read_examples(str(folder))


def test_features_beyond_float32_are_a_bad_feature_naming_the_column(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, small=X[:, 0].astype(np.float64), big=np.array([1.0, 1e39, 2.0, 3.0]), label=Y)
    with pytest.raises(ValueError, match="feature column 'big' has values beyond float32's range .* row 1"):
        read_examples(str(path))
    np.savez(path, big=np.array([1.0, 3e38, 2.0, 3.0]), label=Y)  # within float32: accepted
    assert read_examples(str(path)).x_train[1, 0] == np.float32(3e38)


@pytest.mark.parametrize("labels", [np.array([0, 1, 2**63 - 1, 2]), np.array([0, 1, 2**63 + 5, 2], dtype=np.uint64),
                                    np.array([0.0, 1.0, 9.2e18, 2.0]), np.array([0, 1, -(2**63), 2]),
                                    np.array([0, 1, 2**20, 2])])
def test_labels_far_beyond_a_class_count_are_refused_before_any_allocation(tmp_path, labels):
    path = tmp_path / "ids.npz"
    np.savez(path, a=X[:, 0], label=labels)
    with pytest.raises(ValueError, match="labels out of range"):
        read_examples(str(path))


def test_the_largest_class_count_is_accepted_and_a_larger_num_classes_refused(tmp_path):
    path = tmp_path / "ids.npz"
    np.savez(path, a=X[:, 0], label=np.array([0, 1, 2**20 - 1, 2]))
    assert read_examples(str(path)).num_classes == 2**20
    with pytest.raises(ValueError, match="num_classes must be an int in"):
        read_examples(str(path), num_classes=2**20 + 1)


def test_digits_pixels_constant_in_train_are_centred_not_blown_up():
    """Regression: std + 1e-6 turned a test image's ink on a train-constant pixel into ~1e7."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from dataorder.data import load_digits_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    x_train, x_test = train_test_split(x, test_size=0.25, random_state=0, stratify=digits.target)[:2]
    constant = x_train.std(axis=0) == 0
    assert constant.any() and (x_test[:, constant] != x_train[0, constant]).any()
    split = load_digits_split()
    np.testing.assert_array_equal(split.x_test.numpy()[:, constant], x_test[:, constant] - x_train[0, constant])
    assert split.x_test.abs().max() < 1e3


@pytest.mark.parametrize("kwargs, error, match", [
    ({"test_fraction": "0.25"}, TypeError, "test_fraction must be a number"),
    ({"test_fraction": 1.0}, ValueError, "test_fraction"),
    ({"split_seed": -1}, ValueError, r"split_seed must be an int in \[0, 2\*\*32\)"),
    ({"split_seed": 2**32}, ValueError, "split_seed"),
])
def test_digits_split_arguments_are_checked_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_digits_split(**kwargs)
