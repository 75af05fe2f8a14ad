"""Reports from small fake run folders: grouping, order, FLOPs, plots, HTML, unfinished runs."""

import json

import pytest

from sparsetrain.runner.report import collect_runs, format_table, summarise, write_report


def fake_run(root, name, method, density, seed, accuracy, flops=True, finished=True):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: m\n")
    evals = [{"kind": "eval", "step": 10 * e, "epoch": e, "test_accuracy": accuracy - 0.1 / e,
              "test_loss": 1.0, "lr": 0.1, "density": density, "wall_time_s": e,
              "ever_active": min(1.0, density * (1 + e / 4))} for e in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    if finished:
        summary = {"test_accuracy": accuracy, "best_test_accuracy": accuracy, "density": density,
                   "method": method, "model": "lenet300", "data": "synthetic", "epochs": 3,
                   "wall_time_s": 1.0, "layer_densities": {"fc1.weight": density,
                                                           "fc2.weight": 1.0},
                   "config": {"distribution": "erk", "seed": seed, "density": density}}
        if flops:
            summary.update(train_flops_vs_dense=density * 1.1, inference_flops_vs_dense=density)
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path):
    fake_run(tmp_path, "dense", "dense", 1.0, 0, 0.9)
    for method in ("rigl", "static"):
        for density in (0.1, 0.05):
            for seed, acc in ((0, 0.80), (1, 0.84)):
                fake_run(tmp_path, f"{method}-{density}-{seed}", method, density, seed,
                         acc + (0.02 if method == "rigl" else 0), flops=method == "rigl")
    fake_run(tmp_path, "set-unfinished", "set", 0.1, 0, 0.5, finished=False)
    return tmp_path


def test_grouping_and_order(runs):
    rows = summarise(collect_runs([runs]))
    assert [(r["method"], r["density"]) for r in rows] == [
        ("dense", 1.0), ("static", 0.1), ("rigl", 0.1), ("static", 0.05), ("rigl", 0.05)]
    rigl = rows[2]
    assert rigl["n"] == 2 and rigl["accuracy"] == pytest.approx(0.84)
    assert rigl["std"] == pytest.approx(0.0282843, abs=1e-6)
    assert rigl["train_flops"] == pytest.approx(0.11) and rows[1]["train_flops"] is None
    table = format_table(rows)
    assert "0.110x" in table and "| static | erk | 0.1 | 0.8200 ± 0.0283 (2) | - | - |" in table


def test_report_files(runs, tmp_path):
    out = tmp_path / "report"
    path = write_report([runs], out, title="T")
    text = path.read_text()
    assert text.startswith("# T") and "set-unfinished" in text and "Not finished" in text
    for name in ("accuracy_vs_density.png", "accuracy_vs_train_flops.png", "learning_curves.png",
                 "layer_densities.png", "ever_active.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
        assert f"({name})" in text
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'src="accuracy_vs_density.png"' in page


def test_no_finished_runs(tmp_path):
    fake_run(tmp_path, "x", "rigl", 0.1, 0, 0.5, finished=False)
    with pytest.raises(ValueError, match="no finished runs"):
        write_report([tmp_path], tmp_path / "r")


@pytest.mark.parametrize("text, match", [
    ("{not json", "summary.json"),
    ("\xff\xfe", "summary.json"),
    ("[1, 2]", "summary.json"),
    ('{"method": "rigl", "density": 0.1}', "test_accuracy"),
    ('{"method": "rigl", "density": 0.1, "test_accuracy": "high"}', "test_accuracy"),
    ('{"method": 3, "density": 0.1, "test_accuracy": 0.5}', "method"),
    ('{"method": "rigl", "density": 0.1, "test_accuracy": 0.5, "config": []}', "config"),
])
def test_broken_run_folder_is_one_clear_error(tmp_path, text, match):
    import re

    from sparsetrain.runner.config import ConfigError

    folder = fake_run(tmp_path, "broken", "rigl", 0.1, 0, 0.5)
    (folder / "summary.json").write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError, match=f"{re.escape(str(folder))}.*{match}") as error:
        collect_runs([tmp_path])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=re.escape(str(folder))):
        write_report([tmp_path], tmp_path / "r")


def test_metrics_lines_that_are_not_evals_are_skipped(tmp_path):
    folder = fake_run(tmp_path, "x", "rigl", 0.1, 0, 0.5)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('[1]\n"text"\n{"kind": "eval"}\n{"kind": "eval", "epoch": "one", '
                '"test_accuracy": 0.5}\n')
    (run,) = collect_runs([tmp_path])
    assert [e["epoch"] for e in run["evals"]] == [1, 2, 3]
    write_report([tmp_path], tmp_path / "r")
