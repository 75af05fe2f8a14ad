"""Claims measured on run summaries: selection by settings, the verdict rules, Pearson's r
with its Fisher interval, and layer collapse."""

import math

import pytest

from sparsetrain.runner.claims import (FAILS, HOLDS, MARGIN, UNCLEAR, Claim, collapsed,
                                       correlation, matches, measure, verdict)
from sparsetrain.runner.config import ConfigError
from sparsetrain.runner.stats import Difference


def run(method, seed, accuracy, ever_active=0.05, layers=None, **config):
    return {"method": method, "test_accuracy": accuracy,
            "config": {"method": method, "seed": seed, "density": 0.05, **config},
            "ever_active_fraction": ever_active,
            "layer_densities": layers or {"fc1.weight": 0.05}}


def test_selection_fills_unnamed_settings_with_defaults_and_takes_alternatives():
    s = run("rigl", 0, 0.9, delta_t=25)
    assert matches(s, {"method": "rigl", "prune_ablation": None, "length": 1})
    assert not matches(s, {"method": "rigl", "delta_t": 100})
    assert matches(s, {"delta_t": (25, 100)}) and not matches(s, {"delta_t": (50, 100)})
    dense = {"method": "dense", "test_accuracy": 0.9, "config": {"method": "dense",
                                                                   "density": 1.0, "seed": 0}}
    assert matches(dense, {"method": "dense", "density": 0.05})  # density not compared


@pytest.mark.parametrize("low,high,kind,expected", [
    (0.001, 0.01, "at-least", HOLDS), (0.001, 0.01, "superior", HOLDS),
    (-0.01, -0.001, "at-least", FAILS), (-0.01, -0.001, "superior", FAILS),
    (-MARGIN / 2, 0.01, "at-least", HOLDS), (-MARGIN / 2, 0.01, "superior", UNCLEAR),
    (-2 * MARGIN, 0.01, "at-least", UNCLEAR), (None, None, "at-least", UNCLEAR),
])
def test_verdict_rules(low, high, kind, expected):
    assert verdict(Difference(0.0, low, high, 3), kind) == expected


def test_paired_claim_against_a_hand_computation():
    a = [run("rigl", s, acc) for s, acc in enumerate([0.90, 0.91, 0.93])]
    b = [run("set", s, acc) for s, acc in enumerate([0.88, 0.90, 0.90])]
    claim = Claim("RigL >= SET", "paper", "here", "at-least", {"method": "rigl"},
                  {"method": "set"})
    m = measure(claim, a + b)
    # differences 0.02, 0.01, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert m.n == 3 and m.verdict == HOLDS
    assert f"{0.02 - half:+.4f} to {0.02 + half:+.4f}" in m.text
    assert "0.9133 vs 0.8933" in m.text


def test_a_selection_that_mixes_runs_is_refused():
    runs = [run("rigl", 0, 0.9), run("rigl", 0, 0.8, delta_t=25), run("set", 0, 0.9)]
    claim = Claim("x", "p", "s", "at-least", {"method": "rigl"}, {"method": "set"})
    with pytest.raises(ConfigError, match="seed 0"):
        measure(claim, runs)


def test_missing_runs_are_inconclusive_not_an_error():
    claim = Claim("x", "p", "s", "superior", {"method": "rigl"}, {"method": "set"})
    m = measure(claim, [run("set", 0, 0.9)])
    assert m.verdict == UNCLEAR and m.n == 0 and "no runs" in m.text


def test_pearson_and_its_fisher_interval_against_a_hand_computation():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    r, low, high = correlation(x, y)
    assert r == pytest.approx(0.8)  # sxy 8, sxx 10, syy 10
    z, se = math.atanh(0.8), 1 / math.sqrt(2)
    assert low == pytest.approx(math.tanh(z - 1.959964 * se))
    assert high == pytest.approx(math.tanh(z + 1.959964 * se))
    assert correlation([1.0, 2.0, 3.0], [1.0, 2.0, 2.5])[1] is None  # too few points
    assert math.isnan(correlation([1.0, 1.0], [2.0, 3.0])[0])


def test_correlation_claim_reads_the_ever_active_fraction():
    accuracy = [0.80, 0.81, 0.83, 0.82, 0.85, 0.86]  # r = 0.946 with the fractions below
    runs = [run("rigl", s, accuracy[i], ever_active=0.05 + 0.05 * i, delta_t=d)
            for i, (s, d) in enumerate([(0, 25), (1, 25), (0, 100), (1, 100), (0, 400),
                                        (1, 400)])]
    runs.append(run("set", 0, 0.1, ever_active=0.9))  # not selected
    claim = Claim("explore", "p", "s", "correlation", {"method": "rigl"})
    m = measure(claim, runs)
    assert m.verdict == HOLDS and m.n == 6 and "r = +0.95" in m.text
    reverse = [dict(r, test_accuracy=1 - r["test_accuracy"]) for r in runs]
    assert measure(claim, reverse).verdict == FAILS


def test_collapse_counts_runs_with_an_empty_layer():
    synflow = [run("synflow", s, 0.7, layers={"a": 0.01, "b": 0.2}) for s in range(3)]
    snip = [run("snip", s, 0.1, layers={"a": 0.0, "b": 0.3}) for s in range(3)]
    claim = Claim("no collapse", "p", "s", "collapse", {"method": "synflow"},
                  others=({"method": "snip"},))
    m = measure(claim, synflow + snip)
    assert m.verdict == HOLDS and "synflow 0/3" in m.text and "snip 3/3" in m.text
    assert measure(claim, synflow).verdict == UNCLEAR  # nothing collapsed: nothing avoided
    broken = [run("synflow", 0, 0.1, layers={"a": 0.0})]
    assert measure(claim, broken + snip).verdict == FAILS


def test_a_layer_left_with_one_weight_counts_as_collapsed():
    kept_one = run("snip", 0, 0.1, layers={"a": 1 / 784, "b": 0.2})
    kept_one["layer_active_counts"] = {"a": 1, "b": 60}
    assert collapsed(kept_one)
    kept_one["layer_active_counts"] = {"a": 2, "b": 60}
    assert not collapsed(kept_one)
    assert collapsed(run("snip", 0, 0.1, layers={"a": 0.0}))  # without counts: empty only
    assert not collapsed(run("snip", 0, 0.1, layers={"a": 1 / 784}))
