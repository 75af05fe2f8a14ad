"""Invariants every registered method keeps on every backend it runs on, over distributions and
optimizers: exact counts, inactive weights and their optimizer state stay zero, grown weights
start at zero with zero state, kept weights keep their values and state through an update."""

import pytest
import torch

import sparsetrain as st
from sparsetrain.sparsity.structure import fixed_count
from tests.conftest import OPTIMIZERS, batches, schedule_kwargs, tiny_cnn, train_step

METHODS = st.available_methods()
PAIRS = st.supported_pairs()


def check_counts(sp, t, counts):
    """The counts after step ``t`` are those the method schedules, within its allowed range."""
    expected, total = sp.scheduled_counts(t), sp.scheduled_total(t)
    if expected is not None:
        assert counts == expected, f"step {t}"
    if total is not None:
        assert sum(counts.values()) == total, f"step {t}"
    for name, (low, high) in sp.allowed_counts(t).items():
        assert low <= counts[name] <= high, f"{name} at step {t}"


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("method,backend", PAIRS)
def test_invariants(method, backend, distribution, optimizer_name):
    torch.manual_seed(0)
    model = tiny_cnn()
    numel = {n: p.numel() for n, p in model.named_parameters()}
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    sp = st.make_sparsifier(method, model, opt, density=0.2, distribution=distribution,
                            total_steps=24, backend=backend, **schedule_kwargs(method, 4, alpha=0.5))
    b = sp.backend
    budget = {n: fixed_count(sp.structure, tuple(b.shape(n)), round(d * numel[n]))
              for n, d in st.layer_densities(tiny_cnn(), 0.2, distribution).items()}
    check_counts(sp, 0, sp.active_counts())
    if sp.fixed_budget:
        assert sp.forward_counts() == budget
    changed = 0
    for t, (x, y) in enumerate(batches(24), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        weight_before = {n: b.dense_weight(n).clone() for n in sp.names}
        state_before = {n: [s.clone() for s in b.dense_state(n)] for n in sp.names}
        train_step(model, opt, sp, x, y)
        counts = sp.active_counts()
        check_counts(sp, t, counts)
        for name, mask in sp.masks.items():
            weight, states = b.dense_weight(name), b.dense_state(name)
            assert mask.dtype == torch.bool and mask.shape == weight.shape
            assert int(mask.sum()) == counts[name], f"{name} at step {t}"
            assert torch.equal(sp.active_positions(name), mask.reshape(-1).nonzero().squeeze(1))
            assert torch.count_nonzero(weight[~mask]) == 0, f"inactive {name} revived at step {t}"
            for state in states:
                assert torch.count_nonzero(state[~mask]) == 0, f"state of inactive {name}"
            if torch.equal(mask, before[name]):
                continue
            changed += 1
            assert sp.is_update_step(t), f"{name} changed at step {t}, not an update step"
            grown = mask & ~before[name]
            if grown.any():
                assert sp.grows, f"{method} must only prune, but {name} grew at step {t}"
                if sp.grows_at_zero:
                    assert torch.count_nonzero(weight[grown]) == 0, "grown weights start at 0"
                for state in states:
                    assert torch.count_nonzero(state[grown]) == 0, "grown state must be zero"
            if not sp.optimizer_step_on_update:  # the update replaced the optimizer step
                kept = mask & before[name]
                assert torch.equal(weight[kept], weight_before[name][kept]), "kept weights move"
                for new, old in zip(states, state_before[name]):
                    assert torch.equal(new[kept], old[kept]), "kept state moves along"
    final = sp.scheduled_counts(sp.total_steps)
    if final is not None:  # where the method fixes the final counts: the distribution's
        assert sp.forward_counts() == budget
    if method == "static":
        assert changed == 0
    else:
        assert changed > 0, "a dynamic method must change the topology"
    assert 0 < sp.ever_active_fraction() <= 1


@pytest.mark.parametrize("method,backend", PAIRS)
def test_dense_layers_are_untouched(method, backend):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.make_sparsifier(method, model, opt, density=0.1, total_steps=10, backend=backend,
                            dense_layers=["conv1", "fc2"], **schedule_kwargs(method, 2))
    assert set(sp.masks) == {"conv2.weight", "fc1.weight"}
    for x, y in batches(10):
        train_step(model, opt, sp, x, y)
    assert torch.count_nonzero(model.conv1.weight) == model.conv1.weight.numel()
    assert sp.layer_densities()["fc2.weight"] == 1.0
    # within what the method's structure can hold (fan-in: whole rows)
    tolerance = 1e-3 if sp.structure.kind == "unstructured" else 0.02
    assert sp.overall_density() == pytest.approx(0.1, abs=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method,backend", PAIRS)
def test_dtypes_follow_the_model(method, backend, dtype):
    torch.manual_seed(0)
    model = tiny_cnn().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = dict(density=0.3, total_steps=8, backend=backend, **schedule_kwargs(method, 2))
    sp = st.make_sparsifier(method, model, opt, **kwargs)
    for t, (x, y) in enumerate(batches(8), start=1):
        train_step(model, opt, sp, x.to(dtype), y)
        check_counts(sp, t, {n: int(m.sum()) for n, m in sp.masks.items()})
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", [m for m, b in PAIRS if b == "masked"])
def test_cuda(method):
    torch.manual_seed(0)
    model = tiny_cnn().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = st.make_sparsifier(method, model, opt, density=0.2, total_steps=8,
                            **schedule_kwargs(method, 2))
    assert all(m.is_cuda for m in sp.masks.values())
    for t, (x, y) in enumerate(batches(8), start=1):
        train_step(model, opt, sp, x.cuda(), y.cuda())
        check_counts(sp, t, {n: int(m.sum()) for n, m in sp.masks.items()})
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in sp.masks.items())
