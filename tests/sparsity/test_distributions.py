import math

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.sparsity.distributions import densities_for_shapes
from sparsetrain.sparsity.masks import active_count

SHAPES = {
    "conv1": (16, 3, 3, 3),
    "conv2": (32, 16, 3, 3),
    "conv3": (64, 32, 3, 3),
    "fc1": (256, 1024),
    "fc2": (10, 256),
}


def total(shapes):
    return sum(math.prod(s) for s in shapes.values())


def nonzeros(shapes, densities):
    return sum(active_count(math.prod(s), densities[n]) for n, s in shapes.items())


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.8, 0.95, 1.0])
def test_budget_is_met_and_densities_are_valid(distribution, density):
    d = densities_for_shapes(SHAPES, density, distribution)
    assert set(d) == set(SHAPES)
    assert all(0 < v <= 1 for v in d.values())
    expected = round(density * total(SHAPES))
    assert abs(nonzeros(SHAPES, d) - expected) <= len(SHAPES)
    if distribution == "uniform":
        assert all(v == density for v in d.values())


def erk_reference(shapes, density):
    """ERK written out directly: solve, densify the largest raw density, repeat."""
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense = set()
    while True:
        budget = density * total(shapes) - sum(math.prod(shapes[n]) for n in dense)
        eps = budget / sum(raw[n] * math.prod(shapes[n]) for n in shapes if n not in dense)
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1]
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        top = max(raw[n] for n in over)
        dense |= {n for n in shapes if raw[n] == top}


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_erk_against_reference_and_er_ignores_kernels(density):
    assert densities_for_shapes(SHAPES, density, "erk") == pytest.approx(
        erk_reference(SHAPES, density)
    )
    er = densities_for_shapes(SHAPES, 0.1, "er")
    # ER for a conv layer uses only its channel counts: (n_in + n_out) / (n_in * n_out)
    ratio = er["conv2"] / er["fc1"]
    assert ratio == pytest.approx(((16 + 32) / (16 * 32)) / ((1024 + 256) / (1024 * 256)))


def test_erk_makes_small_layers_dense_at_high_density():
    d = densities_for_shapes(SHAPES, 0.5, "erk")
    assert d["conv1"] == 1.0 and d["fc2"] == 1.0
    assert d["fc1"] < 0.5


def test_erk_power_scale_zero_is_uniform():
    d = densities_for_shapes(SHAPES, 0.2, "erk", erk_power_scale=0.0)
    assert all(v == pytest.approx(0.2) for v in d.values())


def test_custom_map():
    custom = {n: 0.5 for n in SHAPES}
    assert densities_for_shapes(SHAPES, 0.5, custom) == custom
    with pytest.raises(ValueError, match="missing names"):
        densities_for_shapes(SHAPES, 0.5, {"conv1": 0.5})
    with pytest.raises(ValueError, match=r"distribution\['conv1'\]"):
        densities_for_shapes(SHAPES, 0.5, {**custom, "conv1": 1.5})


def test_layer_densities_on_a_model(model):
    d = st.layer_densities(model, 0.1, "erk", dense_layers=["conv1"])
    assert list(d) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert d["conv1.weight"] == 1.0
    sparse = {n: p.numel() for n, p in model.named_parameters() if n in d and n != "conv1.weight"}
    kept = sum(d[n] * k for n, k in sparse.items())
    assert kept == pytest.approx(0.1 * sum(sparse.values()))


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), "a lot", None])
def test_bad_density(bad, model):
    with pytest.raises(ValueError, match="density must be"):
        st.layer_densities(model, bad)


def test_unknown_distribution(model):
    with pytest.raises(ValueError, match="distribution must be one of 'uniform', 'er', 'erk'"):
        st.layer_densities(model, 0.1, "erdos")


def test_lstm_and_embedding_model():
    model = nn.ModuleDict({"emb": nn.Embedding(100, 16), "rnn": nn.LSTM(16, 32)})
    d = st.layer_densities(model, 0.2, "erk")
    counts = {n: p.numel() for n, p in model.named_parameters() if n in d}
    assert sum(d[n] * counts[n] for n in d) == pytest.approx(0.2 * sum(counts.values()))
    assert torch.tensor(list(d.values())).le(1).all()


@pytest.mark.parametrize("power", [float("nan"), float("inf"), -float("inf"), -0.5, 1.5, 1e6,
                                   "1", None, True])
def test_bad_erk_power_scale_is_refused_before_the_loop(power, model, monkeypatch):
    from sparsetrain.sparsity import distributions

    def loop(*args):  # NaN made this loop forever, inf divided by zero
        raise AssertionError("the ERK loop ran with an unchecked erk_power_scale")

    monkeypatch.setattr(distributions, "_scaled_densities", loop)
    with pytest.raises(ValueError, match=r"erk_power_scale must be (a finite number )?in \[0, 1\]"):
        densities_for_shapes(SHAPES, 0.1, "erk", erk_power_scale=power)
    with pytest.raises(ValueError, match="erk_power_scale"):
        st.layer_densities(model, 0.1, "erk", erk_power_scale=power)
    if not isinstance(power, float):
        return  # the sparsifiers take float(erk_power_scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="erk_power_scale"):
        st.RigL(model, optimizer, density=0.1, total_steps=10, erk_power_scale=power)


def test_erk_power_scale_between_zero_and_one_interpolates():
    half = densities_for_shapes(SHAPES, 0.2, "erk", erk_power_scale=0.5)
    full = densities_for_shapes(SHAPES, 0.2, "erk")
    assert full["fc1"] < half["fc1"] < 0.2
