"""``dataorder compare``: train with several orderings side by side, same seeds, same inits."""

from __future__ import annotations

import argparse
import statistics

from dataorder.cli.checks import check_device, check_figure, check_float32, check_unique
from dataorder.cli.errors import UsageError

#: --data -> its default --model
DATASETS = {"digits": "logreg", "patterns32": "cnn", "stdlib-lm": "lm-tiny"}
#: default learning rates on digits (batch 16): the tuned values of the `make demo` comparison
DEFAULT_LR = {"logreg": 0.5}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Columns: final full-train loss, its ratio to rr, held-out accuracy and loss (next-byte for "
                     "stdlib-lm), then the time-to-quality numbers, paired with rr seed by seed: 'time→rr' is the "
                     "median of (training wall-clock until the full-train loss first reaches rr's final one / rr's "
                     "time), 'epochs→rr' the median epochs to that point (rr's in brackets), 'cost/ep' the median "
                     "seconds per epoch / rr's, 'won' the seeds that got there sooner than rr. Evaluation is timed "
                     "apart. A progress bar shows on a terminal after 2 s (never with --quiet).")
    parser.add_argument("--data", default="digits", choices=tuple(DATASETS),
                        help="built-in data: digits, patterns32 (synthetic 32×32 images) or stdlib-lm (byte-level "
                             "LM on the standard library's source; default: digits)")
    parser.add_argument("--model", default=None, help="logreg | mlp | cnn | resnet | lm-tiny | package.module:factory "
                        "(default: logreg on digits, cnn on patterns32, lm-tiny on stdlib-lm)")
    parser.add_argument("--orders", default="rr,so", help="comma-separated orderings, e.g. rr,so,grab,grab-sketch:16")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) per ordering")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (stdlib-lm: its workload's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.5 for logreg, else 0.1; "
                        "stdlib-lm and patterns32: their workload's)")
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                        help="constant, or cosine: the learning rate decays from --lr to 0 over the run's steps")
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="SGD weight decay (default 1e-3 on digits: a finite optimum, where ordering shows)")
    parser.add_argument("--evals-per-epoch", type=int, default=1,
                        help="full-train evaluations per epoch (more: a finer time-to-target; default 1)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--grads", default="ghost", choices=("ghost", "vmap"),
                        help="GraB family: ghost balancing from a plain backward (default) or "
                             "torch.func per-example gradients (vmap)")
    parser.add_argument("--plot", metavar="PNG", help="save full-train loss against epochs and against training "
                        "wall-clock time (mean over seeds) to this PNG (checked before anything trains)")
    parser.add_argument("--augment", metavar="qmc,iid", help="train on digits shifted by up to 1 pixel, shifts "
                        "drawn per (example, epoch) by QMC and/or i.i.d. points; rows become ORDER/AUGMENT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _settings(args: argparse.Namespace) -> dict:
    """SGD settings: the flags given, else the data's workload defaults (stdlib-lm, patterns32), else digits'."""
    from dataorder.training import WORKLOADS

    workload = next((w for w in WORKLOADS.values() if w.data == args.data and w.model == args.model), None)
    digits = {"batch_size": 16, "lr": DEFAULT_LR.get(args.model, 0.1), "momentum": 0.0, "weight_decay": 1e-3}
    defaults = digits if workload is None or args.data == "digits" else {
        "batch_size": workload.batch_size, "lr": workload.lr, "momentum": workload.momentum,
        "weight_decay": workload.weight_decay}
    given = {"batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
             "weight_decay": args.weight_decay}
    settings = {key: defaults[key] if value is None else value for key, value in given.items()}
    return {**settings, "lr_schedule": args.lr_schedule}


def _load_split(args: argparse.Namespace, augment: bool):
    from dataorder import data

    if args.data == "stdlib-lm":
        return data.load_stdlib_lm_split()
    if args.data == "patterns32":
        return data.load_patterns32_split()
    if augment:  # pixels in [0, 1] so that a shift moves ink (dataorder.augment)
        from dataorder.augment import load_shift_digits_split
        return load_shift_digits_split(image=args.model == "cnn")
    return data.load_digits_split(image=args.model == "cnn")


def run(args: argparse.Namespace) -> int:
    from dataorder.orderings import ORDERINGS, SIZED_ORDERINGS, make_ordering
    from dataorder.training import DivergedError, initial_state, train_run, warm_up

    names = [name.strip() for name in args.orders.split(",") if name.strip()]
    if not names:
        raise UsageError("--orders is empty; give comma-separated orderings, e.g. rr,so,grab")
    check_unique("--orders", names)
    unknown = [name for name in names if name.partition(":")[0] not in {**ORDERINGS, **SIZED_ORDERINGS}]
    if unknown:
        raise UsageError(f"--orders: unknown {', '.join(unknown)}; choose from {', '.join(ORDERINGS)} "
                         f"(or {', '.join(f'{n}:K' for n in SIZED_ORDERINGS)})")
    try:
        for name in names:
            make_ordering(name, grads=args.grads)  # every name checked before anything trains
    except ValueError as error:
        raise UsageError(f"--orders: {error}") from error
    for flag, value in (("--epochs", args.epochs), ("--seeds", args.seeds), ("--evals-per-epoch", args.evals_per_epoch)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    args.model = args.model or DATASETS[args.data]
    if ":" not in args.model and (args.data == "stdlib-lm") != (args.model == "lm-tiny"):
        raise UsageError(f"--model {args.model} does not fit --data {args.data}: lm-tiny is the model of stdlib-lm "
                         "(and only of it)")
    settings = _settings(args)
    if settings["batch_size"] < 1:
        raise UsageError(f"--batch-size must be >= 1, got {settings['batch_size']}")
    for key in ("lr", "momentum", "weight_decay"):
        check_float32(f"--{key.replace('_', '-')}", settings[key], positive=key == "lr")
    check_device(args.device)
    augments = [a.strip() for a in (args.augment or "").split(",") if a.strip()] or [None]
    if not set(augments) <= {None, "qmc", "iid"}:
        raise UsageError(f"--augment: choose from qmc, iid (comma-separated), got {args.augment!r}")
    check_unique("--augment", augments)
    if augments != [None] and args.data != "digits":
        raise UsageError("--augment shifts digits only: use it with --data digits")
    plot = check_figure("--plot", args.plot) if args.plot else None
    split = _load_split(args, augment=augments != [None])
    try:
        inits = [initial_state(split, args.model, seed) for seed in range(args.seeds)]
    except ValueError as error:
        raise UsageError(f"--model: {error}") from error
    print(f"dataorder compare: {args.data} ({len(split.y_train)} train / {len(split.y_test)} test), "
          f"model {args.model}, batch {settings['batch_size']}, lr {settings['lr']}"
          f"{' (cosine to 0)' if args.lr_schedule == 'cosine' else ''}, momentum {settings['momentum']}, "
          f"weight decay {settings['weight_decay']}, {args.epochs} epochs, {args.seeds} seeds"
          + (f"; {split.info}" if split.info and args.data != "digits" else ""))
    jobs = [(name, augment) for name in names for augment in augments]
    results = {}
    try:
        for name in names:  # one-time costs (numba compilation) out of the timed runs
            warm_up(split, args.model, name, batch_size=settings["batch_size"], grads=args.grads,
                    device=args.device)
        with _progress(len(jobs) * args.seeds * args.epochs, quiet=args.quiet) as bar:
            for name, augment in jobs:
                results[name if augment is None else f"{name}/{augment}"] = [
                    train_run(split, args.model, make_ordering(name, grads=args.grads), seed=seed,
                              epochs=args.epochs, device=args.device, augment=augment,
                              evals_per_epoch=args.evals_per_epoch, init=inits[seed],
                              on_epoch=bar.update, **settings)
                    for seed in range(args.seeds)
                ]
    except DivergedError as error:
        raise UsageError(f"{error} (--lr {settings['lr']})") from None
    except ValueError as error:
        raise UsageError(str(error)) from error
    print_table(results)
    if plot is not None:
        plot_curves(results, plot)
        print(f"saved loss curves to {plot}")
    return 0


def _progress(total: int, *, quiet: bool):
    """A tqdm bar over epochs on stderr, shown after 2 s, only on a terminal and without ``--quiet``."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="epoch", file=sys.stderr, delay=2.0, leave=False,
                disable=quiet or not sys.stderr.isatty())


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _baseline(results: dict, name: str) -> list | None:
    suffix = name.partition("/")[2]
    return results.get(f"rr/{suffix}" if suffix else "rr")


def _ratio(value: float | None, width: int) -> str:
    return f"{'not reached' if value is None else f'{value:.3f}':>{width}}"


def print_table(results: dict) -> None:
    """One row per ordering: final full-train loss (mean ± std), ratio to rr, held-out accuracy and
    loss, and the time-to-quality columns of :func:`dataorder.training.summarize` against rr.

    A row ``ORDER/AUGMENT`` is compared with ``rr/AUGMENT`` (the same augmentation); without an
    rr row the ratio columns show ``-``.
    """
    from dataorder.training import summarize

    print(f"{'ordering':<10} {'final train loss':>22} {'vs rr':>7} {'test acc':>16} {'test loss':>9} "
          f"{'time→rr':>11} {'epochs→rr':>14} {'cost/ep':>7} {'won':>5}")
    for name, runs in results.items():
        loss, loss_std = _mean_std([r.final_train_loss for r in runs])
        acc, acc_std = _mean_std([r.test_accuracy for r in runs])
        test_loss = statistics.fmean(r.test_loss for r in runs)
        reference = _baseline(results, name)
        if reference:
            ratio = f"{loss / statistics.fmean(r.final_train_loss for r in reference):7.3f}"
            s = summarize(runs, reference)
            epochs = "not reached" if s.epochs is None else f"{s.epochs:g}"
            quality = (f"{_ratio(s.time_ratio, 11)} {f'{epochs} ({s.baseline_epochs:g})':>14} "
                       f"{s.cost_ratio:7.3f} {f'{s.wins}/{s.seeds}':>5}")
        else:
            ratio, quality = f"{'-':>7}", f"{'-':>11} {'-':>14} {'-':>7} {'-':>5}"
        print(f"{name:<10} {loss:>12.5f} ± {loss_std:<7.5f} {ratio} {acc:>8.4f} ± {acc_std:.4f} {test_loss:9.4f} "
              f"{quality}")


def _mean_curve(runs: list, values: str) -> list[float]:
    return [statistics.fmean(getattr(r, values)[i] for r in runs) for i in range(len(runs[0].train_loss))]


def plot_curves(results: dict, path: str) -> None:
    """Full-train loss (mean over seeds) against epochs and against training wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, runs in results.items():
        loss = _mean_curve(runs, "train_loss")
        by_epoch.plot(_mean_curve(runs, "epochs"), loss, label=name, marker="o", markersize=3)
        by_time.plot(_mean_curve(runs, "train_seconds"), loss, label=name, marker="o", markersize=3)
    if "rr" in results:
        for axis in (by_epoch, by_time):
            axis.axhline(statistics.fmean(r.final_train_loss for r in results["rr"]), color="grey",
                         linestyle=":", linewidth=1, label="rr's final loss")
    by_epoch.set_yscale("log")
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training wall-clock seconds (evaluation excluded)")
    by_epoch.set_ylabel("full-train loss (mean over seeds)")
    by_time.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
