"""Structure through the runner: the --structure setting, the structured preset, and the time
per epoch the report shows next to each accuracy."""

import pytest

from sparsetrain.runner.config import ConfigError, TrainConfig, check
from sparsetrain.runner.results import epoch_seconds, summarise
from sparsetrain.runner.sweep import PRESETS, expand_grid


def test_structure_is_checked_with_the_other_settings():
    check(TrainConfig(model="lenet300", data="fashion-mnist", structure="block:4x4"))
    with pytest.raises(ConfigError, match="unknown structure"):
        check(TrainConfig(model="lenet300", data="fashion-mnist", structure="4x4"))
    with pytest.raises(ConfigError, match="leave --structure out"):
        check(TrainConfig(model="lenet300", data="fashion-mnist", method="dense",
                          structure="2:4"))


def test_the_structured_preset_runs_two_four_at_its_own_density_only():
    preset = PRESETS["structured"]
    cells = expand_grid(preset["base"], preset["grid"], preset["exclude"])
    by_structure = {}
    for c in cells:
        by_structure.setdefault(c.structure, set()).add(c.density)
        assert c.backend == "csr" and c.dense_layers == ["fc3.weight"]
    assert by_structure == {"unstructured": {0.5, 0.1, 0.05}, "2:4": {0.5},
                            "fan-in": {0.1, 0.05}, "block:4x4": {0.1, 0.05}}
    assert len(cells) == 2 * 8 * 3


def summary(seed, wall, structure="unstructured", epochs=10, length=1.0):
    return {"method": "rigl", "model": "lenet300", "density": 0.1, "seed": seed,
            "test_accuracy": 0.8, "test_loss": 0.5, "wall_time_s": wall,
            "config": {"method": "rigl", "density": 0.1, "distribution": "erk", "seed": seed,
                       "epochs": epochs, "length": length, "structure": structure}}


def test_seconds_per_epoch_are_the_wall_time_over_the_trained_epochs():
    assert epoch_seconds(summary(0, 20.0)) == 2.0
    assert epoch_seconds(summary(0, 20.0, epochs=5, length=2.0)) == 2.0
    assert epoch_seconds({"config": {"epochs": 10}}) is None
    runs = [{"folder": f"r{i}", "summary": summary(i % 2, wall, structure)}
            for i, (wall, structure) in enumerate([(10.0, "unstructured"), (30.0, "unstructured"),
                                                   (5.0, "block:4x4"), (7.0, "block:4x4")])]
    rows = {r["variant"]: r["epoch_seconds"] for r in summarise(runs)}
    assert rows == {"": 2.0, "structure block:4x4": 0.6}
