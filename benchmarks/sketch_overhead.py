"""Cost of a sketched ghost GraB step against a plain step and the exact ghost step, same run.

Per model, in the same process, timed round-robin (median over ``--repeats`` rounds of
``--steps`` training steps each):

* ``plain``: ``zero_grad``, forward, ``loss.backward()``, ``optimizer.step()`` on a hook-free
  copy (what random reshuffling costs);
* ``exact ghost``: the same with ``GraBSampler(...).attach(model)`` and ``sampler.step()``;
* ``sketch k``: ``attach(model, sketch=k)`` for each ``k`` of ``--ks``.

Models: the digits MLP (64-256-256-10, B = 64), LeNet on 3×32×32 (B = 64), a 2-layer
byte-level transformer LM (vocab 256, d128, T = 128, B = ``--seq-batch``) and a small
ResNet-style CNN (64/128 channels, GroupNorm, 32×32, B = 32); balance ``mean``.
Targets (issue 12): sketched step ≤ 1.10× plain on the LM and the CNN, ≤ 1.3× on LeNet and the MLP.

``--device cuda`` (the GPU rows; ``--large`` is then on by default) adds the same LM at
GPT-2-small width (12 × d768, 12 heads, T = 128, B = ``--seq-batch``) and a ResNet-18-size
CNN with GroupNorm (B = 64), target ≤ 1.05× plain, and counts the host synchronisations of
one ``sampler.step()`` with torch's sync debug mode (target: 1, the products' download).

``--allocator steady`` reruns the script with glibc malloc keeping freed memory: with the
default settings each step faults in fresh pages for its large tensors, a cost that moves by
±20 % between processes and hides the arithmetic being compared (both rows are in RESULTS.md).

``--plain-projections`` adds each ``k`` with float32 products and plain convolutions as the
sketch's projections (the arithmetic before :mod:`dataorder.ghost.projections`), same run.

    python benchmarks/sketch_overhead.py [--ks 8 16] [--threads 1] [--steps 5] [--repeats 7] [--only LM]
        [--allocator steady] [--device cuda] [--large] [--quick] [--plain-projections]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from _common import device_name, machine, print_table, use_allocator
from ghost_models import ResNet18GN, SmallResNetGN, TinyLM, lm_loss
from dataorder.ghost import projections
from dataorder.models import LeNet, mlp
from dataorder.ordering import GraBSampler

TARGETS = {"MLP": 1.3, "LeNet": 1.3, "LM": 1.10, "ResNet": 1.10, "LM-768": 1.05, "ResNet-18": 1.05}
LARGE = ("LM-768", "ResNet-18")


def workloads(seq_batch: int, large: bool, quick: bool = False) -> dict[str, tuple]:
    """name -> (model, (x, y), loss); ``large`` adds the GPU rows' models (tiny ones if ``quick``)."""
    ce = nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 256, (seq_batch, 129), generator=generator)
    tokens, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    out = {
        "MLP": (mlp(64, 10), (torch.randn(64, 64, generator=generator), torch.randint(0, 10, (64,))), ce),
        "LeNet": (LeNet(3, 10, size=32), (torch.randn(64, 3, 32, 32, generator=generator),
                                          torch.randint(0, 10, (64,))), ce),
        "LM": (TinyLM(vocab=256, seq_len=128), (tokens, targets), lm_loss),
        "ResNet": (SmallResNetGN(64), (torch.randn(32, 3, 32, 32, generator=generator),
                                       torch.randint(0, 10, (32,))), ce),
    }
    if large:
        dim, layers, width = (64, 2, 8) if quick else (768, 12, 64)
        out["LM-768"] = (TinyLM(vocab=256, dim=dim, heads=dim // 64, layers=layers, seq_len=128), (tokens, targets),
                         lm_loss)
        out["ResNet-18"] = (ResNet18GN(width), (torch.randn(64, 3, 32, 32, generator=generator),
                                                torch.randint(0, 10, (64,))), ce)
    return out


def timed_variants(model: nn.Module, batch: tuple, loss_fn: Callable, ks: list[int], steps: int,
                   positions: int, device: torch.device, plain_projections: bool = False) -> dict[str, Callable]:
    """name -> a callable running ``steps`` training steps (synchronised on CUDA); each has ``.syncs()``.

    ``plain_projections`` adds each ``k`` with float32 products and plain convolutions as the
    sketch's projections (:mod:`dataorder.ghost.projections` off), to show what they save.
    """
    x, y = (t.to(device) for t in batch)

    def variant(sketch: int | None, attach: bool, plain: bool = False) -> Callable:
        net = copy.deepcopy(model).to(device)  # same weights; hooks on one copy never touch another
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        sampler = GraBSampler(positions, balance="mean").attach(net, sketch=sketch) if attach else None

        def one_step(count_syncs: bool = False) -> int:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            syncs = 0
            if sampler is not None:
                if sampler.steps_position + len(x) > positions:
                    sampler.set_epoch(sampler.epoch + 1)
                if count_syncs:
                    syncs = synchronisations(sampler.step)
                else:
                    sampler.step()
            opt.step()
            return syncs

        def run():
            for _ in range(steps):
                one_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        run.syncs = lambda: one_step(count_syncs=True) if device.type == "cuda" else None
        if sampler is not None:
            sampler.set_epoch(0)
        if plain:  # the maps are made at the first step, with the settings of that moment
            with plain_maps():
                one_step()
        return run

    out = {"plain": variant(None, False), "exact ghost": variant(None, True)}
    for k in ks:
        out[f"sketch k={k}"] = variant(k, True)
        if plain_projections:
            out[f"sketch k={k}, float32 maps"] = variant(k, True, plain=True)
    return out


@contextlib.contextmanager
def plain_maps():
    """Float32 products and plain convolutions for the maps made inside (the fast forms off)."""
    saved = projections.PROJECTION_DTYPE, projections.SHIFTED_MAX_WIDTH
    projections.PROJECTION_DTYPE, projections.SHIFTED_MAX_WIDTH = torch.float32, 0
    try:
        yield
    finally:
        projections.PROJECTION_DTYPE, projections.SHIFTED_MAX_WIDTH = saved


def synchronisations(call: Callable[[], None]) -> int:
    """How many times ``call()`` made the host wait for the CUDA device (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def interleaved(variants: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin so that load drifts hit all alike."""
    for run in variants.values():  # warm-up
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq-batch", type=int, default=16)
    parser.add_argument("--only", nargs="+", choices=sorted(TARGETS), help=f"models ({', '.join(LARGE)} need --large)")
    parser.add_argument("--allocator", choices=("default", "steady"), default="default",
                        help="steady: rerun with glibc malloc keeping freed memory (no page faults per step)")
    parser.add_argument("--device", default="cpu", type=device_name, help="cpu | cuda")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=None,
                        help="add the GPT-2-small-width LM and the ResNet-18-size CNN (default: on with cuda)")
    parser.add_argument("--plain-projections", action="store_true",
                        help="also time each k with float32 products and plain convolutions as projections")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 step, 1 round, k=16, the --large models at d64 / width 8")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.ks = 1, 1, [16]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    large = device.type == "cuda" if args.large is None else args.large
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# sketched ghost step vs plain step -- {machine()}; {allocator}; device {device}"
          f"{' (--quick: 1 step, large models at d64 / width 8)' if args.quick else ''}")
    rows = []
    for name, (model, batch, loss_fn) in workloads(args.seq_batch, large, args.quick).items():
        if args.only and name not in args.only:
            continue
        positions = len(batch[0]) * args.steps * (args.repeats + 4)
        variants = timed_variants(model, batch, loss_fn, args.ks, args.steps, positions, device,
                                  args.plain_projections)
        times = interleaved(variants, args.repeats)
        base = times["plain"]
        d = sum(p.numel() for p in model.parameters())
        for variant, seconds in times.items():
            ratio = seconds / base
            verdict = "" if variant in ("plain", "exact ghost") else ("meets" if ratio <= TARGETS[name] else "misses")
            syncs = variants[variant].syncs() if variant != "plain" else None
            rows.append((name, d, len(batch[0]), variant, f"{1e3 * seconds / args.steps:.2f}", f"{ratio:.2f}",
                         f"{verdict} ≤{TARGETS[name]}" if verdict else "", "-" if syncs is None else syncs))
    print_table(rows, ("model", "d", "B", "step", "ms/step", "× plain", "target", "syncs/step()"))


if __name__ == "__main__":
    main()
