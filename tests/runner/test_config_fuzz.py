"""Property: any value of any setting gives a checked ``TrainConfig`` or one ``ConfigError``,
never another exception (issue 13)."""

import dataclasses
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sparsetrain.runner.config import ConfigError, TrainConfig, make_config, parse_yaml

BASE = {"model": "lenet300", "data": "synthetic"}
KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-2**80, max_value=2**80),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
    st.text(max_size=20),
    st.sampled_from(["", "0", "1", "1e3", "nan", "inf", ".inf", "true", "cuda:0", "cpu",
                     "rigl", "erk", "step", "a,b", "1,2", "[1, 2]"]),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                                            inner, max_size=4)),
    max_leaves=10)


def assert_config_or_config_error(*layers):
    try:
        config = make_config(*layers)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    assert isinstance(config, TrainConfig)
    config.run_name()  # every accepted config names its run folder
    return config


@pytest.mark.fuzz
@given(settings=st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
@example(settings={"method": None})  # failures found before issue 13, always tried
@example(settings={"device": None})
@example(settings={"lr": 10**400})
@example(settings={"seed": 2**70, "width": math.inf})
@example(settings={"method_options": {"erk_power_scale": math.nan}})
def test_any_values_give_a_config_or_a_config_error(settings):
    assert_config_or_config_error(BASE, settings)


@pytest.mark.fuzz
@given(key=st.sampled_from(KEYS), text=st.text(max_size=30))
@example(key="data_options", text="\x1f")
@example(key="method_options", text="{a: &x [1], b: *x}")
def test_any_option_text_gives_a_config_or_a_config_error(key, text):
    # the command line gives strings; --method-option/--data-option values are YAML
    if key in ("method_options", "data_options"):
        try:
            value = {"k": parse_yaml(text, "--option")}
        except ConfigError:
            return
    else:
        value = text
    assert_config_or_config_error(BASE, {key: value})


@pytest.mark.fuzz
@given(text=st.text(max_size=60))
def test_any_yaml_text_parses_or_gives_a_config_error(text):
    try:
        parse_yaml(text, "the text")
    except ConfigError as exc:
        assert "the text" in str(exc)
