"""Top-KAST: the forward set A and the backward set B against a full sort, the forward pass
with A only while B learns, the exploration penalty's gradient, held weights coming back with
their value, exact resume, and the arguments it refuses."""

import pytest
import torch
from torch import nn

from sparsetrain.flops import flops
from sparsetrain.methods.topkast import TopKAST
from sparsetrain.sparsity.permutation import DROP
from tests.conftest import save_checkpoint


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).to(dtype)


def data(steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g).to(dtype), torch.randint(0, 4, (8,), generator=g))
            for _ in range(steps)]


def build(model=None, *, lr=0.1, momentum=0.9, **kwargs):
    model = mlp() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    options = dict(density=0.2, backward_density=0.5, total_steps=40, distribution="uniform",
                   delta_t=1, exploration_l2=1e-2)
    options.update(kwargs)
    return model, opt, TopKAST(model, opt, **options)


def step(model, opt, sp, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()


def theta(sp, name):
    """The full parameter vector of ``name``: the model holds A, the sparsifier the rest."""
    held = sp.method_state()["held"][name]
    return (sp.backend.dense_weight(name).detach().cpu() + held).reshape(-1)


def reference_sets(sp, name, values, t):
    """(B, A): the largest |theta| by a full sort, ties by the step's random order."""
    rank = sp.order(name, DROP, t).rank(torch.arange(values.numel())).tolist()
    ranked = sorted(range(values.numel()), key=lambda i: (-abs(float(values[i])), rank[i]))
    n_b, n_a = sp.active_counts()[name], sp.forward_counts()[name]
    return sorted(ranked[:n_b]), sorted(ranked[:n_a])


def test_sets_are_the_largest_weights_by_a_full_sort():
    model = mlp()
    initial = {n: p.detach().clone().reshape(-1) for n, p in model.named_parameters()}
    model, opt, sp = build(model, delta_t=2)
    assert sp.active_counts() == {"0.weight": 30, "2.weight": 20}  # uniform 0.5
    assert sp.forward_counts() == {"0.weight": 12, "2.weight": 8}  # uniform 0.2
    for name in sp.names:  # the first sets: of the dense initialisation, held entirely
        b, a = reference_sets(sp, name, initial[name], 0)
        assert sp.active_positions(name).tolist() == b
        assert sp.forward_positions(name).tolist() == a
        assert torch.equal(theta(sp, name), initial[name])
    changed = 0
    for t, (x, y) in enumerate(data(12), start=1):
        before = {n: sp.active_positions(n).clone() for n in sp.names}
        step(model, opt, sp, x, y)
        for name in sp.names:
            if t % 2:  # not an update step: the sets stay
                assert torch.equal(sp.active_positions(name), before[name])
                continue
            b, a = reference_sets(sp, name, theta(sp, name), t)
            assert sp.active_positions(name).tolist() == b
            assert sp.forward_positions(name).tolist() == a
            changed += not torch.equal(sp.active_positions(name), before[name])
    assert changed > 0
    assert sp.overall_density() == pytest.approx(20 / 100)
    assert sp.layer_densities()["0.weight"] == pytest.approx(0.2)


def test_the_forward_pass_uses_a_while_b_learns():
    model, opt, sp = build(delta_t=100)
    params = dict(model.named_parameters())
    x, y = data(1)[0]
    for t in range(3):
        before = {n: theta(sp, n) for n in sp.names}
        step(model, opt, sp, x, y)
        for name in sp.names:
            a, b = sp.forward_positions(name), sp.active_positions(name)
            weight = params[name].detach().reshape(-1)
            outside_a = torch.ones(weight.numel(), dtype=torch.bool)
            outside_a[a] = False
            assert torch.count_nonzero(weight[outside_a]) == 0, "the model holds A only"
            explore = b[~torch.isin(b, a)]
            now = theta(sp, name)
            assert explore.numel() and bool((now[explore] != before[name][explore]).all())
            outside_b = torch.ones(weight.numel(), dtype=torch.bool)
            outside_b[b] = False
            assert torch.equal(now[outside_b], before[name][outside_b]), "not updated"
            if t:  # momentum kept for all of B, none outside it
                state = opt.state[params[name]]["momentum_buffer"].reshape(-1)
                assert bool((state[explore] != 0).all())
                assert torch.count_nonzero(state[outside_b]) == 0
    # the model's output is that of the dense theta with every weight outside A at zero
    masked = mlp()
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), masked.parameters()):
            q.copy_(p)
            if name in sp.names:
                full = theta(sp, name)
                keep = torch.zeros_like(full)
                keep[sp.forward_positions(name)] = 1
                q.copy_((full * keep).view(q.shape))
    assert torch.equal(model(x), masked(x))


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_the_penalty_gradient_is_l2_on_a_and_l2_over_d_on_b_minus_a(l2):
    model, opt, sp = build(mlp(torch.float64), momentum=0.0, lr=0.05, exploration_l2=l2,
                           delta_t=100)
    params = dict(model.named_parameters())
    x, y = data(1, dtype=torch.float64)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = {n: params[n].grad.detach().clone().reshape(-1) for n in sp.names}
    before = {n: theta(sp, n) for n in sp.names}
    sp.step()
    for name in sp.names:
        a, b = sp.forward_positions(name), sp.active_positions(name)
        explore = b[~torch.isin(b, a)]
        w, g = before[name], raw[name]
        expected = torch.zeros_like(g)  # the gradient the optimizer used: zero outside B
        expected[a] = g[a] + l2 * w[a]
        expected[explore] = g[explore] + l2 / 0.2 * w[explore]
        assert torch.allclose(params[name].grad.reshape(-1), expected, rtol=1e-12, atol=1e-15)
        assert torch.allclose(theta(sp, name), w - 0.05 * expected, rtol=1e-12, atol=1e-15)


def test_held_weights_come_back_into_b_with_their_value():
    model = mlp()
    initial = {n: p.detach().clone().reshape(-1) for n, p in model.named_parameters()}
    # no data gradient; a penalty that shrinks B (A by 0.8, B \ A by 0.2 per step)
    model, opt, sp = build(model, lr=0.1, exploration_l2=2.0, density=0.25,
                           backward_density=0.5)
    params = dict(model.named_parameters())
    first = {n: sp.active_positions(n).clone() for n in sp.names}
    opt.zero_grad()
    (0 * model(data(1)[0][0]).sum()).backward()
    sp.step()
    for name in sp.names:
        b = sp.active_positions(name)
        grown = b[~torch.isin(b, first[name])]
        assert grown.numel() > 0
        assert torch.equal(theta(sp, name)[grown], initial[name][grown]), "their held value"
        state = opt.state[params[name]]["momentum_buffer"].reshape(-1)
        assert torch.count_nonzero(state[grown]) == 0, "with zero optimizer state"


def test_resume_is_exact(tmp_path):
    batches = data(14)
    model, opt, sp = build(delta_t=3)
    for x, y in batches:
        step(model, opt, sp, x, y)
    for split in (5, 6):  # saved just before and just after an update step
        model_a, opt_a, sp_a = build(delta_t=3)
        for x, y in batches[:split]:
            step(model_a, opt_a, sp_a, x, y)
        checkpoint = save_checkpoint(tmp_path / "c.pt", model_a, opt_a, sp_a)
        model_b, opt_b, sp_b = build(delta_t=3)
        model_b.load_state_dict(checkpoint["model"])
        opt_b.load_state_dict(checkpoint["optimizer"])
        sp_b.load_state_dict(checkpoint["sparsifier"])
        for x, y in batches[split:]:
            step(model_b, opt_b, sp_b, x, y)
        for name in sp.names:
            assert torch.equal(sp.active_positions(name), sp_b.active_positions(name))
            assert torch.equal(sp.forward_positions(name), sp_b.forward_positions(name))
            assert torch.equal(theta(sp, name), theta(sp_b, name))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_b.parameters()))


def test_a_state_that_does_not_fit_is_refused():
    _, _, sp = build()
    state = sp.state_dict()
    outside = [i for i in range(60) if i not in set(sp.active_positions("0.weight").tolist())]
    bad = {**state, "method_state": {**state["method_state"], "forward": {
        **state["method_state"]["forward"], "0.weight": torch.tensor(outside[:12])}}}
    with pytest.raises(ValueError, match=r"'0.weight'\] is not within the saved active set"):
        sp.load_state_dict(bad)
    bad["method_state"]["forward"]["0.weight"] = torch.arange(11)
    with pytest.raises(ValueError, match="has 11 positions, but .* holds 12"):
        sp.load_state_dict(bad)
    bad["method_state"] = {**state["method_state"], "held": {"0.weight": torch.zeros(3)}}
    with pytest.raises(ValueError, match=r"method_state\['held'\] must be a dict"):
        sp.load_state_dict(bad)
    bad["method_state"]["held"] = {**state["method_state"]["held"], "0.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'0.weight'\] must be a floating tensor"):
        sp.load_state_dict(bad)


def test_training_flops_count_a_forward_and_b_for_the_weight_gradient():
    model, _, sp = build(distribution="erk", density=0.2, backward_density=0.4)
    x = torch.zeros(2, 6)
    f_dense, f_b = flops(model, x).total, flops(model, x, sp.active_counts()).total
    f_a = flops(model, x, sp.forward_counts()).total
    # the same FLOPs per weight in every layer of an MLP: the interpolation is exact
    assert sp.training_flops_per_example(f_dense, f_a) == pytest.approx(2 * f_a + f_b)
    assert TopKAST.training_flops(f_dense, f_a) == 4 * f_a


def test_the_csr_backend_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"not available on backend='csr': it needs dense_weights"):
        TopKAST(model, opt, density=0.2, total_steps=10, backend="csr")
    assert TopKAST.supported_backends() == ["masked"]


@pytest.mark.parametrize("kwargs, message", [
    ({"backward_density": 0.1}, r"backward_density \(0.1\) must be at least density \(0.2\)"),
    ({"backward_density": 0.0}, r"backward_density must be in \(0, 1\]"),
    ({"backward_density": 1.5}, r"backward_density must be in \(0, 1\]"),
    ({"exploration_l2": -1e-4}, "exploration_l2 must be >= 0"),
    ({"exploration_l2": float("nan")}, "exploration_l2 must be"),
    ({"exploration_l2": True}, "exploration_l2 must be"),
    ({"delta_t": 0}, "delta_t must be a positive integer"),
    ({"structure": "2:4"}, "runs under structure unstructured"),
])
def test_bad_arguments_are_refused(kwargs, message):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        TopKAST(model, opt, **{"density": 0.2, "total_steps": 10, **kwargs})


def test_defaults():
    _, _, sp = build(backward_density=None, exploration_l2=1e-4, delta_t=100)
    assert (sp.backward_density, sp.exploration_l2, sp.delta_t) == (0.4, 1e-4, 100)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert TopKAST(model, opt, density=0.8, total_steps=5).backward_density == 1.0
