"""MEST: the drop score |w| + lambda |g| and its selection against a slow reference, elastic
mutation's step schedule, the soft memory bound's counts at every step, random growth at
inactive positions, the gradient kept for an update that replaces the optimizer step, exact
resumption (mid-way through a soft grow and drop cycle), mutated states loaded or refused, the
same run on the other backends, and the refusal of bad arguments."""

import math
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs
from torch import nn

import sparsetrain as st
from sparsetrain.backends import CSRBackend, get_backend
from sparsetrain.backends.base import VARIABLE_COUNT
from sparsetrain.methods import MEST
from sparsetrain.sparsity.permutation import DROP, GROW
from tests.conftest import save_checkpoint
from tests.methods import test_state_fuzz as fuzz

pytestmark = pytest.mark.filterwarnings("ignore:backend=.csr.*have no active weight")

STEPS = 40


def mlp(quantized=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(10, 4, dtype=torch.float64))
    if quantized:  # four magnitudes only: the drop score ties a lot
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.sign(p) * (1 + (p.abs() * 40).floor() % 4) / 10)
    return model


def data(n=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()))
    return out


def build(lr=0.05, quantized=False, momentum=0.9, **kwargs):
    model = mlp(quantized)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    options = dict(density=0.3, total_steps=STEPS, distribution="uniform", delta_t=4,
                   alpha=0.5, t_end=30)
    options.update(kwargs)
    return model, opt, MEST(model, opt, **options)


def loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def step(model, opt, sp, x, y):
    opt.zero_grad()
    loss(model, x, y).backward()
    sp.step()


def reference_update(sp, name, before, scores, n_keep, n_grow, t):
    """The active set after an update, by full sorts: keep the ``n_keep`` highest scores (ties:
    the lower rank in the seeded drop order), then grow the first ``n_grow`` positions of the
    seeded grow order that were inactive before."""
    ranks = sp.order(name, DROP, t).rank(before).tolist()
    positions, values = before.tolist(), scores.tolist()
    ordered = sorted(range(len(positions)), key=lambda i: (-values[i], ranks[i]))
    kept = [positions[i] for i in ordered[:n_keep]]
    numel = sp.numel(name)
    grow_rank = sp.order(name, GROW, t).rank(torch.arange(numel)).tolist()
    inactive = [p for p in sorted(range(numel), key=lambda p: grow_rank[p])
                if p not in set(positions)]
    return sorted(kept + inactive[:n_grow])


def step_fraction(t, alpha, decay_step, t_end):
    """Elastic mutation written out: alpha, then alpha / 2 from decay_step, 0 from t_end."""
    return 0.0 if t >= t_end else (alpha if t < decay_step else alpha / 2)


def soft_extra(budget, numel, t, *, alpha, delta_t, decay_step, t_end):
    """Weights above the budget after step t under the soft bound, by replaying the updates."""
    extra = 0
    for u in range(1, t + 1):
        if u % delta_t == 0 and u <= t_end:
            last = u + delta_t > t_end
            grow = math.floor(step_fraction(u, alpha, decay_step, t_end) * budget)
            extra = 0 if last else min(grow, (numel - budget) // 2)
    return extra


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("coefficient,quantized", [(0.0, True), (0.7, False), (50.0, True)])
def test_each_update_matches_the_slow_reference(coefficient, quantized, soft):
    # lr 0: the weights the update scores are those before the step, as the reference reads
    model, opt, sp = build(lr=0.0, momentum=0.0, quantized=quantized,
                           gradient_coefficient=coefficient, soft_memory_bound=soft)
    params = dict(model.named_parameters())
    budget = sp.active_counts()
    updates = 0
    for t, (x, y) in enumerate(data(), start=1):
        opt.zero_grad()
        loss(model, x, y).backward()
        before = {n: sp.active_positions(n).clone() for n in sp.names}
        scores = {n: params[n].detach().reshape(-1)[p].abs()
                  + coefficient * params[n].grad.reshape(-1)[p].abs() for n, p in before.items()}
        sp.step()
        if not sp.is_update_step(t):
            assert all(torch.equal(before[n], sp.active_positions(n)) for n in sp.names)
            continue
        updates += 1
        f = step_fraction(t, 0.5, sp.decay_step, 30)
        for name, active in before.items():
            n = active.numel()
            if soft:
                extra = soft_extra(budget[name], sp.numel(name), t, alpha=0.5, delta_t=4,
                                   decay_step=sp.decay_step, t_end=30)
                n_keep, n_grow = budget[name], extra
            else:
                n_keep, n_grow = n - math.floor(f * n), math.floor(f * n)
            expected = reference_update(sp, name, active, scores[name], n_keep, n_grow, t)
            after = sp.active_positions(name)
            assert after.tolist() == expected, f"{name} at step {t}"
            grown = ~torch.isin(after, active)
            assert int(grown.sum()) == n_grow, "every grown weight was inactive before"
            assert torch.count_nonzero(params[name].reshape(-1)[after[grown]]) == 0, "at zero"
    assert updates == 7


def test_the_gradient_changes_what_is_dropped():
    runs = {}
    for coefficient in (0.0, 1.0):
        model, opt, sp = build(gradient_coefficient=coefficient)
        for x, y in data():
            step(model, opt, sp, x, y)
        runs[coefficient] = [sp.active_positions(n) for n in sp.names]
    assert not all(torch.equal(a, b) for a, b in zip(runs[0.0], runs[1.0]))


@pytest.mark.parametrize("soft", [False, True])
def test_the_gradient_is_read_before_an_update_that_replaces_the_step_clears_it(soft):
    """With the optimizer hooked and the update replacing the optimizer step, the hooks clear
    the gradients before the update runs: the score must use those it kept."""
    runs = []
    for hooked in (False, True):
        model, opt, sp = build(soft_memory_bound=soft, optimizer_step_on_update=False)
        if hooked:
            sp.hook_optimizer()
        for x, y in data():
            opt.zero_grad()
            loss(model, x, y).backward()
            opt.step() if hooked else sp.step()
        runs.append([sp.active_positions(n) for n in sp.names])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_soft_counts_at_every_step():
    model, opt, sp = build(soft_memory_bound=True)
    budget = sp.active_counts()
    assert sp.fixed_budget is False and MEST.fixed_budget is True
    above = 0
    for t, (x, y) in enumerate(data(), start=1):
        before = sp.active_counts()
        step(model, opt, sp, x, y)
        counts = sp.active_counts()
        expected = {n: b + soft_extra(b, sp.numel(n), t, alpha=0.5, delta_t=4,
                                      decay_step=sp.decay_step, t_end=30)
                    for n, b in budget.items()}
        assert counts == expected == sp.scheduled_counts(t), f"step {t}"
        if counts != before:
            assert sp.is_update_step(t)
        for name, (low, high) in sp.allowed_counts(t).items():
            assert low == budget[name] <= counts[name] <= high
        above += counts != budget
    assert above > 10, "the soft bound must hold extra weights for a while"
    assert sp.active_counts() == budget == sp.scheduled_counts(STEPS)


def fresh(**kwargs):
    model = mlp()
    return MEST(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.3, **kwargs)


def test_elastic_mutation_schedule_and_defaults():
    sp = fresh(total_steps=320)
    assert (sp.delta_t, sp.t_end, sp.decay_step, sp.alpha) == (10, 240, 180, 0.2)
    assert sp.gradient_coefficient == 1.0 and sp.allow_regrowth is False
    assert [sp.drop_fraction(t) for t in (1, 179, 180, 239, 240, 300)] == [
        0.2, 0.2, 0.1, 0.1, 0.0, 0.0]
    assert sp.config()["drop_fraction_decay"] == "step"
    assert fresh(total_steps=320, soft_memory_bound=True).alpha == 0.5
    cosine = fresh(total_steps=320, drop_fraction_decay="cosine")
    assert cosine.drop_fraction(120) == st.drop_fraction(120, alpha=0.2, t_end=240)


def test_training_flops_are_those_of_sparse_steps():
    assert MEST.training_flops(10.0, 2.0) == 6.0
    assert st.training_flops_per_example("mest", 10.0, 2.0, delta_t=5) == 6.0


def resume_runs(tmp_path, splits, **kwargs):
    batches = data()
    model, opt, sp = build(**kwargs)
    for x, y in batches:
        step(model, opt, sp, x, y)
    for split in splits:
        model_a, opt_a, sp_a = build(**kwargs)
        for x, y in batches[:split]:
            step(model_a, opt_a, sp_a, x, y)
        saved = save_checkpoint(tmp_path / "mest.pt", model_a, opt_a, sp_a)
        model_b, opt_b, sp_b = build(seed=9, **kwargs)
        model_b.load_state_dict(saved["model"])
        opt_b.load_state_dict(saved["optimizer"])
        with pytest.warns(UserWarning, match="seed"):
            sp_b.load_state_dict(saved["sparsifier"])
        for x, y in batches[split:]:
            step(model_b, opt_b, sp_b, x, y)
        for name in sp.names:
            assert torch.equal(sp.active_positions(name), sp_b.active_positions(name)), split
        for p, p_b in zip(model.parameters(), model_b.parameters()):
            assert torch.equal(p, p_b), f"saved at step {split}"


def test_resume_is_exact(tmp_path):
    resume_runs(tmp_path, [3, 4, 5])


def test_resume_is_exact_mid_way_through_a_soft_cycle(tmp_path):
    # 8 grows, 9 and 11 between, 12 drops the extras and grows again, 28 is the last drop
    resume_runs(tmp_path, [8, 9, 11, 12, 28, 29], soft_memory_bound=True)


def test_a_soft_state_outside_the_range_is_refused():
    model, opt, sp = build(soft_memory_bound=True)
    for x, y in data(10):
        step(model, opt, sp, x, y)
    state = sp.state_dict()
    model2, opt2, fresh = build(soft_memory_bound=True)
    fresh.load_state_dict(state)  # 2 updates in, above the budget: within the range
    assert fresh.active_counts() == sp.active_counts() != fresh.allowed_counts(0)
    low, high = fresh.allowed_counts(10)["0.weight"]
    state["positions"]["0.weight"] = torch.arange(high + 1)
    with pytest.raises(ValueError, match=rf"between {low} and {high}"):
        fresh.load_state_dict(state)
    strict = build()[2]
    with pytest.raises(ValueError, match="exactly"):
        strict.load_state_dict(sp.state_dict())


def masks_and_losses(backend, soft):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp = st.make_sparsifier("mest", model, opt, density=0.3, total_steps=STEPS, delta_t=4,
                            alpha=0.5, distribution="uniform", backend=backend,
                            soft_memory_bound=soft)
    assert sp.backend.name == backend
    history, losses = [], []
    for x, y in data():
        opt.zero_grad()
        value = loss(model, x, y)
        value.backward()
        sp.step()
        losses.append(value.item())
        history.append([sp.active_positions(n).clone() for n in sp.names])
    return history, torch.tensor(losses)


# the strict variant on every backend; the soft one where the count can change
OTHER_BACKENDS = [(b, soft) for b in st.available_backends() if b != "masked"
                  for soft in (False, True)
                  if not soft or VARIABLE_COUNT in get_backend(b).capabilities]


@pytest.mark.parametrize("backend,soft", OTHER_BACKENDS)
def test_other_backends_run_the_same(backend, soft):
    masks_a, loss_a = masks_and_losses("masked", soft)
    masks_b, loss_b = masks_and_losses(backend, soft)
    assert all(torch.equal(a, b) for u, v in zip(masks_a, masks_b) for a, b in zip(u, v))
    assert not all(torch.equal(a, b) for a, b in zip(masks_a[0], masks_a[-1]))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-9, atol=1e-9)


def test_the_soft_bound_is_refused_where_the_count_cannot_change(monkeypatch):
    monkeypatch.setattr(CSRBackend, "capabilities", frozenset())
    with pytest.raises(ValueError, match=r"changes the number of active .*backend='csr' cannot"):
        build(soft_memory_bound=True, backend="csr")
    assert build(backend="csr")[2].backend.name == "csr"  # the strict variant runs there


@pytest.mark.parametrize("kwargs,match", [
    ({"gradient_coefficient": -1.0}, "gradient_coefficient must be >= 0"),
    ({"gradient_coefficient": float("nan")}, "gradient_coefficient"),
    ({"gradient_coefficient": "1"}, "gradient_coefficient"),
    ({"soft_memory_bound": "yes"}, "soft_memory_bound must be True or False"),
    ({"drop_fraction_decay": "exponential"}, "drop_fraction_decay must be one of 'step'"),
    ({"decay_step": 0}, "decay_step must be a positive integer"),
    ({"decay_step": 31}, r"decay_step .*at most 30"),
    ({"decay_step": 10, "drop_fraction_decay": "cosine"}, "does not read it"),
    ({"alpha": 1.5}, "alpha"),
    ({"delta_t": 0}, "delta_t"),
    ({"soft_memory_bound": True, "structure": "fan-in"}, "structure='fan-in'"),
    ({"soft_memory_bound": True, "allow_regrowth": True}, "allow_regrowth=False"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            build(**kwargs)


def soft_or_shared_build(method, seed=0):
    """``test_state_fuzz``'s sparsifier, or for "mest-soft" MEST with the soft bound on it."""
    if method != "mest-soft":
        return SHARED_BUILD(method, seed)
    model = fuzz.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, MEST(model, opt, density=0.3, total_steps=fuzz.TOTAL, seed=seed,
                            delta_t=3, soft_memory_bound=True)


SHARED_BUILD = fuzz.build


@pytest.mark.fuzz
@pytest.mark.parametrize("method", ["mest", "mest-soft"])
@given(data=hs.data())
def test_mutated_states_load_or_are_refused(method, data):
    """``test_state_fuzz``'s property for MEST: a mutated state loads and keeps every invariant
    (counts within ``allowed_counts``), or raises ValueError and changes nothing."""
    with mock.patch.object(fuzz, "build", soft_or_shared_build):
        fuzz.load_mutated(method, data)
