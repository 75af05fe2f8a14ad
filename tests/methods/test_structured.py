"""Structured sparsity for every method: every registered method on every backend it runs on,
under every kind of structure, keeps the structure's exact counts per group, row or block after
every step, with inactive weights and their optimizer state at zero and grown weights starting
at zero; and the structured selection matches a slow, obvious reference on tiny layers."""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.sparsity.groups import group_counts, matrix_coords
from sparsetrain.sparsity.structure import parse_structure
from tests.conftest import schedule_kwargs

PAIRS = st.supported_pairs()
STRUCTURES = list(st.STRUCTURE_EXAMPLES.values())
CASES = [(m, b, s) for m, b in PAIRS for s in STRUCTURES if st.get_method(m).supports_structure(s)]


class Net(nn.Module):
    """A convolution, a hidden and an output Linear that every example structure tiles."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 8, (16,), generator=g))
            for _ in range(n)]


def build(method, backend, structure, steps=24, **extra):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    density = 0.5 if parse_structure(structure).kind == "n:m" else 0.25
    kwargs = schedule_kwargs(method, 4, alpha=0.5)
    sp = st.make_sparsifier(method, model, opt, density=density, total_steps=steps,
                            backend=backend, structure=structure, **kwargs, **extra)
    return model, opt, sp


def assert_within(sp, structure, name):
    s = parse_structure(structure)
    if s.kind == "unstructured":
        return
    counts = group_counts(s, sp.backend.shape(name), sp.active_positions(name))
    if s.kind == "block":
        assert bool(((counts == 0) | (counts == s.rows * s.cols)).all()), f"{name}: a split block"
        return
    if sp.empty_rows_allowed:
        counts = counts[counts > 0]
    assert bool((counts == counts[0]).all()), f"{name}: unequal counts per group {counts}"
    if s.kind == "n:m":
        assert int(counts[0]) >= s.n


@pytest.mark.parametrize("method,backend,structure", CASES)
def test_structured_invariants(method, backend, structure):
    model, opt, sp = build(method, backend, structure)
    b = sp.backend
    changed = 0
    for t, (x, y) in enumerate(data(24), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        for name, mask in sp.masks.items():
            assert_within(sp, structure, name)
            low, high = sp.allowed_counts(t)[name]
            assert low <= int(mask.sum()) <= high, f"{name} at step {t}"
            weight, states = b.dense_weight(name), b.dense_state(name)
            assert torch.count_nonzero(weight[~mask]) == 0, f"inactive {name} revived"
            for state in states:
                assert torch.count_nonzero(state[~mask]) == 0, f"state of inactive {name}"
            grown = mask & ~before[name]
            if not torch.equal(mask, before[name]):
                changed += 1
                assert sp.is_update_step(t)
            if grown.any():
                assert torch.count_nonzero(weight[grown]) == 0, "grown weights start at zero"
                for state in states:
                    assert torch.count_nonzero(state[grown]) == 0, "grown state starts at zero"
    assert (changed == 0) == (method == "static")


@pytest.mark.parametrize("method,backend,structure", CASES)
def test_structured_state_dict_resumes(method, backend, structure, tmp_path):
    model, opt, sp = build(method, backend, structure)
    batches = data(12)
    for x, y in batches[:6]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    path = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()},
               path)
    model2, opt2, sp2 = build(method, backend, structure)
    saved = torch.load(path, weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sp2.load_state_dict(saved["sp"])
    for x, y in batches[6:]:
        for m, o, s in ((model, opt, sp), (model2, opt2, sp2)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            s.step()
    for name in sp.names:
        assert torch.equal(sp.active_positions(name), sp2.active_positions(name))


@pytest.mark.parametrize("structure", [s for s in STRUCTURES if s != "unstructured"])
def test_the_same_seed_gives_the_same_structured_run_on_every_backend(structure):
    """300 steps of RigL (updates every 20): the same masks and the same losses on every
    backend (on CSR, block layers compute with the block kernels)."""
    runs = []
    for backend in [b for m, b in PAIRS if m == "rigl"]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                              nn.Linear(32, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        density = 0.5 if parse_structure(structure).kind == "n:m" else 0.2
        sp = st.RigL(model, opt, density=density, total_steps=300, delta_t=20,
                     structure=structure, backend=backend)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(300):
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 8, (32,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sp.step()
            losses.append(loss.item())
        runs.append((losses, {n: sp.active_positions(n) for n in sp.names}))
    assert len(runs) == len(st.available_backends())
    for losses, masks in runs[1:]:
        assert all(torch.equal(runs[0][1][n], masks[n]) for n in masks)
        assert max(abs(a - b) for a, b in zip(runs[0][0], losses)) < 1e-4


def test_block_layers_on_csr_compute_with_the_block_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    st.RigL(model, opt, density=0.2, total_steps=10, structure="block:8x1", backend="csr")
    assert [getattr(m, "block_shape", None) for m in model] == [(8, 1), None, (8, 1)]


def test_layer_densities_are_rounded_to_the_structure_and_reported():
    _, _, sp = build("static", "masked", "block:4x4")
    for name in sp.names:
        assert sp.backend.n_active(name) % 16 == 0
    assert "structure block:4x4" in sp.summary()
    assert sp.config()["structure"] == "block:4x4"


def test_bad_structures_are_refused_with_what_fits():
    with pytest.raises(ValueError, match="block:3x3 does not tile"):
        build("rigl", "masked", "block:3x3")
    with pytest.raises(ValueError, match="keeps density 0.5, not 0.25"):
        torch.manual_seed(0)
        model = Net()
        st.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.25,
                total_steps=10, structure="2:4")
    with pytest.raises(ValueError, match="unknown structure"):
        build("rigl", "masked", "diagonal")
    with pytest.raises(ValueError, match="SRigL runs under structure fan-in, not 'block:4x4'"):
        build("srigl", "masked", "block:4x4")


def test_masks_that_break_the_structure_are_refused():
    torch.manual_seed(0)
    model = Net()
    masks = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()
             if n.endswith("weight")}
    with pytest.raises(ValueError, match="same number in every"):
        st.Static(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5,
                  total_steps=10, structure="fan-in", masks=masks)


# --- the rules against slow references ----------------------------------------------------------
class One(nn.Module):
    def __init__(self, rows, cols):
        super().__init__()
        self.fc = nn.Linear(cols, rows, bias=False)

    def forward(self, x):
        return self.fc(x)


def one_update(structure, rows=8, cols=8, density=0.5):
    """A RigL update on one layer at step 1, with the weights, gradient and active set before."""
    torch.manual_seed(3)
    model = One(rows, cols)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=density, total_steps=8, delta_t=1, alpha=0.5,
                 distribution="uniform", structure=structure)
    before = sp.masks["fc.weight"].clone()
    weight = model.fc.weight.detach().clone()
    opt.zero_grad()
    model(torch.randn(4, cols)).square().sum().backward()
    grad = model.fc.weight.grad.detach().clone()  # the dense gradient, before masking
    fraction = sp.drop_fraction(1)
    sp.step()
    return sp.masks["fc.weight"], before, weight, grad, fraction


def test_block_update_drops_and_grows_whole_blocks_by_pooled_scores():
    after, before, weight, grad, fraction = one_update("block:2x2")
    pooled_w = weight.abs().view(4, 2, 4, 2).sum((1, 3)).reshape(-1)
    pooled_g = grad.abs().view(4, 2, 4, 2).sum((1, 3)).reshape(-1)
    active = before.view(4, 2, 4, 2)[:, 0, :, 0].reshape(-1)
    n_drop = math.floor(fraction * int(before.sum())) // 4
    ranked = sorted(active.nonzero().squeeze(1).tolist(), key=lambda b: -float(pooled_w[b]))
    kept = set(ranked[:len(ranked) - n_drop])
    free = sorted((b for b in range(16) if b not in kept), key=lambda b: -float(pooled_g[b]))
    expected = kept | set(free[:n_drop])
    got = after.view(4, 2, 4, 2)[:, 0, :, 0].reshape(-1)
    assert set(got.nonzero().squeeze(1).tolist()) == expected
    assert bool((after.view(4, 2, 4, 2).sum((1, 3)) % 4 == 0).all())


@pytest.mark.parametrize("structure", ["fan-in", "2:4"])
def test_group_update_drops_over_the_layer_and_regrows_each_group(structure):
    after, before, weight, grad, fraction = one_update(structure)
    width = 8 if structure == "fan-in" else 4
    n_active = int(before.sum())
    n_drop = math.floor(fraction * n_active)
    positions = before.reshape(-1).nonzero().squeeze(1).tolist()
    by_magnitude = sorted(positions, key=lambda p: -float(weight.reshape(-1)[p].abs()))
    kept = set(by_magnitude[:n_active - n_drop])
    quota = n_active // (64 // width)
    expected = set(kept)
    for g in range(64 // width):
        group = range(g * width, (g + 1) * width)
        have = sum(p in kept for p in group)
        free = sorted((p for p in group if p not in kept),
                      key=lambda p: -float(grad.reshape(-1)[p].abs()))
        expected |= set(free[:quota - have])
    assert set(after.reshape(-1).nonzero().squeeze(1).tolist()) == expected


def test_srigl_ablates_neurons_with_few_salient_weights_and_keeps_the_fan_in_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.make_sparsifier("srigl", model, opt, density=0.2, total_steps=40, delta_t=5,
                            gamma_sal=0.9)
    budget = dict(sp.active_counts())
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    s = parse_structure("fan-in")
    ablated = 0
    for i, name in enumerate(sp.names):
        counts = group_counts(s, sp.backend.shape(name), sp.active_positions(name))
        alive = counts[counts > 0]
        assert bool((alive == alive[0]).all())
        assert int(alive[0]) == budget[name] // alive.numel()  # the budget shared by the alive
        ablated += int((counts == 0).sum())
        if i == len(sp.names) - 1:
            assert int((counts == 0).sum()) == 0, "the classifier is never ablated"
    assert ablated > 0
    # without ablation it is RigL with constant fan-in, on any backend
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert st.SRigL(model, opt, density=0.2, total_steps=10, gamma_sal=0,
                    backend="csr").backend.name == "csr"


def test_matrix_coords_follow_input_channels_of_a_convolution():
    shape = (2, 3, 2, 2)  # out 2, in 3, kernel 2x2: column p * 3 + c
    positions = torch.arange(24)
    row, col = matrix_coords(shape, positions)
    w = torch.arange(24).view(shape)
    for p in range(24):
        o, c, kh, kw = [int(v) for v in (w == p).nonzero()[0]]
        assert int(row[p]) == o and int(col[p]) == (kh * 2 + kw) * 3 + c
