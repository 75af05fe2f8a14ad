"""Which weights a sparsifier covers: declared module types, position embeddings, the summary
of what stays dense and why, and the warning when much of a model is left dense unexpectedly."""

import logging

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.sparsity.coverage import UNEXPECTED_DENSE_LIMIT
from sparsetrain.sparsity.targets import find_targets, partition, weight_layout


class InOut(nn.Module):
    """A projection storing its weight as in x out (like transformers' Conv1D)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Tiny(nn.Module):
    def __init__(self, big_custom=64):
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.wpe = nn.Embedding(6, 8)
        self.proj = InOut(8, big_custom)
        self.head = nn.Linear(big_custom, 16)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        return self.head(torch.relu(self.proj(x)))


@pytest.fixture
def declared():
    from sparsetrain.sparsity import targets

    st.register_weight_layout(InOut, ("weight",), in_dim=0)
    yield
    targets._LAYOUTS.pop(targets._type_key(InOut))


def test_unknown_module_types_are_left_dense_loudly():
    model = Tiny(big_custom=256)  # the custom projection holds most of the weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"stay dense because .* \(InOut\).*register_weight"):
        sp = st.RigL(model, opt, density=0.1, total_steps=10)
    assert "proj.weight" not in sp.names
    assert sp.coverage.dense["proj.weight"][1] == "unsupported module InOut"
    assert sp.coverage.unexpected > UNEXPECTED_DENSE_LIMIT * sp.coverage.total
    assert "proj.weight (2.05k, unsupported module InOut)" in sp.summary()


def test_declared_module_types_are_sparsified(declared):
    model = Tiny()
    assert weight_layout(model.proj).in_dim == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.25, total_steps=20, delta_t=2, distribution="uniform")
    assert "proj.weight" in sp.names
    assert sp.active_counts()["proj.weight"] == 128
    idx = torch.randint(0, 16, (4, 6))
    for _ in range(4):
        opt.zero_grad()
        model(idx).square().mean().backward()
        sp.step()
    assert torch.count_nonzero(model.proj.weight) <= 128
    assert int(sp.masks["proj.weight"].sum()) == 128


def test_position_embeddings_stay_dense_unless_asked(declared):
    model = Tiny()
    sparse, dense = partition(model)
    assert [t.name for t in dense] == ["wpe.weight"]
    assert "wpe.weight" in {t.name for t in find_targets(model)}  # sparsifiable all the same
    sparse, dense = partition(model, sparsify_embeddings=True)
    assert "wpe.weight" in {t.name for t in sparse} and not dense
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.SET(model, opt, density=0.5, total_steps=10)
    assert sp.layer_densities()["wpe.weight"] == 1.0
    assert sp.coverage.dense == {"wpe.weight": (48, "position embedding")}
    assert sp.config()["sparsify_embeddings"] is False
    model = Tiny()
    sp = st.SET(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5, total_steps=10,
                sparsify_embeddings=True)
    assert "wpe.weight" in sp.names


def test_summary_names_what_stays_dense_and_ties(declared, caplog):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="sparsetrain"):
        sp = st.Static(model, opt, density=0.1, total_steps=10, dense_layers=["head"])
    line = sp.summary()
    assert line in caplog.text and "\n" not in line
    assert "Static (masked backend) sparsifies" in line
    assert "head.weight (1.02k, dense_layers)" in line and "wpe.weight (48, position" in line
    cover = sp.coverage
    assert cover.sparsified == sum(sp.numel(n) for n in sp.names)
    assert cover.total == sum(p.numel() for p in model.parameters())
    assert 0 < cover.fraction < 1


def test_tied_weights_are_reported_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(16, 8)
            self.lm_head = nn.Linear(8, 16, bias=False)
            self.lm_head.weight = self.wte.weight

    model = Tied()
    sp = st.Static(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5,
                   total_steps=10)
    assert sp.names == ["wte.weight"]
    assert sp.coverage.tied == {"wte.weight": ["lm_head.weight"]}
    assert sp.coverage.total == 128
    assert "tied: wte.weight = lm_head.weight" in sp.summary()
