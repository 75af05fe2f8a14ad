"""GraNet: global gradual magnitude pruning on the cubic schedule, with zero-cost
neuroregeneration after every pruning and on until ``t_end``; checked step by step against a
slow reference (full sorts over plain lists)."""

import functools
import math
import warnings

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.flops import rigl_training_flops
from sparsetrain.methods.granet import GraNet
from sparsetrain.sparsity.permutation import DROP, GROW, PRUNE, RandomOrder
from tests.conftest import save_checkpoint

SCHEDULE = dict(start_step=2, end_step=17, frequency=3, t_end=26, alpha=0.5)
TOTAL = 30


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(steps)]


def build(seed=0, **kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    options = dict(density=0.2, total_steps=TOTAL, seed=seed, **SCHEDULE)
    options.update(kwargs)
    return model, opt, GraNet(model, opt, **options)


def forward_backward(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


# --- the slow reference -------------------------------------------------------------------
def ref_pruning_step(t, start, end, freq):
    return start < t <= end and (t == end or (t - start) % freq == 0)


def ref_fraction(t, alpha, t_end):
    return alpha / 2 * (1 + math.cos(math.pi * min(t / t_end, 1.0)))


def ref_update_step(t, start, end, freq, t_end, alpha):
    regrow = start < t <= t_end and (t - start) % freq == 0 and ref_fraction(t, alpha, t_end) > 0
    return ref_pruning_step(t, start, end, freq) or regrow


def ref_total(t, n, t0, tf, start, end):
    """The cubic of Zhu & Gupta from T0 (at start) to Tf (at end), as a count of all N."""
    if t <= start:
        return t0
    if t >= end:
        return tf
    d0, df = t0 / n, tf / n
    density = df + (d0 - df) * (1 - (t - start) / (end - start)) ** 3
    return min(t0, max(tf, round(density * n)))


def ref_update(t, names, numels, weights, grads, active, seed, config, t0, tf):
    """GraNet's update at step ``t`` by full sorts: the active sets (sorted lists) after it,
    and the set after pruning alone."""
    start, end, freq = config["start_step"], config["end_step"], config["frequency"]
    active = {n: list(active[n]) for n in names}
    if ref_pruning_step(t, start, end, freq):
        total = sum(len(a) for a in active.values())
        target = ref_total(t, sum(numels.values()), t0, tf, start, end)
        if target < total:
            ranks = RandomOrder(total, PRUNE, seed, t).rank(torch.arange(total)).tolist()
            entries, i = [], 0
            for n in names:
                for p in active[n]:
                    entries.append((-abs(weights[n][p]), ranks[i], n, p))
                    i += 1
            entries.sort()
            active = {n: sorted(p for _, _, m, p in entries[:target] if m == n) for n in names}
    pruned = {n: list(active[n]) for n in names}
    fraction = ref_fraction(t, config["alpha"], config["t_end"])
    for layer, n in enumerate(names):
        count = len(active[n])
        k = min(count, math.ceil(fraction * count))
        if k == 0 or count == numels[n]:
            continue
        drop_rank = RandomOrder(numels[n], seed, DROP, t, layer).rank(torch.arange(numels[n]))
        grow_rank = RandomOrder(numels[n], seed, GROW, t, layer).rank(torch.arange(numels[n]))
        by_magnitude = sorted(active[n], key=lambda p: (-abs(weights[n][p]), int(drop_rank[p])))
        kept = by_magnitude[:count - k]
        free = sorted(set(range(numels[n])) - set(kept),
                      key=lambda p: (-abs(grads[n][p]), int(grow_rank[p])))
        active[n] = sorted(kept + free[:k])
    return active, pruned


@pytest.mark.parametrize("initial_density, distribution", [(1.0, "erk"), (0.6, "uniform")])
def test_every_step_matches_the_slow_reference(initial_density, distribution):
    model, opt, sp = build(initial_density=initial_density, distribution=distribution)
    names, b = sp.names, sp.backend
    numels = {n: sp.numel(n) for n in names}
    n_all = sum(numels.values())
    t0 = sum(sp.active_counts().values())
    if initial_density == 1.0:
        assert t0 == n_all
    tf = round(0.2 * n_all)
    seen = {}

    def spy(t, update=sp.update_topology):
        seen["weights"] = {n: b.dense_weight(n).reshape(-1).tolist() for n in names}
        seen["active"] = {n: sp.active_positions(n).tolist() for n in names}
        update(t)

    sp.update_topology = spy
    updates, regrown_after_end = [], 0
    for t, (x, y) in enumerate(data(TOTAL), start=1):
        forward_backward(model, opt, x, y)
        grads = {n: p.grad.reshape(-1).tolist() for n, p in model.named_parameters()
                 if n in numels}
        before = {n: sp.active_positions(n).tolist() for n in names}
        seen.clear()
        sp.step()
        assert sp.is_update_step(t) == ref_update_step(t, 2, 17, 3, 26, 0.5), t
        after = {n: sp.active_positions(n).tolist() for n in names}
        if not sp.is_update_step(t):
            assert not seen and after == before, f"masks changed at step {t}"
        else:
            updates.append(t)
            expected, pruned = ref_update(t, names, numels, seen["weights"], grads,
                                          seen["active"], sp.seed, SCHEDULE, t0, tf)
            assert after == expected, f"step {t}"
            for layer, n in enumerate(names):
                weight = b.dense_weight(n).reshape(-1)
                momentum = opt.state[dict(model.named_parameters())[n]]["momentum_buffer"]
                new = sorted(set(after[n]) - set(pruned[n]))  # grown, or pruned and regrown
                assert torch.count_nonzero(weight[new]) == 0, "grown weights start at zero"
                assert torch.count_nonzero(momentum.reshape(-1)[new]) == 0
                back = sorted(set(after[n]) & set(pruned[n]))  # kept, or dropped and regrown
                assert weight[back].tolist() == [seen["weights"][n][p] for p in back]
            if t > 17:
                regrown_after_end += sum(len(set(after[n]) - set(before[n])) for n in names)
        counts = sp.active_counts()
        assert sum(counts.values()) == sp.scheduled_total(t)
        last = max([s for s in range(t + 1) if ref_pruning_step(s, 2, 17, 3)], default=0)
        assert sp.scheduled_total(t) == ref_total(last, n_all, t0, tf, 2, 17)
        assert all(lo <= counts[n] <= hi for n, (lo, hi) in sp.allowed_counts(t).items())
    assert updates == [5, 8, 11, 14, 17, 20, 23]  # pruning to 17, regeneration to t_end 26
    assert sum(sp.active_counts().values()) == tf
    assert regrown_after_end > 0, "regeneration continues after the pruning schedule"
    assert sp.scheduled_counts(TOTAL) is None  # the data decide each layer's count


@pytest.mark.parametrize("initial_density", [1.0, 0.5])
def test_the_schedule_total_is_the_cubic(initial_density):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = GraNet(model, opt, density=0.1, total_steps=100, start_step=10, end_step=70,
                frequency=7, initial_density=initial_density, distribution="uniform")
    n_all = sum(sp.numel(n) for n in sp.names)
    t0 = sum(sp.active_counts().values())
    assert t0 == sum(round(initial_density * sp.numel(n)) for n in sp.names)
    prunings = [t for t in range(101) if sp.is_update_step(t) and t <= 70]
    assert prunings == [17, 24, 31, 38, 45, 52, 59, 66, 70]
    totals = [sp.scheduled_total(t) for t in range(101)]
    for t in range(101):
        last = max([s for s in prunings if s <= t], default=10)
        d0, df = t0 / n_all, round(0.1 * n_all) / n_all
        cubic = df + (d0 - df) * (1 - (last - 10) / 60) ** 3
        assert totals[t] == round(cubic * n_all), t
    assert totals[0] == t0 and totals[70] == totals[100] == round(0.1 * n_all)
    assert all(a >= b for a, b in zip(totals, totals[1:]))


def test_defaults_follow_the_authors_code():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = GraNet(model, opt, density=0.1, total_steps=1600)
    config = sp.config()
    assert {k: config[k] for k in ("initial_density", "start_step", "end_step", "frequency",
                                   "alpha", "drop_fraction_decay", "t_end", "distribution")} == {
        "initial_density": 1.0, "start_step": 0, "end_step": 1100, "frequency": 100,
        "alpha": 0.5, "drop_fraction_decay": "cosine", "t_end": 1600, "distribution": "erk"}
    assert all(sp.masks[n].all() for n in sp.names)  # dense start
    assert sp.optimizer_step_on_update and sp.update_reads_gradient
    assert not sp.fixed_budget and sp.grows and st.get_method("granet") is GraNet
    other = mlp()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    assert GraNet(other, opt, density=0.1, total_steps=50, delta_t=5).frequency == 5


def test_the_update_steps_the_optimizer_first():
    model, opt, sp = build()
    for t, (x, y) in enumerate(data(5), start=1):
        forward_backward(model, opt, x, y)
        before = {n: sp.backend.dense_weight(n).clone() for n in sp.names}
        sp.step()
    assert sp.is_update_step(5)
    for n in sp.names:  # the kept weights moved by this step's optimizer step
        kept = sp.masks[n] & (before[n] != 0)
        assert not torch.equal(sp.backend.dense_weight(n)[kept], before[n][kept])


def test_a_sparse_start_is_random_at_the_initial_density():
    _, _, a = build(initial_density=0.5, distribution="uniform")
    _, _, b = build(initial_density=0.5, distribution="uniform", seed=1)
    assert a.active_counts() == {n: round(0.5 * a.numel(n)) for n in a.names}
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.names)
    custom = {"0.weight": 0.5, "2.weight": 0.6, "4.weight": 1.0}
    _, _, c = build(initial_density=0.7, distribution=custom)
    assert c.active_counts() == {"0.weight": 30, "2.weight": 48, "4.weight": 24}


@functools.lru_cache(maxsize=None)
def uninterrupted():
    model, opt, sp = build(initial_density=0.5)
    for x, y in data(TOTAL):
        forward_backward(model, opt, x, y)
        sp.step()
    return sp.masks, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("split", [4, 5, 19])  # before and at a pruning; before a regeneration
def test_resume_is_exact(split, tmp_path):
    batches = data(TOTAL)
    masks, weights = uninterrupted()
    model_a, opt_a, sp_a = build(initial_density=0.5)
    for x, y in batches[:split]:
        forward_backward(model_a, opt_a, x, y)
        sp_a.step()
    checkpoint = save_checkpoint(tmp_path / "c.pt", model_a, opt_a, sp_a)
    assert checkpoint["sparsifier"]["method_state"] == {}  # the schedule is a function of t
    model_b, opt_b, sp_b = build(initial_density=0.5, seed=9)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    with pytest.warns(UserWarning, match="seed"):
        sp_b.load_state_dict(checkpoint["sparsifier"])
    for x, y in batches[split:]:
        forward_backward(model_b, opt_b, x, y)
        sp_b.step()
    assert all(torch.equal(masks[n], sp_b.masks[n]) for n in sp_b.names)
    assert all(torch.equal(p, q) for p, q in zip(weights, model_b.parameters()))


def test_loaded_counts_must_fit_the_schedule():
    model, opt, sp = build()
    state = sp.state_dict()
    state["positions"]["2.weight"] = state["positions"]["2.weight"][:-1]
    with pytest.raises(ValueError, match="exactly 80 there at step 0"):
        sp.load_state_dict(state)  # nothing is pruned before step 5
    numel = {n: sp.numel(n) for n in sp.names}
    assert sp.allowed_counts(4) == {n: (c, c) for n, c in numel.items()}
    assert sp.allowed_counts(5) == {n: (1, c) for n, c in numel.items()}  # global pruning
    for x, y in data(5):
        forward_backward(model, opt, x, y)
        sp.step()
    state = sp.state_dict()
    assert sp.active_counts() != numel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.load_state_dict(state)
    state["step_count"] = 4
    with pytest.raises(ValueError, match="exactly 60 there at step 4"):
        sp.load_state_dict(state)
    for x, y in data(12):  # on to the end of pruning (step 17)
        forward_backward(model, opt, x, y)
        sp.step()
    state = sp.state_dict()
    total = sum(sp.active_counts().values())
    assert sp.allowed_total(17) == (total, 164) and sp.allowed_total(5) > (total, 164)
    state["step_count"] = 5  # a state pruned further than the schedule at step 5
    with pytest.raises(ValueError, match=f"hold {total} weights in all, but this sparsifier "
                                         f"holds between {sp.scheduled_total(5)} and 164"):
        sp.load_state_dict(state)


def test_training_flops_follow_rigl_with_the_masks_of_the_moment():
    assert GraNet.training_flops(100.0, 10.0, delta_t=7) == rigl_training_flops(100.0, 10.0, 7)
    assert st.training_flops_per_example("granet", 100.0, 10.0, delta_t=7) == pytest.approx(
        (3 * 10 * 7 + 2 * 10 + 100) / 8)
    _, _, sp = build()
    assert sp.training_flops_per_example(100.0, 10.0) == rigl_training_flops(100.0, 10.0, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"initial_density": 0.1}, "must not be above initial_density"),
    ({"initial_density": 1.5}, r"initial_density must be in \(0, 1\]"),
    ({"start_step": -1}, "start_step must be a non-negative integer"),
    ({"start_step": 17}, r"start_step \(17\) must be before end_step \(17\)"),
    ({"end_step": 31}, "end_step must be at most total_steps"),
    ({"frequency": 0}, "frequency must be a positive integer"),
    ({"frequency": 3, "delta_t": 4}, "name the same period"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"alpha": float("nan")}, "alpha must be"),
    ({"drop_fraction_decay": "step"}, "drop_fraction_decay must be one of"),
    ({"t_end": 0}, "t_end must be a positive integer"),
    ({"structure": "2:4"}, "runs under structure unstructured"),
    ({"distribution": {"0.weight": 0.1, "2.weight": 0.1, "4.weight": 0.1}},
     "fewer than density"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)
