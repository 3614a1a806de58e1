"""Time per step and bytes communicated of DDP + random reshuffling against CD-GraB, on CPU (gloo).

For W = 2 and 4 processes on 127.0.0.1 (spawned with torch.multiprocessing, one torch/OMP
thread each), an MLP 64-128-10 on sklearn digits, local batch B = 16 per rank, SGD:

* ``ddp+rr``: ``DistributedDataParallel`` forward/backward (one all-reduce of the d
  gradients) with a ``RandomReshuffling`` sampler;
* ``cd-grab full``: ``PerExampleGrads`` per rank, one all-gather of the (B, d) rows
  (``gather_global_batch``), ``sampler.step(gathered, global_batch=True)``, and the
  gathered mean as the gradient — no all-reduce (examples/ddp_grab.py);
* ``cd-grab sketch``: ``GraBSampler(sketch_dim=1024)``: ``PerExampleGrads`` rows for the
  balancing, ``sampler.step(rows)`` sketches them and all-gathers (B, 1024), and DDP
  forward/backward for the gradient (the per-example pass and the backward both run);
* ``cd-grab sketch, 1 pass``: the same sketches, but the gradient is the per-example pass's
  batch mean, all-reduced with one ``dist.all_reduce`` (no second backward);
* ``cd-grab ghost``: DDP forward/backward with ``GraBSampler(...).attach(ddp)`` and
  ``sampler.step()``: each linear layer's inputs and output gradients are all-gathered
  (``B·(in + out)`` values per layer and rank) and every rank balances the global batch
  (examples/ddp_ghost.py).

GraB uses ``balance="pair"`` (CD-GraB's). Variants are timed round-robin in the same process
group (median of repeats, each a run of ``--steps`` steps between barriers, rank 0's clock).
Bytes per step per rank are analytic, float32: ring all-reduce sends and receives
``2·d·4·(W−1)/W``; an all-gather receives ``B·k·4·(W−1)`` (k = d, the sketch width, or for
the ghost path the sum of ``in + out`` over the linear layers).
With W processes on a 2-core machine, W = 4 oversubscribes the cores.

    python benchmarks/distributed.py [--worlds 2 4] [--steps 40] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _common import machine, print_table
from dataorder.distributed import run_local_group

LOCAL_BATCH = 16
SKETCH_DIM = 1024
VARIANTS = ("ddp+rr", "cd-grab full", "cd-grab sketch", "cd-grab sketch, 1 pass", "cd-grab ghost")
HIDDEN = 128
GHOST_WIDTH = (64 + HIDDEN) + (HIDDEN + 10)  # values per example gathered by the ghost path


# -- bytes, analytically ---------------------------------------------------------------------
def allreduce_bytes(d: int, world: int) -> float:
    """Bytes a rank sends (and receives) in a ring all-reduce of ``d`` float32 values."""
    return 2 * d * 4 * (world - 1) / world


def allgather_bytes(batch: int, k: int, world: int) -> float:
    """Bytes a rank receives in an all-gather of (batch, k) float32 rows from every other rank."""
    return batch * k * 4 * (world - 1)


def bytes_per_step(variant: str, d: int, world: int) -> float:
    if variant == "ddp+rr":
        return allreduce_bytes(d, world)
    if variant == "cd-grab full":
        return allgather_bytes(LOCAL_BATCH, d, world)
    if variant == "cd-grab ghost":
        return allreduce_bytes(d, world) + allgather_bytes(LOCAL_BATCH, GHOST_WIDTH, world)
    return allreduce_bytes(d, world) + allgather_bytes(LOCAL_BATCH, SKETCH_DIM, world)


# -- one rank ----------------------------------------------------------------------------------
def batches(sampler, x: torch.Tensor, y: torch.Tensor):
    """Endless full local batches of ``sampler``'s order, moving to the next epoch when it runs out."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(iter(sampler)))
        for start in range(0, len(order) - LOCAL_BATCH + 1, LOCAL_BATCH):
            index = order[start:start + LOCAL_BATCH]
            yield x[index], y[index]
        epoch += 1


def set_flat_grad(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def build_variants(rank: int, world: int) -> tuple[dict, int]:
    """name -> a function running one training step; and d."""
    from dataorder.data import load_digits_split
    from dataorder.distributed import gather_global_batch
    from dataorder.grads import PerExampleGrads
    from dataorder.models import mlp
    from dataorder.ordering import GraBSampler
    from dataorder.samplers.shuffle import RandomReshuffling

    split = load_digits_split()
    x, y = split.x_train, split.y_train
    n = len(y)
    ce = nn.functional.cross_entropy

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = mlp(64, 10, hidden=(HIDDEN,))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    steps = {}

    model, opt = fresh()
    d = sum(p.numel() for p in model.parameters())
    ddp = DistributedDataParallel(model)
    rr = batches(RandomReshuffling(n, seed=0, rank=rank, world_size=world), x, y)

    def ddp_rr(ddp=ddp, opt=opt, data=rr):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        ce(ddp(xb), yb).backward()
        opt.step()
    steps["ddp+rr"] = ddp_rr

    model, opt = fresh()
    per_example = PerExampleGrads(model, ce)
    sampler = GraBSampler(n, balance="pair", seed=0, rank=rank, world_size=world)
    data = batches(sampler, x, y)
    params = list(model.parameters())

    def full(opt=opt, per_example=per_example, sampler=sampler, data=data, params=params):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        gathered = gather_global_batch(per_example(xb, yb).grads)
        sampler.step(gathered, global_batch=True)
        set_flat_grad(params, gathered.mean(0))
        opt.step()
    steps["cd-grab full"] = full

    model, opt = fresh()
    ddp = DistributedDataParallel(model)
    per_example = PerExampleGrads(model, ce)
    sampler = GraBSampler(n, balance="pair", sketch_dim=SKETCH_DIM, seed=0, rank=rank, world_size=world)
    data = batches(sampler, x, y)

    def sketch(ddp=ddp, opt=opt, per_example=per_example, sampler=sampler, data=data):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        rows = per_example(xb, yb).grads  # also writes the local mean into .grad: discarded below
        opt.zero_grad(set_to_none=True)
        ce(ddp(xb), yb).backward()  # DDP: the all-reduced gradient
        sampler.step(rows)  # sketched to (B, 1024) and all-gathered
        opt.step()
    steps["cd-grab sketch"] = sketch

    model, opt = fresh()
    per_example = PerExampleGrads(model, ce)
    sampler = GraBSampler(n, balance="pair", sketch_dim=SKETCH_DIM, seed=0, rank=rank, world_size=world)
    data = batches(sampler, x, y)
    params = list(model.parameters())

    def sketch_one_pass(opt=opt, per_example=per_example, sampler=sampler, data=data, params=params):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        rows = per_example(xb, yb).grads
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        set_flat_grad(params, flat / world)
        sampler.step(rows)
        opt.step()
    steps["cd-grab sketch, 1 pass"] = sketch_one_pass

    model, opt = fresh()
    ddp = DistributedDataParallel(model)
    sampler = GraBSampler(n, balance="pair", seed=0, rank=rank, world_size=world).attach(ddp)
    data = batches(sampler, x, y)

    def ghost(ddp=ddp, opt=opt, sampler=sampler, data=data):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        ce(ddp(xb), yb).backward()  # DDP: the all-reduced gradient; hooks capture the factors
        sampler.step()  # all-gathers each layer's inputs and output gradients
        opt.step()
    steps["cd-grab ghost"] = ghost
    return steps, d


def timed_runs(rank: int, world: int, steps: int, repeats: int, warmup: int) -> dict:
    variants, d = build_variants(rank, world)
    for run in variants.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            dist.barrier()
            samples[name].append((time.perf_counter() - start) / steps)
    return {"d": d, "seconds_per_step": {name: statistics.median(v) for name, v in samples.items()}}


def run_world(world: int, steps: int, repeats: int, warmup: int, timeout: float) -> dict:
    """Rank 0's timings of every variant in a ``world``-process gloo group; every process is reaped."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes before torch loads
    try:
        return run_local_group(timed_runs, world, steps, repeats, warmup, timeout=timeout)[0]
    except (RuntimeError, TimeoutError) as error:
        raise SystemExit(f"W={world}: {error}") from error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per world before killing it")
    parser.add_argument("--quick", action="store_true", help="2 processes, 5 steps, 1 repeat")
    args = parser.parse_args()
    if any(w < 2 for w in args.worlds):
        parser.error("--worlds: every process count must be at least 2")
    worlds, steps, repeats, warmup = ([2], 5, 1, 1) if args.quick else (args.worlds, args.steps, args.repeats, 3)
    torch.set_num_threads(1)
    print(f"machine: {machine()}\nMLP 64-128-10 on digits, local batch {LOCAL_BATCH}, gloo on 127.0.0.1, "
          f"1 thread per process, {steps} steps per run, median of {repeats}")
    rows = []
    for world in worlds:
        result = run_world(world, steps, repeats, warmup, args.timeout)
        d, times = result["d"], result["seconds_per_step"]
        base = times["ddp+rr"]
        for name in VARIANTS:
            sent = bytes_per_step(name, d, world)
            rows.append((world, name, f"{1e3 * times[name]:.2f}", f"{times[name] / base:.2f}",
                         f"{sent / 1024:.1f}", f"{sent / bytes_per_step('ddp+rr', d, world):.1f}"))
    print(f"d = {d}, sketch k = {SKETCH_DIM}, ghost factors per example = {GHOST_WIDTH}")
    print_table(rows, ("W", "variant", "ms/step", "vs ddp+rr", "KiB/step/rank", "bytes vs ddp+rr"))


if __name__ == "__main__":
    main()
