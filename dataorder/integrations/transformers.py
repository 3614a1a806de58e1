"""dataorder samplers inside the Hugging Face ``Trainer`` (transformers 5.x).

:class:`DataOrderTrainer` is a ``Trainer`` that takes ``train_sampler=``; it trains in the
sampler's order and registers a :class:`DataOrderCallback`, which

* calls GraB's ``step()`` after each micro-batch's backward, in order (gradient
  accumulation included: ``on_substep_end`` for the accumulated micro-batches,
  ``on_step_end`` for the last one);
* writes ``sampler.state_dict()`` into every checkpoint folder
  (``dataorder_sampler_rank<r>.pt``);
* restores it on ``train(resume_from_checkpoint=...)`` so that the resumed run sees the same
  order and, with the Trainer's own model/optimizer/RNG restore, the same losses as an
  uninterrupted run.

The Trainer itself calls ``set_epoch`` each epoch and, on a mid-epoch resume, re-draws the
batches trained so far in that epoch (``skip_first_batches``); so the sampler is loaded at
the start of its saved epoch with everything else of its state (GraB's running sums and
stepped positions) as saved, and the Trainer's skip brings it to the exact next batch.

DDP through the Trainer's launcher (``torchrun``/``accelerate launch``): build the sampler
after ``TrainingArguments`` (which initialises ``torch.distributed``), so that it takes its
rank and world size from the process group; each rank yields its own share, and accelerate's
re-sharding of the loader is switched off for it.

Batch sizes: a :class:`~dataorder.samplers.mixture.MixtureSampler`'s ``batch_size`` is its
global batch and must equal ``per_device_train_batch_size * world_size *
gradient_accumulation_steps`` (one optimizer step); a
:class:`~dataorder.samplers.stratified.StratifiedBatchSampler`'s ``batch_size`` must equal
``per_device_train_batch_size`` (its batches are fed to the Trainer as they are).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from torch.utils.data import Sampler

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dataorder.integrations.transformers needs the transformers package: pip install 'transformers>=5' accelerate"
    ) from error

from dataorder.integrations._checkpoint import (
    SamplerMismatch,
    SamplerStateMissing,
    check_attached,
    check_covers,
    load_sampler,
    needs_step,
    save_sampler,
)

__all__ = ["BatchesAsIndices", "DataOrderCallback", "DataOrderTrainer", "SamplerMismatch", "SamplerStateMissing"]


class DataOrderCallback(TrainerCallback):
    """Keeps a dataorder sampler in step with a ``Trainer``: GraB steps and checkpointed state.

    :class:`DataOrderTrainer` registers one; with a plain ``Trainer`` (that you made train
    in the sampler's order yourself), pass ``callbacks=[DataOrderCallback(sampler)]`` and
    call :meth:`load` with the checkpoint folder before ``trainer.train(resume_from_checkpoint=...)``.

    Example::

        >>> from dataorder import RandomReshuffling
        >>> callback = DataOrderCallback(RandomReshuffling(8))
        >>> callback.sampler.n
        8
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.steps = needs_step(sampler)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.steps:  # the model the Trainer trains (a fresh one from model_init, say) must be the attached one
            check_attached(self.sampler, model, "trainer.model")

    def on_substep_end(self, args, state, control, **kwargs):
        if self.steps:  # a micro-batch of an accumulated step was just backpropagated
            self.sampler.step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps:  # the step's last micro-batch (its backward came before the optimizer step)
            self.sampler.step()

    def on_save(self, args, state, control, **kwargs):
        save_sampler(self.sampler, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def load(self, checkpoint: str | os.PathLike) -> None:
        """Restore the sampler from checkpoint folder ``checkpoint``, at the start of its saved epoch.

        The Trainer then re-draws the batches it trained in that epoch, so the next batch is
        exactly the one an uninterrupted run would see. Raises
        :class:`~dataorder.integrations._checkpoint.SamplerStateMissing` if the folder has no
        sampler state for this rank.
        """
        load_sampler(self.sampler, checkpoint, position=0)


class BatchesAsIndices(Sampler[int]):
    """A batch sampler's batches, one index at a time, for a loader that batches them again.

    The Trainer builds its loader with ``sampler=`` and ``batch_size=``; a batch sampler whose
    batches all have ``batch_size`` indices (as :class:`StratifiedBatchSampler`'s do) comes
    out of it unchanged. ``set_epoch`` and the state are the wrapped sampler's.

    Example::

        >>> from dataorder import StratifiedBatchSampler
        >>> batches = StratifiedBatchSampler([0, 0, 1, 1], batch_size=2, seed=0)
        >>> flat = BatchesAsIndices(batches)
        >>> len(flat), sorted(flat) == sorted(i for batch in batches for i in batch)
        (4, True)
    """

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[int]:
        for batch in self.batch_sampler:
            yield from batch

    def __len__(self) -> int:
        return len(self.batch_sampler) * self.batch_sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class DataOrderTrainer(Trainer):
    """A ``Trainer`` that trains in the order of ``train_sampler``, a dataorder sampler.

    Any dataorder index sampler (``RandomReshuffling``, ``GraBSampler`` after
    ``attach(model)``, ``CurriculumSampler``, ``MixtureSampler``, ...) or
    ``StratifiedBatchSampler``. Everything else is the ``Trainer``'s: pass its arguments as
    usual. Checkpoints hold the sampler's state and ``train(resume_from_checkpoint=...)``
    continues the order exactly (see the module docstring).

    Example (the sampler checks come before any training)::

        >>> from transformers import TrainingArguments
        >>> from dataorder import MixtureSampler
        >>> import torch
        >>> args = TrainingArguments("out", per_device_train_batch_size=2, report_to=[])
        >>> mix = MixtureSampler({"a": 4, "b": 4}, {"a": 1, "b": 1}, num_samples=8, batch_size=4)
        >>> DataOrderTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=list(range(8)), train_sampler=mix)
        Traceback (most recent call last):
        ...
        ValueError: MixtureSampler's batch_size=4 is its global batch and must equal per_device_train_batch_size (2) x world_size (1) x gradient_accumulation_steps (1) = 2
    """

    def __init__(self, *args: Any, train_sampler: Any, **kwargs: Any) -> None:
        callback = DataOrderCallback(train_sampler)
        super().__init__(*args, **kwargs)
        _check_fits(train_sampler, self.args, self.train_dataset)
        self.train_sampler = train_sampler
        self.dataorder_callback = callback
        self.add_callback(callback)

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        _check_fits(self.train_sampler, self.args, self.train_dataset if train_dataset is None else train_dataset)
        if _is_batch_sampler(self.train_sampler):
            return BatchesAsIndices(self.train_sampler)
        return self.train_sampler

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # The sampler already yields this rank's share: accelerate's BatchSamplerShard must not
        # take every world_size-th batch of it (the Trainer does the same for its own rank-aware
        # BatchRebalanceSampler). even_batches=False keeps a short last batch as it is.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and hasattr(shard, "num_processes"):
            shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
        return loader

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, with the sampler restored first when resuming from a checkpoint."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir!r} holds no checkpoint")
        if checkpoint:
            self.dataorder_callback.load(checkpoint)
        return super().train(checkpoint or None, *args, **kwargs)


def _is_batch_sampler(sampler: Any) -> bool:
    from dataorder.samplers.stratified import StratifiedBatchSampler

    return isinstance(sampler, StratifiedBatchSampler)


def _check_fits(sampler: Any, args: Any, train_dataset: Any) -> None:
    """One clear error per mismatch between the sampler and the TrainingArguments or the train dataset."""
    from dataorder.samplers.mixture import MixtureSampler

    name = type(sampler).__name__
    world = args.world_size
    if getattr(sampler, "world_size", world) != world or getattr(sampler, "rank", args.process_index) != args.process_index:
        raise ValueError(
            f"{name} was built for rank {sampler.rank} of {sampler.world_size} but this Trainer process is rank "
            f"{args.process_index} of {world}; build the sampler after TrainingArguments (which starts torch.distributed)"
        )
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if isinstance(sampler, MixtureSampler):
        step_batch = per_device * world * accumulation
        if sampler.batch_size != step_batch:
            raise ValueError(
                f"{name}'s batch_size={sampler.batch_size} is its global batch and must equal "
                f"per_device_train_batch_size ({per_device}) x world_size ({world}) x gradient_accumulation_steps "
                f"({accumulation}) = {step_batch}"
            )
    if _is_batch_sampler(sampler):
        if sampler.batch_size != per_device:
            raise ValueError(f"{name}'s batch_size={sampler.batch_size} must equal per_device_train_batch_size={per_device}")
        if args.dataloader_drop_last:
            raise ValueError(f"{name} makes whole batches itself: set dataloader_drop_last=False")
    check_covers(sampler, train_dataset, "train_sampler", "train_dataset")
