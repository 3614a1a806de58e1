"""MixtureSampler vs HF ``interleave_datasets`` and torch ``WeightedRandomSampler``.

Eight sources, one run, measured in the same process:

* throughput: indices per second. MixtureSampler both as a DataLoader sees it (``for i in
  sampler``) and as a vectorised block (``sampler.stream``), with a ramped schedule and with
  fixed weights; ``WeightedRandomSampler`` (fixed weights only) iterated the same way;
  ``datasets.interleave_datasets(probabilities=...)`` timed for building the interleaved
  dataset (its index generation plus ``select``) over small in-memory datasets;
* resuming at global sample 10⁹ of a 2·10⁹-sample run: a fresh MixtureSampler loads a state
  and yields its first index (cold: it builds the count table of the ramp it passed; warm:
  a later resume on the same sampler; medians of 3 and 9). The baselines have no O(1) resume: they must
  regenerate and skip 10⁹ draws, so their time is 10⁹ / their measured rate (extrapolated,
  not run);
* accuracy: mean absolute deviation between realised and scheduled source shares over
  consecutive windows of 1,000 samples (target: the schedule's mean over the window).

    .venv/bin/python benchmarks/mixture.py            # full run
    .venv/bin/python benchmarks/mixture.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import numpy as np
import torch
from _common import machine, print_table

from dataorder.samplers.mixture import MixtureSampler
from dataorder.schedules import Schedule

NAMES = ["web", "code", "math", "books", "wiki", "papers", "forums", "legal"]
BASE = [0.40, 0.20, 0.10, 0.10, 0.08, 0.06, 0.04, 0.02]
FINAL = [0.20, 0.25, 0.20, 0.10, 0.10, 0.08, 0.05, 0.02]
WINDOW = 1000


def ramped() -> Schedule:
    return Schedule(dict(zip(NAMES, BASE)),
                    [{"at": 0.3, "weights": dict(zip(NAMES, FINAL)), "transition": "linear", "over": 0.3}])


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def iterate(sampler) -> list[int]:
    return [index for index in sampler]


def shares_mad(sources: np.ndarray, target: np.ndarray) -> float:
    """Mean |realised - target| share over consecutive windows; ``target`` is (windows, S)."""
    windows = len(sources) // WINDOW
    realised = np.stack([np.bincount(sources[w * WINDOW:(w + 1) * WINDOW], minlength=len(NAMES)) / WINDOW
                         for w in range(windows)])
    return float(np.abs(realised - target[:windows]).mean())


def schedule_target(schedule: Schedule, num_samples: int) -> np.ndarray:
    """Mean scheduled weights over each window (per-sample progress)."""
    progress = np.arange(num_samples) / num_samples
    weights = schedule.weights(progress)
    windows = num_samples // WINDOW
    return weights[: windows * WINDOW].reshape(windows, WINDOW, -1).mean(axis=1)


def bench_mixture(schedule: Schedule, size: int, num_samples: int, batch: int) -> dict:
    sizes = dict.fromkeys(NAMES, size)
    offsets = np.arange(len(NAMES)) * size
    make = lambda: MixtureSampler(sizes, schedule, num_samples=num_samples, batch_size=batch, seed=0)  # noqa: E731
    make().stream(0, batch)  # compile the numba kernels outside the timing
    seconds, indices = timed(lambda: iterate(make()))
    block_seconds, _ = timed(lambda: make().stream())
    sources = np.searchsorted(offsets, np.asarray(indices), side="right") - 1
    # the sampler's source columns follow the schedule order = NAMES here
    return {"rate": num_samples / seconds, "block_rate": num_samples / block_seconds,
            "mad": shares_mad(sources, schedule_target(schedule, num_samples))}


def bench_weighted_random(size: int, num_samples: int) -> dict:
    from torch.utils.data import WeightedRandomSampler

    weights = torch.tensor(np.repeat(np.array(BASE) / size, size), dtype=torch.double)
    make = lambda: WeightedRandomSampler(weights, num_samples, replacement=True,  # noqa: E731
                                         generator=torch.Generator().manual_seed(0))
    seconds, indices = timed(lambda: iterate(make()))
    sources = np.asarray(indices) // size
    target = np.tile(BASE, (num_samples // WINDOW, 1))
    return {"rate": num_samples / seconds, "mad": shares_mad(sources, target)}


def bench_interleave(size: int) -> dict:
    import datasets

    datasets.disable_progress_bars()
    parts = [datasets.Dataset.from_dict({"source": np.full(size, s, dtype=np.int64)}) for s in range(len(NAMES))]
    interleave = lambda: datasets.interleave_datasets(parts, probabilities=BASE, seed=0,  # noqa: E731
                                                      stopping_strategy="first_exhausted")
    interleave()  # warm-up (concatenation caches)
    seconds, mixed = timed(interleave)
    sources = np.asarray(mixed.with_format("numpy")["source"])
    target = np.tile(BASE, (len(sources) // WINDOW, 1))
    return {"rate": len(sources) / seconds, "mad": shares_mad(sources, target), "rows": len(sources)}


def bench_resume(batch: int) -> dict:
    sizes = dict.fromkeys(NAMES, 10**8)
    out = {}
    for label, schedule in (("ramped", ramped()), ("fixed", Schedule.constant(dict(zip(NAMES, BASE))))):
        make = lambda: MixtureSampler(sizes, schedule, num_samples=2 * 10**9, batch_size=batch, seed=0)  # noqa: E731
        state = make().state_dict() | {"sample": 10**9}

        def resume(sampler: MixtureSampler) -> int:
            sampler.load_state_dict(state)
            return next(iter(sampler))

        resume(make())  # one-off costs (kernel compilation, first calls) outside the timing
        colds, warms, firsts = [], [], set()
        for _ in range(3):  # medians: the machine is shared
            sampler = make()
            seconds, first = timed(lambda: resume(sampler))
            colds.append(seconds)
            firsts.add(first)
            for _ in range(3):
                seconds, first = timed(lambda: resume(sampler))
                warms.append(seconds)
                firsts.add(first)
        assert firsts == {int(make().stream(10**9, 10**9 + 1)[0])}
        cold, warm = statistics.median(colds), statistics.median(warms)
        out[label] = (cold, warm)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    num_samples = 100_000 if args.quick else 4_000_000
    size = 100_000 if args.quick else 1_000_000
    hf_size = 10_000 if args.quick else 400_000
    batch = 1024
    torch.set_num_threads(1)

    print(f"dataorder mixture benchmark, {datetime.date.today()}; {machine()}")
    print(f"8 sources of {size:,} examples, {num_samples:,} samples, global batch {batch}; "
          f"MAD over windows of {WINDOW:,} samples\n")
    mix_ramp = bench_mixture(ramped(), size, num_samples, batch)
    mix_fixed = bench_mixture(Schedule.constant(dict(zip(NAMES, BASE))), size, num_samples, batch)
    wrs = bench_weighted_random(size, num_samples)
    hf = bench_interleave(hf_size)
    resume = bench_resume(batch)

    rows = [
        ("MixtureSampler, ramped", f"{mix_ramp['rate'] / 1e6:.2f}", f"{mix_ramp['block_rate'] / 1e6:.2f}",
         f"{mix_ramp['mad']:.5f}", f"{resume['ramped'][0] * 1e3:.1f} / {resume['ramped'][1] * 1e3:.2f}"),
        ("MixtureSampler, fixed", f"{mix_fixed['rate'] / 1e6:.2f}", f"{mix_fixed['block_rate'] / 1e6:.2f}",
         f"{mix_fixed['mad']:.5f}", f"{resume['fixed'][0] * 1e3:.1f} / {resume['fixed'][1] * 1e3:.2f}"),
        ("WeightedRandomSampler, fixed", f"{wrs['rate'] / 1e6:.2f}", "-", f"{wrs['mad']:.5f}",
         f"~{1e9 / wrs['rate'] * 1e3:,.0f} (skip 10^9)"),
        (f"interleave_datasets, fixed ({hf['rows']:,} rows)", "-", f"{hf['rate'] / 1e6:.2f}", f"{hf['mad']:.5f}",
         f"~{1e9 / hf['rate'] * 1e3:,.0f} (regenerate)"),
    ]
    print_table(rows, ("method", "iter M/s", "block M/s", "MAD (1k windows)", "resume at 1e9, ms (cold / warm)"))
    print()
    print(f"MixtureSampler (ramped) iteration vs WeightedRandomSampler: {mix_ramp['rate'] / wrs['rate']:.2f}x")
    print(f"MixtureSampler (ramped) block vs interleave_datasets index generation: "
          f"{mix_ramp['block_rate'] / hf['rate']:.2f}x")
    print(f"MAD: MixtureSampler {mix_ramp['mad']:.5f} (ramped) / {mix_fixed['mad']:.5f} (fixed) vs "
          f"WeightedRandomSampler {wrs['mad']:.5f}, interleave_datasets {hf['mad']:.5f}: "
          f"{wrs['mad'] / mix_fixed['mad']:.1f}x lower than WeightedRandomSampler")
    print(f"resume at sample 10^9 (2e9-sample run, batch {batch}): ramped {resume['ramped'][0] * 1e3:.1f} ms cold "
          f"(builds the count table of the ramp it passed), {resume['ramped'][1] * 1e3:.2f} ms warm; fixed weights "
          f"{resume['fixed'][0] * 1e3:.2f} ms cold")


if __name__ == "__main__":
    main()
