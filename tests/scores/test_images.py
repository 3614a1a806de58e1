"""`dataorder score` on an image column: Pillow decoding, resizing, end to end, resume, bad bytes."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataorder.cli import main
from dataorder.modalities import ModalityError, decode_images, detect, load_image_split, read_table
from dataorder.scores import load_scores, runner

FAST = ["--model", "cnn", "--scores", "el2n,loss", "--runs", "2", "--epochs", "2", "--score-epoch", "1",
        "--batch-size", "16", "--no-progress"]


def pictures(n=48, size=(8, 8), mode="RGB", seed=0):
    """Random images; label 1 for the bright ones (mean above 128), so a CNN can learn them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        bright = i % 2
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        array = rng.integers(100 * bright, 156 + 100 * bright, size=shape).astype(np.uint8)
        images.append(Image.fromarray(array, mode=mode))
        labels.append(bright)
    return images, labels


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_hf(path, images, labels):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))
    return path


def save_parquet(path, blobs, labels, **extra):
    column = pa.array([{"bytes": b, "path": None} for b in blobs],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": column, "label": labels, **extra}), path)
    return path


def score(*args: str) -> int:
    return main(["score", *args])


def test_decode_matches_pillow_channels_first():
    images, _ = pictures(3)
    decoded = decode_images([(png(im), None) for im in images], image_size=None)
    assert decoded.dtype == torch.float32 and tuple(decoded.shape) == (3, 3, 8, 8)
    expected = np.asarray(images[1], dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(decoded[1].numpy(), expected)


def test_greyscale_and_resizing():
    images, _ = pictures(4, size=(10, 6), mode="L")
    decoded = decode_images([(png(im), None) for im in images], image_size=5)
    assert tuple(decoded.shape) == (4, 1, 5, 5)
    from PIL import Image

    expected = np.asarray(images[0].resize((5, 5), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert np.array_equal(decoded[0, 0].numpy(), expected)


@pytest.mark.slow
def test_hf_image_dataset_end_to_end(tmp_path):
    images, labels = pictures()
    data = save_hf(tmp_path / "pics", images, labels)
    assert detect(read_table(data)) == "image"
    split = load_image_split(data)
    assert tuple(split.x_train.shape) == (48, 3, 8, 8) and split.num_classes == 2
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["shape"] == [3, 8, 8] and manifest["dataset"]["examples"] == 48
    el2n = load_scores(out, "el2n")
    assert el2n.shape == (48,) and np.all((el2n >= 0) & (el2n <= np.sqrt(2)))


def test_parquet_images_resized_and_resumed_byte_identical(tmp_path, monkeypatch):
    images, labels = pictures(32, size=(12, 12))
    data = save_parquet(tmp_path / "pics.parquet", [png(im) for im in images], labels)
    args = ["--data", str(data), *FAST, "--image-size", "8"]
    assert score(*args, "--out", str(tmp_path / "clean")) == 0
    real, started = runner.train_and_score, []

    def die_on_second_run(*a, **k):
        if started:
            raise KeyboardInterrupt
        started.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "train_and_score", die_on_second_run)
    assert score(*args, "--out", str(tmp_path / "crashed")) == 130
    monkeypatch.setattr(runner, "train_and_score", real)
    assert score(*args, "--out", str(tmp_path / "crashed")) == 0
    assert (tmp_path / "crashed" / "scores.parquet").read_bytes() == (tmp_path / "clean" / "scores.parquet").read_bytes()


@pytest.mark.parametrize("case, match", [
    ("undecodable", "image column 'image', row 2: cannot decode the image"),
    ("sizes", "images of 2 sizes"),
    ("mixed", "mixes modalities"),
    ("reference", "--reference-split applies to text"),
])
def test_bad_image_inputs_fail_in_one_line_and_write_nothing(case, match, tmp_path, capsys):
    images, labels = pictures(6)
    blobs = [png(im) for im in images]
    extra, flags = {}, []
    if case == "undecodable":
        blobs[2] = b"these bytes are not an image"
    elif case == "sizes":
        blobs[1] = png(pictures(1, size=(5, 5))[0][0])
    elif case == "mixed":
        extra = {"caption": [f"picture {i}" for i in range(6)]}
    else:
        flags = ["--reference-split", "0.1"]
    data = save_parquet(tmp_path / "pics.parquet", blobs, labels, **extra)
    out = tmp_path / "out"
    assert score("--data", str(data), *FAST, *flags, "--out", str(out)) == 2
    error = capsys.readouterr().err.strip()
    assert match in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_modality_error_is_typed():
    with pytest.raises(ModalityError):
        decode_images([(b"junk", None)], image_size=None)
