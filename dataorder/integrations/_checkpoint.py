"""The sampler's part of a trainer checkpoint, shared by the HF and Lightning integrations.

A trainer checkpoint is written at an optimizer-step boundary, but the trainer's loader has
usually drawn more batches than it trained (accelerate and Lightning prefetch one batch,
DataLoader workers more), so the sampler's own position is ahead of the training. What
*is* exact at that moment is the sampler's learning state (GraB's running sums are
stepped once per trained micro-batch) and the trainer's count of trained batches. So a
checkpoint stores ``sampler.state_dict()`` as it is, and a resume loads it with its
position set to where the *training* was (:func:`at_position`): ``0`` under the HF
``Trainer``, which then re-draws the trained batches of the epoch itself, or the trained
count under Lightning, which does not.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dataorder.errors import DataorderError

__all__ = ["SamplerMismatch", "SamplerStateMissing", "at_position", "check_attached", "check_covers", "load_sampler",
           "sampler_file", "needs_step", "save_sampler"]


class SamplerStateMissing(FileNotFoundError):
    """A checkpoint holds no state for this rank's sampler (it was saved without the integration)."""


class SamplerMismatch(DataorderError, ValueError):
    """The sampler does not fit what the trainer trains: its dataset, its loader or its model.

    A ``ValueError``, so ``except ValueError`` catches it too:

    >>> from dataorder import RandomReshuffling
    >>> check_covers(RandomReshuffling(20), list(range(14)), "train_sampler", "train_dataset")
    Traceback (most recent call last):
    ...
    dataorder.integrations._checkpoint.SamplerMismatch: train_sampler has n=20 examples but len(train_dataset)=14: build the sampler from the dataset it orders
    """


def sampler_examples(sampler: Any) -> int | None:
    """How many examples ``sampler`` indexes (``n``; a mixture's sources together), or ``None`` if it does not say.

    >>> from dataorder import MixtureSampler, RandomReshuffling
    >>> mixture = MixtureSampler({"a": 3, "b": 5}, {"a": 1, "b": 1}, num_samples=8, batch_size=4)
    >>> sampler_examples(RandomReshuffling(6)), sampler_examples(mixture)
    (6, 8)
    """
    sizes = getattr(sampler, "sizes", None)
    if isinstance(sizes, dict):  # MixtureSampler: indices run over the sources concatenated
        return sum(int(size) for size in sizes.values())
    n = getattr(sampler, "n", None)
    return None if n is None else int(n)


def check_covers(sampler: Any, dataset: Any, sampler_name: str, dataset_name: str) -> None:
    """Raise :class:`SamplerMismatch` unless ``sampler`` indexes exactly the examples of ``dataset``.

    A longer sampler fails mid-training with an ``IndexError``; a shorter one silently never
    trains the last examples. A dataset without ``len`` (an iterable one) is not checked.

    >>> from dataorder import RandomReshuffling
    >>> check_covers(RandomReshuffling(4), list(range(6)), "train_sampler", "train_dataset")
    Traceback (most recent call last):
    ...
    dataorder.integrations._checkpoint.SamplerMismatch: train_sampler has n=4 examples but len(train_dataset)=6: build the sampler from the dataset it orders
    """
    n = sampler_examples(sampler)
    try:
        size = len(dataset)
    except TypeError:  # an IterableDataset, or no dataset at all
        return
    if n is not None and n != size:
        raise SamplerMismatch(f"{sampler_name} has n={n} examples but len({dataset_name})={size}: "
                              "build the sampler from the dataset it orders")


def check_attached(sampler: Any, model: Any, model_name: str) -> None:
    """Raise :class:`SamplerMismatch` if GraB's hooks sit on a model that is not (part of) the one training.

    Its ``step()`` would then find no backward pass since the last step. A sampler that is not
    attached (no ghost hooks) is not checked here; :func:`needs_step` refuses it.
    """
    attached = getattr(sampler, "attached_model", None)
    modules = getattr(model, "modules", None)
    if attached is None or modules is None:
        return
    if not any(module is attached for module in modules()):
        raise SamplerMismatch(f"the {type(sampler).__name__} is attached to another model than the one training: "
                              f"attach it to {model_name}")


def sampler_file(directory: str | os.PathLike, rank: int) -> str:
    """Where rank ``rank`` keeps its sampler state inside a checkpoint ``directory``.

    >>> sampler_file("ckpt", 0)
    'ckpt/dataorder_sampler_rank0.pt'
    """
    return os.path.join(os.fspath(directory), f"dataorder_sampler_rank{rank}.pt")


def save_sampler(sampler: Any, directory: str | os.PathLike) -> str:
    """Write ``sampler.state_dict()`` into checkpoint ``directory`` (atomically); return the file.

    >>> import tempfile
    >>> from dataorder import RandomReshuffling
    >>> with tempfile.TemporaryDirectory() as ckpt:
    ...     os.path.basename(save_sampler(RandomReshuffling(4), ckpt))
    'dataorder_sampler_rank0.pt'
    """
    os.makedirs(directory, exist_ok=True)
    path = sampler_file(directory, sampler.rank)
    partial = f"{path}.partial"
    torch.save(sampler.state_dict(), partial)
    os.replace(partial, path)  # a killed save never leaves a truncated state behind
    return path


def load_sampler(sampler: Any, directory: str | os.PathLike, position: int) -> None:
    """Load the state that :func:`save_sampler` wrote into ``directory``, at ``position`` of its epoch.

    Raises :class:`SamplerStateMissing` if the checkpoint has no state for this rank; any
    error of ``load_state_dict`` leaves the sampler unchanged.

    >>> import tempfile
    >>> from dataorder import RandomReshuffling
    >>> sampler = RandomReshuffling(4, seed=1); sampler.set_epoch(2)
    >>> with tempfile.TemporaryDirectory() as ckpt:
    ...     _ = save_sampler(sampler, ckpt)
    ...     fresh = RandomReshuffling(4, seed=1)
    ...     load_sampler(fresh, ckpt, position=1)
    >>> fresh.epoch, list(fresh) == list(sampler)[1:]
    (2, True)
    """
    path = sampler_file(directory, sampler.rank)
    if not os.path.isfile(path):
        raise SamplerStateMissing(
            f"checkpoint {os.fspath(directory)!r} has no {os.path.basename(path)}: it was not saved with "
            "dataorder's trainer integration; resume from a checkpoint it wrote, or start a fresh run"
        )
    state = torch.load(path, weights_only=True)
    sampler.load_state_dict(at_position(state, position))


def at_position(state: dict[str, Any], position: int) -> dict[str, Any]:
    """A copy of a sampler ``state`` whose epoch resumes at this rank's ``position``.

    ``position`` counts what the sampler yields: indices for an index sampler, batches for
    a batch sampler. A run sampler's global ``sample`` moves with it. Everything else --
    the epoch, GraB's stepped positions and sums -- is kept.

    >>> from dataorder import RandomReshuffling
    >>> at_position(RandomReshuffling(8).state_dict(), 3)["position"]
    3
    """
    if not isinstance(state, dict) or not ("position" in state or "sample" in state):
        raise TypeError("state must be a dataorder sampler's state_dict() (a dict with a 'position' or 'sample')")
    moved = dict(state)
    if "sample" in moved:  # run samplers keep only the global count: this rank's position times the world
        moved["sample"] = int(position) * int(state["world_size"])
    else:
        moved["position"] = int(position)
    return moved


def needs_step(sampler: Any) -> bool:
    """Whether ``sampler`` orders by gradients, so a trainer must call ``step()`` after each backward.

    Raises ``TypeError`` for an object that is not a dataorder sampler (no
    ``set_epoch``/``state_dict``/``load_state_dict``), and for a gradient sampler without the
    ghost path (``attach``): a trainer's backward gives no per-example gradients to feed it.

    >>> from dataorder import GraBSampler, RandomReshuffling
    >>> needs_step(GraBSampler(8)), needs_step(RandomReshuffling(8))
    (True, False)
    """
    from dataorder.ordering import GradientOrderSampler

    if not (hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict") and hasattr(sampler, "set_epoch")):
        raise TypeError(f"sampler must be a dataorder sampler (with set_epoch/state_dict), got {type(sampler).__name__}")
    if not isinstance(sampler, GradientOrderSampler):
        return False
    if not hasattr(sampler, "attach"):
        raise TypeError(
            f"{type(sampler).__name__} needs per-example gradients passed to step(grads), which a trainer's "
            "backward does not give; under a trainer use GraBSampler(data).attach(model)"
        )
    return True
