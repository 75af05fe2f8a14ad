"""load_state_dict refuses a state that does not fit the sparsifier, with one ValueError that
names what is wrong, and changes nothing when it does: active sets, step and seed stay."""

import warnings

import pytest
import torch
from torch import nn

import sparsetrain as st

TOTAL = 40


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def build(method="rigl", *, backend="masked", seed=0, **kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {"density": 0.3, "total_steps": TOTAL, "seed": seed, "backend": backend}
    if method == "gmp":
        options.update(start_step=4, end_step=24, frequency=5)
    else:
        options.update(delta_t=3)
    options.update(kwargs)
    return model, opt, st.make_sparsifier(method, model, opt, **options)


def train(model, opt, sp, steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 12, generator=g)
        nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=g)).backward()
        sp.step()


def snapshot(sp):
    return (sp.step_count, sp.seed, {n: sp.active_positions(n).clone() for n in sp.names})


def same(a, b):
    return a[:2] == b[:2] and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def refused(sp, state, match):
    """``load_state_dict(state)`` raises one ValueError matching ``match`` and changes
    nothing."""
    before = snapshot(sp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match) as info:
            sp.load_state_dict(state)
    assert "\n" not in str(info.value), "one line"
    assert same(before, snapshot(sp)), "the sparsifier was changed by a refused state"
    return str(info.value)


def saved(method="rigl", steps=7, **kwargs):
    model, opt, sp = build(method, seed=5, **kwargs)
    train(model, opt, sp, steps)
    return sp.state_dict()


def test_a_crafted_denser_active_set_is_refused():
    model, opt, sp = build(density=0.05)
    state = sp.state_dict()
    state["positions"] = {n: torch.arange(sp.numel(n)) for n in sp.names}  # all ones
    message = refused(sp, state, r"'0.weight' has 240 active weights, but this sparsifier holds "
                                r"exactly 11 there at step 0")
    assert "density" in message
    state = sp.state_dict()
    state["positions"]["2.weight"] = state["positions"]["2.weight"][:-1]
    refused(sp, state, r"'2.weight' has \d+ active weights")


@pytest.mark.parametrize("step", [-7, TOTAL + 1, 10 ** 9, 3.0, "3", True, None,
                                  torch.tensor(3), float("nan")])
@pytest.mark.parametrize("method", ["rigl", "gmp"])
def test_step_count_must_be_an_integer_within_the_run(method, step):
    _, _, sp = build(method)
    state = saved(method)
    state["step_count"] = step
    refused(sp, state, rf"step_count must be an integer in \[0, {TOTAL}\]")


@pytest.mark.parametrize("method", ["rigl", "gmp"])
def test_step_count_at_the_ends_of_the_run_loads(method):
    _, _, sp = build(method, seed=5)
    for step in (0, TOTAL):
        state = saved(method, steps=0 if step == 0 else 30)
        state["step_count"] = step
        sp.load_state_dict(state)
        assert sp.step_count == step


@pytest.mark.parametrize("key", ["method", "step_count", "positions", "ever_active", "config",
                                 "method_state"])
def test_every_missing_key_is_named(key):
    _, _, sp = build()
    state = saved()
    del state[key]
    refused(sp, state, rf"not a sparsetrain sparsifier state_dict: it lacks \['{key}'\]")
    del state["config" if key != "config" else "method"]
    message = refused(sp, state, "lacks")
    assert key in message


def test_layer_names_must_match():
    _, _, sp = build()
    state = saved()
    state["positions"]["9.weight"] = torch.tensor([0, 1])
    refused(sp, state, r"unknown names: \['9.weight'\]")
    state = saved()
    del state["positions"]["2.weight"]
    refused(sp, state, r"missing names: \['2.weight'\]")
    state = saved()
    state["ever_active"]["9.weight"] = torch.tensor([0, 1])
    refused(sp, state, r"ever_active.*unknown names: \['9.weight'\]")
    state = saved()
    state["positions"][3] = torch.tensor([0, 1])  # not even a string
    refused(sp, state, r"unknown names: \[3\]")


@pytest.mark.parametrize("change", ["shuffled", "duplicated", "negative", "beyond", "float",
                                    "2-d", "empty", "list", "nan"])
@pytest.mark.parametrize("key", ["positions", "ever_active"])
def test_positions_must_be_sorted_distinct_and_in_range(key, change):
    _, _, sp = build()
    state = saved()
    p = state[key]["2.weight"]
    state[key]["2.weight"] = {
        "shuffled": p.flip(0), "duplicated": torch.cat([p[:1], p[:-1]]).sort().values,
        "negative": torch.cat([torch.tensor([-1]), p[1:]]),
        "beyond": torch.cat([p[:-1], torch.tensor([320])]), "float": p.double(),
        "2-d": p.view(1, -1), "empty": p[:0], "list": p.tolist(),
        "nan": torch.full((20, 16), float("nan")),
    }[change]
    refused(sp, state, rf"{'masks' if key == 'positions' else key}\['2.weight'\]")


def test_wrong_types_are_refused_with_a_value_error():
    _, _, sp = build()
    for key, value, match in [("method", 3, "of method 3"), ("positions", [1, 2], "'positions'"),
                              ("ever_active", torch.ones(3), "'ever_active'"),
                              ("config", "rigl", "'config'"),
                              ("method_state", [], "'method_state'")]:
        state = saved()
        state[key] = value
        refused(sp, state, match)
    refused(sp, [("method", "rigl")], "not a sparsetrain sparsifier state_dict")
    state = saved()
    state["config"]["seed"] = 1.5
    refused(sp, state, r"seed")
    state = saved()
    state["positions"]["0.weight"] = torch.zeros(20, 12, device="meta", dtype=torch.bool)
    refused(sp, state, r"masks\['0.weight'\]")


def test_config_values_of_other_types_only_warn():
    _, _, sp = build()
    state = saved()
    state["config"].update(density=torch.tensor([0.3, 0.3]), alpha=[torch.ones(2)], other=None)
    state["config"][7] = "x"
    with pytest.warns(UserWarning, match="other settings for"):
        sp.load_state_dict(state)


def test_gmp_counts_must_follow_the_schedule_at_the_saved_step():
    _, _, sp = build("gmp", seed=5, initial_density=0.8)
    state = saved("gmp", steps=12, initial_density=0.8)  # pruned at 9: above the final count
    sp.load_state_dict(state)
    low, high = sp.allowed_counts(12)["0.weight"]
    assert low == sp.target_counts(9)["0.weight"] < high == sp.target_counts(0)["0.weight"]
    final = sp.target_counts(TOTAL)["0.weight"]
    assert final < low
    state["positions"]["0.weight"] = state["positions"]["0.weight"][:final]
    refused(sp, state, rf"'0.weight' has {final} active weights.* between {low} and {high}")
    state = saved("gmp", steps=0, initial_density=0.8)
    state["positions"]["0.weight"] = torch.arange(240)  # above the initial density
    refused(sp, state, rf"'0.weight' has 240 active weights.* exactly {high}")
    # a pruning skipped (non-finite weights) leaves more: up to the initial count is accepted
    state = saved("gmp", steps=30, initial_density=0.8)
    state["positions"]["0.weight"] = torch.arange(low)
    sp.load_state_dict(state)
    assert sp.active_counts()["0.weight"] == low


def test_a_sparsifier_built_with_masks_keeps_their_counts():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = {n: (torch.arange(p.numel()) % 3 == 0).view(p.shape)
             for n, p in model.named_parameters() if n.endswith("weight")}
    with pytest.warns(UserWarning, match="not the density"):
        sp = st.Static(model, opt, density=0.5, total_steps=TOTAL, masks=masks)
    sp.load_state_dict(sp.state_dict())
    model2 = mlp()
    other = st.Static(model2, torch.optim.SGD(model2.parameters(), lr=0.1), density=0.5,
                      total_steps=TOTAL)
    refused(sp, other.state_dict(), "active weights")


def test_a_refused_state_changes_nothing():
    _, _, sp = build()
    state = saved(steps=9)  # other active sets, other seed
    assert not same(snapshot(sp), (9, 5, state["positions"]))
    for key, value in [("step_count", -1), ("method_state", 0)]:
        bad = {**state, key: value}
        refused(sp, bad, key)
    bad = {**state, "ever_active": {**state["ever_active"], "4.weight": torch.tensor([9, 3])}}
    refused(sp, bad, "ever_active")
    with pytest.warns(UserWarning, match="seed"):
        sp.load_state_dict(state)
    assert same(snapshot(sp), (9, 5, state["positions"]))


def test_snfs_gradient_average_is_checked():
    _, _, sp = build("snfs", seed=5)
    for ema, match in [({"0.weight": torch.ones(3)}, r"\['gradient_ema'\]\['0.weight'\]"),
                       ({"0.weight": torch.ones(20, 12, dtype=torch.int64)}, "floating"),
                       ({"9.weight": torch.ones(2)}, "9.weight"), ([1], "gradient_ema"),
                       ({"0.weight": 1.0}, r"\['0.weight'\] must be a floating")]:
        state = saved("snfs")
        state["method_state"]["gradient_ema"] = ema
        refused(sp, state, match)
    sp.load_state_dict(saved("snfs"))
    assert set(sp.gradient_ema) == set(sp.names)


def test_states_of_earlier_versions_with_bool_masks_load():
    model, opt, sp = build(seed=5)
    train(model, opt, sp, 7)
    old = {"method": "rigl", "step_count": 7, "masks": dict(sp.masks),
           "generator": torch.Generator().get_state(), "config": sp.config(),
           "method_state": {}}
    _, _, fresh = build(seed=5)
    fresh.load_state_dict(old)
    assert fresh.step_count == 7
    assert all(torch.equal(fresh.masks[n], sp.masks[n]) for n in sp.names)
    old["masks"]["0.weight"] = torch.ones(20, 12, dtype=torch.bool)
    refused(fresh, old, "'0.weight' has 240 active weights")


def test_states_load_across_backends():
    state = saved(steps=9)
    _, _, csr = build(backend="csr")
    with pytest.warns(UserWarning, match="seed"):
        csr.load_state_dict(state)
    assert all(torch.equal(csr.active_positions(n), state["positions"][n]) for n in csr.names)
    bad = {**state, "positions": {**state["positions"], "0.weight": torch.arange(240)}}
    refused(csr, bad, "'0.weight' has 240 active weights")
