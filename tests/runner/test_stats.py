"""Student's t quantiles against printed tables, and paired intervals against a hand
computation."""

import math

import pytest

from sparsetrain.runner.stats import paired_difference, t_cdf, t_quantile

# two-sided 95% (p = 0.975) and 99% (p = 0.995) critical values of the usual printed tables
TABLE = [(1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182), (4, 0.975, 2.776),
         (5, 0.975, 2.571), (9, 0.975, 2.262), (19, 0.975, 2.093), (30, 0.975, 2.042),
         (120, 0.975, 1.980), (1, 0.995, 63.657), (5, 0.995, 4.032), (10, 0.995, 3.169)]


@pytest.mark.parametrize("df, p, value", TABLE)
def test_t_quantiles_match_the_tables(df, p, value):
    assert t_quantile(p, df) == pytest.approx(value, abs=1e-3)
    assert t_quantile(1 - p, df) == pytest.approx(-value, abs=1e-3)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)


def test_t_cdf_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):  # Cauchy (df 1) and df 2 have closed forms
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal's


@pytest.mark.parametrize("p, df", [(0, 3), (1, 3), (0.5, 0), (float("nan"), 3)])
def test_bad_quantile_arguments(p, df):
    with pytest.raises(ValueError, match="t_quantile"):
        t_quantile(p, df)


def test_paired_interval_by_hand():
    # differences 0.02, 0.04, 0.01: mean 0.023333, sample sd 0.0152753, se 0.0088192,
    # t(0.975, 2) = 4.302653, half width 0.0379462
    a = {0: 0.80, 1: 0.84, 2: 0.83, 7: 0.5}   # seed 7 has no partner and is left out
    b = {0: 0.78, 1: 0.80, 2: 0.82, 9: 0.9}
    d = paired_difference(a, b)
    assert d.n == 3
    assert d.mean == pytest.approx(0.0233333, abs=1e-7)
    assert d.low == pytest.approx(0.0233333 - 0.0379462, abs=1e-6)
    assert d.high == pytest.approx(0.0233333 + 0.0379462, abs=1e-6)
    assert not d.excludes_zero
    tight = paired_difference({0: 0.81, 1: 0.82, 2: 0.83}, {0: 0.80, 1: 0.81, 2: 0.82})
    assert tight.mean == pytest.approx(0.01) and tight.low == pytest.approx(0.01)
    assert tight.excludes_zero  # every difference the same: a zero-width interval


def test_too_few_pairs():
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({0: 0.9}, {0: 0.8})
    assert one.n == 1 and one.mean == pytest.approx(0.1) and one.low is None
    assert not one.excludes_zero
