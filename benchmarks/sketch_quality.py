"""How much of exact ghost GraB's gain over random reshuffling the sketched path keeps, per k.

Digits MLP (64-256-256-10, scikit-learn's bundled digits, train split), SGD (lr ``--lr``),
batch 32, ``--epochs`` epochs, for each seed: the same initial weights and the same first
order for every ordering -- RR (``RandomReshuffling``), exact ghost GraB (``attach(model)``),
sketched ghost GraB (``attach(model, sketch=k)`` for each ``k`` of ``--ks``), balance ``mean``.

Reported per ordering: final full-train loss (median over seeds and per seed), the fraction
of exact GraB's gain kept ``(RR - sketch) / (RR - exact)`` per seed, how many seeds the
ordering beat RR, the last epoch's wall-clock time, and the prefix discrepancy of the true
gradients: ``max_t ||sum_{i<=t} (g_{pi_i} - mean g)||_inf`` over the last epoch's order
``pi``, with the exact per-example gradients at the final weights (GraB's quantity).

    python benchmarks/sketch_quality.py [--seeds 0 1 2] [--ks 4 8 16 32] [--epochs 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from _common import machine, print_table
from dataorder.data import load_digits_split
from dataorder.grads import PerExampleGrads
from dataorder.models import mlp
from dataorder.ordering import GraBSampler
from dataorder.samplers.shuffle import RandomReshuffling

BATCH = 32


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sampler, epochs: int, lr: float):
    """Train in place; returns (final full-train loss, last epoch's order, last epoch's seconds)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        order = list(sampler)
        for first in range(0, len(order), BATCH):
            idx = order[first:first + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            if isinstance(sampler, GraBSampler):
                sampler.step()
            optimizer.step()
        seconds = time.perf_counter() - start
    with torch.no_grad():
        loss = loss_fn(model(x), y).item()
    return loss, order, seconds


def discrepancy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, order: list[int], chunk: int = 128) -> float:
    """``max_t ||sum_{i<=t} (g_{order_i} - mean)||_inf`` with exact per-example gradients, in chunks."""
    per_example = PerExampleGrads(model, nn.functional.cross_entropy)
    saved = [p.grad for p in model.parameters()]
    grads = []
    for first in range(0, len(order), chunk):
        idx = order[first:first + chunk]
        grads.append(per_example(x[idx], y[idx]).grads.double())
        for p in model.parameters():
            p.grad = None
    for p, grad in zip(model.parameters(), saved):
        p.grad = grad
    rows = torch.cat(grads)
    prefix = torch.cumsum(rows - rows.mean(0), dim=0)
    return prefix.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = load_digits_split()
    x, y = torch.as_tensor(split.x_train, dtype=torch.float32), torch.as_tensor(split.y_train, dtype=torch.long)
    n = len(x)
    names = ["RR", "GraB exact"] + [f"GraB sketch k={k}" for k in args.ks]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    for seed in args.seeds:
        torch.manual_seed(seed)
        initial = mlp(64, 10)
        for name in names:
            model = copy.deepcopy(initial)  # the same initial weights for every ordering of this seed
            if name == "RR":
                sampler = RandomReshuffling(n, seed=seed)
            else:
                k = None if name == "GraB exact" else int(name.split("=")[1])
                sampler = GraBSampler(n, balance="mean", seed=seed).attach(model, sketch=k)
            loss, order, seconds = train(model, x, y, sampler, args.epochs, args.lr)
            if isinstance(sampler, GraBSampler):
                sampler.detach()
            results[name].append((loss, discrepancy(model, x, y, order), seconds))
            print(f"seed {seed} {name}: loss {loss:.5f}", flush=True)
    rr = [r[0] for r in results["RR"]]
    exact = [r[0] for r in results["GraB exact"]]
    rows = []
    for name in names:
        losses = [r[0] for r in results[name]]
        kept = [(a - b) / (a - e) if a != e else float("nan") for a, b, e in zip(rr, losses, exact)]
        wins = sum(b < a for a, b in zip(rr, losses))
        rows.append((name, f"{statistics.median(losses):.5f}", " ".join(f"{v:.5f}" for v in losses),
                     "-" if name == "RR" else " ".join(f"{100 * v:.0f}%" for v in kept),
                     "-" if name == "RR" else f"{100 * statistics.median(kept):.0f}%",
                     "-" if name == "RR" else f"{wins}/{len(losses)}",
                     f"{statistics.median(r[1] for r in results[name]):.3f}",
                     f"{statistics.median(r[2] for r in results[name]):.3f}"))
    print(f"# digits MLP, n={n}, B={BATCH}, SGD lr={args.lr}, {args.epochs} epochs, seeds {args.seeds} -- {machine()}")
    print_table(rows, ("ordering", "median loss", "loss per seed", "gain kept per seed", "median kept",
                       "beat RR", "discrepancy", "last epoch s"))


if __name__ == "__main__":
    main()
