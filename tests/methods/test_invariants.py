"""Invariants every registered method keeps, over methods x distributions x optimizers."""

import pytest
import torch

import sparsetrain as st
from tests.conftest import OPTIMIZERS, batches, schedule_kwargs, tiny_cnn, train_step

METHODS = st.available_methods()


def state_tensors(optimizer, param):
    return [v for v in optimizer.state.get(param, {}).values()
            if torch.is_tensor(v) and v.shape == param.shape]


def expected_counts_after(sp, t, before):
    """Active weights per layer after step ``t``: constant for a fixed budget, else the schedule's
    count at pruning steps and unchanged in between."""
    if sp.fixed_budget or not sp.is_update_step(t):
        return before
    return sp.target_counts(t)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("method", METHODS)
def test_invariants(method, distribution, optimizer_name):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    sp = st.make_sparsifier(method, model, opt, density=0.2, distribution=distribution,
                            total_steps=24, **schedule_kwargs(method, 4, alpha=0.5))
    params = dict(model.named_parameters())
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    budget = {n: round(d * params[n].numel())
              for n, d in st.layer_densities(model, 0.2, distribution).items()}
    if sp.fixed_budget:
        assert counts == budget
    else:  # dense to sparse: the initial density (1.0 by default) down to the budget
        assert counts == {n: params[n].numel() for n in counts}
    changed = 0
    for t, (x, y) in enumerate(batches(24), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, sp, x, y)
        counts = expected_counts_after(sp, t, counts)
        for name, mask in sp.masks.items():
            p = params[name]
            assert mask.dtype == torch.bool and mask.shape == p.shape
            assert int(mask.sum()) == counts[name], f"{name} at step {t}"
            assert torch.count_nonzero(p[~mask]) == 0, f"inactive {name} revived at step {t}"
            for state in state_tensors(opt, p):
                assert torch.count_nonzero(state[~mask]) == 0, f"state of inactive {name}"
            if not torch.equal(mask, before[name]):
                changed += 1
                assert sp.is_update_step(t), f"{name} changed at step {t}, not an update step"
            grown = mask & ~before[name]
            if grown.any():
                assert sp.fixed_budget, f"{method} must only prune, but {name} grew at step {t}"
                assert torch.count_nonzero(p[grown]) == 0, "grown weights must start at zero"
                for state in state_tensors(opt, p):
                    assert torch.count_nonzero(state[grown]) == 0, "grown state must be zero"
    if not sp.fixed_budget:  # the schedule has ended (end_step <= 24): the budget is reached
        assert {n: int(m.sum()) for n, m in sp.masks.items()} == budget
    if method == "static":
        assert changed == 0
    else:
        assert changed > 0, "a dynamic method must change the topology"


@pytest.mark.parametrize("method", METHODS)
def test_dense_layers_are_untouched(method):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.make_sparsifier(method, model, opt, density=0.1, total_steps=10,
                            dense_layers=["conv1", "fc2"], **schedule_kwargs(method, 2))
    assert set(sp.masks) == {"conv2.weight", "fc1.weight"}
    for x, y in batches(10):
        train_step(model, opt, sp, x, y)
    assert torch.count_nonzero(model.conv1.weight) == model.conv1.weight.numel()
    assert sp.layer_densities()["fc2.weight"] == 1.0
    assert sp.overall_density() == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_dtypes_follow_the_model(method, dtype):
    torch.manual_seed(0)
    model = tiny_cnn().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.make_sparsifier(method, model, opt, density=0.3, total_steps=8,
                            **schedule_kwargs(method, 2))
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    for t, (x, y) in enumerate(batches(8), start=1):
        train_step(model, opt, sp, x.to(dtype), y)
        counts = expected_counts_after(sp, t, counts)
    assert {n: int(m.sum()) for n, m in sp.masks.items()} == counts
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda(method):
    torch.manual_seed(0)
    model = tiny_cnn().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = st.make_sparsifier(method, model, opt, density=0.2, total_steps=8,
                            **schedule_kwargs(method, 2))
    assert all(m.is_cuda for m in sp.masks.values())
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    for t, (x, y) in enumerate(batches(8), start=1):
        train_step(model, opt, sp, x.cuda(), y.cuda())
        counts = expected_counts_after(sp, t, counts)
    assert {n: int(m.sum()) for n, m in sp.masks.items()} == counts
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in sp.masks.items())
