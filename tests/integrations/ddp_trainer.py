"""One rank of a DDP run of DataOrderTrainer, for ``run_local_group`` (spawned processes import it)."""

from __future__ import annotations

import os
import warnings


def train_rank(rank: int, world_size: int, out: str, sampler_name: str, resume: str | None) -> dict:
    import torch.distributed as dist
    from transformers import TrainingArguments

    from dataorder import GraBSampler, RandomReshuffling
    from tests.integrations.test_transformers import RecordingTrainer
    from tests.integrations.tiny import gpt2, token_dataset

    # what torchrun would set: the Trainer (accelerate) reads the group from the environment
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    args = TrainingArguments(out, per_device_train_batch_size=2, gradient_accumulation_steps=1, num_train_epochs=2,
                             save_strategy="steps", save_steps=3, logging_strategy="no", report_to=[],
                             learning_rate=1e-3, use_cpu=True, seed=0, disable_tqdm=True, ddp_backend="gloo")
    data, model = token_dataset(), gpt2(dropout=0.0)
    if sampler_name == "GraBSampler":
        sampler = GraBSampler(data, balance="mean").attach(model)
    else:
        sampler = RandomReshuffling(data, seed=1)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data, train_sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    dist.barrier()
    return {"seen": trainer.seen, "losses": trainer.losses, "rank": sampler.rank, "world_size": sampler.world_size}
