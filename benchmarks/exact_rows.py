"""The exact path's two sources on small models: dense rows built in the backward against ghost products.

``attach(model)`` (the exact path) balances a model with at most
``dataorder.ordering.sources.DENSE_EXACT_MAX`` selected values from dense per-example rows
built during the backward (``GhostGrads(model, dense=True)``), and larger models from the
ghost products. This times both on the same models, with the same data, in one process: a
whole training epoch on the digits training split (DataLoader, forward, backward,
``sampler.step()``, SGD), per step, as a ratio to a plain random-reshuffling epoch of the same
model. Epochs of the three runs are interleaved so that machine noise spreads over all of
them; the medians over epochs are printed. The threshold is where the two ratios cross.

Models: digits MLPs 64-[hidden]-10 (``--hidden`` lists them, ``""`` for logistic regression).

    python benchmarks/exact_rows.py [--hidden ,32,64,128] [--batches 16,64] [--epochs 10] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _common import machine, print_table
from dataorder.data import load_digits_split
from dataorder.ordering import GraBSampler, sources
from dataorder.samplers.shuffle import RandomReshuffling
from dataorder.training import mean_cross_entropy


def build(hidden: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers, width = [], 64
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


def sampler_for(kind: str, model: nn.Module, n: int):
    if kind == "plain":
        return RandomReshuffling(n, seed=0)
    saved = sources.DENSE_EXACT_MAX
    sources.DENSE_EXACT_MAX = 2 ** 62 if kind == "dense rows" else -1  # force one source
    try:
        return GraBSampler(n, balance="mean", seed=0).attach(model)
    finally:
        sources.DENSE_EXACT_MAX = saved


def time_model(hidden: list[int], batch: int, epochs: int, dataset: TensorDataset) -> dict[str, float]:
    """Median seconds per step of each kind over ``epochs`` interleaved epochs (the first two are warm-up)."""
    runs = {}
    for kind in ("plain", "dense rows", "ghost products"):
        model = build(hidden)
        runs[kind] = (model, sampler_for(kind, model, len(dataset)), torch.optim.SGD(model.parameters(), lr=0.1))
    per_step: dict[str, list[float]] = {kind: [] for kind in runs}
    for epoch in range(epochs + 2):
        for kind, (model, sampler, optimizer) in runs.items():
            sampler.set_epoch(epoch)
            start, steps = time.perf_counter(), 0
            for x, y in DataLoader(dataset, batch_size=batch, sampler=sampler):
                optimizer.zero_grad(set_to_none=True)
                mean_cross_entropy(model(x), y).backward()
                if kind != "plain":
                    sampler.step()
                optimizer.step()
                steps += 1
            if epoch >= 2:
                per_step[kind].append((time.perf_counter() - start) / steps)
    return {kind: statistics.median(times) for kind, times in per_step.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default=",32,64,128", help="comma-separated MLP widths, '' for logreg; "
                        "'-' joins layers (256-256)")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two epochs, logreg only (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.batches, args.epochs = ",", "16", 1
    try:
        specs = [[int(size) for size in spec.split("-") if size] for spec in dict.fromkeys(args.hidden.split(","))]
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--hidden and --batches take comma-separated ints, got {args.hidden!r} and {args.batches!r}")
    for flag, values in (("--hidden", [size for spec in specs for size in spec]), ("--batches", batches),
                         ("--epochs", [args.epochs]), ("--threads", [args.threads])):
        if any(value < 1 for value in values):
            parser.error(f"{flag} must be >= 1, got {min(values)}")
    torch.set_num_threads(args.threads)
    split = load_digits_split()
    dataset = TensorDataset(split.x_train, split.y_train)
    print(f"# exact path, dense rows vs ghost products -- {machine()}; digits train split ({len(dataset)}), "
          f"DENSE_EXACT_MAX = {sources.DENSE_EXACT_MAX}")
    rows = []
    for batch in batches:
        for hidden in specs:
            d = sum(p.numel() for p in build(hidden).parameters())
            times = time_model(hidden, batch, args.epochs, dataset)
            plain = times["plain"]
            chosen = "dense rows" if d <= sources.DENSE_EXACT_MAX else "ghost products"
            rows.append(("-".join(["64", *map(str, hidden), "10"]), d, batch, f"{1e6 * plain:.0f}",
                         f"{times['dense rows'] / plain:.2f}", f"{times['ghost products'] / plain:.2f}", chosen))
    print_table(rows, ("model", "d", "B", "plain µs/step", "dense rows ×", "ghost products ×", "attach uses"))


if __name__ == "__main__":
    main()
