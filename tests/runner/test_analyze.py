"""sparsetrain analyze: mask overlap of final masks across seeds and methods, gradient flow."""

import json

import pytest
import torch

from sparsetrain.analysis import position_overlap
from sparsetrain.cli import main
from sparsetrain.runner import Trainer
from sparsetrain.runner.analyze import overlap_tables, write_analysis
from sparsetrain.runner.results import collect_runs

from .test_train import config, quiet


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for method in ("static", "rigl"):
        for seed in (0, 1):
            Trainer(config(method=method, seed=seed, epochs=2, log_every=2), root /
                    f"{method}-{seed}", log=quiet).train()
    Trainer(config(method="dense", epochs=1), root / "dense", log=quiet).train()
    return root


def test_overlap_tables_average_the_pairs(runs):
    tables = overlap_tables(collect_runs([runs]))
    (key,) = tables
    table = tables[key]
    assert key == ("lenet300", 0.2)
    assert set(table) == {("static", "static"), ("rigl", "rigl"), ("static", "rigl")}
    positions = {f"{m}-{s}": torch.load(runs / f"{m}-{s}" / "checkpoint.pt",
                                        weights_only=True)["sparsifier"]["positions"]
                 for m in ("static", "rigl") for s in (0, 1)}
    assert table[("static", "static")] == pytest.approx(
        position_overlap(positions["static-0"], positions["static-1"]).overall)
    cross = [position_overlap(positions[f"static-{a}"], positions[f"rigl-{b}"]).overall
             for a in (0, 1) for b in (0, 1)]
    assert table[("static", "rigl")] == pytest.approx(sum(cross) / 4)
    # static and rigl of one seed start from the same mask: closer than two seeds of static
    assert position_overlap(positions["static-0"], positions["rigl-0"]).overall > \
        table[("static", "static")]


def test_training_logs_gradient_norms(runs):
    records = [json.loads(x) for x in (runs / "rigl-0" / "metrics.jsonl").open()]
    trains = [r for r in records if r["kind"] == "train"]
    assert trains and all("overall" in r["grad_norm"] for r in trains)
    layers = {k: v for k, v in trains[0]["grad_norm"].items() if k != "overall"}
    assert set(layers) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert trains[0]["grad_norm"]["overall"] == pytest.approx(
        sum(v * v for v in layers.values()) ** 0.5)


def test_analyze_writes_its_tables_and_plots(runs, tmp_path, capsys):
    assert main(["analyze", str(runs), "--out", str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "analysis.md").read_text()
    assert "### lenet300 at density 0.2" in text and "| static |" in text
    assert "random masks: 0.111" in text
    for name in ("grad_norm.png", "grad_norm_layers.png"):
        assert (tmp_path / "a" / name).read_bytes().startswith(b"\x89PNG")
        assert f"({name})" in text
    assert "analysis written to" in capsys.readouterr().out


def test_analyze_needs_finished_runs(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        write_analysis([tmp_path], tmp_path / "out")
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
