"""sparsetrain.checks: accepted values come back in their plain type; refused ones raise a
ValueError that names the setting, shows the value, says what is expected and how to fix it."""

import math

import numpy as np
import pytest

from sparsetrain import checks


def test_integers():
    assert checks.positive_int(3, "epochs") == 3
    assert type(checks.positive_int(np.int64(2), "n")) is int
    assert checks.non_negative_int(0, "checkpoint_every") == 0
    with pytest.raises(ValueError, match=r"epochs must be a positive integer, got 0; give epochs "
                                         r"a whole number of 1 or more"):
        checks.positive_int(0, "epochs")
    for bad in (True, 2.0, "3", None, -1):
        with pytest.raises(ValueError, match="positive integer"):
            checks.positive_int(bad, "n")
    with pytest.raises(ValueError, match=r"must be a non-negative integer, got -1; 0 means"):
        checks.non_negative_int(-1, "k", fix="0 means never")


def test_reals_and_fractions():
    assert checks.real_in_range(0.5, "x", 0, 1) == 0.5 and checks.positive_real(2, "lr") == 2.0
    assert checks.fraction(1, "density") == 1.0 and checks.fraction(0, "p", zero=True) == 0.0
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\] \(the fraction of weights "
                                         r"kept\), got 1\.5; give density a number in \(0, 1\]"):
        checks.fraction(1.5, "density", meaning="the fraction of weights kept")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        checks.real_in_range(1.0, "label_smoothing", 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"lr must be > 0, got 0"):
        checks.positive_real(0, "lr")
    with pytest.raises(ValueError, match=r"must be >= 0"):
        checks.real_in_range(-0.1, "momentum", 0.0)
    for bad in (math.nan, True, "0.1", None):
        with pytest.raises(ValueError, match="density must be in"):
            checks.fraction(bad, "density")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        checks.fraction(1.0, "p", one=False)


def test_choice_and_boolean():
    assert checks.choice("sgd", "optimizer", ("sgd", "adam")) == "sgd"
    with pytest.raises(ValueError, match=r"optimizer must be one of 'sgd', 'adam', got 'rmsprop'; "
                                         r"choose one of 'sgd', 'adam'"):
        checks.choice("rmsprop", "optimizer", ("sgd", "adam"))
    with pytest.raises(ValueError, match="one of"):
        checks.choice(["sgd"], "optimizer", {"sgd"})  # unhashable: refused, not a TypeError
    assert checks.boolean(False, "progress") is False
    with pytest.raises(ValueError, match="progress must be True or False, got 1"):
        checks.boolean(1, "progress")


def test_reals_are_finite():
    for bad in (math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got -?inf"):
            checks.positive_real(bad, "lr")
        with pytest.raises(ValueError, match="finite"):
            checks.real_in_range(bad, "x")
    with pytest.raises(ValueError, match="finite"):
        checks.real_in_range(10**400, "x")  # an int too large for a float
    assert checks.real_in_range(-1e300, "x") == -1e300


def test_integer_in_range():
    assert checks.integer_in_range(2**32 - 1, "seed", 0, 2**32 - 1) == 2**32 - 1
    with pytest.raises(ValueError, match=r"seed must be a whole number in \[0, 4294967295\], got "
                                         r"1180591620717411303424; give seed a whole number in "
                                         r"\[0, 4294967295\]"):
        checks.integer_in_range(2**70, "seed", 0, 2**32 - 1)
    for bad in (True, 1.0, "1", None, -1):
        with pytest.raises(ValueError, match="seed must be a whole number"):
            checks.integer_in_range(bad, "seed", 0, 10)


def test_integer_upper_bounds():
    assert checks.positive_int(5, "epochs", high=5) == 5
    with pytest.raises(ValueError, match=r"epochs must be a positive integer \(at most 5\), "
                                         r"got 6"):
        checks.positive_int(6, "epochs", high=5)
    with pytest.raises(ValueError, match=r"k must be a non-negative integer \(at most 5\)"):
        checks.non_negative_int(6, "k", high=5)
