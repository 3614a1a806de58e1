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
  resumed run sees the same order and, with Lightning's own restore, the same losses.

Under DDP pass ``Trainer(use_distributed_sampler=False)``: dataorder samplers shard
themselves (rank and world size from ``torch.distributed``, so build them in
``train_dataloader()`` or after the process group starts); Lightning would otherwise wrap
them in a ``DistributedSampler`` and shard them twice, which the callback refuses.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError("dataorder.integrations.lightning needs the lightning package: pip install 'lightning>=2'") from error

from dataorder.integrations._checkpoint import at_position, needs_step

__all__ = ["DataOrderCallback"]

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

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        if not _draws_from(loader, self.sampler):
            raise ValueError(
                "the train DataLoader does not draw from this callback's sampler (Lightning wraps samplers in a "
                "DistributedSampler under DDP): pass Trainer(use_distributed_sampler=False) and the sampler itself "
                "to the DataLoader"
            )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sampler.set_epoch(trainer.current_epoch)  # also reaches a batch sampler, which Lightning does not

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.steps:
            self.sampler.step()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches of this epoch trained
        checkpoint[CHECKPOINT_KEY] = {"sampler": self.sampler.state_dict(),
                                      "position": _position(trainer.train_dataloader, trained, len(self.sampler))}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("the checkpoint holds no dataorder sampler state: it was saved without DataOrderCallback; "
                             "resume from a checkpoint saved with it, or start a fresh run")
        self.sampler.load_state_dict(at_position(saved["sampler"], saved["position"]))


def _draws_from(loader: Any, sampler: Any) -> bool:
    batch_sampler = getattr(loader, "batch_sampler", None)
    return any(candidate is sampler for candidate in
               (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)))


def _position(loader: Any, trained_batches: int, length: int) -> int:
    """The sampler position after ``trained_batches`` batches: indices, or batches for a batch sampler."""
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None:  # the loader's batch_sampler is the dataorder sampler: positions are batches
        return min(trained_batches, length)
    return min(trained_batches * batch_size, length)
