"""Dynamic Sparse Reparameterization (DSR): the update against a slow reference, the adaptive
threshold, the fixed total, resuming, and the checks of its arguments and state."""

import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs
from torch import nn

import sparsetrain as st
from sparsetrain.methods import DSR
from sparsetrain.methods.dsr import largest_remainders, proportional_split
from sparsetrain.sparsity.permutation import DROP, GROW
from tests.conftest import OPTIMIZERS, batches, save_checkpoint, tiny_cnn, train_step
from tests.methods.test_state_fuzz import load_mutated


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def random_masks(model, counts, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    return {n: torch.zeros(p.numel(), dtype=torch.bool).index_fill_(
                0, torch.randperm(p.numel(), generator=g)[:c], True).view(p.shape)
            for n, p, c in zip(names, weights, counts)}


def build_with_masks(masks, model, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = sum(int(m.sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    options = dict(density=total / numel, total_steps=100, delta_t=10, masks=masks)
    return opt, DSR(model, opt, **{**options, **kwargs})


# --- the slow reference -------------------------------------------------------------------------
def reference_split(total, weights, caps):
    """Largest remainders with exact fractions, the parts over their cap fixed at it and the
    rest split again; by the caps where no open part has weight."""
    parts = [None] * len(weights)
    while True:
        open_ = [i for i in range(len(weights)) if parts[i] is None and caps[i] > 0]
        left = total - sum(p for p in parts if p is not None)
        w = [weights[i] for i in open_]
        if sum(w) == 0:
            w = [caps[i] for i in open_]
        exact = [Fraction(left * x, sum(w)) if sum(w) else Fraction(0) for x in w]
        share = [math.floor(e) for e in exact]
        ranked = sorted(range(len(open_)), key=lambda j: (-(exact[j] - share[j]), open_[j]))
        for j in ranked[:left - sum(share)]:
            share[j] += 1
        over = [open_[j] for j in range(len(open_)) if share[j] > caps[open_[j]]]
        if not over:
            for j, i in enumerate(open_):
                parts[i] = share[j]
            return [0 if p is None else p for p in parts]
        for i in over:
            parts[i] = caps[i]


def reference_update(sp, weights, threshold, t):
    """Algorithm 1 written out with Python loops: the active sets after the update at step t and
    the new threshold. ``weights``: name -> list of the dense weights (flat)."""
    names = sp.names
    active = {n: sp.active_positions(n).tolist() for n in names}
    kept, pruned = {}, {}
    for n in names:
        below = [p for p in active[n] if abs(weights[n][p]) < threshold]
        if len(below) == len(active[n]):  # the largest |w| stays, ties by the lower rank
            order = sp.order(n, DROP, t)
            rank = {p: int(order.rank(torch.tensor([p]))) for p in active[n]}
            best = max(active[n], key=lambda p: (abs(weights[n][p]), -rank[p]))
            below.remove(best)
        pruned[n] = set(below)
        kept[n] = [p for p in active[n] if p not in pruned[n]]
    k = sum(len(pruned[n]) for n in names)
    if k < (1 - sp.tolerance) * sp.n_prune:
        threshold = threshold * 2
    elif k > (1 + sp.tolerance) * sp.n_prune:
        threshold = threshold / 2
    numel = {n: sp.numel(n) for n in names}
    caps = [numel[n] - len(kept[n]) - (0 if sp.allow_regrowth else len(pruned[n]))
            for n in names]
    regrow = sp.allow_regrowth or sum(caps) < k
    if regrow:
        caps = [numel[n] - len(kept[n]) for n in names]
    grow = reference_split(k, [len(kept[n]) for n in names], caps)
    result = {}
    for n, g in zip(names, grow):
        closed = set(kept[n]) if regrow else set(active[n])
        order, grown, rank = sp.order(n, GROW, t), [], 0
        while len(grown) < g:  # the first free positions of the random order, one by one
            p = int(order.position(torch.tensor([rank])))
            if p not in closed:
                grown.append(p)
            rank += 1
        result[n] = sorted(kept[n] + grown)
    return result, threshold, pruned


def set_weights(model, sp, weights):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in sp.names:
            mask = sp.masks[n].reshape(-1)
            flat = torch.tensor(weights[n], dtype=params[n].dtype) * mask
            params[n].copy_(flat.view(params[n].shape))


CASES = [  # (active counts, layer scales of |w|, threshold, N_p)
    ((12, 10, 13), (None, 1e-4, 1.0), 1e-3, 20),  # a full layer capped, a layer all below H
    ((20, 4, 14), (0.05, 1.0, 0.02), 0.03, 5),
    ((5, 25, 2), (0.01, 0.01, 0.01), 0.008, 12),
    ((40, 6, 15), (0.5, 0.5, 0.5), 0.4, 30),  # a dense layer: only what the others free
    ((48, 30, 15), (1.0, 1.0, 1.0), 0.9, 80),  # dense: without regrowth it grows back anyway
]


@pytest.mark.parametrize("allow_regrowth", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_update_is_algorithm_1(case, allow_regrowth):
    counts, scales, threshold, n_prune = CASES[case]
    model = mlp()
    masks = random_masks(model, counts, seed=case)
    opt, sp = build_with_masks(masks, model, initial_threshold=threshold, n_prune=n_prune,
                               allow_regrowth=allow_regrowth, seed=case)
    for x, y in [(torch.randn(4, 8), torch.randint(0, 3, (4,)))]:  # momentum to keep or zero
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.backend.after_optimizer_step()
    g = torch.Generator().manual_seed(100 + case)
    weights = {}
    for n, scale, c in zip(sp.names, scales, counts):
        values = torch.randn(sp.numel(n), generator=g, dtype=torch.float64)
        if scale == 1e-4:  # every weight below H, all tied
            values = torch.full((sp.numel(n),), scale, dtype=torch.float64)
        elif scale is not None:
            values = values * scale
        else:  # exactly 8 of the active ones below H
            active = sp.active_positions(n)
            values = torch.full((sp.numel(n),), 0.5, dtype=torch.float64)
            values[active[:8]] = 1e-5
        weights[n] = values.float().double().tolist()  # the float32 values the model holds
    set_weights(model, sp, weights)
    t = 20
    expected, new_threshold, pruned = reference_update(sp, weights, threshold, t)
    before = {n: sp.backend.dense_weight(n).reshape(-1).clone() for n in sp.names}
    state_before = {n: sp.backend.dense_state(n)[0].reshape(-1).clone() for n in sp.names}
    total = sum(sp.active_counts().values())
    with torch.no_grad():
        sp.update_topology(t)
    assert sp.threshold == new_threshold
    assert sp.last_pruned == sum(len(p) for p in pruned.values())
    assert sum(sp.active_counts().values()) == total
    for n in sp.names:
        assert sp.active_positions(n).tolist() == expected[n], n
        weight = sp.backend.dense_weight(n).reshape(-1)
        state = sp.backend.dense_state(n)[0].reshape(-1)
        kept = [p for p in expected[n] if p not in pruned[n] and bool(masks[n].reshape(-1)[p])]
        grown = [p for p in expected[n] if p not in kept]
        assert torch.equal(weight[kept], before[n][kept]) and torch.equal(state[kept],
                                                                         state_before[n][kept])
        assert not weight[grown].any() and not state[grown].any(), "grown at zero"
    if case == 0:  # the capped layer got all it could hold, the all-below layer kept one
        assert sp.active_counts()["4.weight"] == 15 and len(pruned["2.weight"]) == 9


def test_pruned_weights_are_grown_back_at_zero_when_allowed():
    model = mlp()
    masks = random_masks(model, (47, 29, 14), seed=3)  # one free position in every layer
    opt, sp = build_with_masks(masks, model, n_prune=10, allow_regrowth=True,
                               initial_threshold=0.3)
    weights = {n: (torch.rand(sp.numel(n), generator=torch.Generator().manual_seed(1))
                   .double() * 0.6).float().double().tolist() for n in sp.names}
    set_weights(model, sp, weights)
    expected, _, pruned = reference_update(sp, weights, 0.3, 10)
    with torch.no_grad():
        sp.update_topology(10)
    back = 0
    for n in sp.names:
        assert sp.active_positions(n).tolist() == expected[n]
        again = sorted(pruned[n] & set(expected[n]))
        back += len(again)
        assert not sp.backend.dense_weight(n).reshape(-1)[again].any()
    assert back > 0, "the case must grow back pruned weights"


@pytest.mark.parametrize("total,weights,caps", [
    (17, [4, 1, 13], [36, 20, 2]), (5, [0, 0, 0], [1, 3, 4]), (7, [1, 1, 1], [9, 9, 9]),
    (10, [3, 0, 5], [2, 9, 1]), (0, [2, 3], [4, 4]), (9, [5, 5], [4, 5]),
])
def test_proportional_split_by_largest_remainders_within_caps(total, weights, caps):
    parts = proportional_split(total, weights, caps)
    assert parts == reference_split(total, weights, caps)
    assert sum(parts) == total and all(0 <= p <= c for p, c in zip(parts, caps))
    assert largest_remainders(7, [1, 1, 1]) == [3, 2, 2]  # ties: the earlier layer
    with pytest.raises(ValueError, match="cannot place"):
        proportional_split(10, [1, 1], [4, 5])


@given(hs.lists(hs.tuples(hs.integers(0, 50), hs.integers(0, 40)), min_size=1, max_size=6),
       hs.data())
def test_proportional_split_matches_the_reference(layers, data):
    weights, caps = [w for w, _ in layers], [c for _, c in layers]
    total = data.draw(hs.integers(0, sum(caps)))
    parts = proportional_split(total, weights, caps)
    assert parts == reference_split(total, weights, caps)


def test_threshold_adapts_to_the_number_pruned():
    model = mlp()
    masks = random_masks(model, (30, 20, 12), seed=0)
    _, sp = build_with_masks(masks, model, n_prune=10, tolerance=0.1, initial_threshold=1e-3)
    history = []
    # K per update: below 9 doubles, 9..11 keeps (the bounds included), above 11 halves
    for t, k in enumerate([8, 9, 11, 12, 0, 10, 30, 3], start=1):
        h = sp.threshold
        weights = {n: [0.5] * sp.numel(n) for n in sp.names}
        left = k
        for n in sp.names:  # k active weights below H, spread over the layers
            active = sp.active_positions(n).tolist()
            take = min(left, len(active) - 1)
            for p in active[:take]:
                weights[n][p] = h / 4
            left -= take
        set_weights(model, sp, weights)
        expected, new_h, _ = reference_update(sp, weights, h, t)
        with torch.no_grad():
            sp.update_topology(t)
        assert sp.last_pruned == k
        assert sp.threshold == new_h
        assert all(sp.active_positions(n).tolist() == expected[n] for n in sp.names)
        history.append(sp.threshold / h)
    assert history == [2, 1, 1, 0.5, 2, 1, 0.5, 2]


def test_threshold_stays_positive_and_finite():
    model = mlp()
    _, sp = build_with_masks(random_masks(model, (30, 20, 12), seed=0), model, n_prune=5,
                             initial_threshold=5e-324)
    sp.adapt_threshold(100)
    assert sp.threshold == 5e-324
    sp.threshold = 1.5e308
    sp.adapt_threshold(0)
    assert sp.threshold == 1.5e308


@pytest.mark.parametrize("optimizer_name", ["sgd-momentum-wd", "adam"])
def test_total_is_constant_at_every_step_and_layers_move(optimizer_name):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    sp = DSR(model, opt, density=0.2, total_steps=48, delta_t=3, distribution="erk")
    total, start = sp.scheduled_total(0), sp.active_counts()
    assert sp.scheduled_counts(0) is None and total == sum(start.values())
    thresholds, moved = {sp.threshold}, False
    for t, (x, y) in enumerate(batches(48), start=1):
        masks = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, sp, x, y)
        counts = sp.active_counts()
        assert sum(counts.values()) == total == sp.scheduled_total(t), f"step {t}"
        assert all(lo <= counts[n] <= hi for n, (lo, hi) in sp.allowed_counts(t).items())
        if not sp.is_update_step(t):
            assert all(torch.equal(masks[n], sp.masks[n]) for n in sp.names)
        thresholds.add(sp.threshold)
        moved |= counts != start
    assert moved and len(thresholds) > 1


def test_resume_is_exact_with_the_threshold(tmp_path):
    data = batches(24)

    def build(seed=0):
        torch.manual_seed(0)
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, DSR(model, opt, density=0.2, total_steps=24, delta_t=3, seed=seed)

    model, opt, sp = build()
    for x, y in data:
        train_step(model, opt, sp, x, y)
    model_a, opt_a, sp_a = build()
    for x, y in data[:10]:
        train_step(model_a, opt_a, sp_a, x, y)
    assert sp_a.threshold != sp_a.initial_threshold  # the state must carry it
    checkpoint = save_checkpoint(tmp_path / "c.pt", model_a, opt_a, sp_a)
    assert checkpoint["sparsifier"]["method_state"] == {"threshold": sp_a.threshold}
    model_b, opt_b, sp_b = build()
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    sp_b.load_state_dict(checkpoint["sparsifier"])
    assert sp_b.threshold == sp_a.threshold
    for x, y in data[10:]:
        train_step(model_b, opt_b, sp_b, x, y)
    assert sp_b.threshold == sp.threshold
    assert all(torch.equal(sp.masks[n], sp_b.masks[n]) for n in sp.names)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_b.parameters()))


def refused(sp, state, match):
    before = (sp.threshold, sp.step_count, {n: sp.active_positions(n).clone() for n in sp.names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            sp.load_state_dict(state)
    assert before[:2] == (sp.threshold, sp.step_count)
    assert all(torch.equal(before[2][n], sp.active_positions(n)) for n in sp.names)


@pytest.mark.parametrize("value", [None, 0.0, -1e-3, float("nan"), float("inf"), True, "0.001",
                                   torch.tensor(1e-3), [1e-3]])
def test_a_bad_threshold_in_the_state_is_refused(value):
    model = mlp()
    _, sp = build_with_masks(random_masks(model, (12, 10, 6), 0), model)
    state = sp.state_dict()
    state["step_count"] = 5
    state["method_state"]["threshold"] = value
    refused(sp, state, r"method_state\['threshold'\]")


def test_per_layer_counts_may_move_but_the_total_may_not():
    model = mlp()
    _, sp = build_with_masks(random_masks(model, (12, 10, 6), 0), model)
    state = sp.state_dict()
    positions = state["positions"]
    free = [p for p in range(48) if p not in set(positions["0.weight"].tolist())]
    positions["0.weight"] = torch.tensor(sorted(positions["0.weight"].tolist() + free[:1]))
    refused(sp, state, r"hold 29 weights in all, but this sparsifier holds exactly 28")
    positions["2.weight"] = positions["2.weight"][1:]  # one moved from layer 2 to layer 0
    state["method_state"]["threshold"] = 0.25
    sp.load_state_dict(state)
    assert sp.active_counts() == {"0.weight": 13, "2.weight": 9, "4.weight": 6}
    assert sp.threshold == 0.25


@pytest.mark.fuzz
@given(data=hs.data())
def test_dsr_loads_or_refuses_mutated_states(data):
    load_mutated("dsr", data)


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta_t=0), "delta_t"), (dict(t_end=0), "t_end"), (dict(t_start=-1), "t_start"),
    (dict(initial_threshold=0.0), "initial_threshold"),
    (dict(initial_threshold=float("nan")), "initial_threshold"),
    (dict(initial_threshold=-1e-3), "initial_threshold"), (dict(tolerance=1.0), "tolerance"),
    (dict(tolerance=-0.1), "tolerance"), (dict(n_prune=0), "n_prune"),
    (dict(n_prune=2.5), "n_prune"), (dict(n_prune=True), "n_prune"),
    (dict(prune_fraction=0.0), "prune_fraction"), (dict(prune_fraction=1.5), "prune_fraction"),
    (dict(n_prune=10, prune_fraction=0.1), "give one"), (dict(n_prune=938), "N_p"),
    (dict(prune_fraction=0.5), "N_p"), (dict(allow_regrowth="yes"), "allow_regrowth"),
    (dict(structure="2:4"), "structure"), (dict(density=0.0), "density"),
])
def test_bad_arguments_raise(kwargs, match):
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        DSR(model, opt, **{"density": 0.2, "total_steps": 100, **kwargs})


def test_defaults_flops_and_registration():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.make_sparsifier("dsr", model, opt, density=0.2, total_steps=1000)
    assert isinstance(sp, DSR) and sp.grows and not sp.fixed_budget
    assert (sp.delta_t, sp.t_end, sp.threshold, sp.tolerance) == (100, 750, 1e-3, 0.1)
    assert sp.n_prune == round(0.01 * sum(sp.numel(n) for n in sp.names))
    assert sp.allow_regrowth is False and sp.distribution == "uniform"
    assert DSR.training_flops(10.0, 2.0) == 6.0
    assert st.training_flops_per_example("dsr", 10.0, 2.0, delta_t=7) == 6.0
    assert sp.training_flops_per_example(10.0, 2.0) == 6.0


def test_non_finite_layers_are_skipped_and_the_rest_keep_the_total():
    model = mlp()
    masks = random_masks(model, (12, 10, 6), 0)
    _, sp = build_with_masks(masks, model, initial_threshold=0.5, n_prune=5)
    weights = {n: [0.1] * sp.numel(n) for n in sp.names}
    weights["2.weight"][int(sp.active_positions("2.weight")[0])] = float("nan")
    set_weights(model, sp, weights)
    with pytest.warns(RuntimeWarning, match="'2.weight' has NaN"):
        with torch.no_grad():
            sp.update_topology(10)
    assert torch.equal(sp.masks["2.weight"], masks["2.weight"])
    assert sum(sp.active_counts().values()) == 28 and sp.last_pruned == 16
