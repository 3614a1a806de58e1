"""Time to quality: how soon each ordering reaches random reshuffling's final full-train loss.

For every workload (:data:`dataorder.training.WORKLOADS`: digits logreg and MLP, LeNet and a
ResNet-style CNN on the synthetic 32×32 ``patterns32`` task, a byte-level transformer LM on
the standard library's source) and every ordering, each seed builds the model once and every
ordering starts from a copy of those weights, with that seed for its sampler; orderings are
interleaved within a seed so that machine noise spreads over all of them. Each ordering is
warmed up once per workload (two batches) so that numba compilation is not timed.

Per ordering, paired with rr seed by seed (:func:`dataorder.training.summarize`):

- time→rr: training-loop wall-clock (data loading, forward, backward, balancing, optimizer;
  evaluation excluded and reported apart) until the full-train loss first reaches rr's final
  full-train loss, over rr's time to the same point; median over seeds, "not reached" when the
  median seed never gets there;
- epochs→rr: the median epoch position of that point (rr's in brackets) and cost/ep, the median
  seconds per epoch over rr's: time→rr is roughly their product;
- won: seeds that reached the target sooner than rr; final full-train loss, held-out loss and
  accuracy (next-byte for the LM).

The full-train loss is evaluated ``evals_per_epoch`` times per epoch (the workload says how
often); nothing is interpolated between evaluations.

    python benchmarks/time_to_quality.py [--workloads digits-logreg,stdlib-lm] [--seeds 3]
                                         [--orders rr,grab] [--quick] [--threads 1]
                                         [--epochs N] [--evals-per-epoch N] [--lr-schedule cosine]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from _common import machine, print_table
from dataorder.data import TensorSplit
from dataorder.orderings import make_ordering
from dataorder.training import (LR_SCHEDULES, WORKLOADS, RunResult, Workload, initial_state, summarize, train_run,
                                warm_up)

#: the GraB family: the best of these per workload is checked against the ≤ 0.9× target
GRAB_FAMILY = ("grab", "pair", "recursive", "grab-sketch")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def truncated(split: TensorSplit, size: int) -> TensorSplit:
    return dataclasses.replace(split, x_train=split.x_train[:size], y_train=split.y_train[:size],
                               x_test=split.x_test[:size], y_test=split.y_test[:size])


def run_workload(name: str, workload: Workload, seeds: int, orders: list[str], split: TensorSplit) -> dict:
    settings = dict(batch_size=workload.batch_size, lr=workload.lr, momentum=workload.momentum,
                    weight_decay=workload.weight_decay, lr_schedule=workload.lr_schedule)
    for order in orders:
        warm_up(split, workload.model, order, batch_size=workload.batch_size)
    runs: dict[str, list[RunResult]] = {order: [] for order in orders}
    for seed in range(seeds):
        init = initial_state(split, workload.model, seed)
        for order in orders:
            runs[order].append(train_run(split, workload.model, make_ordering(order), seed=seed,
                                         epochs=workload.epochs, evals_per_epoch=workload.evals_per_epoch,
                                         init=init, **settings))
            print(f"  seed {seed} {order}: {runs[order][-1].train_seconds[-1]:.1f} s", file=sys.stderr)
    return runs


def report(runs: dict[str, list[RunResult]]) -> tuple[str, float | None]:
    """Print the workload's table; return the best GraB-family ordering and its time ratio."""
    base = runs["rr"]
    rows, best = [], ("-", None)
    for order, results in runs.items():
        s = summarize(results, base)
        time_ratio = "not reached" if s.time_ratio is None else f"{s.time_ratio:.3f}"
        epochs = "not reached" if s.epochs is None else f"{s.epochs:g}"
        losses = [r.final_train_loss for r in results]
        rows.append((order, time_ratio, f"{s.reached}/{s.seeds}", f"{epochs} ({s.baseline_epochs:g})",
                     f"{s.cost_ratio:.3f}", f"{s.wins}/{s.seeds}", mean_std(losses),
                     f"{statistics.fmean(losses) / statistics.fmean(r.final_train_loss for r in base):.3f}",
                     mean_std([r.test_loss for r in results]), mean_std([r.test_accuracy for r in results]),
                     f"{statistics.fmean(r.train_seconds[-1] for r in results):.2f}",
                     f"{statistics.fmean(r.eval_seconds for r in results):.2f}"))
        family = order.partition(":")[0] in GRAB_FAMILY
        if family and s.time_ratio is not None and (best[1] is None or s.time_ratio < best[1]):
            best = (order, s.time_ratio)
    print_table(rows, ("ordering", "time→rr", "reached", "epochs→rr (rr)", "cost/ep", "won", "final train loss",
                       "vs rr", "held-out loss", "held-out acc", "train s", "eval s"))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--orders", default=None, help="comma-separated orderings (default: each workload's; "
                        "rr is always run first, as the baseline)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every workload's epochs")
    parser.add_argument("--evals-per-epoch", type=int, default=None,
                        help="override every workload's full-train evaluations per epoch")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                        help="override every workload's learning-rate schedule (cosine: from lr to 0 over the run)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: every workload on 64 examples, 1 seed, 1 epoch, rr and grab")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--evals-per-epoch", args.evals_per_epoch),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.orders is not None:
        try:
            for order in args.orders.split(","):
                make_ordering(order.strip())  # every name checked before anything trains
        except ValueError as error:
            parser.error(f"--orders: {error}")
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    print(f"machine: {machine()}")
    print(f"time to quality, seeds 0..{seeds - 1}{' (--quick: 64 examples, 1 epoch)' if args.quick else ''}")
    best: dict[str, tuple[str, float | None]] = {}
    started = time.perf_counter()
    for name in names:
        workload = WORKLOADS[name]
        if args.quick:
            workload = dataclasses.replace(workload, epochs=1, evals_per_epoch=2, orders=("rr", "grab"))
        else:
            overrides = {"epochs": args.epochs, "evals_per_epoch": args.evals_per_epoch,
                         "lr_schedule": args.lr_schedule}
            workload = dataclasses.replace(workload, **{k: v for k, v in overrides.items() if v is not None})
        orders = list(workload.orders) if args.orders is None else [o.strip() for o in args.orders.split(",")]
        orders = ["rr"] + [o for o in orders if o != "rr"]
        split = workload.load()
        if args.quick:
            split = truncated(split, 64)
        print(f"\n{name}: {workload.model} on {split.name} ({len(split.y_train)} train / {len(split.y_test)} "
              f"held-out), batch {workload.batch_size}, lr {workload.lr}"
              f"{' (cosine to 0)' if workload.lr_schedule == 'cosine' else ''}, momentum {workload.momentum}, "
              f"weight decay {workload.weight_decay}, {workload.epochs} epochs, full-train loss evaluated "
              f"{workload.evals_per_epoch}× per epoch")
        if split.info:
            print(f"  data: {split.info}{' (first 64 of each split for --quick)' if args.quick else ''}")
        workload_start = time.perf_counter()
        runs = run_workload(name, workload, seeds, list(orders), split)
        best[name] = report(runs)
        print(f"  ({time.perf_counter() - workload_start:.0f} s for this workload)")
    print(f"\nbest GraB-family ordering per workload (target: time→rr ≤ 0.9 on at least two):")
    for name, (order, ratio) in best.items():
        print(f"  {name}: {order} {'not reached' if ratio is None else f'{ratio:.3f}'}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
