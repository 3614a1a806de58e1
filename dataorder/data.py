"""Built-in datasets and readers for user data.

Everything here works offline: the built-in real datasets are scikit-learn's bundled
``load_digits`` (1,797 8×8 images, 10 classes) and the running Python's standard-library
source files as a text corpus (:func:`load_stdlib_corpus`, from :mod:`dataorder.corpus`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from dataorder._validate import check_fraction
from dataorder.corpus import load_stdlib_corpus

__all__ = ["TensorSplit", "fingerprint", "load_digits_split", "load_patterns32_split", "load_split",
           "load_stdlib_corpus", "load_stdlib_lm_split", "read_examples"]


@dataclass(frozen=True)
class TensorSplit:
    """Train/test tensors of a classification task.

    ``x_*`` are float32 features, ``y_*`` int64 labels in ``[0, num_classes)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    #: where the data came from, one line (e.g. the corpus fingerprint and selection), printed by the benchmarks
    info: str = ""

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0, *, image: bool = False) -> TensorSplit:
    """scikit-learn's bundled digits, standardised with the train statistics.

    ``image=True`` keeps the (1, 8, 8) image shape (for a CNN); otherwise rows are 64
    features. The split is stratified and fixed by ``split_seed``.

    Example::

        >>> split = load_digits_split()
        >>> split.x_train.shape, split.num_classes
        (torch.Size([1347, 64]), 10)
    """
    from dataorder.errors import require

    load_digits = require("sklearn.datasets", extra="cli", feature="the built-in digits dataset").load_digits
    from sklearn.model_selection import train_test_split

    check_fraction(test_fraction, "test_fraction", zero=False, one=False)
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral) or not 0 <= split_seed < 2**32:
        raise ValueError(f"split_seed must be an int in [0, 2**32) (scikit-learn's random_state), got {split_seed!r}")
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    # a pixel constant over the train split (std 0) is only centred: dividing by a tiny number
    # would blow up the test images that have ink there (held-out losses of hundreds)
    std = np.where(std > 0, std + 1e-6, 1.0).astype(np.float32)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return TensorSplit(
        x_train=torch.from_numpy(x_train).reshape(shape),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test).reshape(shape),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        name="digits",
    )


# -- user data: HF save_to_disk directories, .parquet, .csv, .npz ------------------------------

#: File suffixes :func:`read_examples` understands (a directory is read as an HF dataset).
SUFFIXES = (".parquet", ".csv", ".npz")
#: The most classes a label column may name (one logit each; larger ids are not class ids).
MAX_CLASSES = 2**20
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def load_split(data: str, *, label_column: str = "label", num_classes: int | None = None) -> TensorSplit:
    """``"digits"`` (the built-in split) or a path read by :func:`read_examples`.

    >>> load_split("digits").x_train.shape
    torch.Size([1347, 64])
    """
    if data == "digits":
        return load_digits_split()
    return read_examples(data, label_column=label_column, num_classes=num_classes)


def read_examples(path: str, *, label_column: str = "label", num_classes: int | None = None) -> TensorSplit:
    """Read a labelled table into a :class:`TensorSplit` whose train part is every row, in file order.

    ``path`` is a directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``
    contributes its ``train`` split), or a ``.parquet``, ``.csv`` or ``.npz`` file (``.npz``:
    one array per column). Every column but ``label_column`` is a feature: numeric scalars,
    or fixed-length (nested) lists / arrays of numbers. A single multi-dimensional feature
    column keeps its shape (e.g. ``(C, H, W)`` images); otherwise features are flattened and
    concatenated. Labels must be integer class ids in ``[0, num_classes)`` (``num_classes``
    defaults to the dataset's ``ClassLabel`` size, else the largest label + 1). The test part
    is empty.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` (naming the column and
    the fix) for a missing label column, non-numeric or ragged columns, labels out of range,
    or NaN/infinite features.

    Example::

        >>> import os, tempfile, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "toy.npz")
        >>> np.savez(path, a=np.arange(3.0), b=np.ones(3), label=np.array([0, 1, 1]))
        >>> split = read_examples(path)
        >>> split.x_train.tolist(), split.y_train.tolist(), split.num_classes
        ([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]], [0, 1, 1], 2)
    """
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"data not found: {path!r} (expected 'digits', a .parquet/.csv/.npz file or a "
                                "directory written by datasets' save_to_disk)")
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        columns, class_count = _read_hf(path, label_column)
        num_classes = class_count if num_classes is None else num_classes
    elif suffix == ".npz":
        columns = _read_npz(path)
    elif suffix in (".parquet", ".csv"):
        columns = _read_arrow(path, suffix)
    else:
        raise ValueError(f"cannot read {path!r}: expected a {', '.join(SUFFIXES)} file or a save_to_disk directory")
    name = os.path.basename(os.path.normpath(path))
    return _columns_to_split(columns, label_column=label_column, num_classes=num_classes, name=name)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("a single .npy array, not an .npz archive of columns")
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # truncated, renamed or not an archive
        raise ValueError(f"cannot read {path!r} as npz ({' '.join(str(error).split())}); write it with numpy.savez"
                         ) from None


def open_hf_dataset(path: str):  # noqa: ANN201 - a datasets.Dataset, whose package loads lazily
    """The (train, or only) split of a ``save_to_disk`` directory, and its arrow table.

    Returns ``(dataset, table)``; a missing, damaged or ambiguous directory raises a one-line
    ``ValueError`` naming ``path``.
    """
    from dataorder.errors import require

    datasets = require("datasets", extra="cli", feature="reading a save_to_disk directory")
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as error:  # datasets and pyarrow raise their own types for missing or damaged files
        raise ValueError(f"{path!r} is a directory but not a readable one written by datasets' save_to_disk: "
                         f"{' '.join(str(error).split())}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise ValueError(f"{path!r} holds splits {list(dataset)} and none is 'train'; save the split to score")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    try:
        table = dataset.with_format("arrow")[:]  # a pyarrow Table, with any select()/shuffle() applied
    except Exception as error:  # a damaged arrow file of the dataset
        raise ValueError(f"cannot read the data of {path!r}: {' '.join(str(error).split())}") from None
    return dataset, table


def open_arrow_table(path: str, suffix: str):  # noqa: ANN201 - a pyarrow.Table, whose package loads lazily
    """A ``.parquet`` or ``.csv`` file as a pyarrow table; an unreadable file raises a one-line ``ValueError``."""
    from dataorder.errors import require

    reader = require("pyarrow.parquet" if suffix == ".parquet" else "pyarrow.csv", extra="cli",
                     feature=f"reading {suffix} files")
    try:
        return reader.read_table(path) if suffix == ".parquet" else reader.read_csv(path)
    except Exception as error:  # pyarrow raises its own error types for unreadable (truncated, renamed) files
        raise ValueError(f"cannot read {path!r} as {suffix[1:]}: {' '.join(str(error).split())}") from None


def open_parquet_file(path: str):  # noqa: ANN201 - a pyarrow.parquet.ParquetFile, whose package loads lazily
    """A ``.parquet`` file opened for reading in batches (only its footer is read); an unreadable
    file raises a one-line ``ValueError``."""
    from dataorder.errors import require

    parquet = require("pyarrow.parquet", extra="cli", feature="reading .parquet files")
    try:
        return parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own error types for unreadable (truncated, renamed) files
        raise ValueError(f"cannot read {path!r} as parquet: {' '.join(str(error).split())}") from None


def _read_hf(path: str, label_column: str) -> tuple[dict[str, np.ndarray], int | None]:
    import datasets

    dataset, table = open_hf_dataset(path)
    feature = dataset.features.get(label_column)
    class_count = feature.num_classes if isinstance(feature, datasets.ClassLabel) else None
    return _table_columns(path, table), class_count


def _read_arrow(path: str, suffix: str) -> dict[str, np.ndarray]:
    return _table_columns(path, open_arrow_table(path, suffix))


def _table_columns(path: str, table) -> dict[str, np.ndarray]:  # noqa: ANN001 - a pyarrow Table
    names = table.column_names
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path!r} has duplicate column names {duplicates}; rename them so each column is unique")
    return {name: _arrow_to_numpy(name, column) for name, column in zip(names, table.columns)}


def _arrow_to_numpy(name: str, column) -> np.ndarray:  # noqa: ANN001 - a pyarrow ChunkedArray
    """A (possibly nested, fixed-length) list column as an (n, *shape) array; other columns as (n,)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            raise ValueError(f"column {name!r} has missing values; fill or drop those rows")
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"column {name!r} holds lists of different lengths; features need a fixed shape")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        return np.asarray(array.to_pylist(), dtype=object).reshape(shape)
    values = array.to_numpy(zero_copy_only=False)
    if array.null_count:
        values = values.astype(np.float64)  # missing entries read as NaN and are reported by the checks
    return values.reshape(shape)


def _columns_to_split(columns: dict[str, np.ndarray], *, label_column: str, num_classes: int | None,
                      name: str) -> TensorSplit:
    if label_column not in columns:
        raise ValueError(f"no label column {label_column!r} in {name}; columns are {list(columns)} "
                         "(pass --label-column / label_column=)")
    labels = _check_labels(columns[label_column], label_column, num_classes)
    features = {key: value for key, value in columns.items() if key != label_column}
    if not features:
        raise ValueError(f"{name} has no feature columns besides the label {label_column!r}")
    n = len(labels)
    for key, value in features.items():
        if value.dtype.kind not in "biuf":
            raise ValueError(f"feature column {key!r} is not numeric ({value.dtype}); drop it or encode it as numbers")
        if len(value) != n:
            raise ValueError(f"column {key!r} has {len(value)} rows but {label_column!r} has {n}")
        as_float = value.reshape(n, -1).astype(np.float64)
        bad = ~np.isfinite(as_float).all(axis=1)
        if bad.any():
            raise ValueError(f"feature column {key!r} has NaN or infinite values (first at row {int(bad.argmax())}); "
                             "impute or drop those rows")
        huge = (np.abs(as_float) > _FLOAT32_MAX).any(axis=1)  # features are float32: these would become inf
        if huge.any():
            raise ValueError(f"feature column {key!r} has values beyond float32's range ±{_FLOAT32_MAX:.3g} (first "
                             f"at row {int(huge.argmax())}); rescale the column")
    if len(features) == 1 and next(iter(features.values())).ndim > 2:
        x = next(iter(features.values())).astype(np.float32)
    else:
        x = np.concatenate([value.reshape(n, -1).astype(np.float32) for value in features.values()], axis=1)
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return TensorSplit(
        x_train=torch.from_numpy(np.ascontiguousarray(x)),
        y_train=torch.from_numpy(labels),
        x_test=torch.zeros((0, *x.shape[1:]), dtype=torch.float32),
        y_test=torch.zeros(0, dtype=torch.int64),
        num_classes=classes,
        name=name,
    )


def _check_labels(values: np.ndarray, column: str, num_classes: int | None) -> np.ndarray:
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"label column {column!r} must hold one integer per row, got shape {values.shape}")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise ValueError(f"label column {column!r} has missing or NaN labels; drop those rows")
        if (values != np.round(values)).any():
            raise ValueError(f"label column {column!r} holds non-integer values; labels must be class ids 0..K-1")
    elif values.dtype.kind not in "iub":
        raise ValueError(f"label column {column!r} is not numeric ({values.dtype}); map the labels to class ids 0..K-1")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise ValueError(f"num_classes must be an int in [1, {MAX_CLASSES:,}], got {num_classes!r}")
    if values.dtype.kind != "b" and (values.max() > MAX_CLASSES - 1 or values.min() < -MAX_CLASSES):
        raise ValueError(f"labels out of range in column {column!r}: found {values.max() if values.max() > 0 else values.min()}; "
                         f"labels must be class ids 0..K-1 with K <= {MAX_CLASSES:,} (map ids to 0..K-1)")
    labels = values.astype(np.int64)  # safe: every value is within +-MAX_CLASSES
    if labels.min() < 0:
        raise ValueError(f"labels out of range in column {column!r}: found {int(labels.min())}; labels must be "
                         "class ids 0..K-1 (drop unlabelled rows)")
    if num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"labels out of range in column {column!r}: found {int(labels.max())} but there are "
                         f"{num_classes} classes; labels must be class ids in [0, {num_classes})")
    return labels


def fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A SHA-256 over the shapes, dtypes and bytes of ``x`` and ``y``: equal data, equal fingerprint.

    >>> a = fingerprint(torch.zeros(2, 3), torch.tensor([0, 1]))
    >>> a == fingerprint(torch.zeros(2, 3), torch.tensor([0, 1])), a == fingerprint(torch.ones(2, 3), torch.tensor([0, 1]))
    (True, False)
    """
    import hashlib

    digest = hashlib.sha256()
    for tensor in (x, y):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# -- benchmark workloads: a synthetic 32×32 image task and the stdlib byte-level LM ------------

def load_patterns32_split(n_train: int = 1024, n_test: int = 512, *, seed: int = 0, noise: float = 1.0,
                          num_classes: int = 10) -> TensorSplit:
    """A fixed, seeded 32×32 RGB classification task: shifted class patterns under heavy noise.

    Each class ``c`` has a smooth prototype: per channel, a sum of 4 random low-frequency 2-D
    cosines (integer frequencies 1..3 per axis, random phases and amplitudes), scaled to unit
    RMS. An example of class ``c`` is its prototype circularly shifted by a random offset of up
    to ±4 pixels per axis and multiplied by a random contrast in [0.5, 1.5], plus a *distractor*
    (another random class's prototype, shifted independently, at 0.5×) and i.i.d. Gaussian
    noise of standard deviation ``noise``. The shifts are meant to defeat a linear model; the
    distractor plus noise keep a CNN from fitting it in one epoch; classes are balanced. Everything is a
    pure function of the arguments (``seed`` draws the prototypes and the examples; train and
    test come from the same distribution).

    >>> split = load_patterns32_split(n_train=20, n_test=10)
    >>> split.x_train.shape, split.y_train.shape, split.num_classes
    (torch.Size([20, 3, 32, 32]), torch.Size([20]), 10)
    >>> torch.equal(split.x_test, load_patterns32_split(n_train=20, n_test=10).x_test)
    True
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "num_classes" else 1):
            raise ValueError(f"{name} must be a positive int (num_classes >= 2), got {value!r}")
    if not (noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    rng = np.random.default_rng(seed)
    prototypes = _smooth_prototypes(rng, num_classes, channels=3, size=32, waves=4)
    n = n_train + n_test
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    distractors = (labels + rng.integers(1, num_classes, n)) % num_classes
    shifts = rng.integers(-4, 5, size=(n, 2, 2))
    contrast = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32) * np.float32(noise)
    for i in range(n):
        x[i] += contrast[i] * np.roll(prototypes[labels[i]], tuple(shifts[i, 0]), axis=(1, 2))
        x[i] += 0.5 * np.roll(prototypes[distractors[i]], tuple(shifts[i, 1]), axis=(1, 2))
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
    return TensorSplit(x_train=x_t[:n_train], y_train=y_t[:n_train], x_test=x_t[n_train:], y_test=y_t[n_train:],
                       num_classes=num_classes, name="patterns32",
                       info=f"patterns32: seed {seed}, {n_train} train / {n_test} test, noise {noise}")


def _smooth_prototypes(rng: np.random.Generator, classes: int, *, channels: int, size: int,
                       waves: int) -> np.ndarray:
    """``(classes, channels, size, size)`` sums of random low-frequency cosines, unit RMS each."""
    grid = np.arange(size) * (2 * np.pi / size)
    out = np.zeros((classes, channels, size, size), dtype=np.float32)
    for c in range(classes):
        for ch in range(channels):
            fy, fx = rng.integers(1, 4, size=(2, waves))
            phase, amplitude = rng.uniform(0, 2 * np.pi, waves), rng.uniform(0.5, 1.0, waves)
            pattern = sum(a * np.cos(u * grid[:, None] + v * grid[None, :] + p)
                          for u, v, p, a in zip(fy, fx, phase, amplitude))
            out[c, ch] = pattern / np.sqrt(np.mean(pattern**2))
    return out


def load_stdlib_lm_split(context: int = 128, *, max_bytes: int = 2_000_000, max_windows_per_document: int = 4,
                         domains: tuple[str, ...] = ("code",), validation_fraction: float = 0.1) -> TensorSplit:
    """Next-byte prediction on the standard-library corpus (:func:`load_stdlib_corpus`).

    ``x_*`` are ``(N, context)`` int64 bytes, ``y_*`` the same windows shifted by one byte
    (``num_classes`` 256). Files come from :func:`load_stdlib_corpus` with ``max_bytes`` per
    domain, split into train/validation by file; each file gives at most
    ``max_windows_per_document`` non-overlapping windows (its first ones), which spreads a
    small training set over many files. ``info`` names the corpus fingerprint and every
    selection parameter.

    >>> split = load_stdlib_lm_split(context=32, max_bytes=20_000, max_windows_per_document=2, validation_fraction=0.5)
    >>> split.x_train.shape[1], split.num_classes, bool((split.x_train[:, 1:] == split.y_train[:, :-1]).all())
    (32, 256, True)
    """
    from dataorder.corpus import byte_windows

    corpus = load_stdlib_corpus(max_bytes=max_bytes, domains=domains, validation_fraction=validation_fraction)
    parts = {}
    for split in ("train", "validation"):
        documents = corpus.select(split=split)
        if not documents:
            raise ValueError(f"the corpus has no {split} files at max_bytes={max_bytes}: raise max_bytes")
        parts[split] = byte_windows(documents, context, max_windows_per_document=max_windows_per_document,
                                    domains=domains).inputs_targets()
    (x_train, y_train), (x_test, y_test) = parts["train"], parts["validation"]
    info = (f"stdlib corpus {corpus.fingerprint} ({corpus.root}): domains {','.join(domains)}, "
            f"max_bytes {max_bytes}, validation_fraction {validation_fraction}, {len(corpus.documents)} files; "
            f"context {context}, <= {max_windows_per_document} windows per file: "
            f"{len(x_train)} train / {len(x_test)} validation windows")
    return TensorSplit(x_train=x_train.contiguous(), y_train=y_train.contiguous(), x_test=x_test.contiguous(),
                       y_test=y_test.contiguous(), num_classes=256, name="stdlib-lm", info=info)
