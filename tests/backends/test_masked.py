"""The masked backend: its compiled hot path against torch's own operations."""

import pytest
import torch

import sparsetrain as st
import sparsetrain.kernels as kernels_module
from sparsetrain.backends.masked import zero_inactive
from tests.conftest import batches, tiny_cnn, train_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_zero_inactive_matches_torch_where(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(37, 41, generator=g).to(dtype)
    tensor[0, 0], tensor[1, 1] = float("nan"), -0.0
    active = torch.rand(37, 41, generator=g) < 0.3
    active[0, 0], active[1, 1] = False, True
    expected = torch.where(active, tensor, torch.zeros((), dtype=dtype))
    compiled = tensor.clone()
    zero_inactive(compiled, active)
    monkeypatch.setattr(kernels_module, "_KERNELS", False)
    fallback = tensor.clone()
    zero_inactive(fallback, active)
    for got in (compiled, fallback):
        assert torch.equal(got.view(torch.int8 if dtype.itemsize == 1 else
                                    {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]),
                           expected.view({2: torch.int16, 4: torch.int32,
                                          8: torch.int64}[dtype.itemsize])), "bit for bit"
    strided = tensor.t()  # not contiguous: torch's path
    zero_inactive(strided, active.t())
    assert torch.equal(torch.isnan(strided), torch.zeros_like(active.t()))


@pytest.mark.parametrize("method", [m for m, b in st.supported_pairs() if b == "masked"])
def test_runs_with_and_without_the_compiled_kernels_are_identical(method, monkeypatch):
    def run():
        torch.manual_seed(0)
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = st.make_sparsifier(method, model, opt, density=0.2, total_steps=16, delta_t=4)
        for x, y in batches(16):
            train_step(model, opt, sp, x, y)
        return sp.state_dict()["positions"], [p.detach().clone() for p in model.parameters()]

    positions, weights = run()
    monkeypatch.setattr(kernels_module, "_KERNELS", False)
    positions_torch, weights_torch = run()
    assert all(torch.equal(positions[n], positions_torch[n]) for n in positions)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_torch))
