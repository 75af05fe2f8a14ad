"""SNFS (sparse momentum): the momentum redistribution between layers and the within-layer rule
("none") against slow, written-out references; the counts contract; exact resume."""

import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.backends.base import DENSE_GRADIENT_EVERY_STEP, VARIABLE_COUNT
from sparsetrain.methods.snfs import apportion
from tests.conftest import save_checkpoint

STEPS = 24


def mlp():
    torch.manual_seed(0)
    # tanh keeps every gradient entry non-zero and float64 every value distinct: no ties
    return nn.Sequential(nn.Linear(12, 16, dtype=torch.float64), nn.Tanh(),
                         nn.Linear(16, 16, dtype=torch.float64), nn.Tanh(),
                         nn.Linear(16, 3, dtype=torch.float64))


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def split(total, weights, caps):
    """``total`` split by ``weights`` with the largest remainders (ties: the earlier layer),
    none above its cap; the excess goes round again to the layers with room (by their room
    where their weights are all 0)."""
    counts, left = [0] * len(caps), total
    while left:
        room = [i for i in range(len(caps)) if counts[i] < caps[i]]
        w = [Fraction(weights[i]) for i in room]
        if sum(w) == 0:
            w = [Fraction(caps[i] - counts[i]) for i in room]
        quotas = [left * x / sum(w) for x in w]
        given = [math.floor(q) for q in quotas]
        ranked = sorted(range(len(room)), key=lambda j: (-(quotas[j] - given[j]), j))
        for j in ranked[:left - sum(given)]:
            given[j] += 1
        left = 0
        for i, g in zip(room, given):
            take = min(g, caps[i] - counts[i])
            counts[i] += take
            left += g - take
    return counts


def reference_update(masks, weights, emas, fraction, allow_regrowth, redistribute):
    """One sparse momentum update written out with lists and full sorts; returns the new masks
    and whether a layer was capped."""
    names = list(masks)
    plan = []
    for n in names:
        mask, w = masks[n].flatten().tolist(), weights[n].flatten().tolist()
        m = emas[n].abs().flatten().tolist()
        active = [i for i, a in enumerate(mask) if a]
        k = math.floor(fraction * len(active))
        if not allow_regrowth or not redistribute:
            k = min(k, len(mask) - len(active))
        kept = sorted(active, key=lambda i: abs(w[i]))[k:]
        closed = set(kept) if allow_regrowth else set(active)
        free = sorted((i for i in range(len(mask)) if i not in closed), key=lambda i: -m[i])
        mean = math.fsum(m[i] for i in active) / len(active) if active else 0.0
        plan.append((kept, free, k, mean))
    pruned = [p[2] for p in plan]
    if redistribute:
        means = [p[3] for p in plan]
        wanted = split(sum(pruned), means if sum(means) > 0 else pruned, [10 ** 9] * len(plan))
        counts = split(sum(pruned), means if sum(means) > 0 else pruned,
                       [len(p[1]) for p in plan])
        capped = wanted != counts
    else:
        counts, capped = pruned, False
    new = {}
    for n, (kept, free, _, _), count in zip(names, plan, counts):
        mask = torch.zeros(masks[n].numel(), dtype=torch.bool)
        mask[kept + free[:count]] = True
        new[n] = mask.view(masks[n].shape)
    return new, capped


@pytest.mark.parametrize("allow_regrowth", [True, False])
@pytest.mark.parametrize("redistribution", ["momentum", "none"])
def test_updates_match_the_reference(redistribution, allow_regrowth):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.SNFS(model, opt, density=0.3, distribution="uniform", total_steps=STEPS, delta_t=3,
                 alpha=0.5, allow_regrowth=allow_regrowth, redistribution=redistribution)
    params = dict(model.named_parameters())
    total = sum(sp.active_counts().values())
    ema = {n: None for n in sp.names}
    updates = capped = moved = 0
    for t, (x, y) in enumerate(data(STEPS), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n in sp.names:  # the moving average, as the reference keeps it
            g = params[n].grad
            ema[n] = 0.1 * g.clone() if ema[n] is None else ema[n].mul(0.9).add(g, alpha=0.1)
        before = {n: (m.clone(), params[n].detach().clone()) for n, m in sp.masks.items()}
        counts_before = sp.active_counts()
        sp.step()
        if sp.is_update_step(t):
            expected, was_capped = reference_update(
                {n: m for n, (m, _) in before.items()}, {n: w for n, (_, w) in before.items()},
                ema, sp.drop_fraction(t), allow_regrowth, redistribution == "momentum")
            for n in sp.names:
                assert torch.equal(sp.masks[n], expected[n]), f"{n} at step {t}"
            updates += 1
            capped += was_capped
            moved += sp.active_counts() != counts_before
        else:
            assert all(torch.equal(sp.masks[n], m) for n, (m, _) in before.items())
        assert sum(sp.active_counts().values()) == total == sp.scheduled_total(t)
    assert updates == 6
    if redistribution == "momentum":
        assert moved > 0, "the momentum must move weights between layers"
        if allow_regrowth:
            assert capped > 0, "the run must meet a full layer (the caps)"
    else:
        assert moved == 0


@pytest.mark.parametrize("total,weights,caps,expected", [
    (10, [1, 1, 1], [10, 10, 10], [4, 3, 3]),  # one left over: the earliest of equal parts
    (10, [3, 1, 0], [2, 10, 10], [2, 8, 0]),  # 8 capped at 2: the excess by the shares
    (5, [1, 0, 0], [1, 3, 4], [1, 2, 2]),  # no share left with room: by the room
    (7, [0.2, 0.5, 0.3], [7, 7, 7], [1, 4, 2]),  # 1.4, 3.5, 2.1
    (0, [1, 2], [0, 5], [0, 0]),
])
def test_apportion_keeps_the_total_and_the_caps(total, weights, caps, expected):
    assert apportion(total, weights, caps) == expected == split(total, weights, caps)


def test_apportion_refuses_more_than_the_free_positions():
    with pytest.raises(ValueError, match="cannot place 5"):
        apportion(5, [1, 1], [2, 2])


def build(**kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    options = dict(density=0.3, total_steps=STEPS, delta_t=4, alpha=0.5)
    return model, opt, st.SNFS(model, opt, **{**options, **kwargs})


def train_step(model, opt, sp, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()


def test_the_counts_contract():
    model, opt, sp = build()
    assert sp.redistribution == "momentum" and sp.config()["redistribution"] == "momentum"
    assert not sp.fixed_budget and {DENSE_GRADIENT_EVERY_STEP, VARIABLE_COUNT} <= sp.requires
    start, total = sp.active_counts(), sum(sp.active_counts().values())
    assert sp.scheduled_counts(5) is None and sp.scheduled_total(5) == total
    assert sp.allowed_counts(5) == {n: (0, sp.numel(n)) for n in sp.names}
    for x, y in data(STEPS):
        train_step(model, opt, sp, x, y)
        assert sum(sp.active_counts().values()) == total
    assert sp.active_counts() != start
    _, _, within = build(redistribution="none")
    assert within.fixed_budget and within.requires == {DENSE_GRADIENT_EVERY_STEP}
    assert within.scheduled_counts(5) == start and within.scheduled_total(5) == total
    assert within.allowed_counts(5) == {n: (c, c) for n, c in start.items()}
    assert within.config()["redistribution"] == "none"


def test_settings_are_checked():
    with pytest.raises(ValueError, match="redistribution must be one of 'momentum', 'none'"):
        build(redistribution="magnitude")
    with pytest.raises(ValueError, match="use redistribution='none' with a structure"):
        build(redistribution="momentum", structure="fan-in")
    assert build(structure="fan-in")[2].redistribution == "none"  # a structure fixes counts
    with pytest.raises(ValueError, match="not available on backend='csr'"):
        build(backend="csr")


def test_resume_is_exact_and_a_state_of_another_total_is_refused(tmp_path):
    full = build()
    for x, y in data(STEPS):
        train_step(*full, x, y)
    model, opt, sp = build()
    for x, y in data(STEPS)[:13]:
        train_step(model, opt, sp, x, y)
    checkpoint = save_checkpoint(tmp_path / "c.pt", model, opt, sp)
    assert sp.active_counts() != build()[2].active_counts()  # the counts moved
    model_b, opt_b, sp_b = build()
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    sp_b.load_state_dict(checkpoint["sparsifier"])
    for x, y in data(STEPS)[13:]:
        train_step(model_b, opt_b, sp_b, x, y)
    assert all(torch.equal(full[2].masks[n], sp_b.masks[n]) for n in sp.names)
    assert all(torch.equal(p, q) for p, q in zip(full[0].parameters(), model_b.parameters()))
    state = checkpoint["sparsifier"]
    state["positions"]["2.weight"] = state["positions"]["2.weight"][1:]
    with pytest.raises(ValueError, match="hold .* weights in all, but this sparsifier holds"):
        build()[2].load_state_dict(state)
    with pytest.raises(ValueError, match="active weights, but this sparsifier holds exactly"):
        build(redistribution="none")[2].load_state_dict(checkpoint["sparsifier"])


def test_a_non_finite_momentum_skips_the_whole_update():
    model, opt, sp = build()
    for t, (x, y) in enumerate(data(4), start=1):
        if t == 4:
            before = {n: m.clone() for n, m in sp.masks.items()}
            sp.gradient_ema["2.weight"][0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(model, opt, sp, x, y)
    assert sp.is_update_step(4)
    assert any("skipped for every layer" in str(w.message) for w in caught)
    assert all(torch.equal(sp.masks[n], before[n]) for n in sp.names)
