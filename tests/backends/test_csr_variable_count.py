"""The CSR backend with a number of active weights that changes (capability "variable_count").

Methods whose per-layer counts change (GMP's pruning, SRigL's neuron ablation) give the same run
on ``backend="csr"`` as on the masked backend; ``set_active`` with another count moves the values
and their optimizer state along (the values parameter staying the same object), new weights start
at zero with zero state; checkpoints of another count load into a fresh model; a layer may be
emptied; block layers refuse counts they cannot tile; torch.distributed withdraws the capability.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsetrain as st
from sparsetrain.backends import csr_ops
from sparsetrain.backends.base import VARIABLE_COUNT
from sparsetrain.backends.csr import CSRLinear
from sparsetrain.backends.csr_backend import CSRBackend
from tests.conftest import save_checkpoint

STEPS = 40


def mlp(dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 8)).to(dtype=dtype, device=device)


def data(n=STEPS, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 8, generator=g, dtype=dtype)
    out = []
    for _ in range(n):
        x = torch.randn(16, 32, generator=g, dtype=dtype)
        out.append((x.to(device), (x @ teacher).argmax(1).to(device)))
    return out


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
}


def build(method, backend, structure=None, optimizer="sgd", dtype=torch.float64, **kwargs):
    model = mlp(dtype)
    opt = OPTIMIZERS[optimizer](model.parameters())
    options = dict(density=0.25, total_steps=STEPS, delta_t=5, distribution="uniform",
                   backend=backend, **kwargs)
    if structure is not None:
        options["structure"] = structure
    return model, opt, st.make_sparsifier(method, model, opt, **options)


def train(model, opt, sp, batches):
    losses, masks = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)  # kept across steps: see set_data
        loss.backward()
        sp.step()
        losses.append(loss.item())
        masks.append({n: sp.active_positions(n).clone() for n in sp.names})
    return torch.tensor(losses, dtype=torch.float64), masks


# SRigL with gamma_sal = 0.5 ablates neurons of this net (it changes the counts)
CASES = [("gmp", None, "adam", {}), ("gmp", "block:4x2", "sgd", {}),
         ("gmp", "fan-in", "sgd", {}), ("srigl", "fan-in", "sgd", {"gamma_sal": 0.5}),
         ("srigl", "fan-in", "adam", {"gamma_sal": 0.5})]


@pytest.mark.parametrize("method,structure,optimizer,options", CASES)
def test_same_run_as_the_masked_backend(method, structure, optimizer, options):
    runs = {b: build(method, b, structure, optimizer, **options) for b in ("masked", "csr")}
    assert all(isinstance(runs["csr"][0][i], CSRLinear) for i in (0, 2, 4))
    results = {b: train(*runs[b], data()) for b in runs}
    (loss_m, masks_m), (loss_c, masks_c) = results["masked"], results["csr"]
    for t, (a, b) in enumerate(zip(masks_m, masks_c), start=1):
        assert all(torch.equal(a[n], b[n]) for n in a), f"masks differ after step {t}"
    torch.testing.assert_close(loss_c, loss_m, rtol=1e-9, atol=1e-9)
    sp_m, sp_c = runs["masked"][2], runs["csr"][2]
    for n in sp_m.names:
        torch.testing.assert_close(sp_c.backend.dense_weight(n), sp_m.backend.dense_weight(n),
                                   rtol=1e-9, atol=1e-9)
        for s_c, s_m in zip(sp_c.backend.dense_state(n), sp_m.backend.dense_state(n)):
            torch.testing.assert_close(s_c, s_m, rtol=1e-9, atol=1e-9)
        layer = runs["csr"][0][int(n.split(".")[0])]
        assert layer.nnz == sp_m.backend.n_active(n)
        assert all(v.shape == (layer.nnz,)
                   for v in runs["csr"][1].state[layer.values].values() if v.dim() == 1)
    counts = [{n: m[n].numel() for n in m} for m in masks_c]
    assert any(a != b for a, b in zip(counts, counts[1:])), "the counts must change"
    assert loss_m[-5:].mean() < loss_m[:5].mean()


def _moved(before, new_positions):
    """Per new position: its index in ``before`` or -1 (a slow reference)."""
    index = {int(p): i for i, p in enumerate(before)}
    return torch.tensor([index.get(int(p), -1) for p in new_positions], dtype=torch.int64)


@pytest.mark.parametrize("change,optimizer", [("fewer", "adam"), ("more", "sgd"),
                                              ("empty", "adam")])
def test_set_active_with_another_count_moves_values_and_state(kernels, optimizer, change):
    runs = {b: build("gmp", b, optimizer=optimizer) for b in ("masked", "csr")}
    batches = data(12)
    for b in runs:
        train(*runs[b], batches[:9])  # pruned at 13 only: still dense, state non-zero
    model, opt, sp = runs["csr"]
    layer, name = model[2], "2.weight"
    values, state_before = layer.values, {k: v.clone() if torch.is_tensor(v) else v
                                          for k, v in opt.state[layer.values].items()}
    old = sp.active_positions(name).clone()
    old_values, old_grad = layer.values.detach().clone(), layer.values.grad.clone()
    g = torch.Generator().manual_seed(7)
    keep = old[torch.randperm(old.numel(), generator=g)[:old.numel() // 3]]
    if change == "fewer":
        new = keep.sort().values
    elif change == "more":  # not possible on a dense layer: drop first, then grow past it
        for b in runs:
            runs[b][2].backend.set_active(name, keep.sort().values)
        old, old_values = keep.sort().values, layer.values.detach().clone()
        state_before = {k: v.clone() if torch.is_tensor(v) else v
                        for k, v in opt.state[layer.values].items()}
        old_grad = layer.values.grad.clone()
        free = torch.ones(64 * 64, dtype=torch.bool)
        free[old] = False
        grown = free.nonzero().squeeze(1)[torch.randperm(int(free.sum()), generator=g)[:1500]]
        new = torch.cat([old[::2], grown]).sort().values
    else:
        new = old[:0]
    for b in runs:
        runs[b][2].backend.set_active(name, new)
    where = _moved(old, new)
    kept = where >= 0
    assert layer.values is values and layer.nnz == new.numel()
    assert any(p is values for group in opt.param_groups for p in group["params"])
    assert torch.equal(sp.active_positions(name), new)
    assert torch.equal(layer.values.detach()[kept], old_values[where[kept]])
    assert torch.count_nonzero(layer.values.detach()[~kept]) == 0
    assert torch.equal(layer.values.grad[kept], old_grad[where[kept]])
    assert torch.count_nonzero(layer.values.grad[~kept]) == 0
    state = opt.state[layer.values]
    assert state.keys() == state_before.keys()
    for key, before in state_before.items():
        if key == "step":
            assert torch.equal(state[key], before)  # Adam's step count is not per weight
            continue
        assert state[key].shape == (new.numel(),) and state[key].dtype == before.dtype
        assert torch.equal(state[key][kept], before[where[kept]]), key
        assert torch.count_nonzero(state[key][~kept]) == 0, key
    assert torch.equal(sp.backend.ever_active_positions(name), torch.arange(64 * 64))
    masked = runs["masked"][2].backend
    torch.testing.assert_close(sp.backend.dense_weight(name), masked.dense_weight(name))
    for s_c, s_m in zip(sp.backend.dense_state(name), masked.dense_state(name)):
        torch.testing.assert_close(s_c, s_m)
    # training goes on, with the last loss (and its graph) still referenced
    losses = {b: train(*runs[b], batches[9:])[0] for b in runs}
    torch.testing.assert_close(losses["csr"], losses["masked"], rtol=1e-9, atol=1e-9)
    assert layer.nnz == new.numel()


def test_an_empty_layer_outputs_its_bias_and_can_grow_again():
    model, opt, sp = build("gmp", "csr", optimizer="adam")
    train(model, opt, sp, data(3))
    layer = model[2]
    sp.backend.set_active("2.weight", torch.zeros(0, dtype=torch.int64))
    assert layer.nnz == 0 and layer.values.shape == (0,) and layer.empty_rows() == 64
    assert sp.backend.dense_state("2.weight")[0].count_nonzero() == 0
    assert sp.backend.active_values("2.weight").numel() == 0
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.relu(layer.bias).expand(5, 64))  # ReLU fused
    bias = layer.bias.detach().clone()
    train(model, opt, sp, data(3))
    assert not torch.equal(layer.bias.detach(), bias), "the bias still trains"
    assert layer.nnz == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    back = torch.tensor([3, 70, 4000])
    sp.backend.set_active("2.weight", back)
    assert torch.equal(layer.values.detach(), torch.zeros(3, dtype=torch.float64))
    moments = [v for v in opt.state[layer.values].values() if v.dim() == 1]
    assert len(moments) == 2 and all(s.shape == (3,) and s.count_nonzero() == 0
                                     for s in moments)
    train(model, opt, sp, data(2))
    assert layer.nnz == 3 and layer.values.detach().count_nonzero() == 3


def test_block_layers_refuse_counts_they_cannot_tile():
    model, opt, sp = build("gmp", "csr", structure="block:4x2")
    train(model, opt, sp, data(2))
    layer, name = model[2], "2.weight"
    assert layer.block_shape == (4, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = [v.clone() for v in opt.state[layer.values].values()]
    positions = sp.active_positions(name)
    with pytest.raises(ValueError, match=r"'2.weight' in aligned 4x2 blocks, so its number of "
                                         r"active weights must be a multiple of 8; got 20"):
        sp.backend.set_active(name, positions[:20])
    with pytest.raises(ValueError, match=r"cannot make 512 positions the active set of "
                                         r"'2.weight': positions .* do not tile"):
        sp.backend.set_active(name, torch.arange(1, 513))  # a multiple of 8 out of place
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert all(torch.equal(a, b) for a, b in zip(opt.state[layer.values].values(), state))
    blocks = (torch.arange(16 * 32) * 7 % (16 * 32))[:10].sort().values  # 10 blocks of 4x2
    dense = torch.zeros(16, 32, dtype=torch.bool)
    dense.view(-1)[blocks] = True
    mask = dense.repeat_interleave(4, 0).repeat_interleave(2, 1)
    sp.backend.set_active(name, mask.flatten().nonzero().squeeze(1))
    assert layer.nnz == 80 and layer.b_col.numel() == 10
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.relu(x @ layer.dense_weight().T + layer.bias))


def test_counts_beyond_int32_indices_are_refused_before_anything_changes(monkeypatch):
    model, opt, sp = build("gmp", "csr")
    train(model, opt, sp, data(2))
    layer, name = model[2], "2.weight"
    positions = sp.active_positions(name)
    sp.backend.set_active(name, positions[:100])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    monkeypatch.setattr(csr_ops, "INDEX", torch.int8)  # indices up to 127: 64 x 64 fits
    with pytest.raises(ValueError, match=r"cannot make 200 positions the active set of "
                                         r"'2.weight': .* does not fit int32 indices"):
        sp.backend.set_active(name, positions[:200])
    monkeypatch.undo()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    sp.backend.set_active(name, positions[:200])
    assert layer.nnz == 200


def _checkpoint_run(tmp_path, order, structure=None, method="gmp"):
    """A GMP run saved after its counts changed and loaded into a fresh (dense) model, in
    ``order``; returns (straight-through model, resumed model, their sparsifiers)."""
    batches = data(30)
    model, opt, sp = build(method, "csr", structure)
    train(model, opt, sp, batches)
    model_a, opt_a, sp_a = build(method, "csr", structure)
    train(model_a, opt_a, sp_a, batches[:20])
    assert sp_a.active_counts() != build(method, "csr", structure)[2].active_counts()
    saved = save_checkpoint(tmp_path / "c.pt", model_a, opt_a, sp_a)
    model_b, opt_b, sp_b = build(method, "csr", structure)
    for part in order:
        {"model": model_b, "optimizer": opt_b, "sparsifier": sp_b}[part].load_state_dict(
            saved[part])
    assert sp_b.active_counts() == sp_a.active_counts()
    train(model_b, opt_b, sp_b, batches[20:])
    return model, model_b, sp, sp_b


@pytest.mark.parametrize("order", [("model", "optimizer", "sparsifier"),
                                   ("sparsifier", "model", "optimizer")])
@pytest.mark.parametrize("structure", [None, "block:4x2"])
def test_a_checkpoint_of_another_count_resumes_exactly(tmp_path, order, structure):
    model, model_b, sp, sp_b = _checkpoint_run(tmp_path, order, structure)
    for name in sp.names:
        assert torch.equal(sp.active_positions(name), sp_b.active_positions(name))
        assert torch.equal(sp.backend.ever_active_positions(name),
                           sp_b.backend.ever_active_positions(name))
    for (name, p), p_b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, p_b), name


def test_a_csr_layer_loads_a_state_dict_of_another_size():
    layer = CSRLinear.from_positions(torch.arange(0, 60, 3), torch.randn(20), (6, 10))
    other = copy.deepcopy(layer)
    other.set_positions(torch.tensor([1, 12, 59]), values=torch.tensor([1.0, 2.0, 3.0]))
    assert other.nnz == 3 and other.values.grad is None
    values = layer.values
    values.grad = torch.ones(20)
    layer.load_state_dict(other.state_dict())
    assert layer.values is values and layer.nnz == 3 and layer.values.grad is None
    assert torch.equal(layer.positions(), torch.tensor([1, 12, 59]))
    assert layer.t_perm.numel() == 3
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), other(x))
    # five values and columns, but row pointers of three: not resized, the sizes reported
    broken = {**other.state_dict(), "values": torch.ones(5),
              "col": torch.zeros(5, dtype=torch.int32)}
    twin = copy.deepcopy(layer)
    with pytest.raises(RuntimeError, match="size mismatch"):
        twin.load_state_dict(broken)
    assert twin.nnz == 3 and torch.equal(twin.positions(), torch.tensor([1, 12, 59]))
    with pytest.raises(ValueError, match="positions for"):
        layer.set_positions(torch.tensor([1, 2]))


def test_capability_and_refusal_under_torch_distributed():
    assert VARIABLE_COUNT in CSRBackend.capabilities
    assert ("gmp", "csr") in st.supported_pairs() and ("srigl", "csr") in st.supported_pairs()
    model, opt, sp = build("rigl", "csr")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert VARIABLE_COUNT not in CSRBackend.capabilities
        assert "DistributedDataParallel" in CSRBackend.missing_reason(VARIABLE_COUNT)
        assert ("gmp", "csr") not in st.supported_pairs()
        m2 = mlp()
        with pytest.raises(ValueError, match="GMP is not available on backend='csr'.*masked"):
            st.GMP(m2, torch.optim.SGD(m2.parameters(), lr=0.1), density=0.3, total_steps=10,
                   backend="csr")
        positions = sp.active_positions("2.weight")
        with pytest.raises(RuntimeError, match=r"cannot change the number of active weights "
                                               r"of '2.weight'.*backend='masked'"):
            sp.backend.set_active("2.weight", positions[1:])
        assert torch.equal(sp.active_positions("2.weight"), positions)
        sp.backend.set_active("2.weight", positions)  # the same count still works
        train(model, opt, sp, data(6))
    finally:
        dist.destroy_process_group()
    assert VARIABLE_COUNT in CSRBackend.capabilities


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_set_active_with_another_count(dtype):
    model = mlp(dtype, "cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sp = st.GMP(model, opt, density=0.25, total_steps=20, delta_t=2, backend="csr")
    batches = data(20, dtype, "cuda")
    train(model, opt, sp, batches)
    layer = model[2]
    assert layer.values.is_cuda and layer.values.dtype == dtype
    assert layer.nnz == round(0.25 * 64 * 64)
    assert all(v.shape == (layer.nnz,) for v in opt.state[layer.values].values() if v.dim())
    sp.backend.set_active("2.weight", torch.zeros(0, dtype=torch.int64, device="cuda"))
    train(model, opt, sp, batches[:2])
    assert layer.nnz == 0
