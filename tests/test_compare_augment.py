"""``dataorder compare --augment qmc|iid`` and the augmented-digits task behind it."""

import numpy as np
import pytest
import torch

from dataorder.augment import ShiftTransform, load_shift_digits_split, shift_image, shifted_dataset
from dataorder.cli import main
from dataorder.data import TensorSplit
from dataorder.orderings import make_ordering
from dataorder.samplers.qmc import QMCAugment
from dataorder.training import train_run


def reference_shift(image, dy, dx):
    out = np.zeros_like(image)
    height, width = image.shape
    for y in range(height):
        for x in range(width):
            if 0 <= y + dy < height and 0 <= x + dx < width:
                out[y + dy, x + dx] = image[y, x]
    return out


@pytest.mark.parametrize("dy, dx", [(0, 0), (1, -1), (-2, 3), (4, 0), (-5, -5)])
def test_shift_image_matches_a_pixel_loop(dy, dx):
    image = np.arange(1.0, 26.0).reshape(5, 5)
    ours = shift_image(torch.from_numpy(image).reshape(1, 5, 5), dy, dx)
    assert np.array_equal(ours[0].numpy(), reference_shift(image, dy, dx))


def test_shift_transform_uses_each_shift_equally_often():
    transform = ShiftTransform((1, 3, 3), max_shift=1)
    image = torch.zeros(9)
    image[4] = 1.0  # the centre pixel: where it lands tells the shift
    grid = (np.arange(9) + 0.5) / 9
    landed = [int(transform((image, 0), np.array([a, b]))[0].argmax()) for a in grid for b in grid]
    assert np.bincount(landed).tolist() == [9] * 9


def test_shifted_dataset_drives_shifts_from_qmc_or_iid_points():
    split = load_shift_digits_split()
    assert float(split.x_train.min()) == 0.0 and float(split.x_train.max()) == 1.0
    for augment, method in (("qmc", "sobol"), ("iid", "random")):
        data = shifted_dataset(split.x_train, split.y_train, augment, seed=3)
        assert isinstance(data, QMCAugment) and data.method == method and len(data) == len(split.y_train)
        data.set_epoch(2)
        x, y = data[10]
        u = data.point(10)
        dy, dx = int(u[0] * 3) - 1, int(u[1] * 3) - 1
        expected = reference_shift(split.x_train[10].reshape(8, 8).numpy(), dy, dx)
        assert np.array_equal(x.reshape(8, 8).numpy(), expected) and y == split.y_train[10]
    with pytest.raises(ValueError, match="augment"):
        shifted_dataset(split.x_train, split.y_train, "sobol")


def test_train_run_with_augmentation_is_reproducible_and_differs_from_plain():
    full = load_shift_digits_split()
    split = TensorSplit(full.x_train[:256], full.y_train[:256], full.x_test[:64], full.y_test[:64], 10, "small")
    runs = [train_run(split, "logreg", make_ordering("rr"), seed=0, epochs=1, augment=augment)
            for augment in ("qmc", "qmc", "iid", None)]
    losses = [r.train_loss for r in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2] and losses[0] != losses[3]
    assert losses[0][-1] < losses[0][0]


def test_compare_cli_runs_both_augmentations(capsys):
    assert main(["compare", "--orders", "rr", "--augment", "qmc,iid", "--epochs", "1", "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[0] for line in lines] == ["rr/qmc", "rr/iid"]
    assert [line.split()[4] for line in lines] == ["1.000", "1.000"]  # each against rr with its own augmentation


def test_compare_cli_rejects_unknown_augmentation(capsys):
    assert main(["compare", "--orders", "rr", "--augment", "sobol", "--epochs", "1", "--seeds", "1"]) == 2
    assert "--augment" in capsys.readouterr().err
