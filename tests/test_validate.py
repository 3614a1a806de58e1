"""dataorder._validate: one rule per kind of argument, messages that name it."""

import numpy as np
import pytest

from dataorder import _validate as v


@pytest.mark.parametrize("value", [0, 7, 2**64 - 1, np.uint64(2**64 - 1), np.int32(5)])
def test_seeds_cover_every_64_bit_key(value):
    assert v.check_seed(value) == int(value) and type(v.check_seed(value)) is int


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (2**64, ValueError), (1.0, TypeError),
                                              (True, TypeError), (np.bool_(True), TypeError), ("3", TypeError)])
def test_seed_refusals_name_the_argument_and_the_fix(value, error):
    with pytest.raises(error, match=r"^my_seed must be an int in \[0, 2\*\*64\).*pass e\.g\. my_seed=0$"):
        v.check_seed(value, "my_seed")


def test_counts_stay_inside_int64():
    assert v.check_count(2**63 - 1, "batch_size") == 2**63 - 1
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 2\*\*63\), got 9223372036854775808"):
        v.check_count(2**63, "batch_size")
    assert v.check_count(0, "sample", minimum=0) == 0
    assert v.check_epoch(3) == 3
    with pytest.raises(ValueError, match="epoch"):
        v.check_epoch(-1)


def test_world_and_rank():
    assert v.check_world_size(3) == 3 and v.check_rank(2, 3) == 2
    with pytest.raises(ValueError, match="world_size must be an int in"):
        v.check_world_size(0)
    with pytest.raises(TypeError, match="world_size"):
        v.check_world_size(2.0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 3\) \(world_size=3\), got 3"):
        v.check_rank(3, 3)
    with pytest.raises(TypeError, match="rank"):
        v.check_rank(None, 3)


def test_bools_reals_fractions_choices():
    assert v.check_bool(np.bool_(False), "drop_last") is False
    with pytest.raises(TypeError, match="drop_last must be True or False, got 'yes'"):
        v.check_bool("yes", "drop_last")
    assert v.check_real(np.float32(0.5), "lr", low=0.0, low_open=True) == 0.5
    with pytest.raises(ValueError, match=r"lr must be in \(0.0, inf\], got 0"):
        v.check_real(0, "lr", low=0.0, low_open=True)
    with pytest.raises(ValueError, match="finite"):
        v.check_real(float("inf"), "lr")
    with pytest.raises(TypeError, match="lr must be a number"):
        v.check_real(True, "lr")
    assert v.check_fraction(0.0, "keep") == 0.0
    with pytest.raises(ValueError, match=r"keep must be in \(0.0, 1.0\]"):
        v.check_fraction(0.0, "keep", zero=False)
    with pytest.raises(ValueError, match="balance must be one of 'mean', 'pair', got 3"):
        v.check_choice(3, "balance", ("mean", "pair"))


def test_ints_with_bounds():
    assert v.check_int(-3, "offset") == -3
    with pytest.raises(ValueError, match=r"depth must be an int in \[0, 8\), got 8; pass e.g. depth=0"):
        v.check_int(8, "depth", low=0, high=8)
    with pytest.raises(TypeError, match="depth"):
        v.check_int(1.0, "depth", low=0)
