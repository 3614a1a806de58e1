"""The one stacked-area picture of mixture weights, shared by ``dataorder schedule plot`` and
:func:`dataorder.samplers.adaptive.plot_weights`, and the check that a figure can be saved
where asked. Needs matplotlib (the ``[plot]`` extra), imported only when a picture is drawn
or a file format is checked."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["check_figure_path", "plot_shares"]


def check_figure_path(path: str | os.PathLike) -> Path:
    """The :class:`~pathlib.Path` a figure asked for at ``path`` is saved to, else a one-line ``ValueError``.

    Its folder must exist and take a new file, and it must not be a folder itself; a suffix
    must be a format matplotlib writes. Without a suffix the figure is a PNG and the path
    returned ends in ``.png`` (matplotlib appends it when saving): the path to report. A
    command that trains before it plots checks first, so a typo costs no training run.

    >>> check_figure_path("curves").name
    'curves.png'
    >>> check_figure_path("/no/such/folder/curves.png")
    Traceback (most recent call last):
    ...
    ValueError: /no/such/folder is not a folder: create it, or save the figure elsewhere
    >>> check_figure_path("curves.txt")
    Traceback (most recent call last):
    ...
    ValueError: matplotlib cannot save a figure as .txt: use .png, .pdf, .svg or another of ...
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: create it, or save the figure elsewhere")
    if target.is_dir():
        raise ValueError(f"{target} is a folder: give a file name, e.g. {target / 'curves.png'}")
    suffix = target.suffix.lstrip(".").lower()
    if suffix:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            others = ", ".join(f".{name}" for name in sorted(set(formats) - {"png", "pdf", "svg"}))
            raise ValueError(f"matplotlib cannot save a figure as .{suffix}: use .png, .pdf, .svg or another of "
                             f"{others}")
    else:
        target = target.with_name(target.name + ".png")  # what matplotlib writes
        if target.is_dir():
            raise ValueError(f"{target} is a folder: give a file name, e.g. {target / 'curves.png'}")
    if not _writable(folder) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"cannot write {target}: {folder} does not take new files here; save the figure elsewhere")
    return target


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: ``os.access`` says yes to root everywhere)."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        handle, name = tempfile.mkstemp(prefix=".dataorder-", suffix=".tmp", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


def plot_shares(x: np.ndarray, weights: np.ndarray, names: Sequence[str], out: str | os.PathLike, *,
                xlabel: str, title: str, step: str | None = None) -> None:
    """Write a PNG of ``weights`` ``(len(x), len(names))`` stacked over ``x`` to ``out``.

    ``step="post"`` draws each weight as constant until the next ``x`` (weights set per batch).

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "shares.png")
    >>> plot_shares(np.arange(3), np.array([[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]), ["a", "b"], path,
    ...             xlabel="step", title="toy")
    >>> os.path.getsize(path) > 0
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(x, np.asarray(weights).T, labels=list(names), **({"step": step} if step else {}))
    ax.set_xlim(x[0], max(x[-1], x[0] + 1) if step else x[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of each batch")
    ax.set_title(title.strip())
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
