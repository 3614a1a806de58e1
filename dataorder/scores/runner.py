"""Train short runs and score every example: the loop behind ``dataorder score``.

Run ``r`` trains the model from seed ``seed + r`` with random reshuffling for ``epochs``
epochs, feeding each training batch's logits to the requested trackers (forgetting, AUM,
data maps), and after ``score_epoch`` epochs (0: at initialisation) scores every example
once in eval mode with the functional scores (EL2N, GraNd, loss, ...). Scoring passes
leave training untouched: ``.grad`` is saved and restored and the model's mode is restored.

The output directory holds::

    manifest.json        dataset fingerprint + settings; complete=true once everything is written
    runs/run<r>.npz      one file per finished run, written atomically (temp file, then os.replace)
    consistency.json     rank agreement between runs (see dataorder.scores.aggregate.consistency)
    scores.png           histogram of each score and run 0 vs run 1
    scores.parquet       the scores (format: dataorder.scores.io), written last

Rerunning the same command skips finished runs and writes the identical ``scores.parquet``;
``--runs`` may grow between invocations (run ``r`` is always seed ``seed + r``). A directory
holding another dataset's or other settings' results is refused.

Under ``torchrun`` (``WORLD_SIZE > 1``) runs are dealt round-robin to the ranks (gloo
process group); rank 0 gathers them and writes the merged result.

Example::

    >>> import tempfile
    >>> from dataorder.data import load_digits_split
    >>> split = load_digits_split()
    >>> config = ScoreConfig(model="logreg", scores=("el2n", "aum"), runs=2, epochs=2, score_epoch=1)
    >>> result = score_dataset(split.x_train, split.y_train, 10, config, tempfile.mkdtemp(), progress=False)
    >>> result.columns, result.computed
    (['el2n', 'aum'], [0, 1])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dataorder._validate import check_float32
from dataorder.data import fingerprint
from dataorder.errors import DataorderError, require
from dataorder.models import build_model, what_it_takes
from dataorder.samplers.base import epoch_rng
from dataorder.scores import functional
from dataorder.scores.aggregate import consistency
from dataorder.scores.dynamics import AUM, DataMap, Forgetting
from dataorder.scores.gradnorm import grad_norms
from dataorder.scores.io import HIGHER_MEANS, SCORES_FILE, write_scores

__all__ = ["SCORE_NAMES", "DivergedError", "ScoreConfig", "ScoreConfigError", "ScoreResult", "ScoreSetupError",
           "check_model", "parameter_subset", "score_columns", "score_dataset", "score_model", "train_and_score"]

#: Scores computed once, at ``score_epoch``, by a pass over the data.
FUNCTIONAL: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "el2n": functional.el2n,
    "loss": functional.loss,
    "confidence": functional.confidence,
    "margin": functional.margin,
    "entropy": functional.entropy,
}
#: Scores tracked over all of training.
DYNAMICS: dict[str, type] = {"forgetting": Forgetting, "aum": AUM, "datamap": DataMap}
SCORE_NAMES: tuple[str, ...] = (*FUNCTIONAL, "grand", *DYNAMICS)
FORMAT = "dataorder-scores/1"
MANIFEST = "manifest.json"


#: Seeds go to ``torch.manual_seed``, which takes integers below 2**64.
SEED_LIMIT = 2**64


class ScoreSetupError(DataorderError, ValueError):
    """The scoring job cannot start: a model that does not build, an ``--out`` holding other results."""


class ScoreConfigError(DataorderError, ValueError):
    """A :class:`ScoreConfig` field out of range; ``field`` names it (the CLI shows its flag).

    >>> try:
    ...     ScoreConfig(runs=0)
    ... except ScoreConfigError as error:
    ...     print(error.field, "|", error)
    runs | runs must be an int >= 1, got 0
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}{reason}")


class DivergedError(DataorderError, FloatingPointError):
    """Training produced a non-finite loss (or non-finite scores): the learning rate is too high.

    Raised before the bad batch's update; nothing of the run is saved and the output is not
    marked complete. ``run``, ``epoch`` and ``batch`` say where (``batch`` is None when the
    scoring pass, not training, gave the non-finite values).
    """

    def __init__(self, message: str, *, run: int, epoch: int, batch: int | None = None) -> None:
        self.run, self.epoch, self.batch = run, epoch, batch
        super().__init__(message)


def score_columns(scores: Iterable[str]) -> list[str]:
    """Output columns for score names (``datamap`` gives three).

    >>> score_columns(["el2n", "datamap"])
    ['el2n', 'datamap_confidence', 'datamap_variability', 'datamap_correctness']
    """
    columns: list[str] = []
    for score in scores:
        columns += [f"datamap_{part}" for part in ("confidence", "variability", "correctness")] \
            if score == "datamap" else [score]
    return columns


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScoreConfigError(name, f" must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that determines the scores; all fields but ``runs`` must match to reuse finished runs.

    >>> ScoreConfig(scores=("el2n", "el2n", "aum")).scores
    ('el2n', 'aum')
    """

    model: str = "mlp"
    scores: tuple[str, ...] = ("el2n", "grand", "loss", "forgetting", "aum", "datamap")
    runs: int = 5
    epochs: int = 20
    score_epoch: int = 10
    batch_size: int = 64
    score_batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    grand_params: str = "all"
    device: str = "cpu"

    def __post_init__(self) -> None:
        scores = tuple(dict.fromkeys(self.scores))
        unknown = [score for score in scores if score not in SCORE_NAMES]
        if unknown or not scores:
            raise ScoreConfigError("scores", f": unknown score(s) {', '.join(unknown) or '(none given)'}; choose "
                                             f"from {', '.join(SCORE_NAMES)}")
        object.__setattr__(self, "scores", scores)
        _positive_int(self.runs, "runs")
        _positive_int(self.epochs, "epochs")
        _positive_int(self.score_epoch, "score_epoch", minimum=0)
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.score_batch_size, "score_batch_size")
        _positive_int(self.seed, "seed", minimum=0)
        if self.seed + self.runs - 1 >= SEED_LIMIT:
            raise ScoreConfigError("seed", f" + runs - 1 must be < 2**64 (run r uses seed + r), got seed {self.seed} "
                                           f"and {self.runs} runs")
        if self.score_epoch > self.epochs:
            raise ScoreConfigError("score_epoch", f" ({self.score_epoch}) must be <= epochs ({self.epochs})")
        for name in ("lr", "momentum", "weight_decay"):  # torch's SGD holds them as float32
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ScoreConfigError(name, f" must be a number, got {value!r}")
            try:
                check_float32(value, name, positive=name == "lr")
            except ValueError as error:
                raise ScoreConfigError(name, str(error)[len(name):]) from None

    def settings(self) -> dict[str, Any]:
        """The fields that must match for finished runs to be reused (not ``runs``)."""
        settings = dataclasses.asdict(self)
        del settings["runs"]
        settings["scores"] = list(self.scores)
        return settings


@dataclass
class ScoreResult:
    """What :func:`score_dataset` did: the columns written, runs computed now and runs reused."""

    out: Path
    columns: list[str]
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    consistency: dict[str, Any] = field(default_factory=dict)  # rank 0 only


# -- the math: scoring a model, training one run ------------------------------------------------


def parameter_subset(model: nn.Module, spec: str) -> list[str] | None:
    """Parameter names for GraNd: ``"all"`` (None), ``"last"`` (the last module with parameters),
    or comma-separated names / module prefixes.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> parameter_subset(model, "last"), parameter_subset(model, "0")
    (['2.weight', '2.bias'], ['0.weight', '0.bias'])
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if spec == "all":
        return None
    if spec == "last":
        owners = [prefix for prefix, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
        if not owners:
            raise ValueError("the model has no parameters")
        prefix = owners[-1]
        return [name for name in names if name.rpartition(".")[0] == prefix]
    wanted = [part.strip() for part in spec.split(",") if part.strip()]

    def matches(name: str, part: str) -> bool:
        return name == part or name.startswith(part + ".")

    unknown = [part for part in wanted if not any(matches(name, part) for name in names)]
    if unknown or not wanted:
        raise ValueError(f"grand_params {', '.join(map(repr, unknown)) or repr(spec)} matches no parameter; use all, "
                         f"last, or names from {names}")
    return [name for name in names if any(matches(name, part) for part in wanted)]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), size):
        yield x[start:start + size], y[start:start + size]


def score_model(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], scores: Iterable[str],
                *, grand_params: str = "all", device: torch.device | str | None = None) -> dict[str, np.ndarray]:
    """Functional scores (and GraNd) of every example, streamed over ``batches`` of ``(x, y)``.

    The model is scored in eval mode and its mode restored; no parameter's ``.grad`` changes,
    so this can run in the middle of training. Memory is one batch plus the outputs (n floats
    per score). GraNd uses :func:`dataorder.scores.gradnorm.grad_norms` (ghost norms for
    linear layers, ``torch.func`` otherwise). Scores not computed per batch (dynamics) are
    ignored.

    >>> model = nn.Linear(3, 2)
    >>> batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    >>> {k: v.shape for k, v in score_model(model, batches, ["el2n", "grand"]).items()}
    {'el2n': (8,), 'grand': (8,)}
    """
    wanted = [score for score in scores if score in FUNCTIONAL or score == "grand"]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    subset = parameter_subset(model, grand_params) if "grand" in wanted else None
    was_training = model.training
    outputs = {score: _Buffer() for score in wanted}
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if "grand" in wanted:
                norms, logits = grad_norms(model, x, y, subset)
                outputs["grand"].append(norms)
            else:
                with torch.no_grad():
                    logits = model(x)
            for score in wanted:
                if score != "grand":
                    outputs[score].append(FUNCTIONAL[score](logits, y))
    finally:
        model.train(was_training)
    return {score: buffer.values() for score, buffer in outputs.items()}


class _Buffer:
    """A float64 array that grows by doubling: few long-lived allocations, so streaming millions
    of batches does not fragment the heap (a list of per-batch arrays made glibc's RSS creep)."""

    def __init__(self) -> None:
        self._data, self._size = np.empty(1024), 0

    def append(self, values: torch.Tensor) -> None:
        chunk = values.detach().double().cpu().numpy()
        if self._size + len(chunk) > len(self._data):
            grown = np.empty(max(2 * len(self._data), self._size + len(chunk)))
            grown[:self._size] = self._data[:self._size]
            self._data = grown
        self._data[self._size:self._size + len(chunk)] = chunk
        self._size += len(chunk)

    def values(self) -> np.ndarray:
        return self._data[:self._size].copy()


def train_and_score(x: torch.Tensor, y: torch.Tensor, num_classes: int, config: ScoreConfig, run: int,
                    progress: Any = None) -> dict[str, np.ndarray]:
    """Train run ``run`` (seed ``config.seed + run``) on ``(x, y)`` and return ``{column: (n,) scores}``.

    ``progress`` (a tqdm bar or None) advances by one per example processed.

    >>> from dataorder.data import load_digits_split
    >>> split = load_digits_split()
    >>> config = ScoreConfig(model="logreg", scores=("loss", "forgetting"), epochs=1, score_epoch=1)
    >>> scores = train_and_score(split.x_train, split.y_train, 10, config, run=0)
    >>> sorted(scores), scores["loss"].shape
    (['forgetting', 'loss'], (1347,))
    """
    n, seed = len(y), config.seed + run
    torch.manual_seed(seed)
    model = build_model(config.model, tuple(x.shape[1:]), num_classes).to(x.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    trackers = {name: DYNAMICS[name](n) for name in config.scores if name in DYNAMICS}
    wants_pass = any(score in FUNCTIONAL or score == "grand" for score in config.scores)
    results: dict[str, np.ndarray] = {}

    def score_now() -> None:
        results.update(score_model(model, _batches(x, y, config.score_batch_size), config.scores,
                                   grand_params=config.grand_params))
        _advance(progress, n)

    if wants_pass and config.score_epoch == 0:
        score_now()
    for epoch in range(config.epochs if trackers else config.score_epoch):
        if progress is not None:
            progress.set_postfix_str(f"run {run + 1}/{config.runs} epoch {epoch + 1}/{config.epochs}", refresh=False)
        # random reshuffling: the permutation RandomReshuffling(n, seed=seed) gives epoch `epoch`
        order = torch.from_numpy(epoch_rng(seed, epoch).permutation(n)).to(x.device)
        model.train()
        for start in range(0, n, config.batch_size):
            index = order[start:start + config.batch_size]
            targets = y[index]
            logits = model(x[index])
            loss = F.cross_entropy(logits, targets)
            if not torch.isfinite(loss):  # before the update: a diverged run must not go on
                batch = start // config.batch_size
                raise DivergedError(f"run {run} diverged (loss {loss.item()}) in epoch {epoch} at batch {batch}; "
                                    "lower the learning rate", run=run, epoch=epoch, batch=batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for tracker in trackers.values():
                tracker.update(index, logits.detach(), targets)
            _advance(progress, len(index))
        if wants_pass and epoch + 1 == config.score_epoch:
            score_now()
    for name, tracker in trackers.items():
        values = tracker.scores()
        results.update({f"datamap_{k}": v for k, v in values.items()} if name == "datamap" else {name: values})
    scores = {column: results[column] for column in score_columns(config.scores)}
    for column, values in scores.items():  # (forgetting is inf for never-learned examples, by definition)
        if (column in FUNCTIONAL or column == "grand") and not np.isfinite(values).all():  # the pass overflowed
            raise DivergedError(f"run {run}: {int((~np.isfinite(values)).sum())} non-finite {column} scores; "
                                "lower the learning rate", run=run, epoch=config.score_epoch)
    return scores


def _advance(progress: Any, count: int) -> None:
    if progress is not None:
        progress.update(count)


def check_model(model: str, in_shape: tuple[int, ...], num_classes: int, grand_params: str = "all") -> None:
    """Build ``model`` once; check it maps a batch to ``(batch, num_classes)`` logits and has ``grand_params``.

    >>> check_model("logreg", (64,), 10)
    >>> check_model("no_such_module:factory", (64,), 10)
    Traceback (most recent call last):
    ...
    dataorder.scores.runner.ScoreSetupError: --model no_such_module:factory: cannot import model factory module 'no_such_module': No module named 'no_such_module'
    """
    try:
        network = build_model(model, in_shape, num_classes)
        with torch.no_grad():
            shape = tuple(network.eval()(torch.zeros(2, *in_shape)).shape)
    except Exception as error:  # a user's factory may fail in any way: report it in one line
        message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        raise ScoreSetupError(f"--model {model}: {message}{what_it_takes(model)}") from error
    if shape != (2, num_classes):
        raise ScoreSetupError(f"--model {model}: outputs of shape {shape} for 2 examples; expected (2, {num_classes}) logits")
    try:
        parameter_subset(network, grand_params)
    except ValueError as error:
        raise ScoreSetupError(str(error)) from None


def check_inputs(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """Check the examples before anything is written: finite float features, labels in ``[0, num_classes)``.

    >>> check_inputs(torch.zeros(3, 2), torch.tensor([0, 1, 1]), 2)
    >>> check_inputs(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 2)
    Traceback (most recent call last):
    ...
    ValueError: y: labels must be class ids in [0, 2), found 2
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes < 2**31:
        raise ValueError(f"num_classes must be an int in [1, 2**31), got {num_classes!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError(f"x must be a float tensor of shape (n, ...), got {getattr(x, 'dtype', type(x))}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),) or len(y) == 0:
        raise TypeError(f"y must be an int64 tensor of shape ({len(x)},), got {getattr(y, 'dtype', type(y))} "
                        f"{tuple(getattr(y, 'shape', ()))}")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"y: labels must be class ids in [0, {num_classes}), found {low if low < 0 else high}")
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bad.any():
        raise ValueError(f"x: row {int(bad.nonzero()[0])} has NaN or infinite features; impute or drop it")


# -- the bookkeeping: output directory, run files, distributed merge ----------------------------


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    temporary = _temporary(path)
    try:
        with open(temporary, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda handle: json.dump(_jsonable(value), handle, indent=2, sort_keys=True,
                                                 allow_nan=False), mode="w")


def _jsonable(value: Any) -> Any:
    """``nan``/``inf`` become ``None`` so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _manifest(x: torch.Tensor, y: torch.Tensor, num_classes: int, config: ScoreConfig, name: str,
              digest: str | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "dataset": {"name": name, "fingerprint": digest or fingerprint(x, y), "examples": len(y),
                    "num_classes": num_classes,
                    "shape": list(x.shape[1:])},
        "settings": config.settings(),
        "columns": score_columns(config.scores),
    }


def _prepare_out(out: Path, manifest: dict[str, Any]) -> None:
    """Check ``out`` may receive these results; create it and mark it incomplete.

    The scores are a set: a manifest listing the same ones in another order matches, and
    ``manifest["settings"]["scores"]`` takes its order (the runs' keys were computed with it).
    """
    path = out / MANIFEST
    _check_out_path(out)
    if out.is_dir():
        _remove_stale_temporaries(out)
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old_data, old_settings = old["dataset"], old["settings"]
            old_data.get, old_settings.get  # noqa: B018 - both must be mappings
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ScoreSetupError(f"--out {out}: unreadable {MANIFEST} ({error}); delete the directory or pick "
                                  "another") from None
        if old_data.get("fingerprint") != manifest["dataset"]["fingerprint"]:
            raise ScoreSetupError(
                f"--out {out} holds scores of a different dataset ({old_data.get('name')}, "
                f"{old_data.get('examples')} examples); choose another --out or delete it")
        settings = manifest["settings"]
        old_scores = old_settings.get("scores")
        if isinstance(old_scores, list) and sorted(map(str, old_scores)) == sorted(settings["scores"]):
            settings["scores"] = old_scores  # the same set of scores: keep the order its runs were keyed with
        changed = [f"{key} {old_settings.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if old_settings.get(key) != value]
        if changed:
            raise ScoreSetupError(f"--out {out} holds scores computed with other settings ({'; '.join(changed)}); "
                                  "choose another --out or delete it")
    elif out.exists() and not _only_empty_runs(out):
        raise ScoreSetupError(f"--out {out} is not empty and holds no {MANIFEST}; choose a new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in (SCORES_FILE, "consistency.json", "scores.png"):  # nothing may look complete before we finish
            (out / name).unlink(missing_ok=True)
        _write_json(path, {**manifest, "complete": False})
        (out / "runs").mkdir(exist_ok=True)
    except OSError as error:
        raise ScoreSetupError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def _check_out_path(out: Path) -> None:
    """``out`` must be a directory or not exist yet, under directories."""
    if out.exists() and not out.is_dir():
        raise ScoreSetupError(f"--out {out} is a file; give a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ScoreSetupError(f"--out {out}: {parent} is a file, not a directory; give a path under "
                                      "directories")
            return


def _only_empty_runs(out: Path) -> bool:
    """True when ``out`` holds nothing but an empty ``runs/`` (a job killed before its manifest)."""
    entries = list(out.iterdir())
    return all(entry.name == "runs" and entry.is_dir() and not any(entry.iterdir()) for entry in entries)


def _temporary(path: Path) -> Path:
    """The temp file beside ``path`` that this process writes before ``os.replace``."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temp files left by killed jobs (their process is gone); a live job's stay."""
    for folder in (out, out / "runs"):
        if not folder.is_dir():
            continue
        for temporary in folder.glob(".*.tmp*"):
            pid = temporary.name.rpartition(".tmp")[2]
            if pid.isdigit() and not _process_alive(int(pid)):
                temporary.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call in this process: not being written now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: keep the file
    return True


def _run_key(manifest: dict[str, Any], run: int) -> str:
    identity = {"fingerprint": manifest["dataset"]["fingerprint"], "settings": manifest["settings"], "run": run}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _run_path(out: Path, run: int) -> Path:
    return out / "runs" / f"run{run}.npz"


def _load_run(out: Path, run: int, key: str, columns: list[str], n: int,
              unscored: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """A finished run's scores, or None if absent, unreadable (truncated), or from other settings.

    ``unscored`` rows (a text run's reference documents) hold NaN by design; every other row
    must be finite.
    """
    try:
        with np.load(_run_path(out, run), allow_pickle=False) as archive:
            if str(archive["key"]) != key:
                return None
            scores = {column: archive[column] for column in columns}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    scored = np.ones(n, dtype=bool)
    if unscored is not None:
        scored[unscored] = False
    if any(values.shape != (n,) or values.dtype.kind != "f" or not np.isfinite(values[scored]).all()
           or not np.isnan(values[~scored]).all() for values in scores.values()):
        return None
    return scores


def _unscored_rows(manifest: dict[str, Any]) -> np.ndarray | None:
    """Rows a run leaves NaN: the reference documents of a text ``--reference-split`` run."""
    split = manifest["dataset"].get("reference_split")
    return None if split is None else np.asarray(split["reference_documents"], dtype=np.int64)


def _save_run(out: Path, run: int, key: str, scores: dict[str, np.ndarray]) -> None:
    _atomic_write(_run_path(out, run), lambda handle: np.savez(handle, key=np.array(key), **scores))


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # long timeout: ranks wait in the gather while others finish their runs
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _device(name: str, world: int) -> torch.device:
    if name == "cuda" and world > 1:  # one GPU per rank, as torchrun's LOCAL_RANK says
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(name)


def score_dataset(x: torch.Tensor, y: torch.Tensor, num_classes: int, config: ScoreConfig, out: str | os.PathLike,
                  *, name: str = "data", progress: bool = True, plot: bool = True, task: Any = None) -> ScoreResult:
    """Score every example of ``(x, y)`` over ``config.runs`` runs and write the results to ``out``.

    See the module docstring for the files written. Finished runs found in ``out`` are
    reused; the result is identical to an uninterrupted job. ``plot=False`` skips
    ``scores.png`` (matplotlib takes seconds). Raises :class:`ScoreSetupError`
    before writing anything if the model does not build or ``out`` holds other results.
    ``task`` (e.g. :class:`dataorder.scores.text.TextTask`) replaces the classification
    model check and run with its ``check(config)`` and ``train_and_score``, gives the
    dataset's ``fingerprint()`` and adds its ``info`` to the manifest's dataset entry.
    """
    import torch.distributed as dist

    out = Path(out)
    if task is None:  # a task (text windows of byte tokens) checks its own inputs in task.check
        check_inputs(x, y, num_classes)
    rank, world, owned = _distributed()
    try:
        if task is None:
            check_model(config.model, tuple(x.shape[1:]), num_classes,
                        config.grand_params if "grand" in config.scores else "all")
        else:
            task.check(config)
        # a text task's x holds its training windows only: it fingerprints all of them, streamed
        manifest = _manifest(x, y, num_classes, config, name, None if task is None else task.fingerprint())
        if task is not None:
            manifest["dataset"].update(task.info)
        _prepare_out_on_rank0(out, manifest, rank, world)
        device = _device(config.device, world)
        result = ScoreResult(out=out, columns=score_columns(config.scores))
        runs = _score_runs(x.to(device), y.to(device), num_classes, config, manifest, result,
                           list(range(rank, config.runs, world)), progress=progress and rank == 0,
                           scorer=train_and_score if task is None else task.train_and_score)
        if world > 1:
            runs = _gather_on_rank0(runs, result, rank, world)
        if rank == 0:
            for run, scores in runs.items():  # ranks on other machines saved theirs to their own disks
                if not _run_path(out, run).exists():
                    _save_run(out, run, _run_key(manifest, run), scores)
            result.consistency = _write_outputs(out, manifest, result.columns,
                                                [runs[r] for r in range(config.runs)], plot)
        if world > 1:
            dist.barrier()
        return result
    finally:
        if owned:
            dist.destroy_process_group()


def _prepare_out_on_rank0(out: Path, manifest: dict[str, Any], rank: int, world: int) -> None:
    """Rank 0 checks and prepares ``out``; every rank raises the same error if that fails."""
    error = None
    if rank == 0:
        try:
            _prepare_out(out, manifest)
        except ScoreSetupError as failure:
            error = str(failure)
    if world > 1:
        import torch.distributed as dist

        message = [error, manifest["settings"]["scores"]]  # (the order rank 0 adopted keys every rank's runs)
        dist.broadcast_object_list(message, src=0)
        error, manifest["settings"]["scores"] = message
    if error is not None:
        raise ScoreSetupError(error)
    (out / "runs").mkdir(parents=True, exist_ok=True)


def _score_runs(x: torch.Tensor, y: torch.Tensor, num_classes: int, config: ScoreConfig, manifest: dict[str, Any],
                result: ScoreResult, mine: list[int], progress: bool,
                scorer: Callable[..., dict[str, np.ndarray]] = train_and_score) -> dict[int, dict[str, np.ndarray]]:
    """This rank's runs: loaded when finished before, else trained, scored and saved at once."""
    tqdm = require("tqdm.auto", extra="cli", feature="the scoring progress bar").tqdm

    epochs = config.epochs if any(score in DYNAMICS for score in config.scores) else config.score_epoch
    per_run = len(y) * (epochs + 1)  # training epochs + the scoring pass
    runs: dict[int, dict[str, np.ndarray]] = {}
    with tqdm(total=per_run * len(mine), unit="ex", desc="scoring", disable=True if not progress else None,
              dynamic_ncols=True) as bar:
        for run in mine:
            key = _run_key(manifest, run)
            # rows: examples (a text run scores documents; its y holds one entry per training window)
            scores = _load_run(result.out, run, key, result.columns, manifest["dataset"]["examples"],
                               _unscored_rows(manifest))
            if scores is None:
                scores = scorer(x, y, num_classes, config, run, progress=bar)
                _save_run(result.out, run, key, scores)
                result.computed.append(run)
            else:
                bar.update(per_run)
                result.reused.append(run)
            runs[run] = scores
    return runs


def _gather_on_rank0(runs: dict[int, dict[str, np.ndarray]], result: ScoreResult, rank: int,
                     world: int) -> dict[int, dict[str, np.ndarray]]:
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((runs, result.computed, result.reused), gathered, dst=0)
    if rank != 0:
        return runs
    merged: dict[int, dict[str, np.ndarray]] = {}
    result.computed, result.reused = [], []
    for part, computed, reused in gathered:
        merged.update(part)
        result.computed += computed
        result.reused += reused
    result.computed.sort()
    result.reused.sort()
    return merged


def _write_outputs(out: Path, manifest: dict[str, Any], columns: list[str],
                   runs: list[dict[str, np.ndarray]], plot: bool) -> dict[str, Any]:
    by_column = {column: np.stack([run[column] for run in runs]).astype(np.float64) for column in columns}
    report = {column: consistency(values) for column, values in by_column.items()}
    _write_json(out / "consistency.json", report)
    if plot:
        _plot(out / "scores.png", by_column)
    complete = {**manifest, "runs": len(runs), "complete": True,
                "higher_means": {column: HIGHER_MEANS[column] for column in columns}}
    write_scores(out / SCORES_FILE, by_column, complete)
    _write_json(out / MANIFEST, complete)
    return report


def _plot(path: Path, by_column: dict[str, np.ndarray], max_points: int = 5000) -> None:
    """Histogram of each score (mean over runs) above a scatter of run 0 against run 1, four scores a row."""
    matplotlib = require("matplotlib", extra="plot", feature="scores.png (pass plot=False to skip it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = min(4, len(by_column))
    rows = -(-len(by_column) // per_row)
    figure, axes = plt.subplots(2 * rows, per_row, figsize=(3.2 * per_row, 5.6 * rows), squeeze=False, dpi=80)
    for axis in axes[-2:, (len(by_column) - 1) % per_row + 1:].ravel():
        axis.axis("off")  # unused slots of the last row
    for slot, (column, values) in enumerate(by_column.items()):
        row, col = divmod(slot, per_row)
        column_axes = axes[2 * row:2 * row + 2, col]
        mean = values.mean(axis=0)
        finite = np.isfinite(mean)
        column_axes[0].hist(mean[finite], bins=40, color="tab:blue")
        column_axes[0].set_title(f"{column}\n(higher = {HIGHER_MEANS[column]})", fontsize=9)
        if not finite.all():
            column_axes[0].text(0.98, 0.95, f"{(~finite).sum()} inf/nan not shown", ha="right", va="top",
                                transform=column_axes[0].transAxes, fontsize=7)
        if len(values) < 2:
            column_axes[1].axis("off")
            column_axes[1].text(0.5, 0.5, "one run: no run-vs-run scatter", ha="center", fontsize=8)
            continue
        both = np.flatnonzero(np.isfinite(values[0]) & np.isfinite(values[1]))
        if len(both) > max_points:
            both = np.sort(epoch_rng(0).choice(both, max_points, replace=False))
        column_axes[1].scatter(values[0, both], values[1, both], s=2, alpha=0.3, color="tab:orange")
        column_axes[1].set_xlabel("run 0", fontsize=8)
        column_axes[1].set_ylabel("run 1", fontsize=8)
    height = 5.6 * rows
    figure.subplots_adjust(left=0.07, right=0.97, bottom=0.4 / height, top=1 - 0.45 / height, hspace=0.55,
                           wspace=0.35)  # fixed margins: tight_layout costs seconds
    _atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
