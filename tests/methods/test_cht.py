"""Cannistraci-Hebb training (methods/cht.py): the update against a slow reference on a tiny
layer (removal by sign and magnitude, regrowth by CH3-L3, ties by the seeded orders), the counts
of CHT and of the CHTs density decay, the soft rule, early stop, CSR against masked, resuming,
and the arguments."""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.methods.cht import CHT, sigmoid_progress
from sparsetrain.sparsity import link_prediction as lp
from sparsetrain.sparsity.permutation import DROP, GROW
from tests.conftest import batches, save_checkpoint, tiny_cnn, train_step
from tests.sparsity.test_link_prediction import neighbours, reference


def one_layer(seed=0, rows=6, cols=7):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(cols, rows))
    with torch.no_grad():  # one decimal: magnitudes tie, and some weights are exactly zero
        model[0].weight.copy_((torch.randn(rows, cols) * 3).round() / 10)
    return model


def step_once(model, sp, opt):
    x = torch.randn(4, model[0].in_features)
    opt.zero_grad()
    model(x).square().sum().backward()
    sp.step()


def reference_update(sp, name, weight, t):
    """The active set after CHT's update at step t, from the weights before it: plain sorts."""
    shape = tuple(weight.shape)
    numel = weight.numel()
    active = sp.active_positions(name).tolist()
    fraction = sp.drop_fraction(t)
    drop_rank, grow_rank = sp.order(name, DROP, t).rank, sp.order(name, GROW, t).rank
    flat = weight.reshape(-1)
    kept = []
    for part in ([p for p in active if flat[p] < 0], [p for p in active if flat[p] >= 0]):
        keep = len(part) - math.floor(fraction * len(part))
        ranks = drop_rank(torch.tensor(part, dtype=torch.int64)).tolist() if part else []
        ordered = sorted(zip(part, ranks), key=lambda pr: (-abs(float(flat[pr[0]])), pr[1]))
        kept += [p for p, _ in ordered[:keep]]
    n_grow = len(active) - len(kept)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[kept] = True
    mask = mask.view(shape[0], -1)
    scores = reference(mask).reshape(-1)
    free = [p for p in range(numel) if not mask.reshape(-1)[p]]
    candidates = free
    if sp.exact_paths == 0:  # stage 1: the L3 index on the same paths, integer weights
        graph = lp.bipartite_graph(torch.tensor(sorted(kept), dtype=torch.int64), shape)
        wr, wc = lp.l3_weights(graph)
        adj, rows = neighbours(mask), shape[0]
        cols = mask.shape[1]
        proxy = {p: sum(int(wc[z2 - rows]) * int(wr[z1]) for z2 in adj[p // cols]
                        for z1 in adj[z2] if rows + p % cols in adj[z1]) for p in free}
        ranks = dict(zip(free, grow_rank(torch.tensor(free)).tolist()))
        wanted = math.ceil(sp.candidates * n_grow)
        candidates = sorted(free, key=lambda p: (-proxy[p], ranks[p]))[:wanted]
    ranks = dict(zip(candidates, grow_rank(torch.tensor(candidates)).tolist()))
    grown = sorted(candidates, key=lambda p: (-float(scores[p]), ranks[p]))[:n_grow]
    return sorted(kept + grown), n_grow


@pytest.mark.parametrize("exact_paths", [2 ** 28, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_matches_a_slow_reference(kernels, seed, exact_paths):
    model = one_layer(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as set
    sp = CHT(model, opt, density=0.45, total_steps=8, delta_t=1, distribution="uniform",
             seed=seed, exact_paths=exact_paths, candidates=1.5, early_stop=False)
    for t in (1, 2, 3):
        weight = model[0].weight.detach().clone()
        expected, n_grow = reference_update(sp, "0.weight", weight, t)
        assert n_grow > 0
        step_once(model, sp, opt)
        assert sp.active_positions("0.weight").tolist() == expected, f"update at step {t}"
        grown = set(expected) - set(torch.nonzero(weight.reshape(-1)).squeeze(1).tolist())
        assert all(model[0].weight.reshape(-1)[p] == 0 for p in grown)


def test_ties_are_broken_by_the_seeded_grow_order(kernels):
    # no path of length 3 anywhere: every candidate scores 0 and the grow order alone decides
    model = nn.Sequential(nn.Linear(6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    masks = {"0.weight": torch.eye(6, dtype=torch.bool)}
    for seed in (0, 1):
        sp = CHT(model, opt, density=1 / 6, total_steps=8, delta_t=1, masks=masks, seed=seed,
                 alpha=1.0, drop_fraction_decay="constant")
        step_once(model, sp, opt)
        order = sp.order("0.weight", GROW, 1)
        assert sp.active_positions("0.weight").tolist() == order.first(6).tolist()


def test_fixed_count_and_invariants(kernels):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = st.make_sparsifier("cht", model, opt, density=0.2, total_steps=16, delta_t=3)
    counts = sp.active_counts()
    assert sp.fixed_budget and not sp.update_reads_gradient and sp.grows_at_zero
    for t, (x, y) in enumerate(batches(16), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, sp, x, y)
        assert sp.active_counts() == counts == sp.scheduled_counts(t)
        for name, mask in sp.masks.items():
            grown = mask & ~before[name]
            assert torch.count_nonzero(sp.backend.dense_weight(name)[grown]) == 0
            assert grown.any() == (sp.is_update_step(t) and not torch.equal(mask, before[name]))
    assert sp.ever_active_fraction() > 0.2
    assert CHT.training_flops(10.0, 2.0) == 6.0


def test_the_density_decay_follows_its_sigmoid(kernels):
    assert sigmoid_progress(0.0) == 0.0 and sigmoid_progress(1.0) == pytest.approx(1.0)
    assert sigmoid_progress(0.5) == pytest.approx(0.5)
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.make_sparsifier("cht", model, opt, density=0.1, total_steps=30, delta_t=4,
                            initial_density=0.6, soft=True, distribution="uniform")
    assert not sp.fixed_budget and sp.early_stop is False
    numel = {n: sp.numel(n) for n in sp.names}
    assert sp.active_counts() == {n: round(0.6 * numel[n]) for n in sp.names}
    seen = []
    for t, (x, y) in enumerate(batches(30), start=1):
        train_step(model, opt, sp, x, y)
        assert sp.active_counts() == sp.scheduled_counts(t), f"step {t}"
        seen.append(sum(sp.active_counts().values()))
    assert seen == sorted(seen, reverse=True) and len(set(seen)) > 3
    # the last update (step 20 <= t_end = 22) reaches the final density
    assert sp.scheduled_counts(20) == {n: round(0.1 * numel[n]) for n in sp.names}
    assert sp.scheduled_counts(19) != sp.scheduled_counts(20)
    start, first, end = seen[0], seen[3], seen[-1]  # before, after the first update, final
    assert start == sum(round(0.6 * v) for v in numel.values()) and first < start
    middle = sum(sp.scheduled_counts(12).values())  # 3 of 5 updates: past the middle
    assert end < middle < (start + end) / 2 and start - first < (start - end) / 10


def test_the_decay_requires_a_variable_count():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = CHT(model, opt, density=0.3, total_steps=20, delta_t=2, initial_density=0.6)
    assert sp.requires == {"variable_count"} and CHT.requires == frozenset()
    assert ("cht", "csr") in st.supported_pairs()


def test_soft_rule_keeps_order_where_it_must():
    # soft removal drops zero weights before any other; soft regrowth takes the pairs with a
    # path before those without; both draw the rest at random, the same for the same step
    model = one_layer(4, rows=8, cols=8)
    with torch.no_grad():
        model[0].weight[0, :4] = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = CHT(model, opt, density=0.5, total_steps=10, delta_t=1, soft=True,
             distribution="uniform")
    name = "0.weight"
    active, values = sp.active_positions(name), sp.backend.active_values(name)
    index = torch.arange(active.numel())
    zero = values == 0
    draws = set()
    for t in range(1, 6):
        kept, n_drop = sp._removal(name, active, values, index, 0.5, t)
        assert n_drop == math.floor(0.5 * active.numel()) == active.numel() - kept.numel()
        assert not zero[kept].any() or zero.sum() > n_drop
        again, _ = sp._removal(name, active, values, index, 0.5, t)
        assert torch.equal(kept, again)
        draws.add(tuple(kept.tolist()))
    assert len(draws) > 1  # a different draw at each step
    positions = torch.arange(10)
    scores = torch.tensor([0, 3, 0, 5, 0, 1, 0, 0, 2, 0], dtype=torch.float64)
    for t in range(1, 6):
        chosen = sp._best(name, [(positions[:5], scores[:5]), (positions[5:], scores[5:])], 6, t)
        assert set(chosen.tolist()) >= {1, 3, 5, 8} and chosen.tolist() == sorted(chosen.tolist())


def run(backend, steps=12, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(),
                          nn.Linear(12, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = CHT(model, opt, density=0.4, total_steps=steps, delta_t=2, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 5, (8,), generator=g)).backward()
        sp.step()
        history.append({n: sp.active_positions(n).clone() for n in sp.names})
    return history


@pytest.mark.parametrize("options", [{}, {"soft": True}, {"exact_paths": 0},
                                     {"initial_density": 0.7, "soft": True}])
def test_csr_equals_masked(options):
    masked, csr = run("masked", **options), run("csr", **options)
    for t, (a, b) in enumerate(zip(masked, csr), start=1):
        assert all(torch.equal(a[n], b[n]) for n in a), f"masks differ after step {t}"
    assert any(not torch.equal(masked[0][n], masked[-1][n]) for n in masked[0])


def test_early_stop_ends_the_evolution():
    # a threshold of ~0: a layer is marked as soon as it regrows one link it had just removed
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = CHT(model, opt, density=0.2, total_steps=20, delta_t=2, early_stop=1e-9,
             alpha=0.5, drop_fraction_decay="constant")
    changed = []
    for t, (x, y) in enumerate(batches(20), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, sp, x, y)
        if any(not torch.equal(before[n], m) for n, m in sp.masks.items()):
            changed.append(t)
    stop = sp._stopped_at
    assert stop and all(sp._signals.values()) and changed and max(changed) <= stop
    assert sp.is_update_step(stop) and not any(sp.is_update_step(t) for t in range(stop + 1, 21))
    other = tiny_cnn()
    soft = CHT(other, torch.optim.SGD(other.parameters(), lr=0.1), density=0.2, total_steps=20,
               soft=True)
    assert soft.early_stop is False and sp.early_stop == 1e-9  # CHTs: off by default


@pytest.mark.parametrize("options", [{"early_stop": 0.05}, {"soft": True, "initial_density": 0.5}])
def test_resume_is_exact(tmp_path, options):
    data = batches(16)

    def build(seed=0):
        torch.manual_seed(0)
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = CHT(model, opt, density=0.2, total_steps=16, delta_t=3, seed=seed, **options)
        return model, opt, sp

    model, opt, sp = build()
    for x, y in data:
        train_step(model, opt, sp, x, y)
    for split in (5, 6, 10):
        model_a, opt_a, sp_a = build()
        for x, y in data[:split]:
            train_step(model_a, opt_a, sp_a, x, y)
        checkpoint = save_checkpoint(tmp_path / "c.pt", model_a, opt_a, sp_a)
        model_b, opt_b, sp_b = build(seed=7)
        model_b.load_state_dict(checkpoint["model"])
        opt_b.load_state_dict(checkpoint["optimizer"])
        with pytest.warns(UserWarning, match="seed"):
            sp_b.load_state_dict(checkpoint["sparsifier"])
        assert sp_b.method_state() == sp_a.method_state()
        for x, y in data[split:]:
            train_step(model_b, opt_b, sp_b, x, y)
        assert sp_b.method_state() == sp.method_state()
        for name in sp.names:
            assert torch.equal(sp.masks[name], sp_b.masks[name]), f"{name} saved at {split}"
        for p, q in zip(model.parameters(), model_b.parameters()):
            assert torch.equal(p, q)


def test_a_bad_method_state_is_refused():
    model = one_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = CHT(model, opt, density=0.5, total_steps=10)
    state = sp.state_dict()
    for bad in ({"early_stop_signals": {}, "stopped_at": 0},
                {"early_stop_signals": {"0.weight": 1}, "stopped_at": 0},
                {"early_stop_signals": {"0.weight": False}, "stopped_at": -1},
                {"early_stop_signals": {"0.weight": False}}):
        with pytest.raises(ValueError, match="method_state"):
            sp.load_state_dict({**state, "method_state": bad})


@pytest.mark.parametrize("kwargs, message", [
    ({"soft": "yes"}, "soft must be True or False"),
    ({"initial_density": 0.2}, "initial_density .* must be above density"),
    ({"initial_density": 1.5}, r"initial_density must be in \(0, 1\]"),
    ({"temperature": 0}, "temperature must be"),
    ({"early_stop": 1.5}, "early_stop must be"),
    ({"early_stop": "x"}, "early_stop must be"),
    ({"exact_paths": -1}, "exact_paths must be a non-negative integer"),
    ({"candidates": 0.5}, "candidates must be"),
    ({"initial_density": 0.6, "delta_t": 20}, "needs an update at or before t_end"),
    ({"structure": "fan-in"}, "runs under structure unstructured"),
    ({"alpha": 2}, "alpha must be in"),
])
def test_bad_arguments(kwargs, message):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        CHT(model, opt, **{"density": 0.3, "total_steps": 20, **kwargs})
