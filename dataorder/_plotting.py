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
    """``path`` as a :class:`~pathlib.Path` if a figure can be saved there, else a one-line ``ValueError``.

    Its folder must exist and it must not be a folder itself; a suffix must be a format
    matplotlib writes (none: PNG). A command that trains before it plots checks first, so a
    typo costs no training run.

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
    return target


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
