"""Bad input gets a clear ValueError naming the argument and what is allowed."""

import pytest
import torch
from torch import nn

import sparsetrain as st


def make(model=None, **kwargs):
    model = model if model is not None else nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = {"density": 0.5, "total_steps": 10, **kwargs}
    return st.RigL(model, opt, **args)


@pytest.mark.parametrize("density", [0, 1.5, -1, float("nan"), "half"])
def test_density(density):
    with pytest.raises(ValueError, match=r"density must be .*\(0, 1\]"):
        make(density=density)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distribution": "gaussian"}, "distribution must be one of"),
        ({"total_steps": 0}, "total_steps must be a positive integer"),
        ({"total_steps": 10.5}, "total_steps must be a positive integer"),
        ({"delta_t": -1}, "delta_t must be a positive integer"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\] \(the initial drop fraction\)"),
        ({"drop_fraction_decay": "step"}, "drop_fraction_decay must be one of"),
        ({"t_start": -3}, "t_start must be a non-negative integer"),
        ({"backend": "csr-gpu"}, "backend must be one of 'masked'"),
        ({"dense_layers": ["encoder.*"]}, "'encoder.*' matches none"),
        ({"dense_layers": ["*"]}, "nothing is left to sparsify"),
        ({"masks": {"0.weight": torch.ones(8, 4, dtype=torch.bool)}}, "missing names"),
        ({"masks": {"0.weight": torch.ones(4, 8), "1.weight": torch.ones(2, 8)}}, "has shape"),
        ({"masks": {"0.weight": torch.full((8, 4), 2.0), "1.weight": torch.ones(2, 8)}},
         "only 0 and 1"),
        ({"masks": {"0.weight": torch.zeros(8, 4), "1.weight": torch.ones(2, 8)}},
         "no active weight"),
        ({"seed": "zero"}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


SHARED_ARGUMENTS = [
    ({"density": 0}, r"density must be .*\(0, 1\]"),
    ({"total_steps": 0}, "total_steps must be a positive integer"),
    ({"distribution": "gaussian"}, "distribution must be one of"),
    ({"dense_layers": ["encoder.*"]}, "'encoder.*' matches none"),
    ({"dense_layers": ["*"]}, "nothing is left to sparsify"),
    ({"seed": "zero"}, "seed must be an integer"),
    ({"backend": "csr-gpu"}, "backend must be one of 'masked'"),
]


@pytest.mark.parametrize("kwargs, message", SHARED_ARGUMENTS)
@pytest.mark.parametrize("method", st.available_methods())
def test_every_method_checks_the_shared_arguments(method, kwargs, message):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        st.make_sparsifier(method, model, opt, **{"density": 0.5, "total_steps": 10, **kwargs})


@pytest.mark.parametrize("method", st.available_methods())
def test_every_method_checks_the_optimizer(method):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        st.make_sparsifier(method, model, object(), density=0.5, total_steps=10)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not update the sparsified weights \['0.weight'\]"):
        st.make_sparsifier(method, model, opt, density=0.5, total_steps=10)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'rig'; the registered methods are: "):
        st.get_method("rig")
    assert st.get_method("RigL") is st.RigL


def test_model_with_nothing_to_sparsify():
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(ValueError, match="no weight that sparsetrain can sparsify"):
        make(model)


def test_optimizer_must_hold_the_weights():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not update the sparsified weights \['0.weight'\]"):
        st.SET(model, opt, density=0.5, total_steps=10)
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        st.SET(model, object(), density=0.5, total_steps=10)
