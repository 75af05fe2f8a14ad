import math

import pytest

from sparsetrain.sparsity.schedules import drop_fraction, is_update_step


def test_cosine_decay_matches_the_paper():
    for t in (0, 10, 37, 75):
        expected = 0.3 / 2 * (1 + math.cos(math.pi * t / 75))
        assert drop_fraction(t, alpha=0.3, t_end=75) == pytest.approx(expected)
    assert drop_fraction(75, alpha=0.3, t_end=75) == pytest.approx(0.0)
    assert drop_fraction(200, alpha=0.3, t_end=75) == pytest.approx(0.0)


def test_linear_and_constant_decay():
    assert drop_fraction(25, alpha=0.4, t_end=100, decay="linear") == pytest.approx(0.3)
    assert drop_fraction(25, alpha=0.4, t_end=100, decay="constant") == 0.4
    with pytest.raises(ValueError, match="drop_fraction_decay"):
        drop_fraction(1, alpha=0.3, t_end=10, decay="exp")


def test_update_steps_every_delta_t_until_t_end():
    steps = [t for t in range(1, 1000) if is_update_step(t, delta_t=100, t_end=750)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]
    steps = [t for t in range(1, 100) if is_update_step(t, delta_t=10, t_start=25, t_end=60)]
    assert steps == [35, 45, 55]
