"""Throughput and peak memory of `dataorder score` on text and images, and of the streamed text pass.

``--part cli``: each measurement is one `dataorder score` process (1 thread, 1 run, 1 training
epoch, then the scoring pass), timed end to end; peak RSS is that process's own
(``os.wait4``). Text: stdlib documents cut to their first 1024 bytes, byte tokens,
``--context 64``, ``lm-tiny``; images: random 32x32 RGB PNGs in an HF ``Image`` column,
``--model cnn``.

``--part stream``: the text scoring pass alone over N short synthetic documents (5 to 150
bytes, 1 to 3 windows of context 64; an untrained ``lm-tiny``), one process per row: the
streamed pass (:func:`dataorder.scores.text.score_documents` over a generator) against the
all-at-once one (the documents as a list, tokenized and cut into windows first, then
:func:`~dataorder.scores.text.document_scores`). The memory column is the peak resident set
(``VmHWM``, reset after the imports and the model) above the resident set before the pass,
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed batch
buffers go back to the system and the figure follows live memory.

    flock /tmp/dataorder-bench.lock python benchmarks/scoring_modalities.py --part stream
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


_PASS = """
import sys, time
import numpy as np, torch
from dataorder.models import ByteLM
from dataorder.scores.text import document_scores, make_windows, score_documents, tokenize

n, how, scores = int(sys.argv[1]), sys.argv[2], tuple(sys.argv[3].split(","))
words = "the of data model return def class import value print self list".split()

def documents():
    rng = np.random.default_rng(0)
    for i in range(n):
        yield " ".join(rng.choice(words, size=int(rng.integers(2, 25))))[:150] + "\\n"

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024

torch.manual_seed(0)
model = ByteLM(context=64)
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # reset VmHWM: the peak of the pass, not of the imports
before = rss("VmRSS")
start = time.perf_counter()
if how == "streamed":
    out = score_documents(model, documents(), context=64, scores=scores)
else:
    out = document_scores(model, make_windows(tokenize(list(documents()))[0], 64), scores=scores)
wall = time.perf_counter() - start
assert out["loss"].shape == (n,) and np.isfinite(out["loss"]).all()
print(wall, rss("VmHWM") - before)
"""


def stream_pass(n: int, how: str, scores: str) -> tuple[float, float]:
    """(wall seconds, peak RSS above the start of the pass in MiB) of one scoring-pass process."""
    # a fixed mmap threshold: glibc's sliding one keeps freed batch buffers on the heap, and the
    # resident set then creeps by tens of MiB whatever the data (allocator noise, not live memory)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", _PASS, str(n), how, scores], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"scoring pass failed: {done.stderr}")
    wall, peak = done.stdout.split()
    return float(wall), float(peak)


def stream_table(sizes: list[int], grand_sizes: list[int]) -> None:
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; one process per row, 1 thread")
    print("| scores | documents | pass | wall s | documents/s | peak RSS above start, MiB |")
    print("|---|---|---|---|---|---|")
    for scores, counts in (("loss,el2n", sizes), ("loss,el2n,grand", grand_sizes)):
        for n in counts:
            for how in ("streamed", "all at once"):
                wall, peak = stream_pass(n, how.split()[0], scores)
                print(f"| {scores} | {n} | {how} | {wall:.1f} | {n / wall:.0f} | {peak:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cli", "stream"), default="cli")
    parser.add_argument("--sizes", default=None, help="cli: 500,2000; stream: 1000,10000,100000")
    parser.add_argument("--grand-sizes", default="1000,10000", help="stream: sizes also scored with grand")
    args = parser.parse_args()
    if args.part == "stream":
        stream_table([int(s) for s in (args.sizes or "1000,10000,100000").split(",")],
                     [int(s) for s in args.grand_sizes.split(",") if s])
        return
    sizes = [int(s) for s in (args.sizes or "500,2000").split(",")]
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
