"""A real text corpus on every machine without a download: the running Python's standard library.

The corpus is the ``.py`` source files of ``sysconfig.get_paths()["stdlib"]``, in three
domains for mixture experiments:

- ``code``: library modules (every file outside the ``test`` package), as source text;
- ``tests``: the files of the ``test`` package (``Lib/test``), where the interpreter ships it;
- ``prose``: the docstrings of the ``code`` files (module, class and function docstrings,
  extracted with :mod:`ast`), one document per file, docstrings joined by blank lines.

Selection is fixed and documented: every ``.py`` file below the stdlib root except
``site-packages``/``dist-packages`` and ``__pycache__``, ordered by relative POSIX path; files
that are not valid UTF-8 are skipped. A file belongs to the validation split when the first
8 bytes of ``sha256(relative path)`` read as a fraction fall below ``validation_fraction``, so
the split depends on the path alone (not on which other files exist). ``max_bytes`` caps each
domain: files are taken in the order of ``sha256("order:" + relative path)`` until the cap, so
a cap gives the same files on every machine that has them (a hash independent of the split's,
so a capped corpus keeps about ``validation_fraction`` of its files for validation). The
corpus's SHA-256 fingerprint covers every selected document's domain, path and bytes: two runs
on the same interpreter report the same one.

Tokens are bytes (``0..255``): :func:`byte_windows` cuts documents into fixed windows for a
byte-level language model.

>>> corpus = load_stdlib_corpus(max_bytes=20_000)
>>> sorted({doc.domain for doc in corpus.documents}) == sorted(corpus.domains)
True
>>> len(corpus.fingerprint)
64
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Document", "TextCorpus", "WindowSet", "byte_windows", "load_stdlib_corpus", "stdlib_root"]

DOMAINS = ("code", "tests", "prose")
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One document of a :class:`TextCorpus`: its source path, domain, split and text."""

    path: str
    domain: str
    split: str
    text: str


@dataclass(frozen=True)
class TextCorpus:
    """Documents with their domain and train/validation split, and a SHA-256 fingerprint.

    >>> corpus = TextCorpus.from_documents([Document("a.py", "code", "train", "x = 1\\n")])
    >>> corpus.select(split="train")[0].text
    'x = 1\\n'
    """

    documents: tuple[Document, ...]
    fingerprint: str
    root: str

    @property
    def domains(self) -> tuple[str, ...]:
        """The domains present, in the order ``code``, ``tests``, ``prose``."""
        present = {doc.domain for doc in self.documents}
        return tuple(d for d in DOMAINS if d in present) + tuple(sorted(present - set(DOMAINS)))

    def select(self, *, split: str | None = None, domain: str | None = None) -> list[Document]:
        """The documents of one split and/or domain, in corpus order."""
        return [doc for doc in self.documents
                if (split is None or doc.split == split) and (domain is None or doc.domain == domain)]

    @classmethod
    def from_documents(cls, documents: Iterable[Document], root: str = "") -> TextCorpus:
        """A corpus of the given documents, fingerprinted."""
        docs = tuple(documents)
        return cls(docs, _fingerprint(docs), root)


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory.

    >>> (stdlib_root() / "os.py").is_file()
    True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def load_stdlib_corpus(*, validation_fraction: float = 0.1, max_bytes: int | None = None,
                       domains: Sequence[str] = DOMAINS, root: str | Path | None = None) -> TextCorpus:
    """The standard-library text corpus (see the module docstring for the exact selection).

    ``max_bytes`` caps each domain's total UTF-8 size (``None``: every file); ``domains``
    picks a subset of ``code``, ``tests``, ``prose``; ``root`` reads another directory laid
    out like a stdlib (tests use it).

    >>> corpus = load_stdlib_corpus(max_bytes=10_000, domains=("code",))
    >>> corpus.domains
    ('code',)
    """
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)) \
            or not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {validation_fraction!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if isinstance(domains, str) or not isinstance(domains, Iterable):
        raise TypeError(f"domains must be a sequence of domain names, e.g. domains=('code',), got {domains!r}")
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"domains must be a non-empty subset of {DOMAINS}, got {tuple(domains)!r}")
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"standard-library directory {str(base)!r} does not exist")

    files = {"code": [], "tests": []}
    for path in sorted(base.rglob("*.py"), key=lambda p: p.relative_to(base).as_posix()):
        rel = path.relative_to(base)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]):
            continue
        files["tests" if rel.parts[0] == "test" else "code"].append(rel.as_posix())

    documents: list[Document] = []
    for domain in [d for d in DOMAINS if d in domains]:
        source_domain = "code" if domain == "prose" else domain
        budget = max_bytes
        chosen: list[Document] = []
        for rel in sorted(files[source_domain], key=_cap_order) if max_bytes else files[source_domain]:
            text = _read_text(base / rel)
            if text is None:
                continue
            if domain == "prose":
                text = _docstrings(text)
            if not text.strip():
                continue
            size = len(text.encode("utf-8"))
            if budget is not None and size > budget:
                if chosen:
                    break
                continue
            split = "validation" if _path_fraction(rel) < validation_fraction else "train"
            chosen.append(Document(rel, domain, split, text))
            if budget is not None:
                budget -= size
        if not chosen and max_bytes and files[source_domain]:
            raise ValueError(f"no {domain!r} document fits max_bytes={max_bytes} under {str(base)!r}: raise max_bytes")
        documents += sorted(chosen, key=lambda doc: doc.path)
    return TextCorpus.from_documents(documents, str(base))


@dataclass(frozen=True)
class WindowSet:
    """Fixed-length byte windows: ``tokens`` is ``(N, context + 1)`` int64 (input + next byte),
    ``domain`` is ``(N,)`` int64 into ``domains``, ``document`` the window's document index.

    >>> windows = byte_windows([Document("a.py", "code", "train", "abcdefgh")], context=3)
    >>> windows.tokens.tolist()
    [[97, 98, 99, 100], [100, 101, 102, 103]]
    """

    tokens: torch.Tensor
    domain: torch.Tensor
    document: torch.Tensor
    domains: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: the first ``context`` bytes and the bytes one position later."""
        return self.tokens[:, :-1], self.tokens[:, 1:]


def byte_windows(documents: Sequence[Document], context: int, *, max_windows_per_document: int | None = None,
                 domains: Sequence[str] | None = None) -> WindowSet:
    """Cut each document's UTF-8 bytes into non-overlapping windows of ``context + 1`` bytes.

    Consecutive windows share one byte (a window's last target is the next window's first
    input), so every byte but the first of a document is predicted once. A document shorter
    than one window gives none; the tail that does not fill a window is dropped.
    ``max_windows_per_document`` keeps the first windows of each document only.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    if max_windows_per_document is not None and (isinstance(max_windows_per_document, bool) or not isinstance(
            max_windows_per_document, int) or max_windows_per_document < 1):
        raise ValueError(f"max_windows_per_document must be a positive int or None (every window), got "
                         f"{max_windows_per_document!r}")
    names = tuple(domains) if domains is not None else tuple(dict.fromkeys(doc.domain for doc in documents))
    rows, domain_ids, doc_ids = [], [], []
    for d, doc in enumerate(documents):
        data = np.frombuffer(doc.text.encode("utf-8"), dtype=np.uint8)
        count = (len(data) - 1) // context
        if max_windows_per_document is not None:
            count = min(count, max_windows_per_document)
        if count <= 0:
            continue
        starts = np.arange(count) * context
        rows.append(data[starts[:, None] + np.arange(context + 1)])
        domain_ids.append(np.full(count, names.index(doc.domain)))
        doc_ids.append(np.full(count, d))
    if not rows:
        raise ValueError(f"no document is longer than context={context} bytes; lower the context")
    return WindowSet(torch.from_numpy(np.concatenate(rows).astype(np.int64)),
                     torch.from_numpy(np.concatenate(domain_ids).astype(np.int64)),
                     torch.from_numpy(np.concatenate(doc_ids).astype(np.int64)), names)


# -- helpers ------------------------------------------------------------------------------------
def _path_hash(rel: str) -> bytes:
    return hashlib.sha256(rel.encode("utf-8")).digest()


def _cap_order(rel: str) -> bytes:
    # not _path_hash: ordering by the split's own hash would fill a cap with validation files first
    return _path_hash("order:" + rel)


def _path_fraction(rel: str) -> float:
    return int.from_bytes(_path_hash(rel)[:8], "big") / 2.0**64


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _docstrings(source: str) -> str:
    """Module, class and function docstrings of ``source`` in source order ('' if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    found = []
    for node in nodes:
        text = ast.get_docstring(node, clean=True)
        if text:
            found.append((getattr(node, "lineno", 0), text))
    return "\n\n".join(text for _, text in sorted(found, key=lambda item: item[0]))


def _fingerprint(documents: Sequence[Document]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.text.encode("utf-8")
        digest.update(f"{doc.domain}\0{doc.split}\0{doc.path}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
