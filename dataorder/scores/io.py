"""The ``scores.parquet`` format written by ``dataorder score``, and how to read it back.

One row per example, in dataset order:

* ``index`` — int64, ``0 .. n-1``;
* ``<score>`` — float64, the mean over runs (``el2n``, ``grand``, ``loss``, ``confidence``,
  ``margin``, ``entropy``, ``forgetting``, ``aum``, ``datamap_confidence``,
  ``datamap_variability``, ``datamap_correctness``);
* ``<score>_run<r>`` — float64, run ``r`` (``r = 0 .. R-1``).

The file's schema metadata key ``dataorder`` holds the manifest (dataset fingerprint and
settings) as JSON. :data:`HIGHER_MEANS` gives each score's direction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dataorder.errors import require

__all__ = ["HIGHER_MEANS", "SCORES_FILE", "ScoresFileError", "add_scores_column", "load_scores", "read_metadata",
           "run_column", "write_scores"]

SCORES_FILE = "scores.parquet"

#: Score column -> what a higher value marks: ``"harder"``, ``"easier"`` or ``"ambiguous"``.
HIGHER_MEANS: dict[str, str] = {
    "loss": "harder",
    "confidence": "easier",
    "margin": "easier",
    "el2n": "harder",
    "entropy": "harder",
    "grand": "harder",
    "forgetting": "harder",
    "aum": "easier",
    "datamap_confidence": "easier",
    "datamap_variability": "ambiguous",
    "datamap_correctness": "easier",
}


class ScoresFileError(ValueError):
    """A file that is not a scores file as :func:`write_scores` writes it (the message names the file).

    >>> issubclass(ScoresFileError, ValueError)
    True
    """


def run_column(score: str, run: int) -> str:
    """Name of the column holding ``score`` from run ``run``.

    >>> run_column("el2n", 3)
    'el2n_run3'
    """
    return f"{score}_run{run}"


def write_scores(path: str | os.PathLike, runs: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
    """Write ``scores.parquet`` atomically from ``{score: (R, n) array}``; the mean over runs is the score column.

    Score names that would clash with the file's other columns (``index``, or ``s_run<r>``
    beside a score ``s``) are refused up front, as is metadata that is not a JSON-serialisable dict.

    >>> import tempfile, numpy as np
    >>> path = Path(tempfile.mkdtemp()) / "scores.parquet"
    >>> write_scores(path, {"el2n": np.array([[0.1, 0.3], [0.3, 0.5]])}, {"note": "example"})
    >>> load_scores(path, "el2n").tolist(), load_scores(path, "el2n", run=1).tolist()
    ([0.2, 0.4], [0.3, 0.5])
    """
    pa = require("pyarrow", extra="cli", feature="writing scores.parquet")
    pq = require("pyarrow.parquet", extra="cli", feature="writing scores.parquet")

    from dataorder.scores.aggregate import aggregate

    if not runs:
        raise ValueError("runs must hold at least one score")
    _check_score_names(list(runs))
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict (the manifest), got {type(metadata).__name__}")
    try:
        manifest = json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-serialisable ({error}); convert numpy values with .item()") from None
    n = {np.shape(values)[-1] for values in runs.values()}
    if len(n) != 1:
        raise ValueError(f"every score must cover the same examples, got lengths {sorted(n)}")
    columns: dict[str, Any] = {"index": np.arange(n.pop(), dtype=np.int64)}
    for score, values in runs.items():
        columns[score] = aggregate(values)
    for score, values in runs.items():
        for run, row in enumerate(np.asarray(values, dtype=np.float64)):
            columns[run_column(score, run)] = row
    table = pa.table(columns).replace_schema_metadata({"dataorder": manifest})
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")  # a killed job's is removed by the next one
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _check_score_names(names: list[Any]) -> None:
    """Refuse score names whose columns would clash in the file (``index``, or ``s`` beside ``s_run<r>``)."""
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"score names must be non-empty strings, got {name!r}")
    if "index" in names:
        raise ValueError("a score cannot be named 'index': that column holds the example ids; rename the score")
    for name in names:
        if _is_run_column(name, names):
            raise ValueError(f"score {name!r} would be read as a run column of score {name.rpartition('_run')[0]!r}; "
                             "rename one of them")


def _arrow_call(path: Path, read: Any) -> Any:
    """``read()``, with pyarrow's refusal of an unreadable file turned into a :class:`ScoresFileError`."""
    pa = require("pyarrow", extra="cli", feature="reading scores.parquet")
    try:
        return read()
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ScoresFileError(f"{path} is not a readable parquet file ({reason}); write it again with "
                              "`dataorder score`") from None


def _scores_path(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scores file at {path}; run `dataorder score --out DIR` first")
    return path


def read_metadata(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest stored in a scores file (dataset fingerprint, settings, runs).

    A file that is not readable parquet, or whose manifest is not a JSON object, is a
    :class:`ScoresFileError` naming the file.
    """
    pq = require("pyarrow.parquet", extra="cli", feature="reading scores.parquet")

    path = _scores_path(path_or_dir)
    metadata = _arrow_call(path, lambda: pq.read_schema(path)).metadata or {}
    try:
        manifest = json.loads(metadata.get(b"dataorder", b"{}"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ScoresFileError(f"{path}: the 'dataorder' metadata is not valid JSON ({error}); the file was "
                              "modified") from None
    if not isinstance(manifest, dict):
        raise ScoresFileError(f"{path}: the 'dataorder' metadata is a JSON {type(manifest).__name__}, not an object; "
                              "the file was modified")
    return manifest


def load_scores(path_or_dir: str | os.PathLike, column: str | None = None, *, run: int | None = None) -> np.ndarray:
    """One score per example, in dataset order, as a float64 array.

    ``path_or_dir`` is a ``scores.parquet`` file or the ``--out`` directory holding it;
    ``column`` a score (its mean over runs), or with ``run=r`` that run's values. With
    ``column=None`` the file must hold exactly one score. A file that is not one
    :func:`write_scores` writes (not parquet, truncated, no integer ``index`` column, a
    non-numeric score column) is a :class:`ScoresFileError` naming the file.

    >>> import tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_scores(folder / "scores.parquet", {"aum": np.array([[1.0, -2.0]])}, {})
    >>> load_scores(folder).tolist()
    [1.0, -2.0]
    """
    pq = require("pyarrow.parquet", extra="cli", feature="reading scores.parquet")
    pa = require("pyarrow", extra="cli", feature="reading scores.parquet")

    if column is not None and not isinstance(column, str):
        raise TypeError(f"column must be a score name (str) or None, got {column!r}")
    if column == "index":
        raise ValueError("column 'index' holds the example ids, not a score; pass column=one of the scores")
    path = _scores_path(path_or_dir)
    schema = _arrow_call(path, lambda: pq.read_schema(path))
    names = schema.names
    if names.count("index") != 1 or not pa.types.is_integer(schema.field("index").type):
        raise ScoresFileError(f"{path} has no integer 'index' column; it is not a scores file written by "
                              "`dataorder score`")
    scores = [name for name in names if name != "index" and not _is_run_column(name, names)]
    if column is None:
        if len(scores) != 1:
            raise ValueError(f"{path} holds several scores {scores}; pass column=one of them")
        column = scores[0]
    wanted = column if run is None else run_column(column, run)
    if wanted not in names:
        runs = [name for name in names if _is_run_column(name, names) and name.startswith(column + "_run")]
        hint = f"scores are {scores}" if run is None else f"runs of {column!r} are {runs}"
        raise ValueError(f"{path} has no column {wanted!r}; {hint}")
    kind = schema.field(wanted).type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise ScoresFileError(f"{path}: column {wanted!r} holds {kind}, not numbers; the file was modified")
    table = _arrow_call(path, lambda: pq.read_table(path, columns=["index", wanted]))
    index = table.column("index").to_numpy(zero_copy_only=False)
    if not np.array_equal(index, np.arange(len(index))):
        raise ScoresFileError(f"{path}: column 'index' is not 0..n-1 in order; the file was modified")
    return table.column(wanted).to_numpy().astype(np.float64)


def _is_run_column(name: str, names: list[str]) -> bool:
    stem, separator, run = name.rpartition("_run")
    return bool(separator) and run.isdigit() and stem in names


def add_scores_column(dataset: Any, scores: Any, name: str = "score") -> Any:
    """Return a Hugging Face ``datasets.Dataset`` with ``scores`` added as column ``name``.

    >>> import datasets, numpy as np
    >>> data = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    >>> add_scores_column(data, np.array([0.5, 0.1, 0.9]), "el2n")[0]
    {'x': 1, 'el2n': 0.5}
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) != len(dataset):
        raise ValueError(f"scores must be one value per example: got shape {values.shape} for a dataset of "
                         f"{len(dataset)} rows")
    if name in getattr(dataset, "column_names", ()):
        raise ValueError(f"the dataset already has a column {name!r}; pick another name or remove_columns first")
    return dataset.add_column(name, values.tolist())
