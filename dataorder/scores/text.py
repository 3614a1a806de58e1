"""Language-model scores of documents: tokens, windows, a short LM training run, per-document scores.

Documents become token ids (UTF-8 bytes by default, or a tokenizer ``package.module:callable``
mapping a string to a list of ints), then fixed windows of ``context`` predicted tokens:

- ``windows="split"``: consecutive windows of ``context + 1`` tokens sharing one token
  (a window's last target is the next one's first input), the last one padded; every token
  after a document's first is predicted exactly once;
- ``windows="truncate"``: only the first window of each document.

A run trains the model (``--model lm-tiny``: :class:`dataorder.models.ByteLM`, or a factory
``factory((context,), vocab_size)`` returning ``(B, T) -> (B, T, vocab)`` logits) with random
reshuffling of the windows, then scores every document once: ``loss`` is its mean token loss
(log-perplexity, nats per token), ``el2n`` the mean over its tokens of ``||softmax - onehot||``,
``grand`` the norm of the gradient of its ``loss`` (ghost path: ``c^T G c`` over the Gram of its
windows' gradients, :func:`grouped_quadratic`). The scoring pass cuts windows a batch at a time
from a stream of documents (:func:`window_batches`, :func:`score_documents`): its memory is flat
in the number of documents; only the training windows are held.
With ``reference_split=f`` (the protocol of Ankner et al. 2024) a seeded random fraction
``f`` of the documents trains the model and only the others are scored; the reference
documents' rows are NaN and listed in the manifest (:func:`scored_documents`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from dataorder.ghost import GhostBatch
from dataorder.samplers.base import epoch_rng
from dataorder.scores.gradnorm import ghost_batch
from dataorder.scores.runner import DivergedError

__all__ = ["DEFAULT_TEXT_SCORES", "TEXT_SCORES", "TextInputError", "TextTask", "WindowBatch", "Windows",
           "document_scores", "document_windows", "grouped_quadratic", "iter_tokens", "load_tokenizer",
           "make_windows", "reference_split", "score_documents", "scored_documents", "tokenize", "window_batches",
           "window_dtype"]

#: Scores a text run can give; the default ones leave out ``grand`` (a backward per scoring batch).
TEXT_SCORES = ("loss", "el2n", "grand")
DEFAULT_TEXT_SCORES = ("loss", "el2n")
WINDOW_MODES = ("split", "truncate")
_PAD = 0


class TextInputError(ValueError):
    """Documents that cannot be scored: empty, too short, or a tokenizer that fails."""


# -- tokens and windows -------------------------------------------------------------------------
def load_tokenizer(spec: str | None) -> Callable[[str], Sequence[int]] | None:
    """``None`` (bytes) or the callable named by ``package.module:callable``.

    >>> load_tokenizer(None) is None, load_tokenizer("builtins:list").__name__
    (True, 'list')
    """
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise TextInputError(f"--tokenizer must be package.module:callable, got {spec!r}")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise TextInputError(f"--tokenizer {spec}: {type(error).__name__}: {error}") from None
    if not callable(found):
        raise TextInputError(f"--tokenizer {spec} is not callable")
    return found


def iter_tokens(documents: Iterable[str], tokenizer: Callable[[str], Sequence[int]] | None = None,
                name: str = "tokenizer") -> Iterator[np.ndarray]:
    """Each document's token ids, one at a time (UTF-8 bytes, or ``tokenizer(text)``), checked.

    >>> [ids.tolist() for ids in iter_tokens(["hi", "abc"])]
    [[104, 105], [97, 98, 99]]
    """
    for row, text in enumerate(documents):
        if tokenizer is None:
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        else:
            try:
                ids = np.asarray(tokenizer(text), dtype=np.int64)
            except Exception as error:  # a user's callable may fail in any way: one line, with the row
                raise TextInputError(f"--tokenizer {name} failed on document {row}: {type(error).__name__}: {error}") \
                    from None
            if ids.ndim != 1 or (ids.size and ids.min() < 0):
                raise TextInputError(f"--tokenizer {name} must return a list of non-negative ints; on document {row} "
                                     f"it returned shape {ids.shape}")
        if ids.size < 2:
            raise TextInputError(f"document {row} has {ids.size} token(s); a language model needs at least 2 "
                                 "(drop empty or one-token documents)")
        yield ids


def tokenize(documents: Sequence[str], tokenizer: Callable[[str], Sequence[int]] | None = None,
             name: str = "tokenizer") -> tuple[list[np.ndarray], int]:
    """``(token arrays, vocabulary size)``; bytes give 256, a tokenizer its largest id + 1.

    >>> tokens, vocab = tokenize(["hi"])
    >>> tokens[0].tolist(), vocab
    ([104, 105], 256)
    """
    out = list(iter_tokens(documents, tokenizer, name))
    vocab = 256 if tokenizer is None else int(max(int(ids.max()) for ids in out)) + 1
    return out, vocab


def window_dtype(vocab: int) -> np.dtype:
    """How windows store tokens: uint8 when every id is below 256 (bytes), else int32.

    >>> window_dtype(256), window_dtype(50_000)
    (dtype('uint8'), dtype('int32'))
    """
    return np.dtype(np.uint8 if vocab <= 256 else np.int32)


@dataclass(frozen=True)
class Windows:
    """``tokens`` ``(W, context + 1)``, ``mask`` ``(W, context)`` of real targets, ``document`` ``(W,)``.

    Tokens are stored as uint8 when every id is below 256 (bytes), else int32: one byte per
    byte token; batches are widened to int64 on their way to the model.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    document: torch.Tensor
    documents: int


def document_windows(ids: np.ndarray, context: int, mode: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One document's ``(windows (w, context + 1), mask (w, context))``: the one place windows are cut.

    >>> rows, mask = document_windows(np.arange(6), 3, "split", np.dtype(np.uint8))
    >>> rows.tolist(), mask.tolist()
    ([[0, 1, 2, 3], [3, 4, 5, 0]], [[True, True, True], [True, True, False]])
    """
    targets = len(ids) - 1
    count = 1 if mode == "truncate" else -(-targets // context)
    padded = np.full(count * context + 1, _PAD, dtype=dtype)
    padded[:min(len(ids), padded.size)] = ids[:padded.size]
    starts = np.arange(count) * context
    return padded[starts[:, None] + np.arange(context + 1)], starts[:, None] + np.arange(1, context + 1) <= targets


def _check_windowing(context: Any, mode: Any) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise TextInputError(f"--context must be a positive int, got {context!r}")
    if mode not in WINDOW_MODES:
        raise TextInputError(f"--windows must be one of {WINDOW_MODES}, got {mode!r}")


def make_windows(token_lists: Sequence[np.ndarray], context: int, mode: str = "split",
                 dtype: np.dtype | None = None) -> Windows:
    """Cut each document into windows (see the module doc); the padding is masked out.

    ``dtype`` of the stored tokens: by default :func:`window_dtype` of the largest id.

    >>> w = make_windows([np.arange(6)], context=3)
    >>> w.tokens.tolist(), w.mask.tolist()
    ([[0, 1, 2, 3], [3, 4, 5, 0]], [[True, True, True], [True, True, False]])
    """
    _check_windowing(context, mode)
    if dtype is None:
        dtype = window_dtype(max((int(ids.max()) for ids in token_lists if len(ids)), default=0) + 1)
    rows, masks, owners = [], [], []
    for d, ids in enumerate(token_lists):
        windows, mask = document_windows(ids, context, mode, dtype)
        rows.append(windows)
        masks.append(mask)
        owners.append(np.full(len(windows), d))
    return Windows(torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(masks)),
                   torch.from_numpy(np.concatenate(owners)), len(token_lists))


@dataclass(frozen=True)
class WindowBatch:
    """Windows scored together: ``tokens``/``mask`` as in :class:`Windows`, ``document`` (global ids),
    ``weight`` = each window's share of its document's targets (the ``c`` of ``‖Σ c_w g_w‖``), and
    ``whole``: every document here has all its windows here (False: a chunk of one long document)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    document: np.ndarray
    weight: np.ndarray
    whole: bool


class _Part(NamedTuple):
    """A document's windows (or the tail of them), before batching."""

    document: int
    windows: np.ndarray
    mask: np.ndarray
    weight: np.ndarray


def _cut(d: int, ids: np.ndarray, context: int, mode: str, dtype: np.dtype) -> _Part:
    windows, mask = document_windows(ids, context, mode, dtype)
    return _Part(d, windows, mask, mask.sum(1) / mask.sum())


def _join(parts: list[_Part], whole: bool) -> WindowBatch:
    return WindowBatch(torch.from_numpy(np.concatenate([p.windows for p in parts])),
                       torch.from_numpy(np.concatenate([p.mask for p in parts])),
                       np.concatenate([np.full(len(p.windows), p.document) for p in parts]),
                       np.concatenate([p.weight for p in parts]), whole)


def _slice(batch: WindowBatch, part: slice, whole: bool) -> WindowBatch:
    return WindowBatch(batch.tokens[part], batch.mask[part], batch.document[part], batch.weight[part], whole)


def _pack(parts: Iterable[_Part], batch_size: int, whole_documents: bool) -> Iterator[WindowBatch]:
    """The one batching rule (see :func:`window_batches`) over documents' windows, in order."""
    pending: list[_Part] = []
    held = 0
    for part in parts:
        count = len(part.windows)
        if whole_documents and held + count > batch_size and pending:
            yield _join(pending, whole=True)
            pending, held = [], 0
        if whole_documents and count > batch_size:  # a long document: chunks of its own
            alone = _join([part], whole=False)
            for start in range(0, count, batch_size):
                yield _slice(alone, slice(start, start + batch_size), whole=False)
            continue
        pending.append(part)
        held += count
        if not whole_documents and held >= batch_size:  # cut whole batches off the front, keep the tail
            joined = _join(pending, whole=False)
            full = held - held % batch_size
            for start in range(0, full, batch_size):
                yield _slice(joined, slice(start, start + batch_size), whole=False)
            tail = _slice(joined, slice(full, held), whole=False)  # all of it from this document
            pending = [_Part(part.document, tail.tokens.numpy(), tail.mask.numpy(), tail.weight)] if held > full else []
            held -= full
    if pending:
        yield _join(pending, whole=whole_documents)


def window_batches(token_lists: Iterable[np.ndarray], context: int, mode: str = "split", *, batch_size: int = 256,
                   whole_documents: bool = False, dtype: np.dtype | None = None) -> Iterator[WindowBatch]:
    """Windows of a stream of documents, ``batch_size`` at a time, cut as they are needed.

    Memory: one batch plus one document's windows. ``whole_documents=False`` cuts every
    ``batch_size`` windows regardless of documents (the batches of :func:`make_windows`'
    windows in order); ``True`` never splits a document across batches unless it alone has
    more than ``batch_size`` windows, which then come in chunks of ``batch_size``
    (``whole=False``). ``dtype`` defaults to uint8 (bytes; see :func:`window_dtype`).

    >>> [b.document.tolist() for b in window_batches([np.arange(8), np.arange(3)], 3, batch_size=2)]
    [[0, 0], [0, 1]]
    >>> [(b.document.tolist(), b.whole) for b in window_batches([np.arange(3), np.arange(8)], 3, batch_size=2,
    ...                                                          whole_documents=True)]
    [([0], True), ([1, 1], False), ([1], False)]
    """
    _check_windowing(context, mode)
    _check_batch_size(batch_size)
    dtype = np.dtype(np.uint8) if dtype is None else dtype
    yield from _pack((_cut(d, ids, context, mode, dtype) for d, ids in enumerate(token_lists)), batch_size,
                     whole_documents)


def _stored_batches(windows: Windows, batch_size: int, whole_documents: bool) -> Iterator[WindowBatch]:
    """:func:`window_batches` of windows already cut (documents' windows are consecutive)."""
    owner = windows.document.cpu().numpy()
    targets = windows.mask.sum(1).cpu().numpy()
    edges = np.flatnonzero(np.diff(owner)) + 1
    bounds = zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(owner)]]))
    parts = (_Part(int(owner[a]), windows.tokens[a:b].cpu().numpy(), windows.mask[a:b].cpu().numpy(),
                   targets[a:b] / targets[a:b].sum()) for a, b in bounds)
    return _pack(parts, batch_size, whole_documents)


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TextInputError(f"batch_size must be a positive int, got {batch_size!r}")


def reference_split(documents: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the ``round(fraction * documents)`` reference documents (seeded, at least 1).

    >>> reference_split(10, 0.2, seed=0).tolist() == reference_split(10, 0.2, seed=0).tolist()
    True
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise TextInputError(f"--reference-split must be a fraction in (0, 1), got {fraction!r}")
    count = max(1, min(documents - 1, round(fraction * documents)))
    return np.sort(epoch_rng(seed, 0x5EF).choice(documents, size=count, replace=False))


# -- the math: per-document scores of a language model ----------------------------------------
def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and ``||softmax - onehot||`` of ``(B, T, V)`` logits."""
    loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    probs = logits.softmax(-1)
    probs = probs - F.one_hot(targets, logits.shape[-1]).to(probs.dtype)
    return loss, probs.norm(dim=-1)


def _mean_window_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch mean of each window's mean loss over its real targets (padding has no gradient)."""
    loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (torch.where(mask, loss, 0.0).sum(1) / mask.sum(1)).mean()


def grouped_quadratic(gram: torch.Tensor, weight: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """``(groups,)``: ``Σ_{i, j in group g} w_i w_j G_ij``, i.e. ``‖Σ_{i in g} w_i g_i‖²`` from the Gram ``G``.

    >>> rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    >>> grouped_quadratic(rows @ rows.T, torch.tensor([0.5, 0.5, 1.0]), torch.tensor([0, 0, 1]), 2).tolist()
    [1.25, 9.0]
    """
    same = group[:, None] == group[None, :]
    inner = torch.where(same, gram, 0.0) @ weight
    return torch.zeros(groups, dtype=gram.dtype, device=gram.device).index_add_(0, group, weight * inner)


def _whole_documents_sq(batch: GhostBatch, weight: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """Squared gradient norms of the ``groups`` documents whose windows are all in ``batch`` (float64)."""
    sizes = torch.bincount(group, minlength=groups)
    multi = sizes[group] > 1
    out = torch.zeros(groups, dtype=torch.float64)
    for rows, is_multi in (((~multi).nonzero()[:, 0], False), (multi.nonzero()[:, 0], True)):
        if not len(rows):
            continue
        part = batch if len(rows) == len(group) else batch.select(rows)
        if is_multi:  # documents of several windows: c^T G c over their windows' Gram
            out += grouped_quadratic(part.gram().double().cpu(), weight[rows], group[rows], groups)
        else:  # one window: its squared norm, no off-diagonal work
            out.index_add_(0, group[rows], part.sq_norms().double().cpu())
    return out


class _Totals:
    """Per-document float64 sums that grow with the documents seen (a stream's length is not known)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.sums = {name: np.zeros(0) for name in names}
        self.documents = 0

    def add(self, name: str, owner: np.ndarray, values: np.ndarray) -> None:
        top = int(owner.max()) + 1
        if top > len(self.sums[name]):
            grown = np.zeros(max(top, 2 * len(self.sums[name]), 1024))
            grown[:len(self.sums[name])] = self.sums[name]
            self.sums[name] = grown
        self.documents = max(self.documents, top)
        np.add.at(self.sums[name], owner, values)

    def set(self, name: str, document: int, value: float) -> None:
        self.add(name, np.array([document]), np.array([value]))

    def get(self, name: str, documents: int) -> np.ndarray:
        values = self.sums[name][:documents]
        return np.concatenate([values, np.zeros(documents - len(values))]) if len(values) < documents else values.copy()


class _GrandSums:
    """Each document's squared gradient norm, batch by batch: whole documents from their windows'
    Gram; a document longer than a batch from its gradient summed over its chunks (one ``d``-vector)."""

    def __init__(self, totals: _Totals) -> None:
        self.totals, self.document, self.gradient = totals, -1, None

    def add(self, batch: WindowBatch, ghost: GhostBatch) -> None:
        weight = torch.from_numpy(batch.weight)
        if batch.whole:
            self.finish()
            local = torch.from_numpy(batch.document - batch.document[0])  # a batch's documents are consecutive
            sq = _whole_documents_sq(ghost, weight, local, int(local.max()) + 1)
            self.totals.add("grand", batch.document[0] + np.arange(len(sq)), sq.numpy())
            return
        if int(batch.document[0]) != self.document:
            self.finish()
            self.document = int(batch.document[0])
            self.gradient = torch.zeros(1, ghost.dim, device=ghost.device)
        ghost.add_weighted_(self.gradient, weight[None].float())

    def finish(self) -> None:
        if self.gradient is not None:
            self.totals.set("grand", self.document, float(self.gradient.double().square().sum()))
        self.document, self.gradient = -1, None


def _score_batches(model: torch.nn.Module, batches: Iterable[WindowBatch], scores: Sequence[str],
                   params: Sequence[str] | None, documents: int | None = None) -> dict[str, np.ndarray]:
    """The scoring pass over window batches (eval mode, restored; no ``.grad`` touched)."""
    totals = _Totals(("loss", "el2n", "count", "grand"))
    grand = _GrandSums(totals) if "grand" in scores else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            tokens, mask = batch.tokens.to(device).long(), batch.mask.to(device)
            if grand is not None:
                ghost, logits = ghost_batch(model, tokens[:, :-1],
                                            lambda out: _mean_window_loss(out, tokens[:, 1:], mask), params)
                grand.add(batch, ghost)
                del ghost
            else:
                with torch.no_grad():
                    logits = model(tokens[:, :-1])
            with torch.no_grad():
                loss, el2n = _token_losses(logits, tokens[:, 1:])
            for name, values in (("loss", loss), ("el2n", el2n)):
                totals.add(name, batch.document, (values * mask).sum(1).double().cpu().numpy())
            totals.add("count", batch.document, mask.sum(1).double().cpu().numpy())
        if grand is not None:
            grand.finish()
    finally:
        model.train(was_training)
    documents = totals.documents if documents is None else documents
    counts = totals.get("count", documents)
    out = {name: totals.get(name, documents) / counts for name in ("loss", "el2n")}
    out["grand"] = np.sqrt(np.clip(totals.get("grand", documents), 0, None))
    return {name: out[name] for name in scores}


def _check_scores(scores: Sequence[str]) -> tuple[str, ...]:
    scores = tuple(dict.fromkeys(scores))
    other = [score for score in scores if score not in TEXT_SCORES]
    if other or not scores:
        raise TextInputError(f"scores {','.join(other) or '(none)'}: not available for text; "
                             f"use {','.join(TEXT_SCORES)}")
    return scores


def document_scores(model: torch.nn.Module, windows: Windows, batch_size: int = 256, *,
                    scores: Sequence[str] = DEFAULT_TEXT_SCORES, grand_params: str = "all") -> dict[str, np.ndarray]:
    """Per-document ``scores`` of windows already cut: mean token ``loss``, ``el2n``, ``grand`` (eval mode).

    ``grand`` is the L2 norm of the gradient of the document's mean token loss with respect
    to the parameters ``grand_params`` selects (``all``, ``last`` or names, as
    :func:`~dataorder.scores.runner.parameter_subset`), from ghost Grams of its windows'
    gradients (batches then hold whole documents; see :func:`window_batches`). No ``.grad``
    is touched and the model's mode is restored.

    >>> from dataorder.models import ByteLM
    >>> scores = document_scores(ByteLM(context=4, dim=8, layers=1, heads=2), make_windows([np.arange(9)] * 2, 4),
    ...                          scores=("loss", "grand"))
    >>> scores["loss"].shape, bool(scores["loss"][0] == scores["loss"][1]), bool(scores["grand"][0] > 0)
    ((2,), True, True)
    """
    scores = _check_scores(scores)
    _check_batch_size(batch_size)
    params = _grand_params(model, grand_params) if "grand" in scores else None
    return _score_batches(model, _stored_batches(windows, batch_size, "grand" in scores), scores, params,
                          windows.documents)


def score_documents(model: torch.nn.Module, documents: Iterable[str], *, context: int, windows: str = "split",
                    tokenizer: str | Callable[[str], Sequence[int]] | None = None, batch_size: int = 256,
                    scores: Sequence[str] = DEFAULT_TEXT_SCORES, grand_params: str = "all") -> dict[str, np.ndarray]:
    """:func:`document_scores` of a stream of documents, tokenized and cut a batch at a time.

    Memory is one batch of windows, one document's tokens and the outputs (a float per
    document and score), whatever the number of documents; the values equal
    :func:`document_scores` of all the windows at once, exactly. ``tokenizer``: None
    (bytes), a callable or a ``package.module:callable`` name.

    >>> from dataorder.models import ByteLM
    >>> lines = (f"line {i}\\n" for i in range(1000))           # any iterable, e.g. a file
    >>> score_documents(ByteLM(context=8, dim=8, layers=1, heads=2), lines, context=8)["loss"].shape
    (1000,)
    """
    scores = _check_scores(scores)
    _check_batch_size(batch_size)
    params = _grand_params(model, grand_params) if "grand" in scores else None
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "__name__", "tokenizer")
    call = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    batches = window_batches(iter_tokens(documents, call, name), context, windows, batch_size=batch_size,
                             whole_documents="grand" in scores, dtype=window_dtype(256 if call is None else 2**31))
    return _score_batches(model, batches, scores, params)


def _grand_params(model: torch.nn.Module, spec: str) -> list[str] | None:
    from dataorder.scores.runner import parameter_subset

    try:
        return parameter_subset(model, spec)
    except ValueError as error:
        raise TextInputError(str(error)) from None


# -- one run, and the task the runner drives ----------------------------------------------------
@dataclass
class TextTask:
    """Everything ``dataorder score`` needs for text: built once, then one :meth:`train_and_score` per run.

    ``windows`` holds the *training* windows only: every document's, or with a reference
    split the reference documents' (``windows.document`` keeps the documents' own indices).
    ``x``/``y`` are those windows' tokens and documents. The other documents are never held
    as tokens or windows: the scoring pass and :meth:`fingerprint` re-tokenize ``documents``
    one batch at a time.

    >>> import tempfile
    >>> from dataorder.scores.runner import ScoreConfig, score_dataset
    >>> task = TextTask.build(["def f(x):\\n    return x\\n", "a short sentence.\\n"] * 8, context=8)
    >>> config = ScoreConfig(model="lm-tiny", scores=("loss",), runs=1, epochs=1, score_epoch=1)
    >>> result = score_dataset(task.x, task.y, task.vocab, config, tempfile.mkdtemp(), progress=False, plot=False,
    ...                        task=task)
    >>> result.columns
    ['loss']
    """

    windows: Windows
    vocab: int
    context: int
    info: dict[str, Any]
    reference: np.ndarray | None = None  # documents that train the model (None: all of them, scored in-sample)
    documents: Sequence[str] = ()  # the texts, re-read by the streamed passes when windows hold only some
    tokenizer: str | None = None
    mode: str = "split"
    counts: np.ndarray | None = None  # windows per document

    @classmethod
    def build(cls, documents: Sequence[str], *, context: int = 128, windows: str = "split",
              tokenizer: str | None = None, reference_fraction: float | None = None, seed: int = 0) -> TextTask:
        if not documents:
            raise TextInputError("no documents to score")
        _check_windowing(context, windows)
        reference = None if reference_fraction is None else reference_split(len(documents), reference_fraction, seed)
        training = np.ones(len(documents), dtype=bool) if reference is None else np.isin(np.arange(len(documents)),
                                                                                         reference)
        kept, lengths, top = [], np.zeros(len(documents), dtype=np.int64), 0
        for d, ids in enumerate(iter_tokens(documents, load_tokenizer(tokenizer), tokenizer or "bytes")):
            lengths[d], top = len(ids), max(top, int(ids.max()))  # every document checked before anything runs
            if training[d]:
                kept.append(ids)
        vocab = 256 if tokenizer is None else top + 1
        made = make_windows(kept, context, windows, window_dtype(vocab))
        made = Windows(made.tokens, made.mask, torch.from_numpy(np.flatnonzero(training))[made.document],
                       len(documents))
        counts = np.ones(len(documents), dtype=np.int64) if windows == "truncate" else -(-(lengths - 1) // context)
        info = {"modality": "text", "examples": len(documents), "windows": int(counts.sum()),
                "context": context, "window_mode": windows, "tokenizer": tokenizer or "bytes", "vocab": vocab,
                "tokens": int(lengths.sum())}
        if reference is not None:
            info["reference_split"] = {"fraction": reference_fraction, "seed": seed,
                                       "reference_documents": reference.tolist()}
        return cls(made, vocab, context, info, reference, documents, tokenizer, windows, counts)

    @property
    def x(self) -> torch.Tensor:
        return self.windows.tokens

    @property
    def y(self) -> torch.Tensor:
        return self.windows.document

    def batches(self, batch_size: int, whole_documents: bool = False) -> Iterator[WindowBatch]:
        """Every document's windows, ``batch_size`` at a time (:func:`window_batches`): read from the
        stored windows when they hold all documents, else cut from re-tokenized ``documents``."""
        if self.reference is None:
            return _stored_batches(self.windows, batch_size, whole_documents)
        tokens = iter_tokens(self.documents, load_tokenizer(self.tokenizer), self.tokenizer or "bytes")
        return window_batches(tokens, self.context, self.mode, batch_size=batch_size,
                              whole_documents=whole_documents, dtype=window_dtype(self.vocab))

    def fingerprint(self, chunk: int = 4096) -> str:
        """:func:`dataorder.data.fingerprint` of all windows' tokens and documents, streamed: the same
        digest as of the arrays :func:`make_windows` would give, without holding them."""
        import hashlib

        digest = hashlib.sha256()
        total = int(self.counts.sum())
        digest.update(f"{window_dtype(self.vocab).str}{(total, self.context + 1)}".encode())
        for batch in self.batches(chunk):
            digest.update(np.ascontiguousarray(batch.tokens.numpy()).data)
        digest.update(f"{np.dtype(np.int64).str}{(total,)}".encode())
        for start in range(0, len(self.counts), chunk):
            owners = np.repeat(np.arange(start, min(start + chunk, len(self.counts)), dtype=np.int64),
                               self.counts[start:start + chunk])
            digest.update(owners.data)
        return digest.hexdigest()

    def check(self, config: Any) -> None:
        """Refuse scores that have no meaning for text and models that do not map tokens to next-token logits."""
        from dataorder.models import build_model, what_it_takes
        from dataorder.scores.runner import ScoreSetupError, parameter_subset

        other = [score for score in config.scores if score not in TEXT_SCORES]
        if other:
            raise ScoreSetupError(f"--scores {','.join(other)}: not available for text; use {','.join(TEXT_SCORES)}")
        if "grand" in config.scores:
            try:
                parameter_subset(build_model(config.model, (self.context,), self.vocab), config.grand_params)
            except Exception as error:  # an unknown name, or a factory that fails: one line
                raise ScoreSetupError(f"--grand-params {config.grand_params}: {error}") from None
        try:
            model = build_model(config.model, (self.context,), self.vocab)
            with torch.no_grad():
                shape = tuple(model.eval()(self.windows.tokens[:2, :-1].long()).shape)
        except Exception as error:  # a user's factory may fail in any way: report it in one line
            raise ScoreSetupError(f"--model {config.model}: {type(error).__name__}: {error}"
                                  f"{what_it_takes(config.model)}") from error
        want = (min(2, len(self.windows.document)), self.context, self.vocab)
        if shape != want:
            raise ScoreSetupError(f"--model {config.model}: outputs of shape {shape}; a text model must give "
                                  f"(batch, context, vocab) = {want} next-token logits")

    def train_and_score(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, config: Any, run: int,
                        progress: Any = None) -> dict[str, np.ndarray]:
        """Train run ``run`` (seed ``config.seed + run``) on the windows, then score the documents."""
        from dataorder.models import build_model

        seed = config.seed + run
        torch.manual_seed(seed)
        model = build_model(config.model, (self.context,), self.vocab).to(x.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        train = np.arange(len(y))  # x holds the training windows only
        model.train()
        for epoch in range(config.score_epoch):
            if progress is not None:
                progress.set_postfix_str(f"run {run + 1}/{config.runs} epoch {epoch + 1}/{config.score_epoch}",
                                         refresh=False)
            order = torch.from_numpy(train[epoch_rng(seed, epoch).permutation(len(train))]).to(x.device)
            for start in range(0, len(order), config.batch_size):
                index = order[start:start + config.batch_size]
                tokens, mask = x[index].long(), self.windows.mask[index.cpu()].to(x.device)
                loss, _ = _token_losses(model(tokens[:, :-1]), tokens[:, 1:])
                loss = (loss * mask).sum() / mask.sum()
                if not math.isfinite(loss.item()):  # before this batch's update, like the vector runner
                    raise DivergedError(f"run {run} diverged (loss {loss.item()}) in epoch {epoch} at batch "
                                        f"{start // config.batch_size}; lower the learning rate",
                                        run=run, epoch=epoch, batch=start // config.batch_size)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if progress is not None:
                    progress.update(len(index))
        scores = tuple(config.scores)
        params = _grand_params(model, config.grand_params) if "grand" in scores else None
        scores = _score_batches(model, self.batches(config.score_batch_size, "grand" in scores), scores, params,
                                self.windows.documents)
        if progress is not None:
            progress.update(len(y))
        if self.reference is not None:
            for values in scores.values():
                values[self.reference] = np.nan
        return scores


def scored_documents(manifest: dict[str, Any]) -> np.ndarray | None:
    """The documents a ``--reference-split`` run scored (all but the reference ones); None without a split.

    >>> scored_documents({"dataset": {"examples": 4, "reference_split": {"reference_documents": [1]}}}).tolist()
    [0, 2, 3]
    """
    split = manifest["dataset"].get("reference_split")
    if split is None:
        return None
    keep = np.ones(manifest["dataset"]["examples"], dtype=bool)
    keep[split["reference_documents"]] = False
    return np.flatnonzero(keep)
