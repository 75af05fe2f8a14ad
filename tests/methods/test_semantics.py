"""Each method's drop and grow rule, checked against a slow, written-out reference."""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
from tests.conftest import batches, tiny_cnn, train_step


def mlp():
    torch.manual_seed(0)
    # tanh keeps every gradient entry non-zero, so no ties decide the reference comparison
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]


def reference_update(mask, weight, grow_score, fraction):
    """Algorithm 1 of the RigL paper, written out element by element."""
    flat_mask, w = mask.flatten().tolist(), weight.flatten().tolist()
    g = grow_score.flatten().tolist()
    active = [i for i, m in enumerate(flat_mask) if m]
    k = math.floor(fraction * len(active))
    by_magnitude = sorted(active, key=lambda i: abs(w[i]))
    kept = set(by_magnitude[k:])
    candidates = [i for i in range(len(flat_mask)) if i not in kept]
    grown = set(sorted(candidates, key=lambda i: -abs(g[i]))[:k])
    new = torch.zeros(len(flat_mask), dtype=torch.bool)
    new[list(kept | grown)] = True
    return new.view(mask.shape), k


def run_and_check(method, grow_score_of, steps=20, delta_t=5, **options):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.make_sparsifier(method, model, opt, density=0.3, distribution="uniform",
                            total_steps=steps, delta_t=delta_t, alpha=0.4, **options)
    params = dict(model.named_parameters())
    updates = 0
    history = []
    for t, (x, y) in enumerate(data(steps), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        history.append({n: params[n].grad.clone() for n in sp.masks})
        if sp.is_update_step(t):
            before = {n: (m.clone(), params[n].detach().clone()) for n, m in sp.masks.items()}
            sp.step()
            for name, (mask, weight) in before.items():
                expected, k = reference_update(mask, weight, grow_score_of(history, name),
                                               sp.drop_fraction(t))
                updates += k > 0
                assert torch.equal(sp.masks[name], expected), f"{name} at step {t}"
        else:
            sp.step()
    return updates


def test_rigl_drops_smallest_magnitude_and_grows_largest_gradient():
    # 2 layers x 2 updates
    assert run_and_check("rigl", lambda history, name: history[-1][name].abs()) == 4


def test_snfs_grows_by_the_gradient_moving_average():
    def ema(history, name):
        m = torch.zeros_like(history[0][name])
        for grads in history:
            m = 0.9 * m + 0.1 * grads[name]
        return m.abs()

    assert run_and_check("snfs", ema, redistribution="none") == 4


def test_drop_count_and_update_schedule():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.5, distribution="uniform", total_steps=40, delta_t=5,
                 t_end=20, allow_regrowth=False)
    changed_at = []
    for t, (x, y) in enumerate(data(40), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        for name, mask in sp.masks.items():
            dropped = int((before[name] & ~mask).sum())
            if dropped:
                changed_at.append(t)
                n_active = int(before[name].sum())
                assert dropped == math.floor(sp.drop_fraction(t) * n_active)
    # updates at 5, 10, 15; none at 20 (f(t_end) = 0) and none after t_end
    assert sorted(set(changed_at)) == [5, 10, 15]


def test_rigl_update_replaces_the_optimizer_step_unless_asked():
    for step_on_update in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = st.RigL(model, opt, density=0.5, total_steps=10, delta_t=5,
                     optimizer_step_on_update=step_on_update)
        for t, (x, y) in enumerate(data(5), start=1):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sp.step()
        moved = not torch.equal(before["0.bias"], model[0].bias)
        assert moved == step_on_update


def test_set_is_seeded():
    def final_masks(seed):
        torch.manual_seed(0)
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = st.SET(model, opt, density=0.2, total_steps=12, delta_t=3, seed=seed)
        for x, y in batches(12):
            train_step(model, opt, sp, x, y)
        return sp.masks

    a, b, c = final_masks(1), final_masks(1), final_masks(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_static_never_changes_and_initial_masks_are_random():
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.Static(model, opt, density=0.25, total_steps=10, delta_t=1)
    start = {n: m.clone() for n, m in sp.masks.items()}
    for x, y in batches(10):
        train_step(model, opt, sp, x, y)
    assert all(torch.equal(start[n], sp.masks[n]) for n in start)
    fc1 = start["fc1.weight"]
    # uniformly random positions: every row and column of a 32x128 mask gets some weights
    assert fc1.any(dim=1).all() and fc1.float().mean(dim=0).std() < 0.2


def test_given_masks_are_used():
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = [n for n, _ in model.named_parameters() if n.endswith("weight") and "bn" not in n]
    params = dict(model.named_parameters())
    masks = {n: (torch.arange(params[n].numel()) % 2 == 0).view(params[n].shape).float()
             for n in names}
    sp = st.Static(model, opt, density=0.5, total_steps=5, masks=masks)
    assert all(torch.equal(sp.masks[n], masks[n].bool()) for n in names)
    assert sp.layer_densities()["fc1.weight"] == 0.5
    with pytest.warns(UserWarning, match="not the density"):
        model2 = tiny_cnn()
        st.Static(model2, torch.optim.SGD(model2.parameters(), lr=0.1), density=0.1,
                  total_steps=5, masks=masks)


def test_nan_gradients_skip_the_update_with_a_warning():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = st.RigL(model, opt, density=0.5, total_steps=10, delta_t=1)
    before = {n: m.clone() for n, m in sp.masks.items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        sp.step()
    assert all(torch.equal(before[n], sp.masks[n]) for n in before)
