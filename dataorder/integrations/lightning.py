"""dataorder samplers inside Lightning's ``Trainer`` (lightning 2.x).

Give the ``DataLoader`` a dataorder sampler as usual (``sampler=`` or, for
``StratifiedBatchSampler``, ``batch_sampler=``) and add a :class:`DataOrderCallback`. It

* calls ``set_epoch`` at the start of each epoch;
* calls GraB's ``step()`` after each backward (``on_after_backward``: every micro-batch, in
  order, also with ``accumulate_grad_batches``);
* stores the sampler's state in every checkpoint (``checkpoint["dataorder"]``) and restores
  it on ``trainer.fit(..., ckpt_path=...)``. Lightning continues a mid-epoch checkpoint
  with the batches the loader still yields and does not skip any itself, so the state is
  loaded at the position of the batches *trained* (the loader prefetches one more), and the
  resumed run sees the same order and, with Lightning's own restore, the same losses. A
  checkpoint of a finished epoch resumes in the next one, which Lightning enters without
  ``on_train_epoch_start``: the callback moves the sampler there when it loads the state;
* refuses, when training starts, a setup it cannot keep exact (:class:`SamplerMismatch`):
  no train loader drawing from the sampler, a sampler of another length than that loader's
  dataset, GraB attached to another model than the ``LightningModule`` being trained.
  Several train loaders are fine when one draws from the sampler and is not restarted
  within an epoch (``CombinedLoader``'s ``max_size_cycle`` restarts the shorter ones).

Under DDP pass ``Trainer(use_distributed_sampler=False)``: dataorder samplers shard
themselves (rank and world size from ``torch.distributed``, so build them in
``train_dataloader()`` or after the process group starts); Lightning would otherwise wrap
them in a ``DistributedSampler`` and shard them twice, which the callback refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from lightning.fabric.utilities.types import _Stateful
    from lightning.pytorch import Callback
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError("dataorder.integrations.lightning needs the lightning package: pip install 'lightning>=2'") from error

from dataorder.integrations._checkpoint import SamplerMismatch, at_position, check_attached, check_covers, needs_step

__all__ = ["DataOrderCallback", "SamplerMismatch"]

CHECKPOINT_KEY = "dataorder"


class DataOrderCallback(Callback):
    """Keeps a dataorder sampler in step with Lightning: epochs, GraB steps, checkpointed state.

    Example::

        >>> from dataorder import RandomReshuffling
        >>> callback = DataOrderCallback(RandomReshuffling(8))
        >>> callback.sampler.n
        8
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.steps = needs_step(sampler)
        self._resumed = False  # a checkpoint was loaded and training has not started yet

    def on_train_start(self, trainer, pl_module) -> None:
        loader = _own_loader(trainer, self.sampler)
        if loader is None:
            raise SamplerMismatch(
                "no train DataLoader draws from this callback's sampler (Lightning wraps samplers in a "
                "DistributedSampler under DDP): pass Trainer(use_distributed_sampler=False) and the sampler itself "
                "to the DataLoader"
            )
        _check_not_cycled(trainer, loader)
        check_covers(self.sampler, getattr(loader, "dataset", None), "DataOrderCallback's sampler",
                     "train_loader.dataset")
        if self.steps:
            check_attached(self.sampler, pl_module, "the LightningModule (or one of its submodules)")
        if self._resumed and self.sampler.epoch != trainer.current_epoch:  # Lightning resumed elsewhere than foreseen
            raise SamplerMismatch(
                f"the checkpoint resumes Lightning at epoch {trainer.current_epoch} but the sampler at epoch "
                f"{self.sampler.epoch}: resume from a checkpoint that DataOrderCallback wrote with this Lightning version"
            )
        self._resumed = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sampler.set_epoch(trainer.current_epoch)  # also reaches a batch sampler, which Lightning does not

    def on_fit_end(self, trainer, pl_module) -> None:
        self._resumed = False  # a resume with nothing left to train never reaches on_train_start

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.steps:
            self.sampler.step()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        trained = progress.current.processed  # batches of this epoch trained
        loader = _own_loader(trainer, self.sampler)
        stateful = [other for other in _train_loaders(trainer) if isinstance(other, _Stateful)]
        checkpoint[CHECKPOINT_KEY] = {
            "sampler": self.sampler.state_dict(),
            "position": _position(loader, trained, len(self.sampler)),
            "epoch_finished": _resumes_in_next_epoch(trainer),
            # which of Lightning's saved loader states (a StatefulDataLoader's) holds this sampler's
            "loader_state": next((i for i, other in enumerate(stateful) if other is loader), None),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("the checkpoint holds no dataorder sampler state: it was saved without DataOrderCallback; "
                             "resume from a checkpoint saved with it, or start a fresh run")
        self.sampler.load_state_dict(at_position(saved["sampler"], saved["position"]))
        self._resumed = True
        if not saved.get("epoch_finished", False):
            return
        # Move on to the next epoch now, before Lightning makes the loader's iterator (whose workers
        # draw at once) and without waiting for an on_train_epoch_start that will not come. For GraB
        # this turns the finished epoch's steps into the next order, as the uninterrupted run did.
        self.sampler.set_epoch(self.sampler.epoch + 1)
        states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
        index = saved.get("loader_state")
        if index is not None and states and index < len(states):
            # A StatefulDataLoader would load the finished epoch's sampler state over ours; with no
            # state it starts a fresh pass, as it does after a finished epoch in an uninterrupted run.
            states[index] = {}


def _resumes_in_next_epoch(trainer: Any) -> bool:
    """Whether Lightning resumes a checkpoint written now in the next epoch (as its loops' restart rules do).

    It does for a checkpoint of ``on_train_epoch_end`` (the epoch counted processed, not yet
    completed) and of ``on_train_batch_end`` after the epoch's last batch (that batch not yet
    counted completed). A checkpoint of a validation run after the last batch resumes in the
    same, finished epoch, which then ends at once and moves on through ``on_train_epoch_start``.
    """
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    in_batch_end = batches.current.completed < batches.current.processed
    return bool(epochs.processed > epochs.completed or (in_batch_end and batches.is_last_batch))


def _loaders(loaders: Any) -> list[Any]:
    """The loaders of a ``train_dataloader``: one loader, or a dict/list/CombinedLoader of them, flattened."""
    if hasattr(loaders, "flattened") and hasattr(loaders, "iterables"):  # a CombinedLoader
        return list(loaders.flattened)
    if isinstance(loaders, Mapping):
        return [loader for value in loaders.values() for loader in _loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [loader for value in loaders for loader in _loaders(value)]
    return [loaders]


def _train_loaders(trainer: Any) -> list[Any]:
    """The train loaders, in the order of Lightning's saved loader states."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return _loaders(trainer.train_dataloader if combined is None else combined)


def _own_loader(trainer: Any, sampler: Any) -> Any:
    """The train loader that draws from ``sampler`` (as its sampler or batch sampler), or ``None``."""
    for loader in _train_loaders(trainer):
        batch_sampler = getattr(loader, "batch_sampler", None)
        if any(candidate is sampler for candidate in
               (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))):
            return loader
    return None


def _check_not_cycled(trainer: Any, loader: Any) -> None:
    """Refuse the sampler's loader if a ``max_size_cycle`` CombinedLoader would restart it within an epoch."""
    loaders, combined = _train_loaders(trainer), getattr(trainer.fit_loop, "_combined_loader", None)
    if len(loaders) < 2 or getattr(combined, "_mode", "max_size_cycle") != "max_size_cycle":
        return
    longest = max(_length(other) for other in loaders)
    if _length(loader) < longest:
        raise SamplerMismatch(
            f"the train loader drawing from this callback's sampler has {_length(loader)} batches but another has "
            f"{longest}, so CombinedLoader(mode='max_size_cycle') would restart it within an epoch: make it the "
            "longest, or use CombinedLoader(..., mode='max_size') or 'min_size'"
        )


def _length(loader: Any) -> float:
    try:
        return len(loader)
    except TypeError:
        return float("inf")


def _position(loader: Any, trained_batches: int, length: int) -> int:
    """The sampler position after ``trained_batches`` batches: indices, or batches for a batch sampler."""
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None:  # the loader's batch_sampler is the dataorder sampler: positions are batches
        return min(trained_batches, length)
    return min(trained_batches * batch_size, length)
