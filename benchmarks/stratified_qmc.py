"""Stratified batches and QMC augmentation: variance reductions and sampler speed.

(a) Variance of the minibatch gradient of a linear least-squares model on data whose strata
    have different means and noise levels: StratifiedBatchSampler (proportional, and Neyman
    with sigma_h from per-example gradient norms) vs random reshuffling, same batch size.
    Reported as E||g_batch - g_full||^2 and its ratio to RR (lower is better).
(b) Error of the augmented loss averaged over E epochs, (1/E) sum_e mean_i loss(aug(x_i, u_ie)),
    against its exact value, for a fixed digits classifier: QMC points (QMCAugment) vs i.i.d.
    points, over independent seeds. Two augmentations: the 3x3 pixel shifts of
    ``dataorder compare --augment`` and continuous sub-pixel shifts (bilinear, a smooth integrand).
    Reported as the mean squared error and its ratio QMC / i.i.d.
(c) Batches per second of one epoch: StratifiedBatchSampler vs torch's
    WeightedRandomSampler + BatchSampler (the usual class-balancing recipe), and
    QMCAugment's points per second.

    python benchmarks/stratified_qmc.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler, WeightedRandomSampler

from _common import best_of, machine, print_table
from dataorder.augment import load_shift_digits_split, shift_image
from dataorder.samplers.qmc import QMCAugment, choose
from dataorder.samplers.shuffle import RandomReshuffling
from dataorder.samplers.stratified import StratifiedBatchSampler


# -- (a) gradient variance --------------------------------------------------------------------
def heterogeneous_regression(sizes, dim, noise, seed=0):
    """Strata with their own feature means, target offsets and noise levels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.normal(scale=3.0, size=(len(sizes), dim))
    noise = np.asarray(noise, dtype=np.float64)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    w_true = rng.normal(size=dim)
    y = x @ w_true + 5.0 * labels + noise[labels] * rng.normal(size=len(labels))
    return x, y, labels


def batch_gradient_error(batches, grads, full, weights=None):
    errors = []
    for batch in batches:
        g = grads[batch] if weights is None else grads[batch] * weights(batch)[:, None]
        errors.append(np.sum((g.mean(axis=0) - full) ** 2))
    return float(np.mean(errors))


def gradient_variance(quick: bool, setting: str) -> list[tuple]:
    scale = 1 if quick else 5
    if setting == "unequal sizes":  # between-strata differences dominate
        sizes, noise = tuple(scale * s for s in (800, 400, 200, 100)), np.geomspace(0.5, 4.0, 4)
    else:  # equal sizes, very different noise: where Neyman allocation pays
        sizes, noise = (scale * 400,) * 4, (0.1, 1.0, 10.0, 30.0)
    x, y, labels = heterogeneous_regression(sizes, dim=10, noise=noise)
    w = np.zeros(x.shape[1])  # the gradient at the start of training
    grads = (x @ w - y)[:, None] * x  # per-example gradients of 0.5 (x.w - y)^2
    full = grads.mean(axis=0)
    norms = np.linalg.norm(grads, axis=1)
    batch, epochs = 32, (3 if quick else 10)
    results = {}
    rr = RandomReshuffling(len(y), seed=0)
    errors = []
    for epoch in range(1, epochs + 1):
        rr.set_epoch(epoch)
        errors.append(batch_gradient_error(list(BatchSampler(rr, batch, drop_last=True)), grads, full))
    results["random reshuffling"] = np.mean(errors)
    for allocation in ("proportional", "neyman"):
        sampler = StratifiedBatchSampler(labels, batch, allocation=allocation, seed=0, drop_last=True)
        errors = []
        for epoch in range(epochs + 1):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            for b in batches:  # what a training loop would report: per-example gradient norms
                sampler.update(b, norms[b])
            if epoch:  # epoch 0 has no sigma estimates yet: Neyman starts proportional
                errors.append(batch_gradient_error(batches, grads, full,
                                                   lambda b: sampler.importance_weights(b, torch.float64).numpy()))
        label = f"stratified {allocation}" + (f" {list(sampler.counts.values())}" if allocation == "neyman" else "")
        results[label] = np.mean(errors)
    # the best Neyman can do: sigma_h = sqrt(trace of the stratum's gradient covariance), fed as
    # values with that standard deviation (an oracle no training loop has)
    spread = np.array([np.sqrt(grads[labels == h].var(axis=0).sum()) for h in range(len(sizes))])
    oracle = StratifiedBatchSampler(labels, batch, allocation="neyman", seed=0, drop_last=True)
    oracle.update(np.arange(len(y)), spread[labels] * np.where(np.arange(len(y)) % 2, 1.0, -1.0))
    errors = []
    for epoch in range(1, epochs + 1):
        oracle.set_epoch(epoch)
        oracle.update(np.arange(len(y)), spread[labels] * np.where(np.arange(len(y)) % 2, 1.0, -1.0))
        errors.append(batch_gradient_error(list(oracle), grads, full,
                                           lambda b: oracle.importance_weights(b, torch.float64).numpy()))
    results[f"stratified neyman, oracle sigma {list(oracle.counts.values())}"] = np.mean(errors)
    base = results["random reshuffling"]
    return [(setting, name, f"{value:.4g}", f"{value / base:.3f}") for name, value in results.items()]


# -- (b) QMC vs i.i.d. augmentation -----------------------------------------------------------
def fixed_classifier(split, steps=200):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(split.x_train), split.y_train).backward()
        optimizer.step()
    return model.requires_grad_(False)


def per_example_loss(model, images, targets):
    return torch.nn.functional.cross_entropy(model(images.reshape(len(images), -1)), targets, reduction="none")


def subpixel_shift(images, shifts):
    """Shift (N, 1, H, W) images by real (dy, dx) pixels, bilinear, zero fill."""
    n, _, height, width = images.shape
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shifts[:, 1] / width  # sampling grid moves opposite to the content
    theta[:, 1, 2] = -2.0 * shifts[:, 0] / height
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmented_loss_error(quick: bool) -> list[tuple]:
    split = load_shift_digits_split()
    model = fixed_classifier(split)
    images, targets = split.x_train.reshape(-1, 1, 8, 8), split.y_train
    n = len(targets)
    # discrete 3x3 shifts: the loss of every example under every shift, and its exact mean
    table = torch.stack([per_example_loss(model, shift_image(images, dy, dx), targets)
                         for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dim=1).numpy()
    exact_discrete = table.mean()
    # continuous shifts in [-1, 1]^2: the loss is smooth on each quadrant (bilinear kinks at 0),
    # so Gauss-Legendre on each half-axis gives its exact mean
    nodes, weights = np.polynomial.legendre.leggauss(4 if quick else 10)
    nodes = np.concatenate([(nodes - 1) / 2, (nodes + 1) / 2])
    weights = np.concatenate([weights, weights]) / 4  # each half has length 1; the square has area 4
    exact_continuous = sum(
        wa * wb * per_example_loss(model, subpixel_shift(images, torch.tensor([[a, b]] * n, dtype=torch.float32)),
                                   targets).mean().item()
        for a, wa in zip(nodes, weights) for b, wb in zip(nodes, weights))
    seeds = 4 if quick else 40
    horizons = (4, 8) if quick else (4, 16, 64)
    rows = []
    for kind in ("3x3 shifts", "sub-pixel shifts"):
        squared = {(method, e): [] for method in ("sobol", "random") for e in horizons}
        for seed in range(seeds):
            for method in ("sobol", "random"):
                data = QMCAugment(range(n), lambda s, u: s, dim=2, seed=seed, method=method)
                running = np.zeros(n)
                for epoch in range(max(horizons)):
                    u = data.points(range(n), epoch)
                    if kind == "3x3 shifts":
                        running += table[np.arange(n), choose(u[:, 0], 3) * 3 + choose(u[:, 1], 3)]
                    else:
                        shifts = torch.from_numpy(2 * u - 1).float()
                        running += per_example_loss(model, subpixel_shift(images, shifts), targets).numpy()
                    if epoch + 1 in horizons:
                        exact = exact_discrete if kind == "3x3 shifts" else exact_continuous
                        squared[(method, epoch + 1)].append((running.mean() / (epoch + 1) - exact) ** 2)
        for e in horizons:
            qmc_mse, iid_mse = np.mean(squared[("sobol", e)]), np.mean(squared[("random", e)])
            rows.append((kind, e, f"{qmc_mse:.3g}", f"{iid_mse:.3g}", f"{qmc_mse / iid_mse:.3f}"))
    return rows


# -- (c) speed --------------------------------------------------------------------------------
def sampler_speed(quick: bool) -> list[tuple]:
    n, batch, repeats = (50_000, 256, 2) if quick else (1_000_000, 256, 5)
    rows = []
    for strata in (10, 100):
        labels = np.random.default_rng(0).integers(0, strata, size=n)
        class_weights = 1.0 / np.bincount(labels)
        weighted = BatchSampler(WeightedRandomSampler(torch.from_numpy(class_weights[labels]), n,
                                                      generator=torch.Generator().manual_seed(0)), batch, False)
        stratified = StratifiedBatchSampler(labels, batch, allocation="equal", seed=0)
        epochs = iter(range(10**9))

        def run_stratified():
            stratified.set_epoch(next(epochs))
            return list(stratified)

        base = best_of(lambda: list(weighted), repeats)
        ours = best_of(run_stratified, repeats)
        batches = len(stratified)
        rows.append((f"{strata} strata", f"{batches / base:,.0f}", f"{batches / ours:,.0f}", f"{base / ours:.2f}x"))
    return rows


def qmc_speed(quick: bool) -> list[tuple]:
    n = 5_000 if quick else 200_000
    rows = []
    for method in ("sobol", "random"):
        data = QMCAugment(range(n), lambda s, u: u, dim=4, method=method)
        data.set_epoch(3)
        items = min(n, 20_000)
        per_item = best_of(lambda: [data[i] for i in range(items)], 3) / items
        vectorised = best_of(lambda: data.points(np.arange(n)), 3) / n
        rows.append((method, f"{1 / per_item:,.0f}", f"{1 / vectorised / 1e6:.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    start = time.perf_counter()
    print("\n(a) minibatch gradient error E||g_B - g||^2, linear least squares, heterogeneous strata, batch 32")
    rows = gradient_variance(args.quick, "unequal sizes") + gradient_variance(args.quick, "unequal noise")
    print_table(rows, ("data", "sampler", "E||g_B - g||^2", "vs RR"))
    print("\n(b) squared error of the E-epoch augmented-loss average (digits, fixed classifier), mean over seeds")
    print_table(augmented_loss_error(args.quick), ("augmentation", "epochs", "QMC mse", "i.i.d. mse", "QMC / i.i.d."))
    print("\n(c) one epoch, batch 256: batches per second")
    print_table(sampler_speed(args.quick), ("labels", "WeightedRandomSampler+BatchSampler", "StratifiedBatchSampler",
                                            "speed-up"))
    print("\n    QMCAugment points (dim 4)")
    print_table(qmc_speed(args.quick), ("method", "__getitem__ / s", "points() M/s"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
