"""Same seed, same run: every backend against the masked one, for every method both run.

An MLP whose first layer has dead ReLU units (a large negative bias) and inputs with
always-zero features, so that whole rows and columns of the dense gradient are exactly zero and
the grow step must break ties among them. From the same seed (no masks passed in), every backend
must draw the same initial masks, hold the same masks after every update, and give the same
losses: within 1e-9 in float64 and 1e-4 in float32, over 300 steps.
"""

import pytest
import torch
from torch import nn

import sparsetrain as st

STEPS = 300
BACKENDS = [b for b in st.available_backends() if b != "masked"]
CASES = [(m, b) for m, b in st.supported_pairs()
         if b != "masked" and (m, "masked") in st.supported_pairs()]


def mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64, dtype=dtype), nn.ReLU(),
                          nn.Linear(64, 64, dtype=dtype), nn.ReLU(), nn.Linear(64, 5, dtype=dtype))
    with torch.no_grad():
        model[0].bias[:16] = -10.0  # 16 units that never fire: zero-gradient rows
    return model


def data(dtype, n=STEPS):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 5, generator=g, dtype=dtype)
    batches = []
    for _ in range(n):
        x = torch.randn(16, 32, generator=g, dtype=dtype)
        x[:, :28] = 0  # features that are always zero: zero-gradient columns
        batches.append((x, (x @ teacher).argmax(1)))
    return batches


def run(method, backend, dtype, masks=None):
    model = mlp(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp = st.make_sparsifier(method, model, opt, density=0.3, total_steps=STEPS, delta_t=10,
                            distribution="uniform", backend=backend,
                            **({} if masks is None else {"masks": masks}))
    initial = {n: sp.active_positions(n).clone() for n in sp.names}
    losses, updates = [], []
    sp.tied_growth = 0  # updates that grew a connection of zero gradient (a tie) in layer 0
    for x, y in data(dtype):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        before = sp.active_positions("0.weight").clone()
        sp.step()
        losses.append(loss.item())
        if sp.is_update_step(sp.step_count):
            updates.append({n: sp.active_positions(n).clone() for n in sp.names})
            grad = model[0].weight.grad if backend == "masked" else None
            grown = updates[-1]["0.weight"][~torch.isin(updates[-1]["0.weight"], before)]
            if grad is not None and (grad.reshape(-1)[grown] == 0).any():
                sp.tied_growth += 1
    return initial, torch.tensor(losses, dtype=torch.float64), updates, sp


def assert_same_run(a, b, dtype, expected_updates):
    (init_a, loss_a, upd_a, _), (init_b, loss_b, upd_b, _) = a, b
    assert all(torch.equal(init_a[n], init_b[n]) for n in init_a), "initial masks differ"
    assert len(upd_a) == len(upd_b) == expected_updates
    for i, (u, v) in enumerate(zip(upd_a, upd_b)):
        assert all(torch.equal(u[n], v[n]) for n in u), f"masks differ after update {i + 1}"
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss_b, loss_a, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method,backend", CASES)
def test_same_seed_same_run(method, backend, dtype):
    masked = run(method, "masked", dtype)
    other = run(method, backend, dtype)
    sp = masked[3]
    updates = sum(sp.is_update_step(t) for t in range(1, STEPS + 1))
    assert_same_run(masked, other, dtype, updates)
    assert masked[1][-20:].mean() < 0.7 * masked[1][:20].mean(), "the run must learn"
    if updates:
        final = masked[2][-1]
        assert any(not torch.equal(final[n], masked[0][n]) for n in final), "masks must move"
    if sp.update_reads_gradient:  # the case is hard: the grow step had to break ties
        assert sp.tied_growth > 0


@pytest.mark.filterwarnings("ignore:backend='csr'.*have no active weight")  # SNIP cuts dead units
@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_at_initialisation_masks_give_the_same_run(backend):
    dtype = torch.float64
    batches = data(dtype, 4)
    masks = st.prune_at_init(mlp(dtype), "snip", density=0.3, data=batches)
    assert_same_run(run("static", "masked", dtype, masks), run("static", backend, dtype, masks),
                    dtype, 0)
