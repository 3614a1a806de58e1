"""Extra memory of GraB's state as the dataset grows (n = 1k … 1M) at fixed gradient width d.

Each n runs in a fresh process: build the sampler, feed ``--steps`` batches of ``(B, d)``
gradients, move to the next epoch (which computes the balanced order), and report

* the gradient-sized state (running sums, stale mean, next mean) -- O(d), flat in n;
* the index bookkeeping (this epoch's order as int64, one int16 bucket per position) --
  O(n) integers, like any permutation sampler's order;
* the process's peak RSS increase over a baseline taken after the gradients were allocated,
  next to the same measurement for ``RandomReshuffling`` (its permutation only) and the
  ``n × d`` float32 matrix that storing every gradient (herding) would need.

    python benchmarks/grab_memory.py [--dim 10000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from _common import machine, print_table


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one(n: int, dim: int, batch: int, steps: int, kind: str) -> dict:
    from dataorder.ordering import GraBSampler
    from dataorder.samplers.shuffle import RandomReshuffling

    grads = torch.randn(batch, dim)
    warm = GraBSampler(batch, balance="recursive")  # load numba kernels, allocator pools
    warm.step(grads)
    warm.set_epoch(1)
    warm.global_order()
    del warm
    before = peak_rss_mib()
    if kind == "rr":
        sampler = RandomReshuffling(n)
        sampler.global_order()
        sampler.set_epoch(1)
        sampler.global_order()
        return {"peak_mib": peak_rss_mib() - before}
    sampler = GraBSampler(n, balance=kind)
    for _ in range(min(steps, n // batch)):
        sampler.step(grads)
    sampler.set_epoch(1)
    sampler.global_order()
    state = sampler.state_dict()
    sums = sum(t.numel() * t.element_size() for t in state["tensors"].values())
    index = state["order"].numel() * 8 + n * 2
    return {"peak_mib": peak_rss_mib() - before, "sums_bytes": sums, "index_bytes": index}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--balance", default="mean")
    parser.add_argument("--quick", action="store_true", help="n = 1k and 100k only")
    parser.add_argument("--one", nargs=2, metavar=("N", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.dim, args.batch, args.steps, args.one[1])))
        return
    sizes = (1_000, 100_000) if args.quick else (1_000, 10_000, 100_000, 1_000_000)
    print(f"machine: {machine()}\nd={args.dim}, batch {args.batch}, {args.steps} steps, balance={args.balance}")

    def run(n: int, kind: str) -> dict:
        command = [sys.executable, __file__, "--one", str(n), kind, "--dim", str(args.dim),
                   "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows = []
    for n in sizes:
        grab, rr = run(n, args.balance), run(n, "rr")
        rows.append((f"{n:,}", f"{grab['sums_bytes'] / 2**20:.3f}", f"{grab['index_bytes'] / 2**20:.2f}",
                     f"{grab['peak_mib']:.1f}", f"{rr['peak_mib']:.1f}", f"{n * args.dim * 4 / 2**20:,.0f}"))
    print_table(rows, ("n", "GraB sums MiB", "GraB index MiB", "GraB peak +RSS MiB", "RR peak +RSS MiB",
                       "n×d float32 MiB"))


if __name__ == "__main__":
    main()
