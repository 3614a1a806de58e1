"""One rank of a Lightning DDP run with DataOrderCallback, for ``run_local_group``."""

from __future__ import annotations

import os
import warnings


def fit_rank(rank: int, world_size: int, out: str, sampler_name: str, ckpt_path: str | None) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from dataorder import GraBSampler, RandomReshuffling
    from dataorder.integrations.lightning import DataOrderCallback
    from tests.integrations.test_lightning import TinyLM
    from tests.integrations.tiny import token_dataset

    # what torchrun would set: Lightning's TorchElasticEnvironment reads the group from it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    data, module = token_dataset(), TinyLM()
    if sampler_name == "GraBSampler":
        sampler = GraBSampler(data, balance="mean").attach(module.model)
    else:
        sampler = RandomReshuffling(data, seed=1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[DataOrderCallback(sampler),
                                    ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=2, sampler=sampler), ckpt_path=ckpt_path)
    return {"seen": module.seen, "losses": module.losses, "rank": sampler.rank, "world_size": sampler.world_size}
