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
(log-perplexity, nats per token), ``el2n`` the mean over its tokens of ``||softmax - onehot||``.
With ``reference_split=f`` (the protocol of Ankner et al. 2024) a seeded random fraction
``f`` of the documents trains the model and only the others are scored; the reference
documents' rows are NaN and listed in the manifest (:func:`scored_documents`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from dataorder.samplers.base import epoch_rng
from dataorder.scores.runner import DivergedError

__all__ = ["TEXT_SCORES", "TextInputError", "TextTask", "Windows", "document_scores", "load_tokenizer",
           "make_windows", "reference_split", "scored_documents", "tokenize"]

TEXT_SCORES = ("loss", "el2n")
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


def tokenize(documents: Sequence[str], tokenizer: Callable[[str], Sequence[int]] | None = None,
             name: str = "tokenizer") -> tuple[list[np.ndarray], int]:
    """``(token arrays, vocabulary size)``; bytes give 256, a tokenizer its largest id + 1.

    >>> tokens, vocab = tokenize(["hi"])
    >>> tokens[0].tolist(), vocab
    ([104, 105], 256)
    """
    out = []
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
        out.append(ids)
    vocab = 256 if tokenizer is None else int(max(int(ids.max()) for ids in out)) + 1
    return out, vocab


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


def make_windows(token_lists: Sequence[np.ndarray], context: int, mode: str = "split") -> Windows:
    """Cut each document into windows (see the module doc); the padding is masked out.

    >>> w = make_windows([np.arange(6)], context=3)
    >>> w.tokens.tolist(), w.mask.tolist()
    ([[0, 1, 2, 3], [3, 4, 5, 0]], [[True, True, True], [True, True, False]])
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise TextInputError(f"--context must be a positive int, got {context!r}")
    if mode not in WINDOW_MODES:
        raise TextInputError(f"--windows must be one of {WINDOW_MODES}, got {mode!r}")
    top = max((int(ids.max()) for ids in token_lists if len(ids)), default=0)
    dtype = np.uint8 if top < 256 else np.int32
    rows, masks, owners = [], [], []
    for d, ids in enumerate(token_lists):
        targets = len(ids) - 1
        count = 1 if mode == "truncate" else -(-targets // context)
        padded = np.full(count * context + 1, _PAD, dtype=dtype)
        padded[:min(len(ids), padded.size)] = ids[:padded.size]
        starts = np.arange(count) * context
        rows.append(padded[starts[:, None] + np.arange(context + 1)])
        masks.append(starts[:, None] + np.arange(1, context + 1) <= targets)
        owners.append(np.full(count, d))
    return Windows(torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(masks)),
                   torch.from_numpy(np.concatenate(owners)), len(token_lists))


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


def document_scores(model: torch.nn.Module, windows: Windows, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Mean token ``loss`` and ``el2n`` of every document, streamed over window batches (eval mode).

    >>> from dataorder.models import ByteLM
    >>> scores = document_scores(ByteLM(context=4, dim=8, layers=1, heads=2), make_windows([np.arange(9)] * 2, 4))
    >>> scores["loss"].shape, bool(scores["loss"][0] == scores["loss"][1])
    ((2,), True)
    """
    sums = {name: np.zeros(windows.documents) for name in TEXT_SCORES}
    counts = np.zeros(windows.documents)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(windows.document), batch_size):
                tokens = windows.tokens[start:start + batch_size].to(device).long()
                mask = windows.mask[start:start + batch_size].to(device)
                owner = windows.document[start:start + batch_size].numpy()
                loss, el2n = _token_losses(model(tokens[:, :-1]), tokens[:, 1:])
                for name, values in (("loss", loss), ("el2n", el2n)):
                    np.add.at(sums[name], owner, (values * mask).sum(1).double().cpu().numpy())
                np.add.at(counts, owner, mask.sum(1).double().cpu().numpy())
    finally:
        model.train(was_training)
    return {name: total / counts for name, total in sums.items()}


# -- one run, and the task the runner drives ----------------------------------------------------
@dataclass
class TextTask:
    """Everything ``dataorder score`` needs for text: built once, then one :meth:`train_and_score` per run.

    ``x``/``y`` (the windows' tokens and their document) are what the runner fingerprints.

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

    @classmethod
    def build(cls, documents: Sequence[str], *, context: int = 128, windows: str = "split",
              tokenizer: str | None = None, reference_fraction: float | None = None, seed: int = 0) -> TextTask:
        if not documents:
            raise TextInputError("no documents to score")
        tokens, vocab = tokenize(documents, load_tokenizer(tokenizer), tokenizer or "bytes")
        made = make_windows(tokens, context, windows)
        info = {"modality": "text", "examples": len(documents), "windows": int(len(made.document)),
                "context": context, "window_mode": windows, "tokenizer": tokenizer or "bytes", "vocab": vocab,
                "tokens": int(sum(len(t) for t in tokens))}
        reference = None
        if reference_fraction is not None:
            reference = reference_split(len(documents), reference_fraction, seed)
            info["reference_split"] = {"fraction": reference_fraction, "seed": seed,
                                       "reference_documents": reference.tolist()}
        return cls(made, vocab, context, info, reference)

    @property
    def x(self) -> torch.Tensor:
        return self.windows.tokens

    @property
    def y(self) -> torch.Tensor:
        return self.windows.document

    def check(self, config: Any) -> None:
        """Refuse scores that have no meaning for text and models that do not map tokens to next-token logits."""
        from dataorder.models import build_model
        from dataorder.scores.runner import ScoreSetupError

        other = [score for score in config.scores if score not in TEXT_SCORES]
        if other:
            raise ScoreSetupError(f"--scores {','.join(other)}: not available for text; use {','.join(TEXT_SCORES)}")
        try:
            model = build_model(config.model, (self.context,), self.vocab)
            with torch.no_grad():
                shape = tuple(model.eval()(self.windows.tokens[:2, :-1].long()).shape)
        except Exception as error:  # a user's factory may fail in any way: report it in one line
            raise ScoreSetupError(f"--model {config.model}: {type(error).__name__}: {error}") from error
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
        owners = y.cpu().numpy()
        train = np.arange(len(y)) if self.reference is None else np.flatnonzero(np.isin(owners, self.reference))
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
        scores = document_scores(model, Windows(x, self.windows.mask.to(x.device), self.windows.document,
                                                self.windows.documents), config.score_batch_size)
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
