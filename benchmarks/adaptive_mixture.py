"""Fixed vs adaptive domain mixtures on the stdlib corpus (code / tests / prose) with the byte-level LM.

Every configuration trains a fresh ByteLM (same initial weights per seed) for the same number
of steps with the same batch size; only the mixture differs. Reported: validation loss per
domain and their mean (nats per byte), per seed and averaged, and how many seeds each
configuration beats uniform on the mean.

Configurations (``--part``):
- ``fixed``: uniform, proportional to the domains' sizes, and a small grid of fixed mixtures
  (the best of them, picked on the same validation loss, is optimistic for the grid);
- ``adaptive``: AdaptiveMixtureSampler with rule="exp3" (loss improvement) and rule="doremi"
  (excess loss over a reference: the per-domain training loss of a uniform-mixture model
  trained with another seed, as a ``dataorder score`` run of it would give).

    flock /tmp/dataorder-bench.lock python benchmarks/adaptive_mixture.py --part fixed [--only uniform,proportional]
    flock /tmp/dataorder-bench.lock python benchmarks/adaptive_mixture.py --part adaptive
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _lm  # noqa: E402
from _common import machine  # noqa: E402

from dataorder.corpus import DOMAINS  # noqa: E402
from dataorder.samplers.adaptive import AdaptiveMixtureSampler, plot_weights  # noqa: E402
from dataorder.samplers.mixture import MixtureSampler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRID = [(0.6, 0.2, 0.2), (0.2, 0.6, 0.2), (0.2, 0.2, 0.6), (0.4, 0.2, 0.4)]
ADAPTIVE = {
    "exp3": dict(rule="exp3", rate=50.0, smoothing=0.9, floor=0.05, warmup=20),
    "doremi": dict(rule="doremi", rate=1.0, smoothing=0.9, floor=0.05, warmup=20),
    # added after the first run showed exp3's weights jumping every step (its reward is noisy)
    "exp3-smooth": dict(rule="exp3", rate=50.0, smoothing=0.99, floor=0.05, warmup=20),
}


def run_fixed(corpus, name, weights, seed, steps):
    sampler = MixtureSampler(corpus.sizes, dict(zip(DOMAINS, weights)), num_samples=steps * _lm.BATCH,
                             batch_size=_lm.BATCH, seed=seed)
    net = _lm.train(_lm.batches_of(sampler), corpus.tokens(), corpus.domain_of(), steps, seed)
    return _lm.evaluate(net, corpus), sampler.source_counts()


def reference_losses(corpus, steps, seed=1000, per_domain=2048):
    """Per-domain mean training loss of a uniform-mixture model trained with another seed."""
    sampler = MixtureSampler(corpus.sizes, dict.fromkeys(DOMAINS, 1.0), num_samples=steps * _lm.BATCH,
                             batch_size=_lm.BATCH, seed=seed)
    net = _lm.train(_lm.batches_of(sampler), corpus.tokens(), corpus.domain_of(), steps, seed)
    rng = np.random.default_rng(seed)
    return {d: float(_lm.window_losses(net, w[np.sort(rng.choice(len(w), per_domain, replace=False))]).mean())
            for d, w in corpus.train.items()}


def run_adaptive(corpus, name, seed, steps, reference):
    options = dict(ADAPTIVE[name])
    if options["rule"] == "doremi":
        options["reference"] = reference
    sampler = AdaptiveMixtureSampler(corpus.sizes, dict.fromkeys(DOMAINS, 1.0), num_samples=steps * _lm.BATCH,
                                     batch_size=_lm.BATCH, seed=seed, **options)
    net = _lm.train(_lm.batches_of(sampler), corpus.tokens(), corpus.domain_of(), steps, seed,
                    observe=lambda step, losses: sampler.observe(step, losses) if step + 1 < steps else None)
    final = sampler.weights_at(steps - 1)
    if seed == 0:  # the weights over the run, as `dataorder schedule plot` draws a schedule
        plot_weights(sampler, RESULTS / f"adaptive_mixture_{name}_seed0.png", title="stdlib corpus, seed 0")
    return _lm.evaluate(net, corpus), sampler.source_counts(), final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("fixed", "adaptive"), required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated configuration names (keeps a run short)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    corpus = _lm.load()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}")
    print(f"# corpus {corpus.fingerprint[:12]}, train windows {corpus.sizes}, context {_lm.CONTEXT}, "
          f"batch {_lm.BATCH}, {args.steps} steps, seeds 0..{args.seeds - 1}")
    total = sum(corpus.sizes.values())
    configs = {}
    if args.part == "fixed":
        configs["uniform"] = (1 / 3, 1 / 3, 1 / 3)
        configs["proportional"] = tuple(corpus.sizes[d] / total for d in DOMAINS)
        for weights in GRID:
            configs["fixed " + "/".join(f"{w:.1f}" for w in weights)] = weights
    else:
        reference = reference_losses(corpus, args.steps)
        print(f"# doremi reference (uniform model, seed 1000): {({d: round(v, 4) for d, v in reference.items()})}")
        configs = {f"adaptive {rule}": rule for rule in ADAPTIVE}
    if args.only:
        configs = {name: config for name, config in configs.items() if name in args.only.split(",")}
    print("| mixture | seed | " + " | ".join(DOMAINS) + " | mean | drawn (code/tests/prose) |")
    print("|---|---|" + "---|" * (len(DOMAINS) + 2))
    summary = {}
    for name, config in configs.items():
        means = []
        for seed in range(args.seeds):
            if args.part == "fixed":
                losses, counts = run_fixed(corpus, name, config, seed, args.steps)
                extra = ""
            else:
                losses, counts, final = run_adaptive(corpus, config, seed, args.steps, reference)
                extra = "; final weights " + "/".join(f"{final[d]:.2f}" for d in DOMAINS)
            means.append([losses[d] for d in (*DOMAINS, "mean")])
            drawn = "/".join(str(counts[d]) for d in DOMAINS)
            print(f"| {name} | {seed} | " + " | ".join(f"{losses[d]:.4f}" for d in (*DOMAINS, "mean"))
                  + f" | {drawn}{extra} |", flush=True)
        summary[name] = np.array(means)
    print("\n| mixture (mean of seeds) | " + " | ".join(DOMAINS) + " | mean | per-seed mean |")
    print("|---|" + "---|" * (len(DOMAINS) + 2))
    for name, table in summary.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in table.mean(0))
              + " | " + ", ".join(f"{v:.4f}" for v in table[:, -1]) + " |")
    print(f"# wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
