"""``dataorder compare``: train with several orderings side by side, same seeds, same inits."""

from __future__ import annotations

import argparse
import math
import statistics

from dataorder.cli.errors import UsageError

DATASETS = ("digits",)
#: default learning rates on digits (batch 16): the tuned values of the `make demo` comparison
DEFAULT_LR = {"logreg": 0.5}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", choices=DATASETS, help="built-in dataset (default: digits)")
    parser.add_argument("--model", default="logreg", help="logreg | mlp | cnn | package.module:factory")
    parser.add_argument("--orders", default="rr,so", help="comma-separated orderings, e.g. rr,so,flipflop")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) per ordering")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.5 for logreg, else 0.1)")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=1e-3,
                        help="SGD weight decay (default 1e-3: a finite optimum, where ordering shows)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--grads", default="ghost", choices=("ghost", "vmap"),
                        help="GraB family: ghost balancing from a plain backward (default) or "
                             "torch.func per-example gradients (vmap)")
    parser.add_argument("--plot", metavar="PNG", help="save the mean train-loss curves to this PNG")
    parser.add_argument("--augment", metavar="qmc,iid", help="train on digits shifted by up to 1 pixel, shifts "
                        "drawn per (example, epoch) by QMC and/or i.i.d. points; rows become ORDER/AUGMENT")


def run(args: argparse.Namespace) -> int:
    from dataorder.data import load_digits_split
    from dataorder.orderings import ORDERINGS, make_ordering
    from dataorder.training import train_run

    names = [name.strip() for name in args.orders.split(",") if name.strip()]
    unknown = [name for name in names if name not in ORDERINGS]
    if unknown or not names:
        raise UsageError(f"--orders: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(ORDERINGS)}")
    for flag, value in (("--epochs", args.epochs), ("--seeds", args.seeds), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.model, 0.1)
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UsageError(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    augments = [a.strip() for a in (args.augment or "").split(",") if a.strip()] or [None]
    if not set(augments) <= {None, "qmc", "iid"}:
        raise UsageError(f"--augment: choose from qmc, iid (comma-separated), got {args.augment!r}")
    if augments == [None]:
        split = load_digits_split(image=args.model == "cnn")
    else:  # pixels in [0, 1] so that a shift moves ink (dataorder.augment)
        from dataorder.augment import load_shift_digits_split
        split = load_shift_digits_split(image=args.model == "cnn")
    print(f"dataorder compare: {args.data} ({len(split.y_train)} train / {len(split.y_test)} test), "
          f"model {args.model}, batch {args.batch_size}, lr {args.lr}, weight decay {args.weight_decay}, "
          f"{args.epochs} epochs, {args.seeds} seeds")
    results = {}
    for name, augment in [(name, augment) for name in names for augment in augments]:
        try:
            results[name if augment is None else f"{name}/{augment}"] = [
                train_run(split, args.model, make_ordering(name, grads=args.grads), seed=seed, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, device=args.device,
                          augment=augment)
                for seed in range(args.seeds)
            ]
        except ValueError as error:
            raise UsageError(str(error)) from error
    print_table(results)
    if args.plot:
        plot_curves(results, args.plot)
        print(f"saved loss curves to {args.plot}")
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def print_table(results: dict) -> None:
    """One row per ordering: final full-train loss (mean ± std), ratio to rr, test accuracy.

    A row ``ORDER/AUGMENT`` is compared with ``rr/AUGMENT`` (the same augmentation).
    """
    print(f"{'ordering':<10} {'final train loss':>22} {'vs rr':>7} {'test acc':>16}")
    for name, runs in results.items():
        loss, loss_std = _mean_std([r.final_train_loss for r in runs])
        acc, acc_std = _mean_std([r.test_accuracy for r in runs])
        suffix = name.partition("/")[2]
        reference = results.get(f"rr/{suffix}" if suffix else "rr")
        baseline = statistics.fmean(r.final_train_loss for r in reference) if reference else None
        ratio = f"{loss / baseline:7.3f}" if baseline else f"{'-':>7}"
        print(f"{name:<10} {loss:>12.5f} ± {loss_std:<7.5f} {ratio} {acc:>8.4f} ± {acc_std:.4f}")


def plot_curves(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        epochs = range(len(runs[0].train_loss))
        mean = [statistics.fmean(r.train_loss[e] for r in runs) for e in epochs]
        axis.plot(list(epochs), mean, label=name, marker="o", markersize=3)
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("full-train loss (mean over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
