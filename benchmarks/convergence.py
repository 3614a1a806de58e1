"""Convergence of every ordering on digits: final full-train loss and test accuracy.

First, the orderings' prefix discrepancy on fixed vectors (n=1024, d=32, zero mean, batch
16): the largest ``‖Σ_{i≤t} v_σ(i)‖`` along the order after each pass, over the median of
random permutations.

For each model (logistic regression and an MLP) and each ordering (rr, so, flipflop, grab,
pair, recursive, herding), ``--seeds`` runs share their seeds across orderings, so seed
``s`` gives every ordering the same initial weights and the same first-epoch order. The
table reports the final full-train loss (mean ± std over seeds), its ratio to rr's mean,
in how many seeds the ordering ended below rr (paired by seed), and test accuracy.

    python benchmarks/convergence.py [--models logreg,mlp] [--seeds 5] [--epochs 10] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import machine, print_table
from dataorder.data import load_digits_split
from dataorder.orderings import make_ordering
from dataorder.training import train_run

ORDERS = ("rr", "so", "flipflop", "grab", "pair", "recursive", "herding")
#: model -> training settings (the compare demo's, see the README's GraB section)
SETTINGS = {
    "logreg": {"lr": 0.5, "batch_size": 16, "weight_decay": 1e-3},
    "mlp": {"lr": 0.1, "batch_size": 16, "weight_decay": 1e-3},
}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def discrepancy_table(passes: int = 5) -> None:
    import numpy as np

    from dataorder.ordering import GraBSampler
    from dataorder.ordering import HerdingSampler

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1024, 32))
    vectors -= vectors.mean(axis=0)
    tensor = torch.from_numpy(vectors).float()

    def discrepancy(order):
        return np.linalg.norm(np.cumsum(vectors[order], axis=0), axis=1).max()

    random = np.median([discrepancy(rng.permutation(1024)) for _ in range(100)])
    samplers = {"grab (mean)": GraBSampler(1024), "pair": GraBSampler(1024, balance="pair"),
                "recursive (depth 2)": GraBSampler(1024, balance="recursive"), "herding": HerdingSampler(1024)}
    rows = []
    for name, sampler in samplers.items():
        ratios = []
        for epoch in range(passes + 1):
            sampler.set_epoch(epoch)
            order = sampler.global_order()
            ratios.append(f"{discrepancy(order) / random:.3f}")
            for start in range(0, 1024, 16):
                sampler.step(tensor[order[start:start + 16]])
        rows.append((name, *ratios))
    print("prefix discrepancy / median of 100 random permutations, after each pass (0 = random start)")
    print_table(rows, ("ordering", *map(str, range(passes + 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, logreg only")
    parser.add_argument("--weight-decay", type=float, default=None, help="override the settings' weight decay")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these models are tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = ["logreg"] if args.quick else args.models.split(",")
    seeds, epochs = (1, 2) if args.quick else (args.seeds, args.epochs)
    orders = args.orders.split(",")
    split = load_digits_split()
    print(f"machine: {machine()}")
    discrepancy_table(2 if args.quick else 5)
    print(f"\ndigits, {epochs} epochs, seeds 0..{seeds - 1}")
    for model in models:
        settings = dict(SETTINGS[model])
        if args.weight_decay is not None:
            settings["weight_decay"] = args.weight_decay
        print(f"\n{model}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        runs, seconds = {}, {}
        for name in orders:
            start = time.perf_counter()
            runs[name] = [train_run(split, model, make_ordering(name), seed=seed, epochs=epochs, **settings)
                          for seed in range(seeds)]
            seconds[name] = (time.perf_counter() - start) / seeds
        base = [r.final_train_loss for r in runs.get("rr", runs[orders[0]])]
        rows = []
        for name, results in runs.items():
            losses = [r.final_train_loss for r in results]
            wins = sum(loss < ref for loss, ref in zip(losses, base))
            rows.append((name, mean_std(losses), f"{statistics.fmean(losses) / statistics.fmean(base):.3f}",
                         f"{wins}/{seeds}", mean_std([r.test_accuracy for r in results]), f"{seconds[name]:.1f}"))
        print_table(rows, ("ordering", "final train loss", "vs rr", "below rr", "test accuracy", "s/run"))


if __name__ == "__main__":
    main()
