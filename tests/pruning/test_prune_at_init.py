"""prune_at_init: exact counts, global vs layer scope, iterative rounds, errors."""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
import sparsetrain.pruning.prune as prune_module
from tests.conftest import batches, tiny_cnn, train_step

METHODS = list(st.PRUNING_METHODS)
WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def total(masks):
    return sum(int(m.sum()) for m in masks.values())


@pytest.mark.filterwarnings("ignore:keeping the")
@pytest.mark.parametrize("density", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("method", METHODS)
def test_global_scope_keeps_exactly_the_best_scores(model, method, density):
    masks = st.prune_at_init(model, method, density, data=batches(2))
    n = sum(p.numel() for name, p in model.named_parameters() if name in WEIGHTS)
    assert sorted(masks) == WEIGHTS
    assert total(masks) == max(len(WEIGHTS), round(density * n))
    assert all(m.dtype == torch.bool and bool(m.any()) for m in masks.values())
    if method != "random":  # the kept scores are the largest ones, over all layers at once
        scores = st.pruning_scores(model, method, batches(2))
        kept = torch.cat([scores[n_][masks[n_]].double() for n_ in WEIGHTS])
        dropped = torch.cat([scores[n_][~masks[n_]].double() for n_ in WEIGHTS])
        if not any(int(m.sum()) == 1 for m in masks.values()):  # no collapse rescue involved
            assert kept.min() >= dropped.max()


def test_grasp_removes_the_largest_paper_score(model):
    masks = st.prune_at_init(model, "grasp", 0.2, data=batches(2), samples_per_class=None)
    keep = st.pruning_scores(model, "grasp", batches(2), samples_per_class=None)
    params = dict(model.named_parameters())
    hg = {n: keep[n] / params[n].detach() for n in WEIGHTS}  # keep-score = W * Hg
    paper = {n: -params[n].detach() * hg[n] for n in WEIGHTS}
    removed = torch.cat([paper[n][~masks[n]] for n in WEIGHTS])
    kept = torch.cat([paper[n][masks[n]] for n in WEIGHTS])
    assert removed.min() >= kept.max() - 1e-6 * kept.abs().max()


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("method", METHODS)
def test_layer_scope_follows_the_distribution(model, method, distribution):
    masks = st.prune_at_init(model, method, 0.1, data=batches(2), scope="layer",
                             distribution=distribution)
    densities = st.layer_densities(model, 0.1, distribution)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert int(mask.sum()) == round(densities[name] * params[name].numel())
        if method == "magnitude":
            w = params[name].detach().abs()
            assert w[mask].min() >= w[~mask].max()


def test_layer_scope_defaults_to_uniform(model):
    masks = st.prune_at_init(model, "magnitude", 0.25, scope="layer")
    params = dict(model.named_parameters())
    assert all(int(m.sum()) == round(0.25 * params[n].numel()) for n, m in masks.items())


def test_dense_layers_are_left_out(model):
    masks = st.prune_at_init(model, "snip", 0.1, data=batches(1), dense_layers=["fc2"])
    assert sorted(masks) == ["conv1.weight", "conv2.weight", "fc1.weight"]
    n = sum(p.numel() for name, p in model.named_parameters() if name in masks)
    assert total(masks) == round(0.1 * n)


@pytest.mark.filterwarnings("ignore:keeping the")
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_iterative_rounds_rescore_the_surviving_network(model, scope, monkeypatch):
    seen = []
    real = prune_module.pruning_scores

    def spy(*args, masks=None, **kwargs):
        seen.append(None if masks is None else {n: m.clone() for n, m in masks.items()})
        return real(*args, masks=masks, **kwargs)

    monkeypatch.setattr(prune_module, "pruning_scores", spy)
    density, rounds = 0.05, 4
    final = st.prune_at_init(model, "synflow", density, input_shape=(2, 8, 8), iterations=rounds,
                             scope=scope)
    assert len(seen) == rounds and seen[0] is None
    rounds_masks = seen[1:] + [final]
    params = dict(model.named_parameters())
    n = sum(params[w].numel() for w in WEIGHTS)
    for e, masks in enumerate(rounds_masks, start=1):
        d = density ** (e / rounds)
        if scope == "global":
            assert total(masks) == round(d * n)
        else:
            assert all(int(m.sum()) == round(d * params[k].numel()) for k, m in masks.items())
    for earlier, later in zip(rounds_masks, rounds_masks[1:]):  # pruned weights stay pruned
        assert all(not bool((later[k] & ~earlier[k]).any()) for k in WEIGHTS)
    one_shot = st.prune_at_init(model, "synflow", density, input_shape=(2, 8, 8), scope=scope)
    assert any(not torch.equal(one_shot[k], final[k]) for k in WEIGHTS)


def test_iterative_magnitude_equals_one_shot(model):
    one = st.prune_at_init(model, "magnitude", 0.1)
    many = st.prune_at_init(model, "magnitude", 0.1, iterations=5)
    assert all(torch.equal(one[k], many[k]) for k in WEIGHTS)


def test_data_generator_is_read_once_for_all_rounds(model):
    data = (b for b in batches(2))
    masks = st.prune_at_init(model, "snip", 0.1, data=data, iterations=3)
    assert total(masks) > 0


def test_layer_collapse_keeps_one_weight_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    with pytest.warns(RuntimeWarning, match="would leave no weight"):
        masks = st.prune_at_init(model, "magnitude", 0.05)
    assert total(masks) == round(0.05 * 440)
    assert int(masks["2.weight"].sum()) == 1
    w = model[2].weight.detach().abs()
    assert bool(masks["2.weight"][w == w.max()].all())


def test_seeded_ties(model):
    a = st.prune_at_init(model, "random", 0.1, seed=1)
    b = st.prune_at_init(model, "random", 0.1, seed=1)
    c = st.prune_at_init(model, "random", 0.1, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in WEIGHTS)
    assert any(not torch.equal(a[k], c[k]) for k in WEIGHTS)


def test_masks_train_with_static(model):
    masks = st.prune_at_init(model, "grasp", 0.1, data=batches(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.Static(model, opt, density=0.1, total_steps=5, masks=masks)
    for x, y in batches(5):
        train_step(model, opt, sp, x, y)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(sp.masks[name], mask)
        assert torch.count_nonzero(params[name][~mask]) == 0


def test_model_is_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    st.prune_at_init(model, "grasp", 0.1, data=batches(2), iterations=2)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, -0.1, 1.5, math.nan])
def test_bad_density(model, density):
    with pytest.raises(ValueError, match="density"):
        st.prune_at_init(model, "magnitude", density)


@pytest.mark.parametrize("kwargs, match", [
    ({"scope": "network"}, "scope"),
    ({"iterations": 0}, "iterations"),
    ({"iterations": 1.5}, "iterations"),
    ({"distribution": "erk"}, "distribution applies to scope='layer'"),
    ({"scope": "layer", "distribution": "gaussian"}, "distribution"),
    ({"dense_layers": ["nope"]}, "dense_layers"),
    ({"seed": "x"}, "seed"),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        st.prune_at_init(model, "magnitude", 0.1, **kwargs)


def test_unknown_method(model):
    with pytest.raises(ValueError, match="unknown pruning method"):
        st.prune_at_init(model, "lottery", 0.1)


def test_grasp_without_data(model):
    with pytest.raises(ValueError, match="needs data"):
        st.prune_at_init(model, "grasp", 0.1)


def test_empty_data(model):
    with pytest.raises(ValueError, match="yielded no batch"):
        st.prune_at_init(model, "snip", 0.1, data=iter([]))


def test_not_a_model():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        st.prune_at_init(tiny_cnn().state_dict(), "magnitude", 0.1)


def test_rescue_of_one_layer_never_empties_another():
    """Top-3 by magnitude is (10, 9) of layer 0 and 5 of layer 1, leaving layer 2 empty; its
    rescue must not push out layer 1's only weight."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[10.0, 9.0], [0.1, 0.1]]))
        model[2].weight.copy_(torch.tensor([[5.0, 0.01], [0.01, 0.01]]))
        model[4].weight.copy_(torch.tensor([[1e-6, 2e-6], [1e-6, 1e-6]]))
    with pytest.warns(RuntimeWarning, match="would leave no weight in \\['4.weight'\\]"):
        masks = st.prune_at_init(model, "magnitude", 3 / 12)
    assert [int(m.sum()) for m in masks.values()] == [1, 1, 1]
    assert bool(masks["0.weight"][0, 0]) and bool(masks["2.weight"][0, 0])
    assert bool(masks["4.weight"][0, 1])
