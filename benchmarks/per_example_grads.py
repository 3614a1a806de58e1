"""Per-example gradients: PerExampleGrads (torch.func) vs a backward loop vs Opacus.

Each method produces the same thing -- the (B, d) matrix of flattened per-example gradients
plus the batch-mean gradient in ``.grad`` -- for an MLP (64 → 256 → 256 → 10, d = 85,002)
and LeNet-5 on 3×32×32 images, at B = 128. The methods are timed interleaved in one run
(median and best over repeats: on a shared machine the best is the closer estimate of an
idle one), and their outputs are checked to agree before timing. On Linux CPUs, most of the
cost of writing B·d fresh floats is page faults; ``THP_MEM_ALLOC_ENABLE=1`` (a PyTorch
setting: huge pages for large CPU tensors) removes most of it, for every method.

Targets (DESIGN.md, "Corrections"): on CPU torch.func ≥ 2× the loop on the MLP, ≥ 4× on
LeNet, and at least as fast as Opacus; ≥ 10× the loop on a GPU.

    .venv/bin/python benchmarks/per_example_grads.py            # full run, CPU
    .venv/bin/python benchmarks/per_example_grads.py --quick    # smoke run
    .venv/bin/python benchmarks/per_example_grads.py --device cuda

Opacus is optional (``pip install opacus``); without it its column is skipped with a note.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dataorder.grads import PerExampleGrads
from dataorder.models import LeNet, mlp

SKETCH_DIM = 1024
TARGETS = {"cpu": {"MLP": 2.0, "LeNet": 4.0}, "cuda": {"MLP": 10.0, "LeNet": 10.0}}


def loop_method(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One forward and backward per example, gradients copied into a (B, d) matrix."""
    params = [p for p in model.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = torch.empty(len(x), d, device=x.device)
        for i in range(len(x)):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, params)
            rows[i] = torch.cat([g.reshape(-1) for g in grads])
        mean = rows.mean(0)
        start = 0
        for p in params:
            p.grad = mean[start : start + p.numel()].view_as(p).clone()
            start += p.numel()
        return rows

    return run


def func_method(model: nn.Module, sketch_dim: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    per_example = PerExampleGrads(model, F.cross_entropy, sketch_dim=sketch_dim)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        return per_example(x, y).grads

    return run


def opacus_method(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    try:
        from opacus import GradSampleModule
    except ImportError:
        return None
    wrapped = GradSampleModule(copy.deepcopy(model))
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y).backward()
        return torch.cat([p.grad_sample.reshape(len(x), -1) for p in params], dim=1)

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    methods: dict[str, Callable], x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each method, interleaved so that load drift hits all alike."""
    for _ in range(warmup):
        for run in methods.values():
            run(x, y)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            synchronize(x.device)
            start = clock()
            run(x, y)
            synchronize(x.device)
            samples[name].append(clock() - start)
    return samples


def build(name: str, device: torch.device, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "MLP":
        model, x = mlp(64, 10, hidden=(256, 256)), torch.randn(batch, 64)
    else:
        model, x = LeNet(3, 10, size=32), torch.randn(batch, 3, 32, 32)
    return model.to(device), x.to(device), torch.randint(10, (batch,)).to(device)


def bench_model(
    name: str, device: torch.device, batch: int, repeats: int, warmup: int, clock: Callable[[], float]
) -> dict[str, object]:
    model, x, y = build(name, device, batch)
    methods = {"loop": loop_method(model), "torch.func": func_method(model)}
    opacus = opacus_method(model)
    if opacus is not None:
        methods["opacus"] = opacus
    methods[f"torch.func+sketch{SKETCH_DIM}"] = func_method(model, SKETCH_DIM)
    reference = methods["torch.func"](x, y)
    for method in ("loop", "opacus"):
        if method in methods:
            got = methods[method](x, y)
            if not torch.allclose(got, reference, rtol=1e-3, atol=1e-5):
                raise SystemExit(f"{name}: {method} disagrees with torch.func (max diff {(got - reference).abs().max():.3g})")
    times = time_methods(methods, x, y, repeats, warmup, clock)
    d = sum(p.numel() for p in model.parameters())
    return {"model": name, "d": d, **times}


def markdown(rows: list[dict[str, object]], device: torch.device, batch: int, repeats: int, clock: str) -> str:
    """A table of median (best) milliseconds and ratios to torch.func, median (best)."""
    targets = TARGETS[device.type]
    sketch = f"torch.func+sketch{SKETCH_DIM}"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    lines = [
        (
            f"B={batch}, device={device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"THP_MEM_ALLOC_ENABLE={thp}, {clock} clock, {repeats} interleaved repeats, {datetime.date.today()}. "
            "Cells: median (best) ms; ratios: median (best)."
        ),
        "",
        (
            f"| model | d | loop | Opacus | torch.func | torch.func + CountSketch k={SKETCH_DIM} "
            "| loop / torch.func | Opacus / torch.func | target | met (median / best) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(samples: list[float] | None) -> str:
        return "skipped" if samples is None else f"{1e3 * statistics.median(samples):.1f} ({1e3 * min(samples):.1f})"

    def ratios(samples: list[float] | None, func: list[float]) -> tuple[float, float] | None:
        if samples is None:
            return None
        return statistics.median(samples) / statistics.median(func), min(samples) / min(func)

    for row in rows:
        func, target = row["torch.func"], targets[row["model"]]
        loop = ratios(row["loop"], func)
        opacus = ratios(row.get("opacus"), func)
        met = [loop[i] >= target and (opacus is None or opacus[i] >= 1.0) for i in (0, 1)]
        opacus_text = "n/a" if opacus is None else f"{opacus[0]:.2f}× ({opacus[1]:.2f}×)"
        lines.append(
            f"| {row['model']} | {row['d']:,} | {cell(row['loop'])} | {cell(row.get('opacus'))} | {cell(func)} "
            f"| {cell(row[sketch])} | {loop[0]:.2f}× ({loop[1]:.2f}×) | {opacus_text} | ≥{target:g}×, ≥ Opacus "
            f"| {' / '.join('yes' if m else 'NO' for m in met)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 30, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)",
    )
    parser.add_argument("--models", default="MLP,LeNet", help="comma-separated subset of MLP,LeNet")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 30)
    warmup = 1 if args.quick else 3
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, harmless here
    try:
        import opacus  # noqa: F401
    except ImportError:
        print("note: opacus is not installed (pip install opacus); its column is skipped")
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU time: use it with --device cpu")
    models = [name for name in args.models.split(",") if name]
    if not models or set(models) - {"MLP", "LeNet"}:
        parser.error(f"--models: choose from MLP,LeNet, got {args.models!r}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = [bench_model(name, device, args.batch_size, repeats, warmup, clock) for name in models]
    table = markdown(rows, device, args.batch_size, repeats, args.clock)
    print(table)
    if args.quick:
        print("(--quick: too few repeats to be a measurement)")
    if args.output is not None:
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
