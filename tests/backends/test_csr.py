"""The CSR Linear layer against a dense masked reference."""

import pytest
import torch
from torch import nn

import sparsetrain.backends.csr as csr_module
from sparsetrain.backends.csr import CSRLinear, _CSRLinearFunction, csr_structure


@pytest.fixture(params=["compiled", "torch"], autouse=True)
def kernels(request, monkeypatch):
    """Every test runs with the compiled kernels (where they build) and with torch's ops."""
    if request.param == "torch":
        monkeypatch.setattr(csr_module, "_KERNELS", False)
    elif csr_module.compiled_kernels() is None:
        pytest.skip("the compiled CSR kernels cannot be built here")
    return request.param


def layer(out_f=6, in_f=9, density=0.4, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).double()
    mask = torch.rand(out_f, in_f) < density
    mask[0, 0] = True
    return lin, mask, CSRLinear.from_linear(lin, mask)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_structure_round_trip():
    lin, mask, csr = layer()
    assert torch.equal(csr.mask(), mask)
    assert torch.equal(csr.dense_weight(), lin.weight.detach() * mask)
    s = csr_structure(mask)
    dense_t = torch.sparse_csr_tensor(s["t_crow"], s["t_col"], csr.values.detach()[s["t_perm"]],
                                      size=(9, 6), check_invariants=True).to_dense()
    assert torch.equal(dense_t, csr.dense_weight().t())


def test_forward_and_gradients_match_the_masked_dense_layer():
    lin, mask, csr = layer()
    x = torch.randn(4, 3, 9, dtype=torch.double)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = (lin.weight.detach() * mask).requires_grad_()
    ref = nn.functional.linear(x1, weight, lin.bias)
    out = csr(x2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(csr.values.grad, weight.grad[mask])
    torch.testing.assert_close(csr.bias.grad, lin.bias.grad if lin.bias.grad is not None
                               else g.sum((0, 1)))


def test_gradcheck():
    _, _, csr = layer(5, 7)
    x = torch.randn(3, 7, dtype=torch.double, requires_grad=True)
    values = csr.values.detach().clone().requires_grad_()

    def f(x, v):
        return _CSRLinearFunction.apply(x, v, csr.crow, csr.col, csr.t_crow, csr.t_col,
                                        csr.t_perm, (5, 7))

    assert torch.autograd.gradcheck(f, (x, values))


def test_optimizer_trains_the_values():
    _, _, csr = layer()
    opt = torch.optim.Adam(csr.parameters(), lr=0.1)
    x, y = torch.randn(16, 9, dtype=torch.double), torch.randn(16, 6, dtype=torch.double)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(csr(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_input():
    with pytest.raises(ValueError, match="same 2-D shape"):
        CSRLinear(torch.zeros(3, 4), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D mask"):
        csr_structure(torch.ones(2, 2, 2, dtype=torch.bool))
