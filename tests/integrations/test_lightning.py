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
from lightning.pytorch.utilities import CombinedLoader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dataorder import GraBSampler, RandomReshuffling, StratifiedBatchSampler  # noqa: E402
from dataorder.integrations._checkpoint import SamplerMismatch  # noqa: E402
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


class TinyLinear(pl.LightningModule):
    """A linear classifier that records each trained batch's indices under Lightning's epoch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 2)
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.setdefault(self.trainer.current_epoch, []).append(index.tolist())
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _indexed(n=12):
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=generator), torch.randint(0, 2, (n,), generator=generator),
                         torch.arange(n))


class Validated(TinyLinear):
    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("loss", torch.nn.functional.cross_entropy(self.net(x), y))


def _fit_small(name, out, ckpt_path=None, num_workers=0, loader_class=DataLoader, every="steps"):
    data, module = _indexed(), (Validated() if every == "validation" else TinyLinear())
    if name == "StratifiedBatchSampler":
        sampler = StratifiedBatchSampler([i % 2 for i in range(len(data))], batch_size=4, seed=1)
        loader = loader_class(data, batch_sampler=sampler, num_workers=num_workers)
    else:
        sampler = (GraBSampler(data, balance="pair", seed=1).attach(module.net) if name == "GraBSampler"
                   else RandomReshuffling(data, seed=1))
        loader = loader_class(data, batch_size=4, sampler=sampler, num_workers=num_workers)
    checkpoint = {"epochs": ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1),
                  "steps": ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1),  # 3 batches an epoch
                  "validation": ModelCheckpoint(dirpath=out, save_top_k=-1)}[every]  # after each validation
    validation = dict(val_dataloaders=DataLoader(data, batch_size=6)) if every == "validation" else {}
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                         val_check_interval=3,  # validation (when there is one) after each epoch's last batch
                         callbacks=[DataOrderCallback(sampler), checkpoint])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few batches, workers: Lightning's notes
        trainer.fit(module, loader, ckpt_path=ckpt_path, **validation)
    return module.seen


@pytest.mark.parametrize(("name", "num_workers", "every"), [
    ("RandomReshuffling", 0, "steps"), ("RandomReshuffling", 2, "epochs"), ("GraBSampler", 0, "steps"),
    ("GraBSampler", 2, "epochs"), ("StratifiedBatchSampler", 0, "steps"), ("StratifiedBatchSampler", 0, "epochs"),
    ("GraBSampler", 0, "validation"), ("RandomReshuffling", 2, "validation")])
def test_resume_from_an_end_of_epoch_checkpoint_trains_the_next_epochs(name, num_workers, every, tmp_path):
    """Lightning resumes a finished epoch in the next one without on_train_epoch_start (a checkpoint of
    the epoch's last step or of its end), or, after a validation that followed the last batch, in the
    finished epoch itself: either way the next epochs are trained as in the uninterrupted run."""
    whole = _fit_small(name, tmp_path, num_workers=num_workers, every=every)
    assert sorted(whole) == [0, 1, 2] and all(len(batches) == 3 for batches in whole.values())
    for epoch in (0, 1):
        (checkpoint,) = tmp_path.glob(f"epoch={epoch}-*.ckpt")
        resumed = _fit_small(name, tmp_path / f"again{epoch}", ckpt_path=checkpoint, num_workers=num_workers,
                             every=every)
        assert resumed == {later: whole[later] for later in range(epoch + 1, 3)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_an_end_of_epoch_checkpoint_with_a_stateful_dataloader(num_workers, tmp_path):
    """A StatefulDataLoader's own saved state would put the finished epoch's sampler state back."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    whole = _fit_small("GraBSampler", tmp_path, num_workers=num_workers, loader_class=stateful.StatefulDataLoader)
    (checkpoint,) = tmp_path.glob("epoch=0-*.ckpt")
    resumed = _fit_small("GraBSampler", tmp_path / "again", ckpt_path=checkpoint, num_workers=num_workers,
                         loader_class=stateful.StatefulDataLoader)
    assert resumed == {1: whole[1], 2: whole[2]}


class FirstOfSeveral(TinyLinear):
    """Trains on loader "a" of a dict of train loaders (the other one may be exhausted: ``None``)."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["a"], batch_idx)


def _quick_trainer(**settings):
    base = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False)
    return pl.Trainer(**{**base, **settings})


def _fit_quietly(trainer, module, loaders, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loaders, **kwargs)


def test_several_train_loaders_are_accepted_when_one_draws_from_the_sampler(tmp_path):
    data = _indexed()
    expected = []
    for epoch in range(2):
        reference = RandomReshuffling(data, seed=3)
        reference.set_epoch(epoch)
        order = list(reference)
        expected.append([order[i:i + 4] for i in range(0, len(order), 4)])
    other = DataLoader(_indexed(8), batch_size=4)  # 2 batches: exhausted early in max_size mode
    for loaders in ({"a": "sampler", "b": DataLoader(data, batch_size=4)},
                    CombinedLoader({"a": "sampler", "b": other}, mode="max_size")):
        sampler, module = RandomReshuffling(data, seed=3), FirstOfSeveral()
        own = DataLoader(data, batch_size=4, sampler=sampler)
        if isinstance(loaders, CombinedLoader):
            loaders = CombinedLoader({"a": own, "b": other}, mode="max_size")
        else:
            loaders["a"] = own
        _fit_quietly(_quick_trainer(callbacks=[DataOrderCallback(sampler)]), module, loaders)
        assert [module.seen[0], module.seen[1]] == expected


def test_resume_with_several_train_loaders_equals_uninterrupted_run(tmp_path):
    def fit(out, ckpt_path=None):
        data, module = _indexed(), FirstOfSeveral()
        sampler = RandomReshuffling(data, seed=3)
        loaders = {"a": DataLoader(data, batch_size=4, sampler=sampler), "b": DataLoader(data, batch_size=4)}
        checkpoint = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=-1)
        _fit_quietly(_quick_trainer(callbacks=[DataOrderCallback(sampler), checkpoint], enable_checkpointing=True),
                     module, loaders, ckpt_path=ckpt_path)
        return [batch for epoch in sorted(module.seen) for batch in module.seen[epoch]]

    whole = fit(tmp_path)
    for step in (1, 3):  # mid-epoch and end of epoch
        (checkpoint,) = tmp_path.glob(f"*-step={step}.ckpt")
        assert fit(tmp_path / f"again{step}", ckpt_path=checkpoint) == whole[step:]


def test_a_sampler_loader_that_max_size_cycle_would_restart_is_refused():
    data = _indexed()
    sampler = RandomReshuffling(data, seed=3)
    loaders = {"a": DataLoader(data, batch_size=6, sampler=sampler), "b": DataLoader(data, batch_size=4)}
    with pytest.raises(SamplerMismatch, match="max_size_cycle"):
        _fit_quietly(_quick_trainer(callbacks=[DataOrderCallback(sampler)]), FirstOfSeveral(), loaders)


@pytest.mark.parametrize("n", [6, 18])
def test_a_sampler_of_another_length_than_the_dataset_is_refused(n):
    data = _indexed()
    sampler = RandomReshuffling(n)
    with pytest.raises(SamplerMismatch, match=rf"n={n} examples but len\(train_loader.dataset\)=12"):
        _fit_quietly(_quick_trainer(callbacks=[DataOrderCallback(sampler)]), TinyLinear(),
                     DataLoader(data, batch_size=4, sampler=sampler))


def test_grab_attached_to_another_model_is_refused():
    data, module = _indexed(), TinyLinear()
    sampler = GraBSampler(data).attach(TinyLinear().net)
    with pytest.raises(SamplerMismatch, match="attached to another model"):
        _fit_quietly(_quick_trainer(callbacks=[DataOrderCallback(sampler)]), module,
                     DataLoader(data, batch_size=4, sampler=sampler))
