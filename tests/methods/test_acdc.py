"""AC/DC: the phase schedule, the magnitude selection, re-activation at zero, the dense model of
the pair, and the bookkeeping (counts, state_dict, refused backends and arguments)."""

import copy
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import sparsetrain as st
from sparsetrain.methods import ACDC
from tests.conftest import OPTIMIZERS, batches, save_checkpoint, tiny_cnn, train_step
from tests.methods import test_state_fuzz as fuzz


def build(optimizer="sgd-momentum-wd", model=None, **kwargs):
    torch.manual_seed(0)
    model = tiny_cnn() if model is None else model
    opt = OPTIMIZERS[optimizer](model.parameters())
    args = {"density": 0.2, "total_steps": 20, **kwargs}
    return model, opt, ACDC(model, opt, **args)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def reference_phases(total, warmup, phase, final):
    """'D' or 'C' after each step 0..total, written out from the rule: W dense steps, then a
    compressed and a decompressed phase of P steps for as long as the decompressed one starts
    before F (the last decompressed phase runs on to F), then compressed from F to the end."""
    w = max(1, round(warmup * total))
    p = max(1, round(phase * total))
    f = total - max(1, round(final * total))
    kinds = ["D"] * (total + 1)
    start = w
    while start + p < f:
        for s in range(start, start + p):
            kinds[s] = "C"
        start = start + 2 * p if start + 3 * p < f else f
    for s in range(f, total + 1):
        kinds[s] = "C"
    return kinds


def counts(sp):
    return {n: int(m.sum()) for n, m in sp.masks.items()}


def test_is_registered_with_its_counts_contract():
    assert st.get_method("acdc") is ACDC and "acdc" in st.available_methods()
    assert ACDC.fixed_budget is False and ACDC.grows and ACDC.grows_at_zero
    assert ACDC.requires == {"variable_count", "dense_weights"}
    assert ACDC.supported_backends() == ["masked"]
    assert ACDC.training_flops(10.0, 4.0) == 12.0  # 3 f_S, f_S of the current counts
    assert st.training_flops_per_example("acdc", 10.0, 10.0) == 30.0  # a dense phase: 3 f_D


@pytest.mark.parametrize("total, fractions", [
    (100, (0.1, 0.05, 0.15)), (1000, (0.1, 0.05, 0.15)), (200, (0.05, 0.1, 0.15)),
    (20, (0.1, 0.05, 0.15)), (24, (0.1, 0.05, 0.15)), (30, (0.1, 0.05, 0.15)),
    (10, (0.1, 0.05, 0.15)), (2, (0.1, 0.05, 0.15)), (97, (0.13, 0.07, 0.2)),
    (50, (0.3, 0.2, 0.5)), (50, (0.4, 0.5, 0.2)), (333, (0.01, 0.01, 0.01)),
    (64, (0.25, 0.125, 0.25)),
])
def test_the_phases_follow_the_rule_at_every_step(total, fractions):
    warmup, phase, final = fractions
    _, _, sp = build(model=mlp(), total_steps=total, warmup_fraction=warmup,
                     phase_fraction=phase, final_fraction=final)
    kinds = reference_phases(total, warmup, phase, final)
    assert ["C" if sp.compressed(t) else "D" for t in range(total + 1)] == kinds
    switches = [t for t in range(1, total + 1) if kinds[t] != kinds[t - 1]]
    assert [t for t in range(total + 1) if sp.is_update_step(t)] == switches
    assert kinds[0] == "D" and kinds[total] == "C"


def test_the_defaults_are_the_authors_schedules():
    _, _, sp = build(model=mlp(), total_steps=100)  # ImageNet: 100 epochs as 100 steps
    compressed = [t for t in range(101) if sp.compressed(t)]
    assert compressed == [t for s in range(10, 75, 10) for t in range(s, s + 5)] + list(
        range(85, 101))
    assert [t for t in range(101) if sp.is_update_step(t)] == [*range(10, 80, 5), 85]
    _, _, sp = build(model=mlp(), total_steps=200, warmup_fraction=0.05, phase_fraction=0.1,
                     final_fraction=0.15)  # CIFAR-100: prune at 10, 50, ..., 170
    assert [t for t in range(201) if sp.is_update_step(t)] == list(range(10, 171, 20))
    assert sp.selection == "global" and sp.reset_momentum and sp.keep_dense


@pytest.mark.parametrize("selection, distribution", [
    ("global", "uniform"), ("layer", "uniform"), ("layer", "erk")])
def test_counts_at_every_step(selection, distribution):
    model, opt, sp = build(selection=selection, distribution=distribution)
    numel = {n: m.numel() for n, m in sp.masks.items()}
    final = st.layer_densities(tiny_cnn(), 0.2, distribution)
    budget = {n: round(final[n] * numel[n]) for n in numel}
    assert counts(sp) == numel and sp.scheduled_counts(0) == numel
    for t, (x, y) in enumerate(batches(20), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, sp, x, y)
        changed = any(not torch.equal(before[n], m) for n, m in sp.masks.items())
        assert changed == sp.is_update_step(t), f"step {t}"
        now = counts(sp)
        if not sp.compressed(t):
            assert now == numel and sp.scheduled_counts(t) == numel
        elif selection == "layer":
            assert now == budget == sp.scheduled_counts(t)
        else:
            assert sp.scheduled_counts(t) is None
            assert sum(now.values()) == sp.scheduled_total(t) == round(0.2 * sum(numel.values()))
        for name, (low, high) in sp.allowed_counts(t).items():
            assert low <= now[name] <= high


@pytest.mark.parametrize("selection", ["global", "layer"])
@pytest.mark.parametrize("ties", [False, True])
def test_the_kept_weights_are_the_largest_by_a_full_sort(selection, ties):
    model = mlp()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            if ties:  # a few values, many ties
                layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape).float())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are
    sp = ACDC(model, opt, density=0.3, total_steps=20, selection=selection,
              distribution="uniform")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in sp.masks}
    x = torch.randn(4, 6)
    for _ in range(sp.warmup_steps):
        opt.zero_grad()
        model(x).sum().backward()
        sp.step()
    assert sp.compressed(sp.step_count) and sp.is_update_step(sp.step_count)
    if selection == "global":  # over all layers at once
        entries = sorted(((float(w.abs().reshape(-1)[i]), n, i) for n, w in weights.items()
                          for i in range(w.numel())), reverse=True)
        n_keep = round(0.3 * sum(w.numel() for w in weights.values()))
        groups = {n: [e for e in entries if e[1] == n] for n in weights}
        threshold = entries[n_keep - 1][0]
        assert sum(counts(sp).values()) == n_keep
    else:
        groups = {n: sorted(((float(w.abs().reshape(-1)[i]), n, i) for i in range(w.numel())),
                            reverse=True) for n, w in weights.items()}
    for name, entries in groups.items():
        kept = set(sp.active_positions(name).tolist())
        if selection == "layer":
            n_keep = round(0.3 * weights[name].numel())
            assert len(kept) == n_keep
            threshold = entries[n_keep - 1][0]
        above = {i for v, _, i in entries if v > threshold}
        tied = {i for v, _, i in entries if v == threshold}
        assert above <= kept <= above | tied, name  # exactly the sorted order, up to ties
        if not ties:
            assert kept == {i for _, _, i in entries[:len(kept)]}


@pytest.mark.parametrize("reset_momentum", [True, False])
def test_reactivated_weights_start_at_zero(reset_momentum):
    model, opt, sp = build(reset_momentum=reset_momentum)  # C at 2, D at 3, C at 4, ...
    params = dict(model.named_parameters())
    data = batches(3)
    for x, y in data[:2]:
        train_step(model, opt, sp, x, y)
    pruned = {n: ~m for n, m in sp.masks.items()}
    assert all(p.any() for p in pruned.values())
    train_step(model, opt, sp, *data[2])
    assert sp.is_update_step(3) and not sp.compressed(3)
    for name, mask in sp.masks.items():
        assert mask.all()
        assert torch.count_nonzero(params[name][pruned[name]]) == 0, "restarted at zero"
        buffer = opt.state[params[name]]["momentum_buffer"]
        assert torch.count_nonzero(buffer[pruned[name]]) == 0, "with zero optimizer state"
        assert bool((buffer[~pruned[name]] != 0).any()) != reset_momentum
    if reset_momentum:  # every momentum buffer restarts, the dense layers' too
        assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in opt.state.values())
    for t, (x, y) in enumerate(batches(2, seed=1), start=4):
        train_step(model, opt, sp, x, y)
        assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in sp.masks.items())


def run_recording(sp_kwargs=None, steps=20):
    """A run; the model's tensors right after every optimizer step (before any switch)."""
    model, opt, sp = build(**(sp_kwargs or {}))
    after_step = {}
    opt.register_step_post_hook(lambda *_: after_step.__setitem__(
        sp.step_count, {k: v.clone() for k, v in model.state_dict().items()}))
    dense = []
    for x, y in batches(steps):
        train_step(model, opt, sp, x, y)
        dense.append((sp.dense_step, sp.dense_state_dict()))
    return model, opt, sp, after_step, dense


def test_the_dense_model_is_the_one_at_the_end_of_the_last_dense_phase():
    model, opt, sp, after_step, dense = run_recording()
    for t, (step, copy_) in enumerate(dense, start=1):
        ends = [s for s in range(1, t + 1) if sp.is_update_step(s) and sp.compressed(s)]
        if not ends:
            assert step == 0 and copy_ is None
            continue
        assert step == ends[-1]
        assert copy_.keys() == after_step[step].keys()
        assert all(torch.equal(copy_[k], after_step[step][k]) for k in copy_)
    assert sp.dense_step == sp.final_start
    final = sp.dense_state_dict()
    assert sum(int(torch.count_nonzero(final[n])) for n in sp.masks) > 2 * sum(
        counts(sp).values()), "the dense model holds the weights pruned since"
    evaluation = copy.deepcopy(model)
    evaluation.load_state_dict(final)  # strict: every parameter and buffer
    _, _, off = build(keep_dense=False)
    for x, y in batches(20):
        train_step(off.model, off.optimizer, off, x, y)
    assert off.dense_state_dict() is None and off.dense_step == 0
    with pytest.warns(UserWarning, match="keep_dense"):
        off.load_state_dict(sp.state_dict())  # a saved dense copy is dropped without keep_dense
    assert off.dense_state_dict() is None and off.dense_step == 0


@functools.lru_cache(maxsize=None)
def straight_run():
    model, opt, sp, _, _ = run_recording()
    return model, opt, sp


@pytest.mark.parametrize("split", [2, 3, 17])  # at a compressed, a dense and the final switch
def test_resume_is_exact_with_the_dense_model(split, tmp_path):
    model, opt, sp = straight_run()
    model_a, opt_a, sp_a = build()
    data = batches(20)
    for x, y in data[:split]:
        train_step(model_a, opt_a, sp_a, x, y)
    saved = save_checkpoint(tmp_path / "c.pt", model_a, opt_a, sp_a)
    model_b, opt_b, sp_b = build()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])
    sp_b.load_state_dict(saved["sparsifier"])
    assert sp_b.dense_step == sp_a.dense_step
    if sp_a.dense_step:
        assert all(torch.equal(v, sp_b.dense_state_dict()[k])
                   for k, v in sp_a.dense_state_dict().items())
    for x, y in data[split:]:
        train_step(model_b, opt_b, sp_b, x, y)
    assert all(torch.equal(sp.masks[n], sp_b.masks[n]) for n in sp.masks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_b.parameters()))
    assert sp_b.dense_step == sp.dense_step
    assert all(torch.equal(v, sp_b.dense_state_dict()[k])
               for k, v in sp.dense_state_dict().items())


def refused(sp, state, match):
    before = (sp.step_count, sp.dense_step, {n: sp.active_positions(n).clone() for n in sp.names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match) as info:
            sp.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert before[:2] == (sp.step_count, sp.dense_step)
    assert all(torch.equal(before[2][n], sp.active_positions(n)) for n in sp.names)


def test_crafted_states_are_refused():
    model, opt, sp = build()
    for x, y in batches(6):
        train_step(model, opt, sp, x, y)
    good = sp.state_dict()
    assert good["method_state"]["dense_step"] == 6
    _, _, fresh = build()

    def changed(**method_state):
        state = copy.deepcopy(good)
        state["method_state"].update(method_state)
        return state

    refused(fresh, changed(dense_step=5), "dense_step")  # 5 starts a dense phase
    refused(fresh, changed(dense_step=21), "dense_step")
    refused(fresh, changed(dense_step=0), "dense_step")
    refused(fresh, changed(dense={}), "dense_step")
    refused(fresh, changed(dense="x"), r"method_state\['dense'\] must be a dict")
    refused(fresh, changed(extra=1), "unknown keys")
    weights = dict(good["method_state"]["dense"])
    refused(fresh, changed(dense={**weights, "fc1.weight": torch.zeros(3)}), "shape")
    refused(fresh, changed(dense={k: v for k, v in weights.items() if k != "fc1.bias"}),
            "fc1.bias")
    state = copy.deepcopy(good)
    state["positions"]["fc1.weight"] = torch.arange(sp.numel("fc1.weight"))  # dense, at step 6
    assert sp.compressed(6) and sp.selection == "global"
    fresh.load_state_dict(state)  # a pruning skipped on non-finite weights leaves a layer dense
    state["step_count"] = 3  # a dense phase holds every weight
    refused(fresh, state, r"'conv1.weight' has \d+ active weights, but this sparsifier holds "
                          r"exactly 144 there at step 3")


@pytest.mark.fuzz
@settings(max_examples=max(10, settings.default.max_examples // 4))  # a quarter of the profile
@given(data=hs.data())
def test_mutated_states_load_or_are_refused(data):
    """The registry's state fuzzing (positions, steps, config, keys), plus mutations of AC/DC's
    own method state: either a state that keeps every invariant loads, or ValueError."""
    original = fuzz.mutate

    def mutate(state, data, method):
        method_state = state.get("method_state")
        if isinstance(method_state, dict) and data.draw(hs.booleans(), label="own state"):
            key = data.draw(hs.sampled_from(["dense", "dense_step"]), label="key")
            dense = method_state.get("dense")
            if key == "dense" and isinstance(dense, dict) and dense and data.draw(hs.booleans()):
                name = data.draw(hs.sampled_from(sorted(dense)), label="tensor")
                dense[name] = data.draw(hs.sampled_from([*fuzz.WEIRD, dense[name].double(),
                                                         dense[name].reshape(-1)[:1]]),
                                           label="value")
            else:
                method_state[key] = data.draw(hs.one_of(hs.integers(-2, fuzz.TOTAL + 2),
                                                        hs.sampled_from(fuzz.WEIRD)))
            return
        original(state, data, method)

    fuzz.mutate = mutate
    try:
        fuzz.load_mutated("acdc", data)
    finally:
        fuzz.mutate = original


def test_the_csr_backend_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"ACDC is not available on backend='csr': it needs "
                                         r"dense_weights \(dense storage of every weight\).*"
                                         r"use a backend that does \(masked\)"):
        build(backend="csr")


@pytest.mark.parametrize("selection", ["global", "layer"])
def test_non_finite_weights_skip_a_pruning(selection):
    model, opt, sp = build(selection=selection)

    def spoil(*_):  # a NaN appears in the optimizer step that ends the warm-up
        if sp.step_count == sp.warmup_steps:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")

    opt.register_step_post_hook(spoil)
    with pytest.warns(RuntimeWarning, match="'fc1.weight' has NaN"):
        for x, y in batches(2):
            train_step(model, opt, sp, x, y)
    assert counts(sp)["fc1.weight"] == model.fc1.weight.numel()  # stays dense
    pruned = counts(sp)["fc2.weight"] < model.fc2.weight.numel()
    assert pruned == (selection == "layer")  # global selection skips the whole pruning
    for name, (low, high) in sp.allowed_counts(2).items():
        assert low <= counts(sp)[name] <= high


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup_fraction": 0}, r"warmup_fraction must be in \(0, 1\)"),
    ({"phase_fraction": 1.0}, r"phase_fraction must be in \(0, 1\)"),
    ({"final_fraction": float("nan")}, "final_fraction must be"),
    ({"final_fraction": "0.1"}, "final_fraction must be"),
    ({"warmup_fraction": 0.6, "final_fraction": 0.5}, "do not fit in total_steps=20"),
    ({"total_steps": 1}, "do not fit in total_steps=1"),
    ({"selection": "random"}, "selection must be one of 'global', 'layer'"),
    ({"selection": "global", "structure": "2:4"}, "use selection='layer'"),
    ({"reset_momentum": "yes"}, "reset_momentum must be True or False"),
    ({"keep_dense": 1}, "keep_dense must be True or False"),
    ({"delta_t": 0}, "delta_t must be a positive integer"),
    ({"density": 0.0005}, "keeps 2 weights, fewer than the 4 sparsified layers"),
    ({"density": 0}, r"density must be .*\(0, 1\]"),
    ({"distribution": "gaussian"}, "distribution must be one of"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_delta_t_is_accepted_and_the_structure_picks_layer_selection():
    _, _, sp = build(delta_t=7)
    _, _, plain = build()
    assert [sp.is_update_step(t) for t in range(21)] == [plain.is_update_step(t)
                                                         for t in range(21)]
    _, _, nm = build(model=nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                     density=0.5, structure="2:4")
    assert nm.selection == "layer" and nm.config()["selection"] == "layer"
