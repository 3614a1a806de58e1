"""The one stacked-area picture of mixture weights, shared by ``dataorder schedule plot`` and
:func:`dataorder.samplers.adaptive.plot_weights`. Needs matplotlib (the ``[plot]`` extra),
imported only when a picture is drawn."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_shares"]


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
