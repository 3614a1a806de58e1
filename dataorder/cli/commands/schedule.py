"""``dataorder schedule show|plot CONFIG``: inspect a domain-mixture schedule (YAML).

``show`` prints the weights at the schedule's breakpoints and what each source contributes
over the run (samples and tokens); ``plot`` writes a stacked-area PNG of the mixture.
The run's size comes from the file's ``run:`` section or the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataorder.cli.checks import check_figure
from dataorder.cli.errors import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("show", "plot"), help="show: print a table; plot: write a PNG")
    parser.add_argument("config", metavar="CONFIG", help="YAML schedule (sources:, schedule:, optional run:)")
    parser.add_argument("--num-samples", type=int, help="samples in the run (overrides run.num_samples)")
    parser.add_argument("--batch-size", type=int, help="global batch size (overrides run.batch_size)")
    parser.add_argument("--tokens-per-sample", type=float, help="tokens per sample, e.g. the sequence length")
    parser.add_argument("--at", help="comma-separated progress values to show (default: the breakpoints)")
    parser.add_argument("--out", metavar="PNG", help="plot: output file; without a suffix, a PNG named with .png "
                        "(default: CONFIG with .png, or CONFIG.mix.png for a CONFIG ending in .png)")


def run(args: argparse.Namespace) -> int:
    from dataorder.schedules import Schedule

    if args.out is not None and args.action != "plot":
        raise UsageError("--out is the file of schedule plot; schedule show prints to the terminal")
    schedule = Schedule.load(args.config)  # OSError / ValueError: one line at the CLI's error boundary
    totals = _totals(schedule, args)
    if args.action == "show":
        print(render(schedule, totals, _points(schedule, args.at), name=args.config))
    else:
        out = check_figure("--out", args.out if args.out else _default_out(args.config), keep=args.config)
        plot(schedule, totals, out, title=Path(args.config).name)
        print(f"saved the mixture plot to {out}")
    return 0


def _default_out(config: str) -> Path:
    """CONFIG with .png; CONFIG.mix.png when CONFIG already ends in .png (never the input itself).

    >>> str(_default_out("mix.yaml")), str(_default_out("mix.png"))
    ('mix.png', 'mix.mix.png')
    """
    path = Path(config)
    return path.with_suffix(".mix.png") if path.suffix.lower() == ".png" else path.with_suffix(".png")


def _totals(schedule, args: argparse.Namespace) -> dict:
    from dataorder.schedules import check_run_value

    totals = dict(schedule.run)
    for key in ("num_samples", "batch_size", "tokens_per_sample"):
        value = getattr(args, key)
        if value is not None:
            flag = f"--{key.replace('_', '-')}"
            if not value > 0:
                raise UsageError(f"{flag} must be > 0, got {value}")
            totals[key] = check_run_value(key, value, flag)
    return totals


def _points(schedule, at: str | None) -> list[float]:
    if at is None:
        points = set(schedule.breakpoints)
        points.update(s.at + s.over / 2 for s in schedule.segments if s.over)
        return sorted(points)
    try:
        points = sorted(float(value) for value in at.split(",") if value.strip())
    except ValueError as error:
        raise UsageError(f"--at must be comma-separated numbers in [0, 1], got {at!r}") from error
    if not points or any(not 0.0 <= p <= 1.0 for p in points):
        raise UsageError(f"--at values must be progress fractions in [0, 1], got {at!r}")
    return points


def expected_samples(schedule, totals: dict) -> tuple[list[float], str]:
    """Samples per source (schedule order) and how they were computed."""
    num_samples = totals["num_samples"]
    if "batch_size" in totals:
        from dataorder.schedules import BatchCounts

        counts = BatchCounts(schedule, num_samples, totals["batch_size"]).total()
        return [float(c) for c in counts], f"exact MixtureSampler counts, global batch {totals['batch_size']:,}"
    mean = schedule.mean_weights()
    return [mean[name] * num_samples for name in schedule.names], "expected: mean weight x samples"


def render(schedule, totals: dict, points: list[float], *, name: str = "schedule") -> str:
    """The text of ``show``."""
    names = schedule.names
    width = max(8, *(len(n) for n in names)) + 1
    lines = [f"{name}: {len(names)} sources, {len(schedule.segments)} segment(s)"]
    lines += [f"note: {note}" for note in schedule.notes]
    steps = "num_samples" in totals and "batch_size" in totals
    header = f"{'progress':>8}" + (f" {'step':>10}" if steps else "") + "".join(f"{n:>{width}}" for n in names)
    lines += ["", "weights", header]
    for p in points:
        row = f"{p:>8.3f}"
        if steps:
            row += f" {int(p * totals['num_samples'] / totals['batch_size']):>10,}"
        weights = schedule.weights(p)
        lines.append(row + "".join(f"{w:>{width}.4f}" for w in weights))
    if "num_samples" not in totals:
        mean = schedule.mean_weights()
        lines += ["", "mean weights over the run: " + ", ".join(f"{n} {mean[n]:.4f}" for n in names),
                  "(give --num-samples, or run: {num_samples: ...} in the file, for samples per source)"]
        return "\n".join(lines)
    samples, how = expected_samples(schedule, totals)
    tokens = totals.get("tokens_per_sample")
    lines += ["", f"over {totals['num_samples']:,} samples ({how})",
              f"{'source':<{width}} {'samples':>16} {'share':>8}" + (f" {'tokens':>20}" if tokens else "")]
    total = sum(samples)
    for source, count in zip(names, samples):
        row = f"{source:<{width}} {count:>16,.0f} {count / total:>8.2%}"
        lines.append(row + (f" {count * tokens:>20,.0f}" if tokens else ""))
    lines.append(f"{'total':<{width}} {total:>16,.0f} {1:>8.2%}" + (f" {total * tokens:>20,.0f}" if tokens else ""))
    return "\n".join(lines)


def plot(schedule, totals: dict, out: Path, *, title: str = "") -> None:
    """Stacked-area PNG of the weights over the run."""
    import numpy as np

    from dataorder._plotting import plot_shares

    edges = np.array(schedule.breakpoints)
    p = np.unique(np.concatenate([np.linspace(0, 1, 501), edges, np.clip(edges - 1e-9, 0, 1)]))
    weights = schedule.weights(p)
    x, label = p, "training progress"
    if "num_samples" in totals and "tokens_per_sample" in totals:
        x, label = p * totals["num_samples"] * totals["tokens_per_sample"], "tokens"
    elif "num_samples" in totals and "batch_size" in totals:
        x, label = p * totals["num_samples"] / totals["batch_size"], "step (global batch)"
    plot_shares(x, weights, schedule.names, out, xlabel=label, title=f"data mixture {title}")
