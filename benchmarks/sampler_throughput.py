"""Indices per second of RandomReshuffling vs torch's RandomSampler and DistributedSampler.

Two measurements per sampler, in the same run: index generation alone (one epoch of
``list(sampler)``) and indices delivered through ``DataLoader(batch_size=256)`` over a
``TensorDataset`` of 1M rows. Ratios are against ``torch.utils.data.RandomSampler``.

    python benchmarks/sampler_throughput.py [--rows 1000000] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from _common import best_of, machine, print_table
from dataorder.samplers.shuffle import RandomReshuffling


def samplers(dataset):
    generator = torch.Generator().manual_seed(0)
    return {
        "torch RandomSampler": RandomSampler(dataset, generator=generator),
        "torch DistributedSampler": DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0),
        "dataorder RandomReshuffling": RandomReshuffling(dataset, seed=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100k rows, 2 repeats")
    args = parser.parse_args()
    rows, repeats = (100_000, 2) if args.quick else (args.rows, args.repeats)
    dataset = TensorDataset(torch.arange(rows, dtype=torch.float32).unsqueeze(1))
    print(f"machine: {machine()}\nrows: {rows}, DataLoader batch_size=256, median of {repeats}")

    def epoch_of(sampler):
        epochs = iter(range(10**9))

        def run():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(next(epochs))
            return list(sampler)
        return run

    def loader_epoch(sampler):
        loader = DataLoader(dataset, batch_size=256, sampler=sampler)

        def run():
            for _ in loader:
                pass
        return run

    results = {name: (best_of(epoch_of(s), repeats), best_of(loader_epoch(s), max(1, repeats // 2)))
               for name, s in samplers(dataset).items()}
    base_gen, base_loader = results["torch RandomSampler"]
    table = [(name, f"{rows / gen / 1e6:.1f}", f"{base_gen / gen:.2f}x", f"{rows / load / 1e6:.2f}",
              f"{base_loader / load:.2f}x") for name, (gen, load) in results.items()]
    print_table(table, ("sampler", "gen M idx/s", "gen vs RandomSampler", "loader M idx/s", "loader vs RandomSampler"))


if __name__ == "__main__":
    main()
