"""HF Trainer + GraB on a tiny GPT-2 built from config, trained on Python's own source bytes.

The data are byte tokens (vocab 256) of a few standard-library modules read from disk, cut
into sequences of 64. ``DataOrderTrainer`` trains in GraB's order, calls ``sampler.step()``
after each micro-batch's backward (here with gradient accumulation 2), writes the sampler's
state into every checkpoint and restores it on ``resume_from_checkpoint``. The script
trains once with GraB and once with random reshuffling from the same initial weights and
prints both losses per epoch (one seed: a demonstration, not a comparison).

Run (CPU, well under a minute):
    python examples/hf_trainer_grab.py --epochs 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from dataorder import GraBSampler, RandomReshuffling
from dataorder.integrations.transformers import DataOrderTrainer

MODULES = ("os.py", "random.py", "textwrap.py", "string.py", "bisect.py", "heapq.py")


def byte_sequences(length: int = 64, limit: int = 64) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping byte windows of a few stdlib sources: a dataset with no download."""
    root = pathlib.Path(os.__file__).parent
    data = b"".join((root / name).read_bytes() for name in MODULES)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    count = min(limit, tokens.numel() // length)
    rows = tokens[: count * length].view(count, length)
    return [{"input_ids": row, "labels": row} for row in rows]


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def train(order: str, data, args: TrainingArguments, seed: int) -> list[float]:
    model = tiny_gpt2(seed)
    if order == "grab":
        sampler = GraBSampler(data, balance="mean", seed=seed)
        sampler.attach(model)  # warns once that the position embedding's input is shared by the batch
        print("GraB balances the model on the ghost path: tied wte/lm_head summed, "
              "the batch-shared position embedding left out")
    else:
        sampler = RandomReshuffling(data, seed=seed)
    trainer = DataOrderTrainer(model=model, args=args, train_dataset=data, train_sampler=sampler)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    data = byte_sequences()
    steps_per_epoch = len(data) // (options.batch_size * 2)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=options.batch_size, gradient_accumulation_steps=2,
                                 num_train_epochs=options.epochs, learning_rate=3e-3, logging_steps=steps_per_epoch,
                                 save_strategy="epoch", report_to=[], use_cpu=True, seed=options.seed,
                                 disable_tqdm=True)
        losses = {order: train(order, data, args, options.seed) for order in ("grab", "rr")}
    print(f"{len(data)} sequences of 64 bytes; training loss logged once per epoch")
    for order, values in losses.items():
        print(f"{order:>4}: " + "  ".join(f"{value:.4f}" for value in values))


if __name__ == "__main__":
    main()
