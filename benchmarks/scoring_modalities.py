"""Throughput and peak memory of `dataorder score` on text and images, at two dataset sizes.

Each measurement is one `dataorder score` process (1 thread, 1 run, 1 training epoch, then the
scoring pass), timed end to end; peak RSS is that process's own (``os.wait4``). Text: stdlib
documents cut to their first 1024 bytes, byte tokens, ``--context 64``, ``lm-tiny``; images:
random 32x32 RGB PNGs in an HF ``Image`` column, ``--model cnn``.

    flock /tmp/dataorder-bench.lock python benchmarks/scoring_modalities.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402


def text_data(folder: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataorder.corpus import load_stdlib_corpus

    docs = [doc.text.encode()[:1024].decode("utf-8", "ignore") for doc in load_stdlib_corpus(max_bytes=8_000_000).documents]
    docs = [d for d in docs if len(d.strip()) > 1]
    path = folder / f"docs{n}.parquet"
    pq.write_table(pa.table({"text": [docs[i % len(docs)] for i in range(n)]}), path)
    return path


def image_data(folder: Path, n: int) -> Path:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    path = folder / f"pics{n}"
    datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]},
                               features=features).save_to_disk(str(path))
    return path


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `dataorder score` process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "dataorder", "score", *args, "--no-progress"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"dataorder score failed: {child.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; one process per row, 1 thread")
    print("| modality | examples | wall s (train 1 epoch + score) | examples/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in sizes:
            data = text_data(folder, n)
            wall, rss = run(["--data", str(data), "--context", "64", "--runs", "1", "--score-epoch", "1",
                             "--epochs", "1", "--batch-size", "64", "--out", str(folder / f"t{n}")])
            print(f"| text (bytes, context 64) | {n} | {wall:.1f} | {n / wall:.1f} | {rss:.0f} |", flush=True)
        for n in sizes:
            data = image_data(folder, n)
            wall, rss = run(["--data", str(data), "--model", "cnn", "--scores", "el2n,loss", "--runs", "1",
                             "--score-epoch", "1", "--epochs", "1", "--out", str(folder / f"i{n}")])
            print(f"| images (32x32 RGB, cnn) | {n} | {wall:.1f} | {n / wall:.1f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
