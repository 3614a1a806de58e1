"""Reading images and text for ``dataorder score``: which modality a dataset is, and its decoded columns.

A dataset (a ``save_to_disk`` directory or a ``.parquet`` file) is one of:

- ``image``: one Hugging Face ``Image`` column (in a parquet file: a struct column with
  ``bytes`` and ``path`` fields, as ``datasets`` writes it) plus the label column; decoded
  with Pillow to float32 ``(N, C, H, W)`` in [0, 1] (``C`` = 1 if every image is greyscale,
  else 3 RGB), resized to ``image_size`` or, if not given, kept at the images' common size;
- ``text``: one string column (``text_column``, default ``text``); a label column is
  neither needed nor read;
- ``numeric``: anything else, read by :func:`dataorder.data.read_examples` as before.

Errors are :class:`ModalityError` (a ``ValueError``) with one line naming the column, the
row and the fix; they are raised before anything is written.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataorder.data import open_arrow_table, open_hf_dataset, open_parquet_file

__all__ = ["FLAG_APPLIES", "ModalityError", "ScoreInput", "Table", "TextColumn", "check_flags_apply", "decode_images",
           "detect", "load_image_split", "load_score_input", "load_texts", "read_schema", "read_table"]


class ModalityError(ValueError):
    """A dataset whose images or texts cannot be read as one modality (mixed columns, bad bytes, empty text)."""


@dataclass
class Table:
    """The columns of a dataset as pyarrow arrays, with the names of its image columns.

    >>> import pyarrow as pa
    >>> Table("toy", {"text": pa.chunked_array([["a b"]])}, set()).kinds()
    {'text': 'text'}
    """

    name: str
    columns: dict[str, Any]  # name -> pyarrow ChunkedArray (or, from read_schema, its schema field)
    image_columns: set[str]
    class_count: int | None = None

    def kinds(self, exclude: str | None = None) -> dict[str, str]:
        """``{column: "image" | "text" | "numeric"}`` for every column but ``exclude``."""
        import pyarrow as pa

        kinds = {}
        for name, column in self.columns.items():
            if name == exclude:
                continue
            if name in self.image_columns:
                kinds[name] = "image"
            elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                kinds[name] = "text"
            else:
                kinds[name] = "numeric"
        return kinds


def read_table(path: str | os.PathLike, label_column: str = "label") -> Table:
    """The columns of a ``save_to_disk`` directory or a ``.parquet`` file.

    A missing path raises ``FileNotFoundError``; another kind of file :class:`ModalityError`.

    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
    >>> pq.write_table(pa.table({"text": ["a b"], "label": [0]}), path)
    >>> sorted(read_table(path).columns)
    ['label', 'text']
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data not found: {path!r}")
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        import datasets

        dataset, table = open_hf_dataset(path)
        images = {key for key, feature in dataset.features.items() if isinstance(feature, datasets.Image)}
        label = dataset.features.get(label_column)
        classes = label.num_classes if isinstance(label, datasets.ClassLabel) else None
        return Table(name, {key: table.column(key) for key in table.column_names}, images, classes)
    if not path.lower().endswith(".parquet"):
        raise ModalityError(f"cannot read {path!r} for images or text: expected a .parquet file or a save_to_disk "
                            "directory")
    import pyarrow as pa

    table = open_arrow_table(path, ".parquet")
    images = {field.name for field in table.schema
              if pa.types.is_struct(field.type) and {"bytes", "path"} <= {f.name for f in field.type}}
    return Table(name, {key: table.column(key) for key in table.column_names}, images)


def detect(table: Table, label_column: str = "label", text_column: str = "text") -> str:
    """``"image"``, ``"text"`` or ``"numeric"``; a dataset mixing images or text with other features is refused.

    >>> import pyarrow as pa
    >>> detect(Table("toy", {"text": pa.chunked_array([["hi"]]), "label": pa.chunked_array([[0]])}, set()))
    'text'
    """
    kinds = table.kinds(exclude=label_column)
    media = {name: kind for name, kind in kinds.items() if kind != "numeric"}
    if not media:
        return "numeric"
    if len(kinds) == 1 and len(media) == 1:
        (column, kind), = media.items()
        if kind == "text" and column != text_column:
            raise ModalityError(f"text column {column!r} is not --text-column {text_column!r}; pass "
                                f"--text-column {column}")
        return kind
    listing = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    raise ModalityError(f"{table.name} mixes modalities ({listing}); keep one image or text column (and the label), "
                        "e.g. with dataset.select_columns")


def _image_bytes(table: Table, column: str) -> list[tuple[bytes | None, str | None]]:
    values = table.columns[column].combine_chunks()
    return [(row.get("bytes"), row.get("path")) if row is not None else (None, None) for row in values.to_pylist()]


def decode_images(raw: list[tuple[bytes | None, str | None]], image_size: int | None,
                  column: str = "image") -> torch.Tensor:
    """Decode ``(bytes, path)`` pairs with Pillow to float32 ``(N, C, H, W)`` in [0, 1].

    >>> from PIL import Image
    >>> buffer = io.BytesIO(); Image.new("RGB", (4, 2), (255, 0, 0)).save(buffer, format="PNG")
    >>> images = decode_images([(buffer.getvalue(), None)], image_size=3)
    >>> tuple(images.shape), float(images[0, 0].mean()), float(images[0, 1].mean())
    ((1, 3, 3, 3), 1.0, 0.0)
    """
    from PIL import Image, UnidentifiedImageError

    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ModalityError(f"--image-size must be a positive int, got {image_size!r}")
    pictures = []
    for row, (data, path) in enumerate(raw):
        try:
            if data is None and path is None:
                raise ValueError("no bytes and no path")
            picture = Image.open(io.BytesIO(data) if data is not None else path)
            picture.load()
        except (OSError, ValueError, UnidentifiedImageError) as error:
            raise ModalityError(f"image column {column!r}, row {row}: cannot decode the image "
                                f"({type(error).__name__}: {error}); fix or drop that row") from None
        pictures.append(picture)
    if not pictures:
        raise ModalityError(f"image column {column!r} has no rows")
    grey = all(picture.mode in ("1", "L", "I;16", "I", "F") for picture in pictures)
    sizes = {picture.size for picture in pictures}
    if image_size is None and len(sizes) > 1:
        raise ModalityError(f"image column {column!r} holds images of {len(sizes)} sizes (e.g. {sorted(sizes)[:2]}); "
                            "pass --image-size N to resize them to N x N")
    mode, size = ("L" if grey else "RGB"), ((image_size, image_size) if image_size else sizes.pop())
    out = np.empty((len(pictures), 1 if grey else 3, size[1], size[0]), dtype=np.float32)
    for row, picture in enumerate(pictures):
        picture = picture.convert(mode)
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.float32) / 255.0
        out[row] = array[None] if grey else array.transpose(2, 0, 1)
    return torch.from_numpy(out)


def load_image_split(path: str | os.PathLike, *, label_column: str = "label", num_classes: int | None = None,
                     image_size: int | None = None):
    """An image dataset as a :class:`dataorder.data.TensorSplit` (``x_train`` float32 ``(N, C, H, W)``).

    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> from PIL import Image
    >>> buffer = io.BytesIO(); Image.new("L", (6, 6), 128).save(buffer, format="PNG")
    >>> images = pa.array([{"bytes": buffer.getvalue(), "path": None}] * 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "pics.parquet")
    >>> pq.write_table(pa.table({"image": images, "label": [0, 1]}), path)
    >>> split = load_image_split(path, image_size=4)
    >>> tuple(split.x_train.shape), split.num_classes
    ((2, 1, 4, 4), 2)
    """
    from dataorder.data import TensorSplit, _check_labels

    table = read_table(path, label_column)
    if detect(table, label_column) != "image":
        raise ModalityError(f"{table.name} has no image column")
    if label_column not in table.columns:
        raise ModalityError(f"no label column {label_column!r} in {table.name}; columns are {list(table.columns)} "
                            "(pass --label-column)")
    column = next(iter(table.image_columns))
    labels = _check_labels(table.columns[label_column].to_numpy(), label_column, num_classes or table.class_count)
    x = decode_images(_image_bytes(table, column), image_size, column)
    classes = num_classes or table.class_count or int(labels.max()) + 1
    return TensorSplit(x_train=x, y_train=torch.from_numpy(labels), x_test=torch.zeros((0, *x.shape[1:])),
                       y_test=torch.zeros(0, dtype=torch.int64), num_classes=classes, name=table.name)


class TextColumn(Sequence):
    """The documents of a string column as a sequence of ``str``, made a chunk at a time.

    ``chunks()`` returns a fresh iterator of pyarrow string arrays (the column's pieces in
    row order); every pass calls it again, so a pass holds one chunk of Python strings and
    whatever the source keeps: an in-memory column (:meth:`of_column`, memory-mapped for a
    ``save_to_disk`` directory) or nothing at all for a ``.parquet`` file, re-read in batches
    of :attr:`CHUNK_ROWS` rows (:meth:`of_parquet`). Indexing walks the documents (O(n)).

    >>> import pyarrow as pa
    >>> docs = TextColumn.of_column(pa.chunked_array([["one", "two"], ["three"]]))
    >>> len(docs), list(docs), docs[2], docs[-1]
    (3, ['one', 'two', 'three'], 'three', 'three')
    """

    CHUNK_ROWS = 4096

    def __init__(self, chunks: Callable[[], Iterator[Any]], length: int) -> None:
        self._chunks, self._length = chunks, int(length)

    @classmethod
    def of_column(cls, column: Any) -> TextColumn:
        """The documents of a pyarrow (chunked) string array."""
        return cls(lambda: (column.slice(start, cls.CHUNK_ROWS) for start in range(0, len(column), cls.CHUNK_ROWS)),
                   len(column))

    @classmethod
    def of_parquet(cls, path: str, column: str) -> TextColumn:
        """The documents of column ``column`` of a ``.parquet`` file, read from the file on every pass."""
        rows = open_parquet_file(path).metadata.num_rows

        def chunks() -> Iterator[Any]:
            for batch in open_parquet_file(path).iter_batches(batch_size=cls.CHUNK_ROWS, columns=[column]):
                yield batch.column(0)
        return cls(chunks, rows)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        position = index + self._length if index < 0 else index
        if not 0 <= position < self._length:
            raise IndexError(f"document {index} of {self._length}")
        for row, text in enumerate(self):
            if row == position:
                return text
        raise IndexError(f"document {index} of {self._length}")

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks():
            yield from chunk.to_pylist()


def read_schema(path: str | os.PathLike, label_column: str = "label") -> Table:
    """:func:`read_table`'s answer to "which columns of which kinds", without a parquet file's data.

    A ``.parquet`` file's columns are its schema's fields (their ``type`` is all :meth:`Table.kinds`
    reads); a ``save_to_disk`` directory is memory-mapped, so it is :func:`read_table` itself.

    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
    >>> pq.write_table(pa.table({"text": ["a b"], "label": [0]}), path)
    >>> read_schema(path).kinds(exclude="label")
    {'text': 'text'}
    """
    path = os.fspath(path)
    if os.path.isdir(path) or not path.lower().endswith(".parquet") or not os.path.exists(path):
        return read_table(path, label_column)
    import pyarrow as pa

    schema = open_parquet_file(path).schema_arrow
    images = {field.name for field in schema
              if pa.types.is_struct(field.type) and {"bytes", "path"} <= {f.name for f in field.type}}
    return Table(os.path.basename(path), {field.name: field for field in schema}, images)


def load_texts(path: str | os.PathLike, *, text_column: str = "text",
               label_column: str = "label") -> tuple[str, TextColumn]:
    """``(name, documents)``: the text column of a dataset, in row order; empty or missing texts are refused.

    The documents are never all held as Python strings (:class:`TextColumn`): a ``.parquet``
    file is re-read in batches on every pass, a ``save_to_disk`` directory's column is
    memory-mapped. The check for empty documents is the first such pass.

    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "docs.parquet")
    >>> pq.write_table(pa.table({"text": ["one", "two"]}), path)
    >>> name, docs = load_texts(path)
    >>> name, list(docs)
    ('docs.parquet', ['one', 'two'])
    """
    path = os.fspath(path)
    table = read_schema(path, label_column)
    if detect(table, label_column, text_column) != "text":
        raise ModalityError(f"{table.name} has no text column {text_column!r}")
    if os.path.isdir(path):
        texts = TextColumn.of_column(table.columns[text_column])
    else:
        texts = TextColumn.of_parquet(path, text_column)
    try:
        empty = next((row for row, text in enumerate(texts) if text is None or not text.strip()), None)
    except Exception as error:  # pyarrow's own error types for a file damaged past its footer
        raise ValueError(f"cannot read {path!r} as parquet: {' '.join(str(error).split())}") from None
    if empty is not None:
        raise ModalityError(f"text column {text_column!r}, row {empty}: the document is empty; drop empty rows")
    return table.name, texts


@dataclass
class ScoreInput:
    """What ``dataorder score`` scores: tensors for the runner, and the text task (None for vectors and images)."""

    modality: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    task: Any = None


#: The ``dataorder score`` data flags that only some data take: flag -> the kinds of data it applies to
#: (``digits`` is the built-in dataset; the others are the modalities of a file or directory).
FLAG_APPLIES: dict[str, tuple[str, ...]] = {
    "--label-column": ("numeric", "image", "text"),
    "--num-classes": ("numeric", "image"),
    "--image-size": ("image",),
    "--text-column": ("text",),
    "--tokenizer": ("text",),
    "--context": ("text",),
    "--windows": ("text",),
    "--reference-split": ("text",),
}


def check_flags_apply(kind: str, given: Sequence[str], name: str) -> None:
    """Refuse a flag of :data:`FLAG_APPLIES` given for data of another ``kind`` (it would be ignored).

    >>> check_flags_apply("digits", ["--num-classes"], "digits")
    Traceback (most recent call last):
    ...
    dataorder.modalities.ModalityError: --num-classes applies to numeric or image data files; digits is the built-in dataset (drop --num-classes)
    """
    for flag in given:
        if kind not in FLAG_APPLIES[flag]:
            where = _APPLIES_TO.get(flag) or " or ".join(FLAG_APPLIES[flag]) + " data"
            subject = "digits is the built-in dataset" if kind == "digits" else f"{name} is {kind} data"
            raise ModalityError(f"{flag} applies to {where}; {subject} (drop {flag})")


_APPLIES_TO = {"--label-column": "a data file (numeric, image or text)",
               "--num-classes": "numeric or image data files",
               "--reference-split": "text (a language model's reference run)"}


def load_score_input(data: str, *, label_column: str | None = None, num_classes: int | None = None,
                     text_column: str | None = None, image_size: int | None = None, tokenizer: str | None = None,
                     context: int | None = None, windows: str | None = None, reference_split: float | None = None,
                     seed: int = 0) -> ScoreInput:
    """Read ``data`` as whichever modality it holds (see the module doc) for ``dataorder score``.

    A data option left ``None`` takes its default (``label_column="label"``, ``text_column="text"``,
    ``context=128``, ``windows="split"``); one given for data it does not apply to
    (:data:`FLAG_APPLIES`, e.g. ``image_size`` for text) is refused with a :class:`ModalityError`.

    >>> import os, tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "docs.parquet")
    >>> pq.write_table(pa.table({"text": ["print('hi')\\n", "x = 1\\n"]}), path)
    >>> found = load_score_input(path, context=4)
    >>> found.modality, found.num_classes, tuple(found.x.shape)
    ('text', 256, (5, 5))
    """
    from dataorder.data import load_split

    given = [flag for flag, value in (("--label-column", label_column), ("--num-classes", num_classes),
                                      ("--image-size", image_size), ("--text-column", text_column),
                                      ("--tokenizer", tokenizer), ("--context", context), ("--windows", windows),
                                      ("--reference-split", reference_split)) if value is not None]
    label_column = "label" if label_column is None else label_column
    text_column = "text" if text_column is None else text_column
    if data == "digits":
        check_flags_apply("digits", given, data)
    if data != "digits" and os.path.exists(data) and (os.path.isdir(data) or data.lower().endswith(".parquet")):
        modality = detect(read_schema(data, label_column), label_column, text_column)
    else:
        modality = "numeric"
    if data != "digits" and os.path.exists(data):  # (a missing path: read_examples says so)
        check_flags_apply(modality, given, os.path.basename(os.path.normpath(data)))
    if modality == "image":
        split = load_image_split(data, label_column=label_column, num_classes=num_classes, image_size=image_size)
    elif modality == "text":
        from dataorder.scores.text import TextTask

        name, texts = load_texts(data, text_column=text_column, label_column=label_column)
        task = TextTask.build(texts, context=128 if context is None else context,
                              windows="split" if windows is None else windows, tokenizer=tokenizer,
                              reference_fraction=reference_split, seed=seed)
        return ScoreInput("text", task.x, task.y, task.vocab, name, task)
    else:
        split = load_split(data, label_column=label_column, num_classes=num_classes)
    return ScoreInput(modality, split.x_train, split.y_train, split.num_classes, split.name)
