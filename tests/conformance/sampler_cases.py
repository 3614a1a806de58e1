"""Every sampler class, built small, with what the protocol suite needs to drive it.

A :class:`Case` builds its sampler with ``make(seed=, rank=, world_size=, drop_last=)``;
the global batch (``GLOBAL_BATCH``) is the same at every world size, so the ranks' shares of
a world of ``W`` interleave back into the order of one process. ``train`` is the training
loop's part of an epoch for the gradient-driven samplers: after each batch it feeds the
batch's per-example gradients to ``step`` (rows of a fixed random table, so a resumed run
feeds exactly what the straight run fed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

import dataorder

N = 22  # examples: not a multiple of the world sizes 2 and 3 nor of the batch, so padding shows
GLOBAL_BATCH = 6  # divisible by world sizes 1, 2 and 3
EPOCHS = 2
GRAD_DIM = 5
GRADS = torch.randn(N, GRAD_DIM, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
SCORES = np.linspace(0.0, 1.0, N)[np.random.default_rng(7).permutation(N)]
LABELS = [i % 3 for i in range(N)]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., object]
    kind: str = "indices"  # "indices", "batches" (a batch sampler) or "dataset" (QMCAugment)
    per_epoch: bool = True  # False: one run over the whole training (set_epoch changes nothing)
    steps: bool = False  # gradient-driven: the next epoch's order comes from step()
    #: test name -> why this case is expected to fail it (strict xfail: remove once fixed)
    known_failures: dict[str, str] = field(default_factory=dict)

    def build(self, *, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        return self.make(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)


def _index_sampler(cls, **fixed):
    def make(**kwargs):
        return cls(N, **fixed, **kwargs)

    return make


def _stratified(*, seed, rank, world_size, drop_last):
    return dataorder.StratifiedBatchSampler(LABELS, GLOBAL_BATCH // world_size, seed=seed, rank=rank,
                                            world_size=world_size, drop_last=drop_last)


def _curriculum(*, seed, rank, world_size, drop_last):
    return dataorder.CurriculumSampler(SCORES, num_samples=2 * N + 1, pacing="linear", start=0.3, full_at=0.6,
                                       seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)


def _mixture(*, seed, rank, world_size, drop_last):
    schedule = dataorder.Schedule.anneal({"a": 0.8, "b": 0.2}, {"a": 0.3, "b": 0.7}, last=0.5,
                                         transition="linear", over=0.25)
    return dataorder.MixtureSampler({"a": 15, "b": 7}, schedule, num_samples=2 * N + 5, batch_size=GLOBAL_BATCH,
                                    seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)


def _adaptive(*, seed, rank, world_size, drop_last):
    """An adaptive mixture with two updates in its history (observed before any batch is drawn)."""
    sampler = dataorder.AdaptiveMixtureSampler(
        {"a": 15, "b": 7}, {"a": 0.6, "b": 0.4}, rule="exp3", rate=2.0, smoothing=0.5, floor=0.1,
        num_samples=2 * N + 5, batch_size=GLOBAL_BATCH, seed=seed, rank=rank, world_size=world_size,
        drop_last=drop_last)
    sampler.observe(0, {"a": 2.0, "b": 3.0})
    sampler.observe(1, {"a": 1.0})  # b not seen at step 1: its last loss stays step 0's
    return sampler


def _qmc(*, seed, rank, world_size, drop_last):
    return dataorder.QMCAugment(list(range(N)), lambda x, u: (x, tuple(u.tolist())), dim=3, seed=seed)


CASES = [
    Case("RandomReshuffling", _index_sampler(dataorder.RandomReshuffling)),
    Case("ShuffleOnce", _index_sampler(dataorder.ShuffleOnce)),
    Case("WithReplacement", _index_sampler(dataorder.WithReplacement, num_samples=N + 3)),
    Case("FlipFlop", _index_sampler(dataorder.FlipFlop)),
    Case("StratifiedBatchSampler", _stratified, kind="batches"),
    Case("CurriculumSampler", _curriculum, per_epoch=False),
    Case("MixtureSampler", _mixture, per_epoch=False),
    Case("AdaptiveMixtureSampler", _adaptive, per_epoch=False),
    Case("QMCAugment", _qmc, kind="dataset"),
    Case("GraBSampler-mean", _index_sampler(dataorder.GraBSampler, balance="mean"), steps=True),
    Case("GraBSampler-pair", _index_sampler(dataorder.GraBSampler, balance="pair"), steps=True),
    Case("HerdingSampler", _index_sampler(dataorder.HerdingSampler), steps=True),
]


def flatten(items: Iterable) -> list[int]:
    """Indices of a list of indices or of batches."""
    out: list[int] = []
    for item in items:
        out.extend(item) if isinstance(item, list) else out.append(item)
    return out


def dataset_items(wrapper) -> list:
    return [wrapper[i] for i in range(len(wrapper))]


def train(case: Case, sampler, iterator, stop: int | None = None) -> list:
    """Items of ``iterator`` up to ``stop`` of them (default: all), as a training loop takes them.

    A gradient-driven sampler gets each batch of ``GLOBAL_BATCH`` indices stepped, and the
    epoch's last, smaller batch once the epoch is used up (``stop`` at a batch boundary or at
    the end of the epoch).
    """
    items, batch = [], []
    while stop is None or len(items) < stop:
        item = next(iterator, None)
        if item is None:
            break
        items.append(item)
        batch.append(item)
        if case.steps and len(batch) == GLOBAL_BATCH:
            sampler.step(GRADS[batch])
            batch = []
    if case.steps and batch and (stop is None or sampler.position == len(sampler)):
        sampler.step(GRADS[batch])
    return items
