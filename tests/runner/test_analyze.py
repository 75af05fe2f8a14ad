"""sparsetrain analyze: mask overlap of final masks across seeds and methods, loss along lines,
exploration, per-layer density over time, gradient flow; the sweep report links it."""

import json

import pytest
import torch

import sparsetrain as st
from sparsetrain.analysis import position_overlap
from sparsetrain.cli import main
from sparsetrain.runner import Trainer
from sparsetrain.analysis import loss_along_line
from sparsetrain.runner import folder
from sparsetrain.runner.analyze import overlap_tables, write_analysis
from sparsetrain.runner.landscape import ALPHAS, barrier, lines
from sparsetrain.runner.mask_history import exploration_markdown, layer_density_series
from sparsetrain.runner.report import write_report
from sparsetrain.runner.results import collect_runs, run_labels

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
    for name in ("grad_norm.png", "grad_norm_layers.png", "lines.png", "layer_density.png"):
        assert (tmp_path / "a" / name).read_bytes().startswith(b"\x89PNG")
        assert f"({name})" in text
    assert "analysis written to" in capsys.readouterr().out


def test_analyze_needs_finished_runs(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        write_analysis([tmp_path], tmp_path / "out")
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_barrier_is_the_largest_rise_above_the_chord():
    assert barrier([1.0, 1.0, 1.0]) == 0.0
    assert barrier([2.0, 1.5, 1.0]) == 0.0  # on the chord
    assert barrier([2.0, 3.0, 1.0]) == pytest.approx(1.5)  # chord 1.5 at the middle
    assert barrier([1.0, 0.2, 0.1, 0.2, 1.0]) <= 0  # convex: below the chord


def test_lines_run_from_the_saved_initial_weights_to_the_final_ones(runs):
    found = collect_runs([runs])
    result = lines(found, run_labels(found))
    (key,) = result
    assert key == ("lenet300", 0.2)
    assert set(result[key]["init"]) == {"static", "rigl"}  # lowest seed; dense has no line
    assert set(result[key]["static"]) == {"rigl"} and result[key]["static_label"] == "static"
    # the ends, computed independently: a fresh model loaded with each end
    trainer = Trainer(config(method="rigl", seed=0, epochs=2, log_every=2), runs / "rigl-0",
                      resume=True, log=quiet)
    model, data = trainer.model, trainer.data
    trainer.close()
    x = data.prepare(data.train_x[:2048], train=False)
    y = data.prepare_targets(data.train_y[:2048])
    final = {k: v.clone() for k, v in model.state_dict().items()}
    initial = folder.load_initial(runs / "rigl-0")
    ends = loss_along_line(model, initial, final, [(x, y)], alphas=[0.0, 1.0])
    losses = result[key]["init"]["rigl"]
    assert len(losses) == len(ALPHAS)
    assert losses[0] == pytest.approx(ends[0].loss, rel=1e-5)
    assert losses[-1] == pytest.approx(ends[1].loss, rel=1e-5)
    # from Static's solution: starts at Static's final loss and ends at RigL's
    assert result[key]["static"]["rigl"][-1] == pytest.approx(losses[-1], rel=1e-5)
    assert result[key]["static"]["rigl"][0] == pytest.approx(
        result[key]["init"]["static"][-1], rel=1e-5)


def test_exploration_and_layer_densities_over_time(runs):
    found = [r for r in collect_runs([runs]) if r["summary"] is not None]
    labels = run_labels(found)
    text = "\n".join(exploration_markdown(found, labels))
    ever = {m: [r["summary"]["ever_active_fraction"] for r in found
                if r["summary"]["method"] == m] for m in ("static", "rigl")}
    assert f"| rigl | {sum(ever['rigl']) / 2:.4f} |" in text
    assert f"| static | {sum(ever['static']) / 2:.4f} |" in text and "dense" not in text
    series = layer_density_series(found, labels)
    density, per_label = series["lenet300"]
    assert density == 0.2 and set(per_label) == {"static", "rigl"}
    rigl = per_label["rigl"]
    summary = next(r["summary"] for r in found if r["folder"].name == "rigl-0")
    assert {name: points[-1][1] for name, points in rigl.items()} == pytest.approx(
        summary["layer_densities"])
    assert [e for e, _ in rigl["fc1.weight"]] == [1, 2]  # one point per evaluation


def test_the_sweep_report_links_the_analysis(runs, tmp_path):
    analysis = write_analysis([runs], tmp_path / "analysis", lines=False).parent
    assert not (analysis / "lines.png").exists()
    report = write_report([runs], tmp_path / "report", analysis=analysis)
    text = report.read_text()
    assert "## Analysis" in text and "(../analysis/analysis.md)" in text
    assert "(../analysis/layer_density.png)" in text and "lines.png" not in text
    assert 'href="../analysis/grad_norm.png"' in (tmp_path / "report" / "report.html").read_text()
    plain = write_report([runs], tmp_path / "plain").read_text()
    assert "## Analysis" not in plain


def test_the_gradient_at_init_is_that_of_the_initial_weights_on_their_active_positions(runs):
    found = collect_runs([runs])
    result = lines(found, run_labels(found))[("lenet300", 0.2)]
    trainer = Trainer(config(method="static", seed=0, epochs=2, log_every=2), runs / "static-0",
                      resume=True, log=quiet)
    model, data, masks = trainer.model, trainer.data, trainer.sparsifier.masks
    trainer.close()
    model.load_state_dict(folder.load_initial(runs / "static-0"))  # Static never moves a mask
    x = data.prepare(data.train_x[:2048], train=False)
    y = data.prepare_targets(data.train_y[:2048])
    expected = st.analysis.gradient_norms(model.train(), [(x, y)], masks=dict(masks))
    assert result["gradient_at_init"]["static"] == pytest.approx(expected["overall"], rel=1e-4)
