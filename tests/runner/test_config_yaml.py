"""The one safe YAML loader of every file and value the command line reads: no aliases (a
600-byte "billion laughs" expands to 10**9 items), no Python objects, bounded size and depth,
and every failure a ``ConfigError`` that names where the YAML came from."""

import time

import pytest

from sparsetrain.runner.config import ConfigError, load_yaml, parse_yaml, read_yaml_file
from sparsetrain.runner.sweep import load_sweep_file

BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n"
    for i in range(8))


def test_alias_bomb_is_refused_within_a_second(tmp_path):
    assert len(BOMB) < 700
    path = tmp_path / "bomb.yaml"
    path.write_text("method_options:\n" + "".join("  " + line + "\n"
                                                  for line in BOMB.splitlines()))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{path}.*alias"):
        load_yaml(path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base:\n" + "".join("  " + line + "\n" for line in BOMB.splitlines()))
    with pytest.raises(ConfigError, match=f"sweep file {sweep}.*alias"):
        load_sweep_file(sweep)
    with pytest.raises(ConfigError, match="--method-option x.*alias"):
        parse_yaml("{" + BOMB.strip().replace("\n", ", ") + "}", "--method-option x")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text, match", [
    ("a: &x 1\nb: *x\n", "alias"),
    ("<<: *x\n", "alias"),
    ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("[" * 5000 + "]" * 5000, "nested"),
    ("a: 1" + "1" * 5000 + "\n", "not valid YAML"),
    ("a: [1\n", "not valid YAML"),
])
def test_refused_yaml(text, match):
    with pytest.raises(ConfigError, match=f"the text.*{match}"):
        parse_yaml(text, "the text")


def test_plain_yaml_is_read():
    assert parse_yaml("{a: 1, b: [x, 2.5], c: null, d: .inf}", "v") == {
        "a": 1, "b": ["x", 2.5], "c": None, "d": float("inf")}
    assert parse_yaml("", "v") is None
    # numbers as YAML 1.2 reads them (PyYAML alone gives the string '1e10')
    assert parse_yaml("[1e10, 1e-3, -2E5, 1_000, abc1e3]", "v") == [1e10, 1e-3, -2e5, 1000,
                                                                      "abc1e3"]


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot read sweep file {tmp_path}"):
        read_yaml_file(tmp_path, "sweep file")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=f"config file {big} is larger than 1 MiB"):
        read_yaml_file(big, "config file")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"a: caf\xe9\n")
    with pytest.raises(ConfigError, match=f"sweep file {latin} is not UTF-8 text"):
        load_sweep_file(latin)


@pytest.mark.parametrize("text", ["base: [1, 2]\ngrid: {seed: [0]}\n",
                                  "base: {model: m}\ngrid: [seed]\n", "[1]\n"])
def test_sweep_file_shape(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"sweep file {path}"):
        load_sweep_file(path)


def test_saved_settings_are_read_back_without_aliases(tmp_path):
    from sparsetrain.runner import folder
    from sparsetrain.runner.config import make_config

    shared = [1, 2]
    config = make_config({"model": "lenet300", "data": "synthetic",
                          "method_options": {"a": shared, "b": shared}})
    folder.save_config(tmp_path, config)  # what a run writes
    path = tmp_path / "config.yaml"
    assert "*id" not in path.read_text()
    assert make_config(load_yaml(path)) == config
