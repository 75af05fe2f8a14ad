"""Settings: defaults, YAML files, overrides, checks and derived run names."""

import pytest

from sparsetrain.runner.config import ConfigError, TrainConfig, load_yaml, make_config

BASE = {"model": "lenet300", "data": "synthetic"}


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: lenet5\ndata: fashion-mnist\nbatch-size: 64\nlr: 0.05\n"
                    "dense_layers: [conv1]\n")
    config = make_config(load_yaml(path), {"lr": "0.2", "epochs": "3"})
    assert (config.model, config.batch_size, config.lr, config.epochs) == ("lenet5", 64, 0.2, 3)
    assert config.dense_layers == ["conv1"]
    assert config.method == TrainConfig().method


def test_unknown_key_names_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: lenet5\nepoch: 3\n")
    with pytest.raises(ConfigError, match="'epoch'.*did you mean 'epochs'"):
        load_yaml(path)
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="'learning_rate'.*the settings are: .*lr,"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="'desnity'.*did you mean 'density'"):
        make_config(BASE, {"desnity": 0.1})


@pytest.mark.parametrize("text, match", [
    ("- a\n- b\n", "mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, match", [
    ({"density": 0}, "density"),
    ({"density": 1.5}, "density"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"batch_size": "many"}, "batch_size"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"lr_schedule": "exp"}, "lr_schedule"),
    ({"nesterov": "maybe"}, "nesterov"),
    ({"t_end": 1.5}, "t_end"),
    ({"device": "tpu"}, "device"),
    ({"model": None}, "model"),
    ({"lr_step_epochs": 0}, "lr_step_epochs must be a positive integer"),
    ({"momentum": -0.5}, "momentum must be >= 0"),
    ({"prune_iterations": 0}, "prune_iterations"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        make_config(BASE, override)


def test_run_name_lists_the_non_default_settings():
    config = make_config(BASE, {"method": "set", "density": 0.05, "epochs": 3, "device": "cpu"})
    name = config.run_name()
    assert name.startswith("lenet300_synthetic_set")
    assert "density0.05" in name and "epochs3" in name and "device" not in name
    assert make_config(BASE).run_name() == "lenet300_synthetic_rigl_density0.1"


def test_shipped_configs_are_valid():
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        make_config(load_yaml(path))
