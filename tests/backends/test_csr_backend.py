"""backend="csr" on the sparsifiers: conversion, invariants, equivalence with the masked backend,
compact topology updates against dense references, conversion both ways, state and bad input."""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
import sparsetrain.backends.csr_backend as csr_backend
from sparsetrain.backends import CSRLinear, to_csr, to_masked
from sparsetrain.backends.csr_backend import random_positions
from tests.conftest import OPTIMIZERS, batches, tiny_cnn, train_step

CSR_METHODS = ["static", "set", "rigl"]


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
    assert sp.backend.is_compact("fc1.weight") and not sp.backend.is_compact("conv1.weight")
    budget = {n: round(d * math.prod(sp.backend.shapes[n]))
              for n, d in st.layer_densities(tiny_cnn(), 0.2, "erk").items()}
    assert {n: sp.backend.n_active(n) for n in sp.backend.names} == budget
    assert set(sp.masks) == set(budget)
    assert sp.masks["fc1.weight"].shape == (32, 128)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", CSR_METHODS)
def test_invariants_on_csr(method, optimizer_name):
    """Exact counts, inactive weights and state stay zero, grown weights start at zero with
    zero state, kept weights keep their values and state through an update."""
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    sp = st.make_sparsifier(method, model, opt, density=0.2, total_steps=24, delta_t=4,
                            alpha=0.5, backend="csr")
    counts = {n: sp.backend.n_active(n) for n in sp.backend.names}
    changed = 0
    for t, (x, y) in enumerate(batches(24), start=1):
        before = {n: sp.masks[n].clone() for n in sp.backend.names}
        layers = sp.backend.layers
        values_before = {n: layers[n].dense_weight() for n in layers}
        state_before = {n: [s.clone() for s in state_tensors(opt, layers[n].values)]
                        for n in layers}
        train_step(model, opt, sp, x, y)
        for name in sp.backend.names:
            mask = sp.masks[name]
            assert int(mask.sum()) == counts[name] == sp.backend.n_active(name)
            if not sp.backend.is_compact(name):
                p = sp.backend.params[name]
                assert torch.count_nonzero(p[~mask]) == 0
                continue
            layer = layers[name]
            assert torch.equal(layer.mask(), mask)
            grown = mask & ~before[name]
            if not torch.equal(mask, before[name]):
                changed += 1
                assert sp.is_update_step(t)
                weight = layer.dense_weight()
                assert torch.count_nonzero(weight[grown]) == 0, "grown weights start at zero"
                kept = mask & before[name]
                if not sp.optimizer_step_on_update:  # the update replaced the optimizer step
                    torch.testing.assert_close(weight[kept], values_before[name][kept],
                                               rtol=0, atol=0)
                for new, old in zip(state_tensors(opt, layer.values), state_before[name]):
                    dense_new = torch.zeros(mask.shape, dtype=new.dtype)
                    dense_new[layer.rows(), layer.col] = new
                    assert torch.count_nonzero(dense_new[grown]) == 0, "grown state is zero"
                    if not sp.optimizer_step_on_update:
                        dense_old = torch.zeros(mask.shape, dtype=old.dtype)
                        dense_old[before[name].nonzero(as_tuple=True)] = old
                        assert torch.equal(dense_new[kept], dense_old[kept]), "state moved"
    if method == "static":
        assert changed == 0
    else:
        assert changed > 0


def _train(model, opt, sp, data):
    losses, masks = [], []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sp.step()
        losses.append(loss.item())
        if sp.is_update_step(sp.step_count):
            masks.append({n: sp.masks[n].clone() for n in sp.backend.names})
    return losses, masks


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_csr_and_masked_backends_train_alike_for_300_steps(method):
    """Same initial weights and masks, same data: same losses and the same masks after every
    update (float64, so that no near-tie can fall differently)."""
    torch.manual_seed(0)
    reference = mlp()
    masks = exact_masks(reference, 0.3)
    runs = {}
    for backend in ("masked", "csr"):
        model = mlp()
        model.load_state_dict(reference.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sp = st.make_sparsifier(method, model, opt, density=0.3, total_steps=300, delta_t=10,
                                alpha=0.3, masks=masks, backend=backend)
        runs[backend] = _train(model, opt, sp, mlp_batches(300))
        final = {n: sp.masks[n].clone() for n in sp.backend.names}
        runs[backend] += (final,)
    (loss_m, upd_m, final_m), (loss_c, upd_c, final_c) = runs["masked"], runs["csr"]
    torch.testing.assert_close(torch.tensor(loss_c), torch.tensor(loss_m), rtol=1e-9, atol=1e-9)
    assert sum(loss_m[-20:]) < 0.7 * sum(loss_m[:20])
    assert len(upd_m) == len(upd_c) == (22 if method == "rigl" else 0)
    for a, b in zip(upd_m, upd_c):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(final_m[n], final_c[n]) for n in final_m)
    if method == "rigl":
        assert not all(torch.equal(final_m[n], masks[n]) for n in masks), "masks must move"


def test_blockwise_gradient_grow_matches_the_dense_top_k(monkeypatch):
    """The running top-k over blocks of rows equals the top-k of the whole dense gradient."""
    monkeypatch.setattr(csr_backend, "BLOCK_ELEMENTS", 3 * 40)  # blocks of 3 rows
    monkeypatch.setattr(csr_backend, "MIN_BLOCK_ELEMENTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 17, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.25, total_steps=10, delta_t=1, alpha=0.4, backend="csr")
    layer = model[0]
    before = layer.mask()
    weight = layer.dense_weight()
    x = torch.randn(8, 40, dtype=torch.float64)
    out = model(x)
    out.square().sum().backward()
    dense_grad = 2 * out.detach().t() @ x
    sp.step()
    n_drop = math.floor(sp.drop_fraction(1) * int(before.sum()))
    magnitude = weight.abs().masked_fill(~before, -math.inf).reshape(-1)
    kept = torch.zeros(before.numel(), dtype=torch.bool)
    kept[torch.topk(magnitude, int(before.sum()) - n_drop).indices] = True
    scores = dense_grad.abs().reshape(-1).masked_fill(kept, -math.inf)
    grown = torch.zeros(before.numel(), dtype=torch.bool)
    grown[torch.topk(scores, n_drop).indices] = True
    assert torch.equal(layer.mask().reshape(-1), kept | grown)


def test_gradient_grow_breaks_ties_towards_the_lower_position(monkeypatch):
    """Inputs that are zero in most features give many exactly-zero gradients; when more must
    grow than there are non-zero candidates, the zero-score ones come in position order."""
    monkeypatch.setattr(csr_backend, "BLOCK_ELEMENTS", 2 * 30)
    monkeypatch.setattr(csr_backend, "MIN_BLOCK_ELEMENTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 10, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.5, total_steps=10, delta_t=1, alpha=0.5, backend="csr")
    layer = model[0]
    before = layer.positions()
    x = torch.zeros(4, 30, dtype=torch.float64)
    x[:, 0] = torch.randn(4, dtype=torch.float64)  # only column 0 has a gradient
    model(x).sum().backward()
    weight = layer.dense_weight().reshape(-1)
    sp.step()
    n_drop = math.floor(sp.drop_fraction(1) * 150)
    kept = before[torch.topk(weight[before].abs(), 150 - n_drop).indices]
    free = torch.tensor([p for p in range(300) if p not in set(kept.tolist())])
    nonzero = free[free % 30 == 0]
    zero = free[free % 30 != 0][:n_drop - nonzero.numel()]
    expected = torch.sort(torch.cat([kept, nonzero, zero])).values
    assert torch.equal(layer.positions(), expected)


def test_dense_gradient_of_a_csr_layer_is_grad_y_transposed_x():
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
    torch.testing.assert_close(sp.backend.dense_gradient("0.weight"), reference.weight.grad)


def test_random_positions_are_distinct_uniform_and_avoid_the_excluded():
    g = torch.Generator().manual_seed(0)
    exclude = torch.tensor([0, 5, 6, 99])
    counts = torch.zeros(100)
    for _ in range(400):
        pos = random_positions(100, 10, g, exclude)
        assert pos.numel() == 10 and torch.equal(pos, torch.unique(pos))
        assert not torch.isin(pos, exclude).any()
        counts[pos] += 1
    free = counts[~torch.isin(torch.arange(100), exclude)]
    assert counts[exclude].sum() == 0
    expected = 400 * 10 / 96
    assert ((free - expected).abs() < 5 * math.sqrt(expected)).all()
    dense = random_positions(100, 90, g, exclude)  # near full: listed, not rejected
    assert dense.numel() == 90 and not torch.isin(dense, exclude).any()
    with pytest.raises(ValueError, match="cannot choose"):
        random_positions(10, 8, g, torch.arange(3))


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
    masks = {n: sp.masks[n].clone() for n in sp.backend.names}

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
    for method in ("snfs", "gmp"):
        with pytest.raises(ValueError, match="not available on backend='csr'"):
            st.make_sparsifier(method, model, opt, density=0.1, total_steps=10, backend="csr")
    with pytest.raises(ValueError, match="backend must be one of"):
        st.RigL(model, opt, density=0.1, total_steps=10, backend="sparse")
    convs = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    opt = torch.optim.SGD(convs.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="no sparsified weight is a plain nn.Linear"):
        st.Static(convs, opt, density=0.5, total_steps=10, backend="csr")
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
    before = {n: sp.masks[n].clone() for n in sp.backend.names}
    x, y = mlp_batches(1)[0]
    x[0, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        sp.step()
    assert all(torch.equal(sp.masks[n], before[n]) for n in before)


def test_selection_helpers_against_sorting():
    """The O(n) selections used by the compact updates against a full stable sort."""
    g = torch.Generator().manual_seed(0)
    for n, k in [(10, 3), (1000, 1), (700_000, 90_000), (700_000, 650_000)]:
        scores = torch.randint(0, n // 3 + 2, (n,), generator=g).float()  # many ties
        positions = torch.randperm(n, generator=g)
        got_s, got_p = csr_backend._top_k_lowest_first(scores, positions, k)
        order = torch.argsort(positions)  # by position, then stably by score, descending
        best = order[torch.sort(scores[order], descending=True, stable=True).indices[:k]]
        assert torch.equal(torch.sort(got_p).values, torch.sort(positions[best]).values)
        assert (scores >= csr_backend._lower_bound_of_kth(scores, k)).sum() >= k
        drop = csr_backend._smallest(scores, k)
        expected = torch.sort(scores, stable=True).indices[:k]
        assert torch.equal(drop.nonzero().squeeze(1), torch.sort(expected).values)
    a = torch.tensor([1, 4, 9, 10])
    b = torch.tensor([0, 5, 11])
    merged, a_at, b_at = csr_backend._merge_sorted(a, b)
    assert merged.tolist() == [0, 1, 4, 5, 9, 10, 11]
    assert torch.equal(merged[a_at], a) and torch.equal(merged[b_at], b)
