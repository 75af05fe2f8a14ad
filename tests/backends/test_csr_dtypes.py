"""CSRLinear in bfloat16 and float16: the products against a float64 reference, autocast against
nn.Linear under autocast, weights stored in 16 bits on the CSR backend, and the warning where
torch's fallback cannot compute a dtype itself."""

import contextlib
import warnings

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.backends.csr import CSRLinear
from sparsetrain.backends.csr_ops import csr_linear
from tests.backends.conftest import quiet

HALF = [torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("kernels")  # every test, both ways




def operands(dtype, batch, out_f=50, in_f=70, density=0.25, seed=0):
    """A CSR layer's structure and values, an input and an output gradient, all in ``dtype``,
    and the dense weight they make."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    weight = (torch.randn(out_f, in_f, generator=g) * mask).to(dtype)
    layer = CSRLinear(weight, mask)
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    gy = torch.randn(batch, out_f, generator=g).to(dtype)
    return layer, weight, mask, x, gy


def assert_rounded_once(result, exact, dtype):
    """``result`` is ``exact`` (float64) rounded once to ``dtype``: within one unit in the last
    place. Sums kept in 16 bits, or rounded twice, miss by several."""
    assert result.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(result.double(), exact, rtol=eps, atol=1e-6)


@quiet
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 37, 130])
def test_products_are_summed_in_float32_and_rounded_once(dtype, batch):
    layer, weight, mask, x, gy = operands(dtype, batch)
    w, xd, gd = weight.double(), x.double(), gy.double()
    xr = x.clone().requires_grad_()
    values = layer.values.detach().clone().requires_grad_()
    y, _ = csr_linear(xr, values, *layer.structure(), layer.in_features, -1)
    assert_rounded_once(y, xd @ w.t(), dtype)
    y.backward(gy)
    assert_rounded_once(xr.grad, gd @ w, dtype)
    assert_rounded_once(values.grad, (gd.t() @ xd)[mask], dtype)


@quiet
@pytest.mark.parametrize("dtype", HALF)
def test_a_layer_with_16_bit_weights_trains_like_the_masked_linear(dtype):
    """A CSR layer holding 16-bit values against nn.Linear in the same dtype (float32 sums in
    both, so they agree to the dtype's rounding)."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 30).to(dtype)
    mask = torch.rand(30, 40) < 0.3
    with torch.no_grad():
        lin.weight.mul_(mask)
    csr = CSRLinear.from_linear(lin, mask)
    assert csr.values.dtype == dtype
    x = torch.randn(4, 5, 40).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = lin(x1), csr(x2)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-2}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(csr.values.grad, lin.weight.grad[mask], **tol)
    torch.testing.assert_close(csr.bias.grad, lin.bias.grad, **tol)


@quiet
@pytest.mark.parametrize("dtype", HALF)
def test_autocast_runs_the_layer_as_it_runs_nn_linear(dtype):
    """float32 weights under autocast: computed in the autocast dtype, returned in it, the
    values' gradient in float32; the same as nn.Linear under autocast to its rounding."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    mask = torch.rand(48, 64) < 0.2
    with torch.no_grad():
        lin.weight.mul_(mask)
    csr = CSRLinear.from_linear(lin, mask)
    x = torch.randn(3, 20, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        ref, out = lin(x1), csr(x2)
    assert ref.dtype == out.dtype == dtype
    tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-2}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert csr.values.grad.dtype == torch.float32 and x2.grad.dtype == torch.float32
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(csr.values.grad, lin.weight.grad[mask], **tol)
    torch.testing.assert_close(csr.bias.grad, lin.bias.grad, **tol)


def test_float64_weights_are_left_alone_by_autocast():
    lin = nn.Linear(8, 6).double()
    csr = CSRLinear.from_linear(lin, torch.ones(6, 8, dtype=torch.bool))
    x = torch.randn(5, 8, dtype=torch.double)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = csr(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, lin(x))


@pytest.mark.parametrize("dtype", HALF)
def test_the_fallback_warns_once_that_it_computes_in_float32(kernels, dtype):
    layer, weight, mask, x, _ = operands(dtype, 9)
    if kernels == "compiled":  # the kernels take 16 bits themselves: nothing to say
        with _no_warning():
            layer(x)
        return
    with pytest.warns(RuntimeWarning, match=rf"do not take {dtype}: CSR products run in "
                                            rf"float32 and are rounded to {dtype}"):
        out = layer(x)
    assert out.dtype == dtype
    assert_rounded_once(out, x.double() @ weight.double().t(), dtype)
    with _no_warning():  # once only
        layer(x).sum().backward()


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_values_of_other_dtypes_are_a_clear_error():
    csr = CSRLinear(torch.ones(3, 4, dtype=torch.complex64), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="float64, float32, bfloat16 or float16 values, not "
                                         "torch.complex64.*backend='masked'"):
        csr(torch.ones(2, 4))


def mlp(dtype, device=None):
    return nn.Sequential(nn.Linear(20, 32, dtype=dtype, device=device), nn.Tanh(),
                         nn.Linear(32, 5, dtype=dtype, device=device))


@quiet
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("meta", [False, True])
def test_the_backend_takes_16_bit_weights_and_rigl_updates_them(dtype, meta):
    model = mlp(dtype, device="meta" if meta else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.3, total_steps=6, delta_t=2, backend="csr",
                 distribution="uniform")
    assert isinstance(model[0], CSRLinear) and model[0].values.dtype == dtype
    g = torch.Generator().manual_seed(0)
    counts, before = sp.active_counts(), {n: m.clone() for n, m in sp.masks.items()}
    for _ in range(6):
        x, y = torch.randn(16, 20, generator=g).to(dtype), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        out = model(x)
        assert out.dtype == dtype
        nn.functional.cross_entropy(out.float(), y).backward()
        sp.step()
    assert sp.active_counts() == counts
    assert any(not torch.equal(before[n], sp.masks[n]) for n in before)  # RigL grew weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


@quiet
def test_a_model_converted_to_bfloat16_after_the_sparsifier_keeps_training():
    model = mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.3, total_steps=4, delta_t=2, backend="csr")
    model.to(torch.bfloat16)  # in place: the optimizer holds the same parameters
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 20, dtype=torch.bfloat16)).float().square().mean().backward()
        sp.step()
    assert model[0].values.dtype == torch.bfloat16 and model[0].values.grad is not None


@quiet
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
@pytest.mark.parametrize("change", ["set_positions", "load_state_dict"])
def test_gradients_follow_a_change_of_structure(dtype, change):
    """The transposed structure the input gradient uses is rebuilt with the structure."""
    layer, _, mask, x, gy = operands(dtype, 20, seed=1)
    mask = mask.reshape(-1)[torch.randperm(mask.numel())].reshape(mask.shape)  # as many
    weight = (torch.randn(mask.shape) * mask).to(dtype)
    other = CSRLinear(weight, mask)
    if change == "set_positions":
        with torch.no_grad():
            layer.values = nn.Parameter(other.values.detach().clone())
        layer.set_positions(other.positions())
    else:
        layer.load_state_dict(other.state_dict())
    xr = x.clone().requires_grad_()
    layer(xr).backward(gy)
    w, gd, xd = weight.double(), gy.double(), x.double()
    assert_rounded_once(xr.grad, gd @ w, dtype)
    assert_rounded_once(layer.values.grad, (gd.t() @ xd)[mask], dtype)
