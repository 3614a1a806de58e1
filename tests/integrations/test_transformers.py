"""HF Trainer + dataorder samplers: the order, GraB's steps and a kill-free resume from a checkpoint.

Each case trains a tiny GPT-2 from config (same initial weights) twice: once uninterrupted
(saving checkpoints every 3 optimizer steps) and once resumed from one of those
checkpoints in a fresh Trainer with a fresh sampler. The resumed run's batches and losses
must equal the uninterrupted run's from that step on, bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

from dataorder import (  # noqa: E402
    CurriculumSampler,
    GraBSampler,
    HerdingSampler,
    MixtureSampler,
    RandomReshuffling,
    StratifiedBatchSampler,
)
from dataorder.integrations._checkpoint import SamplerMismatch, SamplerStateMissing  # noqa: E402
from dataorder.integrations.transformers import DataOrderCallback, DataOrderTrainer  # noqa: E402
from tests.integrations.tiny import N, gpt2, labels, token_dataset  # noqa: E402


class RecordingTrainer(DataOrderTrainer):
    """Records each micro-batch's examples (their first token) and its loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"][:, 0].tolist())
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(loss.item())
        return loss


def _sampler(name: str, data, model):
    if name == "RandomReshuffling":
        return RandomReshuffling(data, seed=1)
    if name == "GraBSampler":
        return GraBSampler(data, balance="mean").attach(model)
    if name == "MixtureSampler":
        return MixtureSampler({"a": 10, "b": 6}, {"a": 0.5, "b": 0.5}, num_samples=2 * N, batch_size=4, seed=1)
    if name == "CurriculumSampler":
        return CurriculumSampler(np.linspace(0, 1, N).tolist(), num_samples=2 * N, start=0.5, full_at=0.5, seed=1)
    if name == "StratifiedBatchSampler":
        return StratifiedBatchSampler(labels(), batch_size=4, seed=1)
    raise KeyError(name)


# name -> (per-device batch, epochs): 2 x accumulation 2 = one step of 4 examples everywhere
SETTINGS = {"RandomReshuffling": (2, 2), "GraBSampler": (2, 2), "MixtureSampler": (2, 1),
            "CurriculumSampler": (2, 1), "StratifiedBatchSampler": (4, 2)}


def _train(name: str, out, resume=None, **overrides) -> RecordingTrainer:
    per_device, epochs = SETTINGS[name]
    settings = dict(per_device_train_batch_size=per_device, gradient_accumulation_steps=2, num_train_epochs=epochs,
                    save_strategy="steps", save_steps=3, logging_strategy="no", report_to=[], learning_rate=1e-3,
                    use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(overrides)
    args = TrainingArguments(str(out), **settings)
    data, model = token_dataset(), gpt2()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data, train_sampler=_sampler(name, data, model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D's torch.func fallback, transformers' config notes
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _check_resume(name: str, tmp_path, step: int, **overrides) -> RecordingTrainer:
    whole = _train(name, tmp_path, **overrides)
    resumed = _train(name, tmp_path, resume=tmp_path / f"checkpoint-{step}", **overrides)
    done = 2 * step  # micro-batches trained before the checkpoint (accumulation 2)
    assert resumed.seen == whole.seen[done:]
    assert resumed.losses == whole.losses[done:]
    return whole


def test_grab_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    whole = _check_resume("GraBSampler", tmp_path, step=3)
    sampler = whole.train_sampler
    assert sampler.epoch == 1 and sampler.steps_position == N  # every micro-batch was stepped, in order
    first, second = (sum(whole.seen[e * 8:(e + 1) * 8], []) for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(N)) and first != second


def test_mixture_resume_equals_uninterrupted_run_and_keeps_each_step_mixed(tmp_path):
    whole = _check_resume("MixtureSampler", tmp_path, step=3)
    steps = [whole.seen[i] + whole.seen[i + 1] for i in range(0, len(whole.seen), 2)]
    assert [sum(index < 10 for index in step) for step in steps] == [2] * len(steps)  # 50/50 in every step


@pytest.mark.slow
@pytest.mark.parametrize(("name", "step"), [("RandomReshuffling", 3), ("RandomReshuffling", 6), ("GraBSampler", 6),
                                            ("CurriculumSampler", 6), ("StratifiedBatchSampler", 3)])
def test_resume_equals_uninterrupted_run(name, step, tmp_path):
    _check_resume(name, tmp_path, step)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RandomReshuffling", "GraBSampler"])
def test_resume_with_loader_workers(name, tmp_path):
    """Workers prefetch further ahead; the resume point is the Trainer's count, not the sampler's."""
    _check_resume(name, tmp_path, step=3, dataloader_num_workers=2)


@pytest.mark.slow
def test_stratified_batches_reach_the_model_unchanged(tmp_path):
    whole = _train("StratifiedBatchSampler", tmp_path)
    sampler = StratifiedBatchSampler(labels(), batch_size=4, seed=1)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += [list(batch) for batch in sampler]
    assert whole.seen == expected


def test_checkpoint_without_sampler_state_is_refused(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    callback = DataOrderCallback(RandomReshuffling(N))
    with pytest.raises(SamplerStateMissing):
        callback.load(tmp_path / "checkpoint-1")


def test_wrong_batch_sizes_and_samplers_are_refused_before_training(tmp_path):
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True)
    data = token_dataset()
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        DataOrderTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=data,
                         train_sampler=StratifiedBatchSampler(labels(), batch_size=4))
    with pytest.raises(ValueError, match="rank"):
        DataOrderTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=data,
                         train_sampler=RandomReshuffling(data, rank=1, world_size=2))
    with pytest.raises(TypeError, match="attach"):
        DataOrderTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=data, train_sampler=HerdingSampler(data))


@pytest.mark.parametrize("n", [N - 6, N + 6])
def test_a_sampler_of_another_length_than_the_dataset_is_refused(n, tmp_path):
    """Longer: an IndexError mid-training; shorter: the last examples never trained."""
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True)
    with pytest.raises(SamplerMismatch, match=rf"^train_sampler has n={n} examples but len\(train_dataset\)={N}: "):
        DataOrderTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=token_dataset(),
                         train_sampler=RandomReshuffling(n))
    trainer = DataOrderTrainer(model=torch.nn.Linear(2, 2), args=args, train_sampler=RandomReshuffling(n))
    trainer.train_dataset = token_dataset()  # given after construction: refused when training starts
    with pytest.raises(SamplerMismatch, match="len\\(train_dataset\\)"):
        trainer.train()


def test_grab_attached_to_another_model_than_the_trained_one_is_refused(tmp_path):
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)
    data = token_dataset()
    sampler = GraBSampler(data).attach(gpt2())  # model_init builds a fresh model when training starts
    trainer = DataOrderTrainer(model_init=lambda: gpt2(), args=args, train_dataset=data, train_sampler=sampler)
    expected = "attached to another model than the one training: attach it to trainer.model$"
    with pytest.raises(SamplerMismatch, match=expected):
        trainer.train()
