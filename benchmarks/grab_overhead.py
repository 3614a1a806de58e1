"""Cost of a GraB training step against a plain random-reshuffling step, same model and batch.

Per model (an MLP on digits-sized inputs, LeNet on 3×32×32 images), in the same run:

* ``plain``: ``zero_grad``, forward, ``loss.backward()``, ``optimizer.step()`` (what RR costs);
* ``grab``: ``zero_grad``, ``PerExampleGrads`` (per-example grads, batch mean into ``.grad``),
  ``sampler.step(grads)``, ``optimizer.step()``;
* ``step``: ``sampler.step(grads)`` alone, for each balance (mean, pair, recursive, and mean
  on a 1024-wide CountSketch), as a fraction of the GraB step.

The issue's targets (GraB step ≤ 1.3× plain on CPU, ≤ 1.2× on GPU; ``step`` ≤ 5% of the
step) assume per-example gradients come almost free; with torch.func materialising the
``B × d`` matrix they do not (see DESIGN.md), so the ratio is reported as measured.

    python benchmarks/grab_overhead.py [--device cuda] [--batch 64] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from _common import best_of, machine, print_table
from dataorder.grads import PerExampleGrads
from dataorder.models import LeNet, mlp
from dataorder.samplers.grab import GraBSampler


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "MLP 64-256-256-10": (mlp(64, 10), (64,)),
        "LeNet 3x32x32": (LeNet(3, 10, size=32), (3, 32, 32)),
    }


def measure(name: str, model: nn.Module, shape: tuple[int, ...], batch: int, steps: int, repeats: int,
            device: str) -> list[tuple]:
    torch.manual_seed(0)
    model = model.to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.functional.cross_entropy
    per_example = PerExampleGrads(model, loss_fn)
    d = per_example.dim
    n = batch * steps * 2 * (repeats + 1)  # every timed run consumes fresh positions of one epoch
    samplers = {balance: GraBSampler(n, balance=balance) for balance in ("mean", "pair", "recursive")}
    samplers["mean, sketch_dim=1024"] = GraBSampler(n, sketch_dim=1024)

    def plain():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

    def per_example_only():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            per_example(x, y)
            optimizer.step()

    def grab_step(sampler):
        def run():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                sampler.step(per_example(x, y).grads)
                optimizer.step()
        return run

    grads = per_example(x, y).grads

    def step_only(sampler):
        def run():
            for _ in range(steps):
                sampler.step(grads)
        return run

    variants = {"plain": plain, "per-example": per_example_only}
    for balance, sampler in samplers.items():
        variants[f"grab {balance}"] = grab_step(sampler)
        variants[f"step {balance}"] = step_only(sampler)
    times = interleaved(variants, repeats)
    base, pex = times["plain"], times["per-example"]
    rows = [(name, d, "plain backward (RR)", f"{1e3 * base / steps:.2f}", "1.00", "-"),
            (name, d, "PerExampleGrads only", f"{1e3 * pex / steps:.2f}", f"{pex / base:.2f}", "-")]
    for balance in samplers:
        full, alone = times[f"grab {balance}"], times[f"step {balance}"]
        rows.append((name, d, f"GraB step ({balance})", f"{1e3 * full / steps:.2f}", f"{full / base:.2f}",
                     f"{100 * alone / full:.1f}%"))
    return rows


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median time of each variant, timed round-robin so that load drifts hit all alike."""
    for run in variants.values():  # warm-up
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            samples[name].append(best_of(run, repeats=1, warmup=0))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 repeat")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    print(f"machine: {machine()}\ndevice: {args.device}, batch {args.batch}, {steps} steps per run, median of {repeats}")
    rows = []
    for name, (model, shape) in models().items():
        rows += measure(name, model, shape, args.batch, steps, repeats, args.device)
    print_table(rows, ("model", "d", "training step", "ms/step", "vs plain", "sampler.step share"))


if __name__ == "__main__":
    main()
