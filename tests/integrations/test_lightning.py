"""Lightning + dataorder samplers: GraB's steps and a kill-free resume from a mid-epoch checkpoint.

As for the HF Trainer: a tiny GPT-2 from config (same initial weights) trains uninterrupted
(checkpoints every 3 optimizer steps), then a fresh Trainer, model and sampler resume from
one checkpoint; the resumed batches and losses must equal the uninterrupted run's.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("transformers")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dataorder import GraBSampler, RandomReshuffling, StratifiedBatchSampler  # noqa: E402
from dataorder.integrations.lightning import DataOrderCallback  # noqa: E402
from tests.integrations.tiny import N, gpt2, token_dataset  # noqa: E402


class TinyLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = gpt2(dropout=0.0)  # Lightning does not restore the RNG: no dropout, so losses can match
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.seen.append(batch["input_ids"][:, 0].tolist())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _sampler(name, data, module):
    if name == "RandomReshuffling":
        return RandomReshuffling(data, seed=1)
    if name == "GraBSampler":
        return GraBSampler(data, balance="pair").attach(module.model)
    if name == "StratifiedBatchSampler":
        return StratifiedBatchSampler([i % 2 for i in range(N)], batch_size=2, seed=1)
    raise KeyError(name)


def _fit(name, out, ckpt_path=None, num_workers=0):
    data, module = token_dataset(), TinyLM()
    sampler = _sampler(name, data, module)
    if isinstance(sampler, StratifiedBatchSampler):
        loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers)
    else:
        loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=num_workers)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=2, use_distributed_sampler=False,
                         callbacks=[DataOrderCallback(sampler),
                                    ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D's torch.func fallback; Lightning's mid-epoch resume note
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, sampler


def _check_resume(name, tmp_path, step, num_workers=0):
    whole, sampler = _fit(name, tmp_path, num_workers=num_workers)
    (checkpoint,) = tmp_path.glob(f"*step={step}.ckpt")
    resumed, _ = _fit(name, tmp_path / "again", ckpt_path=checkpoint, num_workers=num_workers)
    done = 2 * step  # micro-batches before the checkpoint (accumulate_grad_batches=2)
    assert resumed.seen == whole.seen[done:]
    assert resumed.losses == whole.losses[done:]
    return whole, sampler


def test_grab_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    whole, sampler = _check_resume("GraBSampler", tmp_path, step=3)
    assert sampler.epoch == 1 and sampler.steps_position == N  # every micro-batch stepped, in order
    first, second = sum(whole.seen[:8], []), sum(whole.seen[8:], [])
    assert sorted(first) == sorted(second) == list(range(N)) and first != second


@pytest.mark.slow
@pytest.mark.parametrize(("name", "step"), [("RandomReshuffling", 3), ("RandomReshuffling", 6), ("GraBSampler", 6),
                                            ("StratifiedBatchSampler", 3)])
def test_resume_equals_uninterrupted_run(name, step, tmp_path):
    _check_resume(name, tmp_path, step)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RandomReshuffling", "GraBSampler"])
def test_resume_with_loader_workers(name, tmp_path):
    """Workers prefetch further ahead; the resume point is Lightning's count of trained batches."""
    _check_resume(name, tmp_path, step=3, num_workers=2)


def test_a_loader_that_does_not_draw_from_the_sampler_is_refused(tmp_path):
    data, module = token_dataset(), TinyLM()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[DataOrderCallback(RandomReshuffling(data))])
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        trainer.fit(module, DataLoader(data, batch_size=2, shuffle=True))
