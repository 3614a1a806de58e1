"""Benchmark: difficulty scoring throughput, memory when streaming, and a data-diet check.

1. Examples/s of EL2N (forward only) and GraNd (per-example gradients, torch.func) as
   :func:`dataorder.scores.runner.score_model` computes them, against a naive loop over
   examples (one forward, or one forward + backward, per example), on the digits MLP and a
   32×32 LeNet; on the CPU, and on the GPU when one is present.
2. Peak resident memory while scoring synthetic examples streamed in batches (1M by
   default): each size runs in a fresh subprocess; bounded means the peak grows only by the
   output arrays (8 bytes per example per score), not with the data.
3. Data diet on digits (Paul et al. 2021): EL2N averaged over runs, keep the hardest 50% vs
   a random 50% (and the easiest 50%), retrain, test accuracy over seeds.

Usage: ``python benchmarks/scoring.py [--quick]`` (``--quick``: small sizes, a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from dataorder.data import TensorSplit, load_digits_split
from dataorder.models import LeNet, build_model
from dataorder.orderings import make_ordering
from dataorder.scores import el2n
from dataorder.scores.aggregate import aggregate, consistency
from dataorder.scores.runner import ScoreConfig, score_model, train_and_score
from dataorder.training import train_run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, examples: int, device: torch.device, repeats: int = 3) -> float:
    """Best examples/s over ``repeats`` timed calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return examples / best


def naive_el2n(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.array([el2n(model(x[i:i + 1]), y[i:i + 1]).item() for i in range(len(y))])


def naive_grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.eval()
    norms = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        norms.append(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())).item())
    model.zero_grad(set_to_none=True)
    return np.array(norms)


def throughput(quick: bool, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    digits = load_digits_split()
    n_cnn = 256 if quick else 2048
    cases = {
        "digits MLP (d=85k)": (build_model("mlp", (64,), 10), digits.x_train, digits.y_train),
        "32x32 LeNet (d=62k)": (LeNet(3, 10, size=32), torch.randn(n_cnn, 3, 32, 32), torch.randint(0, 10, (n_cnn,))),
    }
    loop_n = 32 if quick else 256
    rows = []
    for name, (model, x, y) in cases.items():
        model, x, y = model.to(device), x.to(device), y.to(device)
        if quick:
            x, y = x[:256], y[:256]
        batches = [(x[s:s + 256], y[s:s + 256]) for s in range(0, len(y), 256)]
        ref_el2n, ref_grand = naive_el2n(model, x[:loop_n], y[:loop_n]), naive_grand(model, x[:loop_n], y[:loop_n])
        got = score_model(model, batches[:1], ["el2n", "grand"])
        np.testing.assert_allclose(got["el2n"][:loop_n], ref_el2n, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["grand"][:loop_n], ref_grand, rtol=1e-3, atol=1e-5)
        for score, naive in (("el2n", naive_el2n), ("grand", naive_grand)):
            batched = _rate(lambda: score_model(model, batches, [score]), len(y), device, repeats=2 if quick else 5)
            looped = _rate(lambda: naive(model, x[:loop_n], y[:loop_n]), loop_n, device, repeats=2 if quick else 3)
            path = "forward" if score == "el2n" else "ghost"
            rows.append({"device": device.type, "case": name, "score": score, "path": path, "batched": batched,
                         "loop": looped, "ratio": batched / looped})
            print(f"  {device.type:<4} {name:<20} {score:<6} {path:<10} batched {batched:>10,.0f} ex/s   "
                  f"loop {looped:>8,.0f} ex/s   ×{batched / looped:.1f}", flush=True)
    return rows


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(n: int, batch: int) -> None:
    """Score ``n`` synthetic examples streamed in batches; print the RSS before and its peak during (MiB)."""
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10)

    def stream():
        generator = torch.Generator().manual_seed(1)
        for start in range(0, n, batch):
            size = min(batch, n - start)
            yield torch.randn(size, 64, generator=generator), torch.randint(0, 10, (size,), generator=generator)

    before = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) so it measures the scoring alone, not the imports
    start = time.perf_counter()
    scores = score_model(model, stream(), ["el2n", "loss", "grand"], grand_params="last")
    seconds = time.perf_counter() - start
    peak = _rss_mib("VmHWM")
    assert all(len(v) == n for v in scores.values())
    print(json.dumps({"n": n, "rss_before_mib": before, "peak_mib": peak, "seconds": seconds}))


def memory(quick: bool) -> list[dict]:
    sizes = [2_000, 20_000] if quick else [100_000, 1_000_000]
    rows = []
    for n in sizes:
        output = subprocess.run([sys.executable, __file__, "--memory-child", str(n)], check=True, capture_output=True,
                                text=True)
        row = json.loads(output.stdout.strip().splitlines()[-1])
        row["outputs_mib"] = n * 8 * 3 / 2**20  # three float64 score arrays
        rows.append(row)
        print(f"  n={n:>9,}: RSS {row['rss_before_mib']:.0f} MiB before scoring, peak {row['peak_mib']:.0f} MiB "
              f"during (+{row['peak_mib'] - row['rss_before_mib']:.0f} MiB; the score arrays are "
              f"{row['outputs_mib']:.1f} MiB), {n / row['seconds']:,.0f} ex/s", flush=True)
    growth = (rows[-1]["peak_mib"] - rows[-1]["rss_before_mib"]) - (rows[0]["peak_mib"] - rows[0]["rss_before_mib"])
    print(f"  the scoring peak grows by {growth:.0f} MiB from n={sizes[0]:,} to n={sizes[-1]:,} "
          f"(the score arrays grow by {rows[-1]['outputs_mib'] - rows[0]['outputs_mib']:.1f} MiB)")
    return rows


def data_diet(quick: bool) -> dict:
    runs, seeds, epochs, score_epoch = (2, 1, 1, 1) if quick else (5, 5, 30, 2)
    digits = load_digits_split()
    x, y = digits.x_train, digits.y_train
    config = ScoreConfig(model="mlp", scores=("el2n",), runs=runs, epochs=score_epoch, score_epoch=score_epoch,
                         batch_size=32, lr=0.05)
    per_run = np.stack([train_and_score(x, y, 10, config, run)["el2n"] for run in range(runs)])
    score = aggregate(per_run)
    agreement = consistency(per_run)["mean_pairwise"]["spearman"]
    keep = len(y) // 2
    order = np.argsort(-score, kind="stable")
    subsets = {"full data (100%)": np.arange(len(y)), "hardest 50% by EL2N": np.sort(order[:keep]),
               "easiest 50% by EL2N": np.sort(order[-keep:])}
    results: dict[str, list[float]] = {}
    for label, subset in subsets.items():
        results[label] = [_accuracy(digits, subset, seed, epochs) for seed in range(seeds)]
    results["random 50%"] = [_accuracy(digits, np.sort(np.random.default_rng(100 + seed).permutation(len(y))[:keep]),
                                       seed, epochs) for seed in range(seeds)]
    for label, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {label:<22} test accuracy {statistics.fmean(values):.4f} ± {spread:.4f}", flush=True)
    print(f"  (EL2N from {runs} runs at epoch {config.score_epoch}; run-vs-run Spearman {agreement:.3f}; "
          f"retrain {epochs} epochs × {seeds} seeds)")
    return {"accuracy": results, "spearman": agreement}


def _accuracy(digits: TensorSplit, subset: np.ndarray, seed: int, epochs: int) -> float:
    index = torch.from_numpy(subset)
    split = TensorSplit(digits.x_train[index], digits.y_train[index], digits.x_test, digits.y_test, 10, "digits")
    return train_run(split, "mlp", make_ordering("rr"), seed=seed, epochs=epochs, batch_size=32, lr=0.05).test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, batch=1024)
        return
    print(f"scoring benchmark (torch {torch.__version__}, {torch.get_num_threads()} threads{', quick' if args.quick else ''})")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print("1. throughput: batched score_model vs a per-example loop (CPU: 1 thread, see the note in the results)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded shared CPU stalls multi-threaded tiny ops; both sides get one thread
    for device in devices:
        throughput(args.quick, device)
    torch.set_num_threads(threads)
    print("2. peak memory while streaming synthetic examples (MLP, EL2N + loss + last-layer GraNd, batch 1024)")
    memory(args.quick)
    print("3. data diet on digits (MLP): keep 50% of the training set, retrain, test accuracy")
    data_diet(args.quick)


if __name__ == "__main__":
    main()
