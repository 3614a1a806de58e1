"""Perplexity pruning on the stdlib corpus: train on the middle 50% vs a random 50% vs all, equal steps.

The protocol of Ankner et al. 2024 with the byte-level LM: a reference ByteLM is trained on
a seeded random 10% of the training documents (:func:`dataorder.scores.text.reference_split`);
it scores every other document by its mean token loss (:func:`document_scores`, on the
document's first 8 windows); :func:`dataorder.prune` with ``strategy="middle"`` keeps the 50%
of those documents around the median. A fresh ByteLM (same initial weights per seed) then
trains for the same number of steps on the windows of (a) the kept documents, (b) a random
50% of the documents, (c) all of them, with random reshuffling; reported is the validation
loss per domain and its mean.

    flock /tmp/dataorder-bench.lock python benchmarks/perplexity_pruning.py
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

from dataorder.corpus import DOMAINS, byte_windows  # noqa: E402
from dataorder.samplers.curriculum import prune  # noqa: E402
from dataorder.samplers.shuffle import RandomReshuffling  # noqa: E402
from dataorder.scores.text import document_scores, make_windows, reference_split, tokenize  # noqa: E402


def windows_of(documents) -> tuple[torch.Tensor, torch.Tensor]:
    made = byte_windows(documents, _lm.CONTEXT, domains=DOMAINS)
    return made.tokens.to(torch.uint8), made.domain


def epochs_of(sampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from _lm.batches_of(sampler)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    corpus = _lm.load()
    documents = corpus.text.select(split="train")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}")
    reference = reference_split(len(documents), 0.1, seed=0)
    rest = np.setdiff1d(np.arange(len(documents)), reference)
    tokens, domains = windows_of([documents[i] for i in reference])
    net = _lm.train(epochs_of(RandomReshuffling(len(tokens), seed=0)), tokens, domains, args.steps, seed=1000)
    ids, _ = tokenize([documents[i].text for i in rest])
    windows = make_windows([t[:8 * _lm.CONTEXT + 1] for t in ids], _lm.CONTEXT)
    scores = document_scores(net, windows)["loss"]
    kept = rest[prune(scores, args.keep, strategy="middle")]
    rng = np.random.default_rng(0)
    random_half = np.sort(rng.choice(rest, size=len(kept), replace=False))
    sets = {"middle 50% (perplexity)": kept, "random 50%": random_half, "all (90% after the reference split)": rest}
    size = lambda chosen: sum(len(documents[i].text.encode()) for i in chosen)  # noqa: E731
    print(f"# {len(documents)} training documents; reference {len(reference)} docs; scored {len(rest)}; "
          f"{args.steps} steps x batch {_lm.BATCH}, context {_lm.CONTEXT}; seeds 0..{args.seeds - 1}")
    print(f"# reference-model document loss: median {np.median(scores):.3f}, kept band "
          f"[{scores[np.isin(rest, kept)].min():.3f}, {scores[np.isin(rest, kept)].max():.3f}] nats/byte")
    print("| training set | docs | bytes | domains (code/tests/prose docs) | seed | " + " | ".join(DOMAINS) + " | mean |")
    print("|---|---|---|---|---|" + "---|" * (len(DOMAINS) + 1))
    summary = {}
    for name, chosen in sets.items():
        tokens, domains = windows_of([documents[i] for i in chosen])
        mix = "/".join(str(sum(documents[i].domain == d for i in chosen)) for d in DOMAINS)
        rows = []
        for seed in range(args.seeds):
            net = _lm.train(epochs_of(RandomReshuffling(len(tokens), seed=seed)), tokens, domains, args.steps, seed)
            losses = _lm.evaluate(net, corpus)
            rows.append([losses[d] for d in (*DOMAINS, "mean")])
            print(f"| {name} | {len(chosen)} | {size(chosen)} | {mix} | {seed} | "
                  + " | ".join(f"{losses[d]:.4f}" for d in (*DOMAINS, "mean")) + " |", flush=True)
        summary[name] = np.array(rows)
    print("\n| training set (mean of seeds) | " + " | ".join(DOMAINS) + " | mean | per-seed mean |")
    print("|---|" + "---|" * (len(DOMAINS) + 2))
    for name, table in summary.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in table.mean(0)) + " | "
              + ", ".join(f"{v:.4f}" for v in table[:, -1]) + " |")
    print(f"# wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
