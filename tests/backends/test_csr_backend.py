"""backend="csr" on the sparsifiers: conversion, compact topology updates against dense
references, conversion both ways, state and bad input. (The invariants and the equivalence with
the masked backend are tested for every backend in tests/methods/test_invariants.py and
tests/backends/test_equivalence.py.)"""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
import sparsetrain.backends.csr_backend as csr_backend
import sparsetrain.kernels as kernels_module
from sparsetrain.backends import CSRLinear, to_csr, to_masked
from sparsetrain.sparsity.permutation import DROP, GROW
from tests.backends.conftest import quiet
from tests.conftest import OPTIMIZERS, batches, tiny_cnn, train_step


def mlp(dtype=torch.float64, widths=(20, 32, 24, 5)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def mlp_batches(n, dtype=torch.float64, batch=16, seed=0):
    """Inputs with labels from a fixed linear teacher, so that there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(20, 5, generator=torch.Generator().manual_seed(99), dtype=dtype)
    xs = [torch.randn(batch, 20, generator=g, dtype=dtype) for _ in range(n)]
    return [(x, (x @ teacher).argmax(1)) for x in xs]


def exact_masks(model, density):
    """Random masks with exactly ``round(density * numel)`` ones per weight."""
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[torch.randperm(p.numel())[:round(density * p.numel())]] = True
            masks[name] = mask.view(p.shape)
    return masks


def state_tensors(optimizer, param):
    return [v for v in optimizer.state.get(param, {}).values()
            if torch.is_tensor(v) and v.shape == param.shape]


def test_linear_layers_are_converted_in_place_and_the_optimizer_follows():
    torch.manual_seed(0)
    model = tiny_cnn()
    bias = model.fc1.bias
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.RigL(model, opt, density=0.2, total_steps=10, backend="csr")
    assert isinstance(model.fc1, CSRLinear) and isinstance(model.fc2, CSRLinear)
    assert isinstance(model.conv1, nn.Conv2d)  # convolutions stay masked
    assert model.fc1.bias is bias  # the same parameter: the optimizer keeps it
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.fc1.values) in in_opt and id(model.fc2.values) in in_opt
    assert {id(p) for p in model.parameters()} == in_opt
    assert set(sp.backend.layers) == {"fc1.weight", "fc2.weight"}
    budget = {n: round(d * sp.numel(n))
              for n, d in st.layer_densities(tiny_cnn(), 0.2, "erk").items()}
    assert sp.active_counts() == budget
    assert set(sp.masks) == set(budget)
    assert sp.masks["fc1.weight"].shape == (32, 128)


def _train(model, opt, sp, data):
    losses, masks = [], []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sp.step()
        losses.append(loss.item())
        if sp.is_update_step(sp.step_count):
            masks.append({n: sp.masks[n].clone() for n in sp.names})
    return losses, masks


def reference_update(sp, name, weight, mask, dense_grad, t):
    """The RigL update by a full sort: keep the largest (|W|, -drop rank) among the active,
    grow the largest (|grad|, -grow rank) among the rest."""
    flat_mask, n_active = mask.reshape(-1), int(mask.sum())
    n_drop = math.floor(sp.drop_fraction(t) * n_active)
    active = flat_mask.nonzero().squeeze(1)
    drop_rank = sp.order(name, DROP, t).rank(active)
    magnitude = weight.reshape(-1)[active].abs()
    order = sorted(range(n_active), key=lambda i: (-float(magnitude[i]), int(drop_rank[i])))
    kept = active[torch.tensor(order[:n_active - n_drop])]
    free = torch.ones(mask.numel(), dtype=torch.bool)
    free[kept] = False
    candidates = free.nonzero().squeeze(1)
    grow_rank = sp.order(name, GROW, t).rank(candidates)
    score = dense_grad.reshape(-1)[candidates].abs()
    order = sorted(range(candidates.numel()), key=lambda i: (-float(score[i]), int(grow_rank[i])))
    grown = candidates[torch.tensor(order[:n_drop])]
    return torch.sort(torch.cat([kept, grown])).values


@pytest.mark.parametrize("zero_features", [0, 35])
def test_blockwise_gradient_grow_matches_a_full_sort(monkeypatch, zero_features):
    """The running top-k over blocks of rows equals a full sort of the dense gradient, with
    the ties (inputs that are zero in most features give many exactly-zero gradients) broken by
    the tie keys."""
    monkeypatch.setattr(csr_backend, "BLOCK_ELEMENTS", 3 * 40)  # blocks of 3 rows
    monkeypatch.setattr(csr_backend, "MIN_BLOCK_ELEMENTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 17, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.5, total_steps=10, delta_t=1, alpha=0.4, backend="csr")
    layer = model[0]
    before, weight = layer.mask(), layer.dense_weight()
    x = torch.randn(8, 40, dtype=torch.float64)
    x[:, :zero_features] = 0
    out = model(x)
    out.square().sum().backward()
    dense_grad = 2 * out.detach().t() @ x
    sp.step()
    expected = reference_update(sp, "0.weight", weight, before, dense_grad, 1)
    assert torch.equal(layer.positions(), expected)


def test_blocks_give_the_dense_gradient_grad_y_transposed_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.5, total_steps=10, delta_t=1, backend="csr")
    x = torch.randn(3, 6, dtype=torch.float64)
    reference = nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(model[0].dense_weight())
        reference.bias.copy_(model[0].bias)
    for _ in range(2):  # two backward passes (gradient accumulation) add up
        model(x).sin().sum().backward()
        reference(x).sin().sum().backward()
    blocks = list(sp.backend.blocks("0.weight"))
    gradient = torch.cat([b.gradient().clone() for b in blocks])
    torch.testing.assert_close(gradient, reference.weight.grad)
    weight = torch.cat([b.weight() for b in blocks])
    assert torch.equal(weight, model[0].dense_weight())


@pytest.mark.parametrize("optimizer_name", ["sgd-momentum-wd", "adam"])
def test_conversion_both_ways_keeps_weights_and_optimizer_state(optimizer_name):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    sp = st.Static(model, opt, density=0.3, total_steps=10)
    for x, y in batches(3):
        train_step(model, opt, sp, x, y)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: [s.clone() for s in state_tensors(opt, p)] for n, p in model.named_parameters()}
    layers = to_csr(model, masks, opt)
    assert set(layers) == {"fc1.weight", "fc2.weight"}
    for name, layer in layers.items():
        assert torch.equal(layer.dense_weight(), dense[name])
        for new, old in zip(state_tensors(opt, layer.values), state[name]):
            assert torch.equal(new, old[masks[name]])
    x, y = batches(1, seed=3)[0]
    out_csr = model(x)
    back = to_masked(model, opt)
    assert set(back) == {"fc1.weight", "fc2.weight"}
    assert all(torch.equal(back[n], masks[n]) for n in back)
    params = dict(model.named_parameters())
    for name in back:
        assert isinstance(params[name], nn.Parameter) and torch.equal(params[name], dense[name])
        for new, old in zip(state_tensors(opt, params[name]), state[name]):
            assert torch.equal(new, old)
    torch.testing.assert_close(model(x), out_csr)
    # the optimizer goes on with the converted parameters
    sp2 = st.Static(model, opt, density=0.3, total_steps=10, masks={**masks, **back})
    train_step(model, opt, sp2, x, y)


def test_state_dict_round_trip_and_across_backends(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = st.RigL(model, opt, density=0.3, total_steps=40, delta_t=5, backend="csr")
    _train(model, opt, sp, mlp_batches(12))
    torch.save({"sparsifier": sp.state_dict(), "model": model.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(saved["sparsifier"]["positions"]) == {"0.weight", "2.weight", "4.weight"}
    masks = {n: sp.masks[n].clone() for n in sp.names}

    fresh = mlp()
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05)
    sp2 = st.RigL(fresh, opt2, density=0.3, total_steps=40, delta_t=5, backend="csr", seed=1)
    with pytest.warns(UserWarning, match=r"other settings for \['seed'\]"):
        sp2.load_state_dict(saved["sparsifier"])
    fresh.load_state_dict(saved["model"])
    assert sp2.step_count == 12
    assert all(torch.equal(sp2.masks[n], masks[n]) for n in masks)
    x, y = mlp_batches(1, seed=5)[0]
    torch.testing.assert_close(fresh(x), model(x))

    masked = mlp()
    opt3 = torch.optim.SGD(masked.parameters(), lr=0.05)
    sp3 = st.RigL(masked, opt3, density=0.3, total_steps=40, delta_t=5, seed=1)
    with pytest.warns(UserWarning, match="other settings"):
        sp3.load_state_dict(saved["sparsifier"])  # CSR positions -> masks
    assert all(torch.equal(sp3.masks[n], masks[n]) for n in masks)
    with pytest.warns(UserWarning, match=r"other settings for \['backend'\]"):
        sp2.load_state_dict(sp3.state_dict())  # masks -> CSR positions
    assert all(torch.equal(sp2.masks[n], masks[n]) for n in masks)


def test_meta_device_layers_are_materialised_with_only_their_active_weights():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3000, 2000), nn.ReLU(), nn.Linear(2000, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.RigL(model, opt, density=0.01, distribution="uniform", total_steps=10,
                 delta_t=2, backend="csr")
    assert not any(p.is_meta for p in model.parameters())
    assert model[0].nnz == round(0.01 * 3000 * 2000) and model[2].nnz == round(0.01 * 20000)
    bound = 1 / math.sqrt(3000)
    assert model[0].values.abs().max() <= bound and model[0].values.std() > bound / 3
    x, y = torch.randn(4, 3000), torch.randint(0, 10, (4,))
    for _ in range(3):
        train_step(model, opt, sp, x, y)
    assert model[0].nnz == round(0.01 * 3000 * 2000)


def test_bad_input():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refused = [m for m in st.available_methods() if (m, "csr") not in st.supported_pairs()]
    assert refused
    for method in refused:
        with pytest.raises(ValueError, match="not available on backend='csr'"):
            st.make_sparsifier(method, model, opt, density=0.1, total_steps=10, backend="csr")
    with pytest.raises(ValueError, match="backend must be one of"):
        st.RigL(model, opt, density=0.1, total_steps=10, backend="sparse")
    convs = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    opt = torch.optim.SGD(convs.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"none of the sparsified weights is one \(0.weight, "
                      r"1.weight: in a Conv2d module, not a plain nn.Linear\)"):
        st.Static(convs, opt, density=0.5, total_steps=10, backend="csr")
    tied = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight
    opt = torch.optim.SGD(tied.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"0.weight: tied \(also the weight of 1\)"):
        st.Static(tied, opt, density=0.5, total_steps=10, backend="csr")
    wide = nn.Sequential(nn.Linear(4, 50))
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="have no active weight"):
        st.Static(wide, opt, density=0.1, total_steps=10, backend="csr")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    opt = torch.optim.SGD(meta.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="meta device"):
        st.Static(meta, opt, density=0.5, total_steps=10, backend="csr")


def test_nan_gradients_skip_the_update_with_a_warning():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = st.RigL(model, opt, density=0.3, total_steps=40, delta_t=1, backend="csr")
    before = {n: sp.masks[n].clone() for n in sp.names}
    x, y = mlp_batches(1)[0]
    x[0, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        sp.step()
    assert all(torch.equal(sp.masks[n], before[n]) for n in before)




@pytest.mark.parametrize("meta", [False, True])
def test_other_weight_dtypes_are_refused_at_construction(meta):
    with torch.device("meta" if meta else "cpu"):
        model = mlp(dtype=torch.complex64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match=r"float32, float64, bfloat16 and float16 Linear weights, "
                                         r"not 0.weight \(torch.complex64\).*backend='masked'"):
        st.RigL(model, opt, density=0.3, total_steps=10, backend="csr")
    # refused before anything was converted: the model and the optimizer are as they were
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.Tanh))
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))


@quiet
def test_set_active_moves_values_and_optimizer_state_along(kernels):
    """Values and state of positions that stay move to their new places, new positions start at
    zero, and ever-active grows by the new ones (with the compiled kernels and with torch's)."""
    torch.manual_seed(0)
    model = mlp(widths=(20, 300, 400, 5))  # sets large enough for the kernels' threads
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp = st.Static(model, opt, density=0.5, total_steps=10, backend="csr")
    for x, y in mlp_batches(2):
        train_step(model, opt, sp, x, y)
    layer, backend = model[2], sp.backend
    old = layer.positions()
    dense = [layer.dense_weight().reshape(-1)] + [
        torch.zeros(layer.in_features * layer.out_features, dtype=s.dtype).index_put_((old,), s)
        for s in state_tensors(opt, layer.values)]
    free = torch.ones(dense[0].numel(), dtype=torch.bool)
    free[old] = False
    g = torch.Generator().manual_seed(1)
    kept = old[torch.randperm(old.numel(), generator=g)[:old.numel() // 3]]
    grown = free.nonzero().squeeze(1)[torch.randperm(int(free.sum()), generator=g)]
    new = torch.sort(torch.cat([kept, grown[:old.numel() - kept.numel()]])).values
    ever = backend.ever_active_positions("2.weight")
    backend.set_active("2.weight", new)
    assert torch.equal(layer.positions(), new)
    stays = ~free[new]
    for before, after in zip(dense, [layer.values.detach()] + state_tensors(opt, layer.values)):
        assert torch.equal(after[stays], before[new[stays]])
        assert not after[~stays].any()
    assert backend.ever_active_positions("2.weight").tolist() == sorted(
        set(ever.tolist()) | set(new.tolist()))


@quiet
@pytest.mark.parametrize("structure", [None, "block:4x1", "fan-in"])
def test_updates_with_and_without_the_compiled_kernels_are_identical(monkeypatch, structure):
    """The same run, its topology updates computed once with the compiled kernels and once with
    torch's operations: the same positions, values and optimizer state."""
    if kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled kernels cannot be built here")

    def run(update_kernels: bool):
        torch.manual_seed(0)
        model = mlp(widths=(20, 400, 300, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        extra = {} if structure is None else {"structure": structure,
                                               "dense_layers": ["4.weight"]}
        sp = st.RigL(model, opt, density=0.4, total_steps=30, delta_t=3, backend="csr",
                     **extra)
        for x, y in mlp_batches(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with monkeypatch.context() as m:  # only the step, which updates, without them
                if not update_kernels:
                    m.setattr(kernels_module, "_KERNELS", False)
                sp.step()
        return ([sp.backend.active_positions(n) for n in sp.names]
                + [sp.backend.ever_active_positions(n) for n in sp.names]
                + [p.detach().clone() for p in model.parameters()]
                + [s.clone() for p in model.parameters() for s in state_tensors(opt, p)])

    compiled, fallback = run(True), run(False)
    assert len(compiled) == len(fallback)
    assert all(torch.equal(a, b) for a, b in zip(compiled, fallback))
