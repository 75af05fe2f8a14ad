"""Gradual magnitude pruning: the cubic schedule, the pruning rule and its bookkeeping."""

import copy

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.methods import GMP
from tests.conftest import OPTIMIZERS, batches, save_checkpoint, tiny_cnn, train_step


def build(optimizer="sgd-momentum-wd", **kwargs):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = OPTIMIZERS[optimizer](model.parameters())
    args = {"density": 0.1, "total_steps": 30, "start_step": 4, "end_step": 22,
            "frequency": 5, **kwargs}
    return model, opt, GMP(model, opt, **args)


def cubic_count(numel, final, initial, t, start, end):
    """Zhu & Gupta's schedule written out: d(t) = d_f + (d_i - d_f) * (1 - (t - t0) / n)^3."""
    initial = max(initial, final)
    if t <= start:
        density = initial
    elif t >= end:
        density = final
    else:
        density = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3
    return min(numel, max(1, round(density * numel)))


def counts(sp):
    return {n: int(m.sum()) for n, m in sp.masks.items()}


def test_is_registered_and_prunes_without_a_fixed_budget():
    assert st.get_method("gmp") is GMP and "gmp" in st.available_methods()
    assert GMP.fixed_budget is False and st.RigL.fixed_budget is True
    model, opt, sp = build()
    assert isinstance(sp, st.Sparsifier) and not isinstance(sp, st.DynamicSparsifier)
    with pytest.raises(NotImplementedError, match="density_at"):
        sp.drop_fraction(5)


@pytest.mark.parametrize(
    "distribution, density, initial_density",
    [("uniform", 0.1, 1.0), ("uniform", 0.05, 0.6), ("erk", 0.3, 0.5), ("er", 0.2, 1.0)],
)
def test_schedule_is_the_cubic_per_layer(distribution, density, initial_density):
    model, opt, sp = build(distribution=distribution, density=density,
                           initial_density=initial_density, start_step=7, end_step=27)
    params = dict(model.named_parameters())
    final = st.layer_densities(model, density, distribution)
    total = sum(params[n].numel() for n in sp.masks)
    for t in range(0, 31):
        expected = {n: cubic_count(params[n].numel(), final[n], initial_density, t, 7, 27)
                    for n in sp.masks}
        assert sp.target_counts(t) == expected, f"step {t}"
        assert sp.density_at(t) == pytest.approx(sum(expected.values()) / total)
    assert sp.target_counts(27) == {n: round(final[n] * params[n].numel()) for n in sp.masks}
    if distribution == "erk":  # its small layers are denser than initial_density: kept as is
        constant = [n for n in sp.masks if final[n] >= initial_density]
        assert constant
        for n in constant:
            assert {sp.target_counts(t)[n] for t in range(31)} == {counts(sp)[n]}


def test_pruning_steps():
    _, _, sp = build(start_step=3, end_step=20, frequency=5)
    assert [t for t in range(0, 31) if sp.is_update_step(t)] == [8, 13, 18, 20]
    _, _, sp = build(start_step=0, end_step=20, frequency=4)
    assert [t for t in range(0, 31) if sp.is_update_step(t)] == [4, 8, 12, 16, 20]


def test_default_schedule():
    model, opt, sp = build(start_step=None, end_step=None, frequency=100, total_steps=1000)
    assert (sp.start_step, sp.end_step, sp.frequency) == (200, 750, 100)
    assert [t for t in range(1001) if sp.is_update_step(t)] == [300, 400, 500, 600, 700, 750]
    assert sp.distribution == "uniform" and sp.initial_density == 1.0
    _, _, short = build(start_step=None, end_step=None, total_steps=1)
    assert (short.start_step, short.end_step) == (0, 1)


@pytest.mark.parametrize("optimizer", ["sgd-momentum-wd", "adam", "adamw"])
def test_exact_counts_pruned_weights_and_their_state_stay_zero(optimizer):
    model, opt, sp = build(optimizer)
    params = dict(model.named_parameters())
    final = st.layer_densities(model, 0.1, "uniform")
    assert counts(sp) == {n: params[n].numel() for n in sp.masks}  # starts dense
    current = counts(sp)
    pruned_at = []
    for t, (x, y) in enumerate(batches(30), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, sp, x, y)
        if sp.is_update_step(t):
            current = sp.target_counts(t)
            assert sp.overall_density() == pytest.approx(sp.density_at(t))
        assert counts(sp) == current, f"step {t}"
        changed = False
        for name, mask in sp.masks.items():
            p = params[name]
            assert not (mask & ~before[name]).any(), f"{name} regrew weights at step {t}"
            changed |= not torch.equal(mask, before[name])
            assert torch.count_nonzero(p[~mask]) == 0, f"pruned {name} revived at step {t}"
            for state in opt.state[p].values():
                if torch.is_tensor(state) and state.shape == p.shape:
                    assert torch.count_nonzero(state[~mask]) == 0, f"state of pruned {name}"
        if changed:
            pruned_at.append(t)
    assert pruned_at == [9, 14, 19, 22]
    assert counts(sp) == {n: round(final[n] * params[n].numel()) for n in sp.masks}
    assert sp.layer_densities() == {n: int(m.sum()) / m.numel() for n, m in sp.masks.items()}


def test_no_pruning_before_start_or_after_end():
    model, opt, sp = build(start_step=10, end_step=20, frequency=3)
    data = batches(30)
    for x, y in data[:10]:
        train_step(model, opt, sp, x, y)
        assert all(bool(m.all()) for m in sp.masks.values())
    for x, y in data[10:20]:
        train_step(model, opt, sp, x, y)
    at_end = {n: m.clone() for n, m in sp.masks.items()}
    assert sp.overall_density() == pytest.approx(sp.density_at(20))
    for x, y in data[20:]:
        train_step(model, opt, sp, x, y)
    assert all(torch.equal(at_end[n], sp.masks[n]) for n in at_end)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def test_prunes_the_smallest_magnitudes_after_the_optimizer_step():
    """Against a reference: the same optimizer step on a copy, then the top |W| by hand."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = GMP(model, opt, density=0.2, total_steps=20, start_step=2, end_step=14, frequency=3)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for t in range(1, 21):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        ref_model, ref_opt = copy.deepcopy((model, opt))
        ref_params = dict(ref_model.named_parameters())
        for name, p in model.named_parameters():
            ref_params[name].grad = p.grad.clone()
        masks = {n: m.clone() for n, m in sp.masks.items()}
        with torch.no_grad():
            for name, mask in masks.items():
                ref_params[name].grad.mul_(mask)
            ref_opt.step()
            for name, mask in masks.items():
                ref_params[name].mul_(mask)
        sp.step()
        for name, mask in masks.items():
            expected = mask
            if sp.is_update_step(t):
                w = ref_params[name].detach().flatten().tolist()
                active = [i for i, m in enumerate(mask.flatten().tolist()) if m]
                keep = sorted(active, key=lambda i: -abs(w[i]))[: sp.target_counts(t)[name]]
                expected = torch.zeros(mask.numel(), dtype=torch.bool)
                expected[keep] = True
                expected = expected.view(mask.shape)
                checked += 1
            assert torch.equal(sp.masks[name], expected), f"{name} at step {t}"
            assert torch.equal(dict(model.named_parameters())[name],
                               ref_params[name] * expected), f"{name} at step {t}"
    assert checked == 2 * 4  # two layers, pruning at 5, 8, 11 and 14 (the end step)


def test_initial_density_gives_exact_random_masks():
    model, opt, sp = build(initial_density=0.5, density=0.1)
    params = dict(model.named_parameters())
    assert counts(sp) == {n: round(0.5 * params[n].numel()) for n in sp.masks}
    fc1 = sp.masks["fc1.weight"]
    assert fc1.any(dim=1).all() and fc1.float().mean(dim=0).std() < 0.2
    assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in sp.masks.items())
    other = build(initial_density=0.5, density=0.1, seed=1)[2]
    assert not torch.equal(other.masks["fc1.weight"], fc1)


def test_ties_are_broken_by_the_seed():
    def masks(seed):
        model = nn.Sequential(nn.Linear(10, 10))
        with torch.no_grad():
            model[0].weight.fill_(0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sp = GMP(model, opt, density=0.3, total_steps=4, start_step=0, end_step=2,
                 frequency=1, seed=seed)
        for _ in range(4):
            opt.zero_grad()
            model(torch.ones(1, 10)).sum().backward()
            sp.step()
        assert int(sp.masks["0.weight"].sum()) == 30
        return sp.masks["0.weight"]

    assert torch.equal(masks(3), masks(3))
    assert not torch.equal(masks(3), masks(4))


@pytest.mark.parametrize("split", [9, 12, 22])
@pytest.mark.parametrize("initial_density", [1.0, 0.6])
def test_resume_mid_schedule_is_exact(split, initial_density, tmp_path):
    data = batches(30)
    model, opt, sp = build("adam", initial_density=initial_density)
    for x, y in data:
        train_step(model, opt, sp, x, y)

    model_a, opt_a, sp_a = build("adam", initial_density=initial_density)
    for x, y in data[:split]:
        train_step(model_a, opt_a, sp_a, x, y)
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model_a, opt_a, sp_a)
    model_b, opt_b, sp_b = build("adam", initial_density=initial_density)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    sp_b.load_state_dict(checkpoint["sparsifier"])
    assert sp_b.step_count == split
    assert all(torch.equal(sp_a.masks[n], sp_b.masks[n]) for n in sp_a.masks)
    for x, y in data[split:]:
        train_step(model_b, opt_b, sp_b, x, y)
    for name in sp.masks:
        assert torch.equal(sp.masks[name], sp_b.masks[name]), name
    for (name, p), p_b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, p_b), name


def test_state_dict_holds_the_schedule():
    _, _, sp = build(initial_density=0.9, distribution={"conv1.weight": 0.5,
                                                        "conv2.weight": 0.2,
                                                        "fc1.weight": 0.1,
                                                        "fc2.weight": 0.3})
    state = sp.state_dict()
    assert state["method"] == "gmp" and state["step_count"] == 0
    assert state["config"] == {
        "density": 0.1, "distribution": {"conv1.weight": 0.5, "conv2.weight": 0.2,
                                         "fc1.weight": 0.1, "fc2.weight": 0.3},
        "total_steps": 30, "initial_density": 0.9, "start_step": 4, "end_step": 22,
        "frequency": 5, "dense_layers": [], "seed": 0, "backend": "masked",
        "erk_power_scale": 1.0, "sparsify_embeddings": False, "structure": "unstructured",
    }
    _, _, other = build(end_step=25, initial_density=0.9)
    with pytest.warns(UserWarning, match="end_step"):
        other.load_state_dict(sp.state_dict())
    _, _, other = build(end_step=25)  # other counts at the saved step: refused
    with pytest.raises(ValueError, match="'conv1.weight' has 130 active weights.* exactly 144"):
        other.load_state_dict(sp.state_dict())
    model, opt, _ = build()
    rigl = st.RigL(model, opt, density=0.5, total_steps=10)
    with pytest.raises(ValueError, match="of method 'gmp'"):
        rigl.load_state_dict(state)


def test_dense_layers_are_untouched():
    model, opt, sp = build(dense_layers=["conv1", "fc2"], density=0.2)
    assert set(sp.masks) == {"conv2.weight", "fc1.weight"}
    for x, y in batches(30):
        train_step(model, opt, sp, x, y)
    assert torch.count_nonzero(model.conv1.weight) == model.conv1.weight.numel()
    assert torch.count_nonzero(model.fc2.weight) == model.fc2.weight.numel()
    assert sp.layer_densities()["conv1.weight"] == 1.0
    assert sp.layer_densities()["fc2.weight"] == 1.0
    assert sp.overall_density() == pytest.approx(0.2, abs=1e-3)


def test_step_returns_the_optimizer_result():
    model, opt, sp = build()
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.is_tensor(sp.step(closure))


def test_nan_weights_delay_the_pruning_of_their_layer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = GMP(model, opt, density=0.5, total_steps=10, start_step=0, end_step=4, frequency=2)
    x, y = torch.randn(4, 12), torch.randint(0, 4, (4,))

    def step(nan=False):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if nan:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        sp.step()

    step()
    with pytest.warns(RuntimeWarning, match="'0.weight' has NaN or infinite weights or scores at step 2"):
        step(nan=True)  # a pruning step
    assert bool(sp.masks["0.weight"].all())
    assert int(sp.masks["2.weight"].sum()) == sp.target_counts(2)["2.weight"] < 64
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    step()
    step()  # the end step prunes every layer to its final count
    assert counts(sp) == {"0.weight": 96, "2.weight": 32}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0}, r"density must be in \(0, 1\]"),
        ({"density": 0.5, "initial_density": 0.4}, "must not be above initial_density"),
        ({"initial_density": 0}, r"initial_density must be in \(0, 1\]"),
        ({"initial_density": 1.5}, r"initial_density must be in \(0, 1\]"),
        ({"start_step": -1}, "start_step must be a non-negative integer"),
        ({"start_step": 2.5}, "start_step must be a non-negative integer"),
        ({"start_step": True}, "start_step must be a non-negative integer"),
        ({"end_step": 0}, "end_step must be a positive integer"),
        ({"end_step": 31}, r"end_step must be at most total_steps \(30\)"),
        ({"start_step": 22}, r"start_step \(22\) must be before end_step \(22\)"),
        ({"start_step": 25, "end_step": None}, r"before end_step \(22, the default"),
        ({"frequency": 0}, "frequency must be a positive integer"),
        ({"frequency": 1.5}, "frequency must be a positive integer"),
        ({"total_steps": 0}, "total_steps must be a positive integer"),
        ({"seed": 1.0}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_dst_only_arguments_are_rejected():
    with pytest.raises(TypeError, match="alpha"):
        build(alpha=0.3)


def test_delta_t_is_the_pruning_frequency():
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.make_sparsifier("gmp", model, opt, density=0.2, total_steps=40, delta_t=7)
    assert sp.frequency == 7
    with pytest.raises(ValueError, match="frequency .* and delta_t"):
        GMP(model, opt, density=0.2, total_steps=40, delta_t=7, frequency=5)
