"""The CSR Linear layer against a dense masked reference."""

import pytest
import torch
from torch import nn

import sparsetrain.kernels as kernels_module
from sparsetrain.backends.csr import CSRLinear, csr_structure
from sparsetrain.backends.csr_ops import csr_linear


@pytest.fixture(params=["compiled", "torch"], autouse=True)
def kernels(request, monkeypatch):
    """Every test runs with the compiled kernels (where they build) and with torch's ops."""
    if request.param == "torch":
        monkeypatch.setattr(kernels_module, "_KERNELS", False)
    elif kernels_module.compiled_kernels() is None:
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
    dense = torch.sparse_csr_tensor(s["crow"], s["col"], csr.values.detach(), size=(6, 9),
                                    check_invariants=True).to_dense()
    assert torch.equal(dense, csr.dense_weight())
    assert torch.equal(csr.positions(), mask.reshape(-1).nonzero().squeeze(1))
    for r0, r1 in [(0, 6), (2, 5), (3, 3), (5, 6)]:
        assert torch.equal(csr.dense_rows(r0, r1), csr.dense_weight()[r0:r1])
    rebuilt = CSRLinear.from_positions(csr.positions(), csr.values, (6, 9), csr.bias)
    assert torch.equal(rebuilt.dense_weight(), csr.dense_weight())
    assert torch.equal(rebuilt.crow, csr.crow) and torch.equal(rebuilt.col, csr.col)


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
        return csr_linear(x, v, *csr.structure(), 7, -1)[0]

    def with_bias(x, v, b):  # the bias added by the kernel as it writes y
        return csr_linear(x, v, *csr.structure(), 7, -1, b)[0]

    assert torch.autograd.gradcheck(f, (x, values))
    bias = torch.randn(5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(with_bias, (x, values, bias))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 37, 300])
def test_batch_tiles_and_tails(dtype, batch):
    """Batches smaller than, not a multiple of and larger than the kernels' tiles."""
    torch.manual_seed(1)
    lin = nn.Linear(70, 50).to(dtype)
    mask = torch.rand(50, 70) < 0.2
    csr = CSRLinear.from_linear(lin, mask)
    x1 = torch.randn(batch, 70, dtype=dtype, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    weight = (lin.weight.detach() * mask).requires_grad_()
    ref = nn.functional.linear(x1, weight, lin.bias)
    out = csr(x2)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(csr.values.grad, weight.grad[mask], **tol)


def test_empty_rows_output_only_the_bias():
    """A density that leaves output units without inputs: they give their bias, gradients
    stay right, and nothing reads out of bounds."""
    lin = nn.Linear(8, 5).double()
    mask = torch.zeros(5, 8, dtype=torch.bool)
    mask[1, 3] = mask[3, 0] = mask[3, 7] = True  # rows 0, 2 and 4 are empty
    csr = CSRLinear.from_linear(lin, mask)
    assert csr.empty_rows() == 3
    x = torch.randn(4, 8, dtype=torch.double, requires_grad=True)
    out = csr(x)
    torch.testing.assert_close(out[:, [0, 2, 4]], lin.bias.detach()[[0, 2, 4]].expand(4, 3))
    torch.testing.assert_close(out, nn.functional.linear(x, lin.weight * mask, lin.bias))
    assert torch.autograd.gradcheck(
        lambda x, v: csr_linear(x, v, *csr.structure(), 8, -1)[0],
        (x, csr.values.detach().clone().requires_grad_()))


def test_capture_keeps_the_input_and_output_gradient():
    lin, mask, csr = layer()
    csr.capture = []
    x = torch.randn(4, 9, dtype=torch.double)
    out = csr(x)
    g = torch.randn_like(out)
    out.backward(g)
    (x_saved, g_saved), = csr.capture
    torch.testing.assert_close(x_saved, x)
    torch.testing.assert_close(g_saved, g)


def test_wrong_input_width_is_a_clear_error():
    _, _, csr = layer()
    with pytest.raises(ValueError, match="expects inputs with 9 features"):
        csr(torch.randn(2, 8, dtype=torch.double))
