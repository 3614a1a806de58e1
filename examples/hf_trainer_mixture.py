"""HF Trainer + MixtureSampler: a tiny GPT-2 pretrained on two byte corpora with an annealed mix.

Two sources read from disk (no download): ``code`` (Python sources of the standard
library) and ``prose`` (the text of Python's licence). The schedule trains on 80 % code /
20 % prose, then anneals to 30 % / 70 % over the last half of the run. Every optimizer step
(``per_device_train_batch_size x world_size x gradient_accumulation_steps`` examples, the
sampler's global ``batch_size``) holds exactly the scheduled counts of each source. The
script stops halfway, then resumes from the checkpoint in a fresh Trainer and checks that
the resumed run saw the same examples as one uninterrupted run would.

Run (CPU, well under a minute):
    python examples/hf_trainer_mixture.py
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import torch
from torch.utils.data import ConcatDataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from dataorder import MixtureSampler, Schedule
from dataorder.integrations.transformers import DataOrderTrainer

LENGTH = 64


def windows(data: bytes, count: int) -> list[dict[str, torch.Tensor]]:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    count = min(count, tokens.numel() // LENGTH)
    rows = tokens[: count * LENGTH].view(count, LENGTH)
    return [{"input_ids": row, "labels": row} for row in rows]


def sources() -> dict[str, list]:
    root = pathlib.Path(os.__file__).parent
    code = b"".join((root / name).read_bytes() for name in ("os.py", "random.py", "textwrap.py"))
    return {"code": windows(code, 96), "prose": windows((root / "LICENSE.txt").read_bytes(), 48)}


class RecordingTrainer(DataOrderTrainer):
    """Counts each step's sources (the first batch of every step is where the mix is checked)."""

    seen: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.extend(inputs["row"].tolist())
        inputs = {key: value for key, value in inputs.items() if key != "row"}
        return super().training_step(model, inputs, num_items_in_batch)


def train(data, parts, args, resume=None) -> RecordingTrainer:
    schedule = Schedule.anneal({"code": 0.8, "prose": 0.2}, {"code": 0.3, "prose": 0.7}, last=0.5)
    step_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    sampler = MixtureSampler(parts, schedule, num_samples=4 * len(data) // 3, batch_size=step_batch, seed=0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=LENGTH, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    trainer = RecordingTrainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data, train_sampler=sampler)
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    options = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    parts = sources()
    # each example carries its global index ("row") so the script can tell the sources apart
    data = ConcatDataset([parts["code"], parts["prose"]])
    data = [dict(data[i], row=torch.tensor(i)) for i in range(len(data))]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=options.batch_size, gradient_accumulation_steps=2,
                                 num_train_epochs=1, learning_rate=3e-3, logging_strategy="no", save_strategy="steps",
                                 save_steps=5, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                                 remove_unused_columns=False)
        whole = train(data, parts, args)
        resumed = train(data, parts, args, resume=os.path.join(out, "checkpoint-5"))
    step = 2 * options.batch_size
    code_share = [sum(row < len(parts["code"]) for row in whole.seen[i:i + step]) / step
                  for i in range(0, len(whole.seen), step)]
    print("code share per optimizer step:", " ".join(f"{share:.2f}" for share in code_share))
    same = resumed.seen == whole.seen[5 * step:]
    print(f"resumed from step 5: {'same' if same else 'DIFFERENT'} examples as the uninterrupted run")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
