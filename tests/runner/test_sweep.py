"""Sweeps: the grid, merged dense cells, skipping finished cells, resuming, parallel jobs."""

import json
import shutil

import pytest

from sparsetrain.runner.config import ConfigError
from sparsetrain.runner import Trainer
from sparsetrain.runner.sweep import (PRESETS, expand_grid, load_sweep_exclude, load_sweep_file,
                                     run_sweep)

BASE = {"model": "lenet300", "data": "synthetic", "epochs": 1, "batch_size": 32,
        "data_options": {"n_train": 64, "n_test": 16, "input_shape": [1, 4, 4]},
        "progress": False, "device": "cpu", "delta_t": 1}


def quiet(_):
    pass


def test_grid_is_expanded_and_dense_merged():
    cells = expand_grid(BASE, {"method": ["dense", "static", "rigl"], "density": [0.5, 0.2],
                               "seed": [0, 1]})
    assert len(cells) == 2 + 2 * 2 * 2
    assert len({c.run_name() for c in cells}) == len(cells)
    assert all(c.density == 1.0 for c in cells if c.method == "dense")


def test_grid_errors():
    with pytest.raises(ConfigError, match="did you mean 'density'"):
        expand_grid(BASE, {"densty": [0.1]})
    with pytest.raises(ConfigError, match="non-empty list"):
        expand_grid(BASE, {"density": 0.1})
    with pytest.raises(ValueError, match="density"):
        expand_grid(BASE, {"density": [1.5]})


def test_presets_are_valid():
    for preset in PRESETS.values():
        assert expand_grid(preset["base"], preset["grid"])


def test_sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: {model: lenet300}\ngrid: {seed: [0, 1]}\n")
    assert load_sweep_file(path) == ({"model": "lenet300"}, {"seed": [0, 1]})
    path.write_text("runs: []\n")
    with pytest.raises(ConfigError, match="'base' and 'grid'"):
        load_sweep_file(path)


def test_finished_cells_are_skipped_and_interrupted_ones_resumed(tmp_path):
    cells = expand_grid(BASE, {"method": ["static", "set"], "density": [0.5]})
    folders = run_sweep(cells, tmp_path, log=quiet)
    assert all((f / "summary.json").exists() for f in folders)
    stamp = [(f / "summary.json").stat().st_mtime_ns for f in folders]
    shutil.rmtree(folders[1])  # as if the sweep had been stopped during that run:
    Trainer(cells[1], folders[1], log=quiet).train(
        on_step=lambda t: t.state.step == 1 and t.request_stop())
    assert not (folders[1] / "summary.json").exists()
    messages = []
    run_sweep(cells, tmp_path, log=messages.append)
    assert "1 already finished, 1 to train" in messages[0]
    assert (folders[0] / "summary.json").stat().st_mtime_ns == stamp[0]
    summary = json.loads((folders[1] / "summary.json").read_text())
    assert summary["method"] == "set" and summary["steps"] == 2


def test_parallel_jobs(tmp_path):
    cells = expand_grid(BASE, {"method": ["static", "rigl"], "density": [0.5]})
    folders = run_sweep(cells, tmp_path, jobs=2, log=quiet)
    assert all((f / "summary.json").exists() for f in folders)


def test_a_sweep_file_may_leave_cells_out(tmp_path):
    from sparsetrain.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("base: {model: lenet300, data: synthetic, data_options: {n_train: 64, "
                    "n_test: 16, input_shape: [1, 6, 6], num_classes: 3}, epochs: 1, "
                    "batch_size: 32, progress: false, device: cpu}\n"
                    "grid: {method: [static, set], density: [0.5, 0.2]}\n"
                    "exclude: [{method: set, density: 0.2}]\n")
    assert load_sweep_exclude(path) == [{"method": "set", "density": 0.2}]
    assert main(["sweep", "--config", str(path), "--sweep-dir", str(tmp_path / "runs"),
                 "--no-analysis"]) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "report")
    assert len(names) == 3 and not any("set_density0.2" in n for n in names)
    path.write_text("base: {model: lenet300}\ngrid: {seed: [0]}\nexclude: [{colour: red}]\n")
    with pytest.raises(ConfigError, match="colour"):
        load_sweep_exclude(path)


def test_the_methods_preset_runs_every_registered_method_beside_dense():
    import sparsetrain as st

    preset = PRESETS["methods"]
    cells = expand_grid(preset["base"], preset["grid"])
    assert {c.method for c in cells} == {"dense", "small-dense", *st.available_methods()}
    sparse = [c for c in cells if c.method not in ("dense", "small-dense")]
    assert {(c.density, c.seed) for c in sparse} == {(d, s) for d in (0.1, 0.05, 0.02)
                                                     for s in (0, 1, 2)}
    assert all(c.epochs == 10 and c.model == "lenet300" for c in cells)


def test_the_runner_hands_srigl_the_schedule_keywords_of_rigl():
    import sparsetrain as st
    from sparsetrain.runner.build import accepted_keywords

    taken = accepted_keywords(st.get_method("srigl"))
    assert {"gamma_sal", "delta_t", "alpha", "t_end", "distribution"} <= taken
    assert "kwargs" not in taken
