"""Lightning + GraB: a small MLP classifier trained in GraB's order, with a mid-epoch resume.

``DataOrderCallback`` calls ``set_epoch`` each epoch, GraB's ``step()`` after every backward
(``on_after_backward``), and keeps the sampler's state in Lightning's checkpoints. The
script trains once uninterrupted (checkpointing every 10 steps), then resumes from the
checkpoint of step 10 -- in the middle of the first epoch -- in a fresh Trainer, and checks
that the resumed run trains on the same batches with the same losses.

``use_distributed_sampler=False`` matters under DDP: dataorder samplers shard themselves.

Run (CPU, well under a minute):
    python examples/lightning_grab.py
"""

from __future__ import annotations

import os
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dataorder import GraBSampler
from dataorder.integrations.lightning import DataOrderCallback


def blobs(n: int = 512, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian blobs: a classification set built in memory (no download)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=generator)
    centres = torch.randn(classes, features, generator=generator) * 0.6
    inputs = centres[targets] + torch.randn(n, features, generator=generator)
    return TensorDataset(inputs, targets, torch.arange(n))


class Classifier(pl.LightningModule):
    def __init__(self, features: int = 16, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every run
        self.net = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes))
        self.seen: list[int] = []
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        inputs, targets, rows = batch
        loss = nn.functional.cross_entropy(self.net(inputs), targets)  # mean-reduced, as GraB's ghost path needs
        self.seen.extend(rows.tolist())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(out: str, ckpt_path: str | None = None) -> Classifier:
    data, module = blobs(), Classifier()
    sampler = GraBSampler(data, balance="mean", seed=0).attach(module.net)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[DataOrderCallback(sampler),
                                    ModelCheckpoint(dirpath=out, every_n_train_steps=10, save_top_k=-1)])
    trainer.fit(module, DataLoader(data, batch_size=32, sampler=sampler), ckpt_path=ckpt_path)
    return module


def main() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*resuming from a checkpoint.*")
    with tempfile.TemporaryDirectory() as out:
        whole = fit(out)
        resumed = fit(os.path.join(out, "again"), ckpt_path=os.path.join(out, "epoch=0-step=10.ckpt"))
    per_epoch = len(whole.losses) // 3
    means = [sum(whole.losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch for e in range(3)]
    print("mean training loss per epoch:", "  ".join(f"{value:.4f}" for value in means))
    same = resumed.seen == whole.seen[10 * 32:] and resumed.losses == whole.losses[10:]
    print(f"resumed from step 10: {'same' if same else 'DIFFERENT'} batches and losses as the uninterrupted run")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
