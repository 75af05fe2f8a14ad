"""Each method against Static over the same seeds: pairing, intervals, verdicts, report."""

import json

import pytest

from sparsetrain.runner.comparison import verdicts
from sparsetrain.runner.report import collect_runs, format_table, format_verdicts, summarise
from sparsetrain.runner.report import write_report
from sparsetrain.runner.stats import t_quantile


def run(root, method, density, seed, value, *, kind="classification", distribution="erk",
        length=None, **settings):
    folder = root / f"{method}-{distribution}-{density}-{seed}-{length}-{settings}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: m\n")
    (folder / "metrics.jsonl").write_text(json.dumps(
        {"kind": "eval", "epoch": 1, "test_accuracy": value, "test_loss": value}) + "\n")
    config = {"distribution": distribution, "seed": seed, "density": density, **settings}
    if length is not None:
        config["length"] = length
    summary = {"test_accuracy": value, "density": density, "method": method, "model": "m",
               "data": "d", "config": config, "layer_densities": {"w": density}}
    if kind == "sequence":
        summary.update(data_kind="sequence", test_loss=value)
    (folder / "summary.json").write_text(json.dumps(summary))


def rows_of(root):
    return {(r["method"], r["distribution"], r["density"], r["length"]): r
            for r in summarise(collect_runs([root]))}


def test_paired_difference_and_interval(tmp_path):
    static = {0: 0.80, 1: 0.84, 2: 0.82}
    rigl = {0: 0.83, 1: 0.86, 2: 0.86}   # differences 0.03, 0.02, 0.04
    set_ = {0: 0.79, 1: 0.86, 2: 0.81}   # differences -0.01, 0.02, -0.01
    for seed in static:
        run(tmp_path, "static", 0.1, seed, static[seed])
        run(tmp_path, "rigl", 0.1, seed, rigl[seed])
        run(tmp_path, "set", 0.1, seed, set_[seed])
    run(tmp_path, "dense", 1.0, 0, 0.9)
    rows = rows_of(tmp_path)
    d = rows[("rigl", "erk", 0.1, 1.0)]["vs_static"]
    half = t_quantile(0.975, 2) * 0.01 / 3 ** 0.5  # sd of (0.03, 0.02, 0.04) is 0.01
    assert d.n == 3 and d.mean == pytest.approx(0.03)
    assert (d.low, d.high) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert rows[("static", "erk", 0.1, 1.0)]["vs_static"] is None
    assert rows[("dense", "-", 1.0, 1.0)]["vs_static"] is None
    (line,) = verdicts(list(rows.values()))
    assert line.startswith("m at density 0.1: better than Static: rigl (+0.0300, 95% CI ")
    assert "not distinguishable from Static: set" in line and "worse" not in line
    table = format_table(list(rows.values()))
    assert f"| +0.0300 [{0.03 - half:+.4f}, {0.03 + half:+.4f}] (3) |" in table
    assert "ranked only where the 95% interval" in format_verdicts(list(rows.values()))


def test_loss_lower_is_better_and_worse_rows(tmp_path):
    for seed, (static, rigl, set_) in enumerate([(1.5, 1.7, 1.40), (1.6, 1.8, 1.51),
                                                 (1.55, 1.74, 1.45)]):
        run(tmp_path, "static", 0.1, seed, static, kind="sequence")
        run(tmp_path, "rigl", 0.1, seed, rigl, kind="sequence")
        run(tmp_path, "set", 0.1, seed, set_, kind="sequence")
    (line,) = verdicts(summarise(collect_runs([tmp_path])))
    assert "better than Static: set (-0.0967" in line
    assert "worse than Static: rigl (+0.1967" in line


def test_pairs_only_shared_seeds_and_same_distribution_and_length(tmp_path):
    for seed in (0, 1, 2):
        run(tmp_path, "static", 0.05, seed, 0.7 + seed / 100)
        run(tmp_path, "static", 0.05, seed, 0.6 + seed / 100, distribution="uniform")
        run(tmp_path, "rigl", 0.05, seed, 0.72 + seed / 100, distribution="uniform")
        run(tmp_path, "rigl", 0.05, seed, 0.9, length=5)
    run(tmp_path, "set", 0.05, 0, 0.71)          # one shared seed: no interval
    run(tmp_path, "set", 0.05, 5, 0.71)          # a seed Static lacks
    run(tmp_path, "small-dense", 0.05, 0, 0.69, distribution="-")
    rows = rows_of(tmp_path)
    uniform = rows[("rigl", "uniform", 0.05, 1.0)]["vs_static"]
    assert uniform.mean == pytest.approx(0.12) and uniform.n == 3   # against uniform Static
    assert rows[("rigl", "erk", 0.05, 5.0)]["vs_static"] is None    # no Static at 5x
    one = rows[("set", "erk", 0.05, 1.0)]["vs_static"]
    assert one.n == 1 and one.low is None
    # two Static distributions: small-dense (which has none) is not compared
    assert rows[("small-dense", "-", 0.05, 1.0)]["vs_static"] is None
    (line,) = verdicts(list(rows.values()))
    assert "better than Static: rigl (uniform) (+0.1200" in line
    assert "fewer than 2 seeds shared with Static, no interval: set (erk)" in line
    assert "| rigl 5x | erk | 0.05 |" in format_table(list(rows.values()))


def test_small_dense_against_the_one_static(tmp_path):
    for seed in (0, 1):
        run(tmp_path, "static", 0.02, seed, 0.8 + seed / 10)
        run(tmp_path, "small-dense", 0.02, seed, 0.7 + seed / 10, distribution="-")
    d = rows_of(tmp_path)[("small-dense", "-", 0.02, 1.0)]["vs_static"]
    assert d.mean == pytest.approx(-0.1) and d.n == 2


def test_a_seed_twice_in_a_row_is_not_paired(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for seed in (0, 1):
        run(tmp_path / "a", "static", 0.1, seed, 0.8)
        run(tmp_path / "a", "rigl", 0.1, seed, 0.81)
        run(tmp_path / "b", "rigl", 0.1, seed, 0.85)  # same cell, another setting elsewhere
    rows = rows_of(tmp_path)
    assert rows[("rigl", "erk", 0.1, 1.0)]["n"] == 4
    assert rows[("rigl", "erk", 0.1, 1.0)]["vs_static"] is None
    assert verdicts(list(rows.values())) == []


def test_report_states_the_verdicts(tmp_path):
    for seed in (0, 1, 2):
        run(tmp_path / "runs", "static", 0.1, seed, 0.80 + seed / 100)
        run(tmp_path / "runs", "rigl", 0.1, seed, 0.85 + seed / 100 + (seed == 1) / 1000)
    path = write_report([tmp_path / "runs"], tmp_path / "report")
    text = path.read_text()
    assert "better than Static: rigl (+0.0503" in text and "'vs Static'" in text
    assert "better than Static: rigl" in (tmp_path / "report" / "report.html").read_text()


def test_runs_that_differ_in_another_setting_get_rows_of_their_own(tmp_path):
    accuracy = {None: [0.80, 0.82, 0.81], "shuffle": [0.79, 0.80, 0.80],
                "reinit": [0.81, 0.83, 0.82]}
    for ablation, values in accuracy.items():
        for seed, value in enumerate(values):
            run(tmp_path, "snip", 0.1, seed, value, prune_ablation=ablation)
    for seed, value in enumerate([0.78, 0.79, 0.80]):
        run(tmp_path, "static", 0.1, seed, value)
    rows = summarise(collect_runs([tmp_path]))
    snip = {r["variant"]: r for r in rows if r["method"] == "snip"}
    assert set(snip) == {"", "prune_ablation shuffle", "prune_ablation reinit"}
    assert snip["prune_ablation shuffle"]["accuracy"] == pytest.approx(0.79667, abs=1e-5)
    # every row still pairs with Static over its three seeds
    assert all(r["vs_static"].n == 3 for r in snip.values())
    assert snip[""]["vs_static"].mean == pytest.approx(0.02)
    table = format_table(rows)
    assert "snip [prune_ablation shuffle]" in table and "snip [prune_ablation reinit]" in table
    assert all(r["variant"] == "" for r in rows if r["method"] == "static")
