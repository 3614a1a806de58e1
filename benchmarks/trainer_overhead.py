"""GraB under the HF Trainer vs the Trainer's own random-reshuffling step, and resume overhead.

Same process, same tiny GPT-2 from config (2 layers, d=64, vocab 256, untied), same data:

* optimizer-step time (``on_step_begin`` -> ``on_step_end`` of a timer registered after
  every other callback: forward, backward, optimizer, and for GraB the callback's ``step()``) for the plain ``Trainer`` (its own
  RandomSampler), ``DataOrderTrainer`` + ``RandomReshuffling`` and ``DataOrderTrainer`` +
  ``GraBSampler(balance="mean")`` attached to the whole model on the exact ghost path, and
  the same with ``attach(model, sketch=16)`` (tied ``wte``/``lm_head`` summed, the
  shared position embedding left out). Runs alternate (plain, RR, GraB, plain, ...); each row is the
  median step over all its runs after the first steps of each run; ratios are to the plain
  Trainer's median;
* resume: loading a sampler state from a checkpoint folder (``DataOrderCallback.load``:
  ``torch.load`` + ``load_state_dict``) for RR and GraB at n = the benchmark's dataset and
  n = 10⁶ (GraB's state holds the epoch's order and the running sums), and the Trainer's
  re-draw of the trained batches of a half-finished epoch of 10⁶ examples (accelerate's
  ``skip_first_batches`` iterates them without loading data), measured as iterating that
  many batches of the restored sampler.

    .venv/bin/python benchmarks/trainer_overhead.py            # full run
    .venv/bin/python benchmarks/trainer_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import tempfile
import time
import warnings

import torch
from _common import best_of, machine, print_table
from torch.utils.data import BatchSampler
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from dataorder import GraBSampler, RandomReshuffling
from dataorder.integrations._checkpoint import save_sampler
from dataorder.integrations.transformers import DataOrderCallback, DataOrderTrainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def model(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def dataset(n: int, length: int) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in tokens]


def run(kind: str, data, args) -> list[float]:
    timer, net = StepTimer(), model()
    if kind == "Trainer (its RandomSampler)":
        trainer = Trainer(model=net, args=args, train_dataset=data)
    else:
        if "GraB" in kind:
            sketch = 16 if kind.endswith("sketch 16") else None
            sampler = GraBSampler(data, balance="mean").attach(net, sketch=sketch)
        else:
            sampler = RandomReshuffling(data)
        trainer = DataOrderTrainer(model=net, args=args, train_dataset=data, train_sampler=sampler)
    trainer.add_callback(timer)  # last, so its on_step_end comes after the GraB step()
    trainer.train()
    return timer.times[2:]  # the first steps warm up allocators and caches


def step_rows(options) -> list[tuple]:
    data = dataset(options.n, options.length)
    kinds = ["Trainer (its RandomSampler)", "DataOrderTrainer + RR", "DataOrderTrainer + GraB (mean)",
             "DataOrderTrainer + GraB (mean), sketch 16"]
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=options.batch, num_train_epochs=1,
                                 save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, learning_rate=1e-3)
        for _ in range(options.repeats):
            for kind in kinds:
                times[kind] += run(kind, data, args)
    base = statistics.median(times[kinds[0]])
    return [(kind, f"{statistics.median(times[kind]) * 1e3:.2f}", f"{statistics.median(times[kind]) / base:.2f}x",
             len(times[kind])) for kind in kinds]


def resume_rows(options) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in (options.n, options.big_n):
            for name in ("RR", "GraB (mean)"):
                sampler = RandomReshuffling(n) if name == "RR" else _stepped_grab(n)
                save_sampler(sampler, folder)
                fresh = RandomReshuffling(n) if name == "RR" else GraBSampler(n, balance="mean")
                seconds = best_of(lambda: DataOrderCallback(fresh).load(folder), repeats=options.resume_repeats)
                rows.append((f"load state: {name}, n={n:,}", f"{seconds * 1e3:.2f}"))
        skipped = options.big_n // 2 // 32
        sampler = RandomReshuffling(options.big_n)

        def redraw():
            for _ in itertools.islice(BatchSampler(sampler, 32, drop_last=False), skipped):
                pass

        seconds = best_of(redraw, repeats=options.resume_repeats)
        rows.append((f"Trainer re-draw of {skipped:,} batches of 32 (n={options.big_n:,})", f"{seconds * 1e3:.2f}"))
    return rows


def _stepped_grab(n: int) -> GraBSampler:
    """A GraB sampler half-way through epoch 1 with running sums of the tiny GPT-2's block width."""
    sampler = GraBSampler(n, balance="mean")
    width = sum(p.numel() for name, p in model().named_parameters() if name.startswith("transformer.h."))
    sampler.set_epoch(0)
    sampler.step(torch.randn(min(n, 64), width))
    return sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and few repeats")
    options = parser.parse_args()
    options.n, options.length, options.batch = (64, 32, 8) if options.quick else (256, 64, 8)
    options.repeats = 1 if options.quick else 3
    options.big_n = 10_000 if options.quick else 1_000_000
    options.resume_repeats = 1 if options.quick else 5
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(f"# trainer_overhead  {datetime.date.today()}  {machine()}")
    print(f"\ntiny GPT-2, n={options.n} sequences of {options.length} tokens, batch {options.batch}: "
          "median optimizer step")
    print_table(step_rows(options), ("run", "ms/step", "vs Trainer", "steps"))
    print("\nresume (median of repeats)")
    print_table(resume_rows(options), ("what", "ms"))


if __name__ == "__main__":
    main()
