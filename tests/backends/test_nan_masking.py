"""Masking selects, it does not multiply: NaN or inf at an inactive position of a gradient, a
weight or an optimizer state becomes exactly zero and never reaches the active weights, on
every backend that has masked-dense layers (the CSR backend keeps its convolutions so)."""

import warnings

import pytest
import torch

import sparsetrain as st
import sparsetrain.kernels as kernels_module
from tests.conftest import batches, tiny_cnn

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
}
STEPS = 6


def dense_layers(sp, model):
    """The sparsified weights stored dense (name -> parameter): all on the masked backend, the
    convolutions on the CSR one."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in sp.names if n in params}


def plant(tensor, inactive, step):
    """NaN, inf and -inf at inactive positions of ``tensor`` (in place)."""
    flat = inactive.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == 0:  # a layer kept whole by the distribution
        return
    values = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=tensor.dtype)
    picked = flat[(torch.arange(3) * 7 + step) % flat.numel()]
    with torch.no_grad():
        if tensor.is_contiguous():
            tensor.view(-1)[picked] = values
        else:
            tensor[torch.unravel_index(picked, tensor.shape)] = values


def check_inactive_zero(sp, layers, t, masked_with):
    """Inactive weights and state are zero and everything finite; the gradients are zero where
    ``masked_with`` (the masks before the step; None when the step did not mask them) is not."""
    for name, param in layers.items():
        inactive = ~sp.masks[name]
        assert torch.count_nonzero(param.detach()[inactive]) == 0, f"weight {name} at {t}"
        for state in sp.backend.dense_state(name):
            assert torch.count_nonzero(state[inactive]) == 0, f"state of {name} at {t}"
        if masked_with is not None:
            assert torch.count_nonzero(param.grad[~masked_with[name]]) == 0, f"grad {name} at {t}"
        assert torch.isfinite(param.detach()).all(), f"weight {name} at {t}"
        for state in sp.backend.dense_state(name):
            assert torch.isfinite(state).all(), f"state of {name} at {t}"


def run(method, backend, optimizer_name, *, plant_state, channels_last=False):
    torch.manual_seed(0)
    model = tiny_cnn()
    if channels_last:  # conv weights not contiguous: torch's path, not the compiled kernel
        model = model.to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    sp = st.make_sparsifier(method, model, opt, density=0.3, total_steps=20, delta_t=2,
                            backend=backend)
    layers = dense_layers(sp, model)
    assert layers, "the test needs masked-dense layers"
    first = {n: sp.masks[n].clone() for n in sp.names}
    data = batches(STEPS)
    for t, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, param in layers.items():
            inactive = ~sp.masks[name]
            plant(param.grad, inactive, t)
            if plant_state:
                plant(param.data, inactive, t)
                for state in sp.backend.dense_state(name):
                    plant(state, inactive, t)
        before = {n: sp.masks[n] for n in layers}
        with warnings.catch_warnings():  # RigL skips an update whose gradient is not finite
            warnings.filterwarnings("ignore", "RigL: weight", RuntimeWarning)
            sp.step()
        optimizer_ran = not sp.is_update_step(t) or sp.optimizer_step_on_update
        check_inactive_zero(sp, layers, t, before if optimizer_ran else None)
        out = model(data[0][0])
        assert torch.isfinite(out).all(), f"output at step {t}"
    return sp, first


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["masked", "csr"])
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_non_finite_gradient_at_inactive_positions_never_leaks(method, backend, optimizer_name):
    sp, first = run(method, backend, optimizer_name, plant_state=False)
    if method == "set":  # the topology did change on the way
        assert any(not torch.equal(sp.masks[n], first[n]) for n in first)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["masked", "csr"])
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_non_finite_weights_and_state_at_inactive_positions_become_zero(method, backend,
                                                                        optimizer_name):
    sp, first = run(method, backend, optimizer_name, plant_state=True)
    if method == "set":
        assert any(not torch.equal(sp.masks[n], first[n]) for n in first)


@pytest.mark.parametrize("compiled", [True, False])
def test_torch_path_selects_too(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(kernels_module, "_KERNELS", False)
    run("set", "masked", "adam", plant_state=True, channels_last=not compiled)
