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


def test_accepted_edge_values():
    config = make_config(BASE, {"seed": 2**32 - 1, "width": 16, "lr_gamma": 1, "momentum": 0,
                                "device": "cuda:1", "lr_milestones": [0, 30],
                                "method_options": {"erk_power_scale": 0.5},
                                "data_options": {"n_train": 1000, "seed": 2**32 - 1,
                                                 "input_shape": [3, 32, 32], "noise": 0.5}})
    assert config.seed == 2**32 - 1 and config.device == "cuda:1"
    assert make_config(BASE, {"device": "cuda"}).device == "cuda"


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config file {path} is not UTF-8 text"):
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
    ({"momentum": -0.5}, r"momentum must be in \[0, 1\)"),
    ({"prune_iterations": 0}, "prune_iterations"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"clip_grad_norm": 0}, "clip_grad_norm must be > 0"),
    ({"clip_grad_norm": "big"}, "clip_grad_norm"),
    # issue 13: accepted before, and wrong or fatal later
    ({"lr_gamma": -1}, r"lr_gamma must be in \(0, 1\]"),
    ({"lr_gamma": 2}, r"lr_gamma must be in \(0, 1\]"),
    ({"lr": float("inf")}, "lr must be a finite number > 0"),
    ({"lr": ".inf"}, "lr"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"lr": float("nan")}, "lr"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"warmup_epochs": float("inf")}, "warmup_epochs"),
    ({"lr_milestones": [0.5, float("nan")]}, "lr_milestones"),
    ({"lr_milestones": [-1]}, "lr_milestones"),
    ({"alpha": 1.5}, "alpha"),
    ({"distribution": "erdos"}, "distribution"),
    ({"drop_fraction_decay": "exp"}, "drop_fraction_decay"),
    ({"width": 1e6}, r"width must be in \(0, 16\]"),
    ({"width": float("inf")}, "width"),
    ({"width": 0}, "width"),
    ({"device": "cuda:abc"}, r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "cuda:"}, "device"),
    ({"device": "cpu:0"}, "device"),
    ({"seed": 2**70}, r"seed must be a whole number in \[0, 4294967295\]"),
    ({"seed": -1}, "seed"),
    ({"epochs": 2**70}, "epochs"),
    ({"batch_size": 1e20}, "batch_size"),
    ({"epochs": 1e400}, "epochs"),
    ({"lr": 10**400}, "lr"),
    ({"epochs": None}, "epochs"),
    ({"device": None}, "device"),
    ({"method": ["rigl"]}, "method"),
    ({"dense_layers": {"a": 1}}, "dense_layers"),
    ({"out": "runs/a\0b"}, "out"),
    ({"method_options": {"erk_power_scale": float("nan")}}, "erk_power_scale"),
    ({"method_options": {"erk_power_scale": float("inf")}}, "erk_power_scale"),
    ({"method_options": {1: 2}}, "method_options"),
    ({"data_options": {"n_train": 10**10}}, "n_train"),
    ({"data_options": {"n_train": 1e10}}, "n_train"),
    ({"data_options": {"input_shape": [1, 10**9]}}, "input_shape"),
    ({"data_options": {"noise": float("nan")}}, "noise"),
    ({"data_options": {"seed": 2**70}}, "seed"),
    ({"data_options": {"n_train": {"a": 1}}}, "n_train"),
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
