"""A ReLU fused into CSRLinear (``activation="relu"``) against nn.Linear followed by torch.relu:
forward and gradients in every dtype, unstructured and in blocks, with and without the compiled
kernels; the gradient at the kink and where the output is 0; RigL's capture and the dense
gradient it reads; copies, FLOPs and bad values."""

import copy
import pickle

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.backends.block_ops import BLOCK_KEYS, block_linear
from sparsetrain.backends.csr import CSRLinear
from sparsetrain.backends.csr_ops import csr_linear
from tests.backends.conftest import quiet
from tests.backends.test_csr_blocks import block_mask
from tests.backends.test_equivalence import data
from tests.backends.test_equivalence import mlp as equivalence_mlp

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BLOCKS = [None, (4, 1), (8, 1), (1, 4), (2, 8)]

pytestmark = [pytest.mark.usefixtures("kernels"), quiet]


def dyadic(shape, g, scale):
    """Integers in [-3, 3] times ``scale``: every product and sum of them below is exact in
    float32, so each result is the exact one rounded once, whatever the order of the sums."""
    return torch.randint(-3, 4, shape, generator=g).double() * scale


def operands(block, bias, batch, out_f=48, in_f=64, seed=0):
    """Mask, weight, bias (odd multiples of 1/64, so that no pre-activation is 0: without a
    bias some are, exactly), input and output gradient."""
    g = torch.Generator().manual_seed(seed)
    mask = (block_mask(out_f, in_f, block, seed=seed) if block
            else torch.rand(out_f, in_f, generator=g) < 0.3)
    weight = dyadic((out_f, in_f), g, 1 / 8) * mask
    b = (2 * torch.randint(-8, 8, (out_f,), generator=g) + 1).double() / 64 if bias else None
    return mask, weight, b, dyadic((batch, in_f), g, 1 / 4), dyadic((batch, out_f), g, 1 / 8)


def relu_layer(weight, mask, bias, block, dtype):
    layer = CSRLinear(weight.to(dtype), mask, None if bias is None else bias.to(dtype))
    if block:
        layer.set_block_shape(block)
    layer.activation = "relu"
    return layer


def reference(weight, bias, x, gy):
    """nn.Linear then torch.relu in float64: (y, grad_x, dense weight gradient, bias gradient,
    the output gradient masked by relu)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    x = x.clone().requires_grad_()
    pre = lin(x)
    pre.retain_grad()
    y = torch.relu(pre)
    y.backward(gy)
    return y.detach(), x.grad, lin.weight.grad, None if bias is None else lin.bias.grad, pre.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [3, 130])
def test_forward_gradients_and_capture_equal_linear_then_relu(dtype, block, bias, batch):
    mask, weight, b, x, gy = operands(block, bias, batch)
    y_ref, gx_ref, gw_ref, gb_ref, masked = reference(weight, b, x, gy)
    layer = relu_layer(weight, mask, b, block, dtype)
    layer.capture = []
    xr = x.to(dtype).requires_grad_()
    y = layer(xr)
    y.backward(gy.to(dtype))
    assert y.dtype == dtype and torch.equal(y, y_ref.to(dtype))
    assert torch.equal(xr.grad, gx_ref.to(dtype))
    assert torch.equal(layer.values.grad, gw_ref[mask].to(dtype))
    if bias:
        assert torch.equal(layer.bias.grad, gb_ref.to(dtype))
    (cx, cgy), = layer.capture  # the gradient of x W^T + b, from which RigL's dense one follows
    assert torch.equal(cx, x.to(dtype)) and torch.equal(cgy, masked.to(dtype))
    assert (cgy[y == 0] == 0).all() and (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    """float32 values under autocast: relu of the product in the autocast dtype, the values'
    gradient in float32, as nn.Linear then relu under autocast."""
    mask, weight, b, x, gy = operands((4, 1), True, 70)
    layer = relu_layer(weight, mask, b, None, torch.float32)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(b)
    x1, x2 = x.float().requires_grad_(), x.float().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        ref, out = torch.relu(lin(x1)), layer(x2)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ref.backward(gy.to(dtype))
    out.backward(gy.to(dtype))
    assert layer.values.grad.dtype == torch.float32
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.values.grad, lin.weight.grad[mask], rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize("block", [None, (2, 2), (1, 2)])
def test_gradcheck_in_float64(block):
    g = torch.Generator().manual_seed(2)
    mask = block_mask(6, 8, block, density=0.5, seed=2) if block else torch.rand(6, 8) < 0.5
    weight = torch.randn(6, 8, generator=g, dtype=torch.float64) * mask
    layer = relu_layer(weight, mask, torch.zeros(6, dtype=torch.float64), block, torch.float64)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    pre = x.detach() @ weight.t() + bias.detach()
    assert (pre.abs() > 1e-3).all() and (pre < 0).any()  # away from the kink, some cut off

    def f(x, v, b):
        if block:
            return block_linear(x, v, layer.crow, layer.col,
                                *(getattr(layer, k) for k in BLOCK_KEYS), *block, 8, -1, b,
                                True)[0]
        return csr_linear(x, v, *layer.structure(), 8, -1, b, True)[0]

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("block", [None, (4, 1)])
def test_the_gradient_is_zero_at_the_kink_and_where_the_output_is_zero(block):
    """Pre-activations exactly 0 (zero inputs, no bias) and units cut off for the whole batch:
    exact zeros in the output gradient kept, the values' and the bias' gradient, as torch's
    relu gives."""
    mask, weight, _, x, _ = operands(block, False, 40)
    bias = torch.zeros(48, dtype=torch.float64)
    bias[:8] = -100.0  # dead for every example
    x[:5] = 0  # pre-activations exactly 0 for units 8 on
    layer = relu_layer(weight, mask, bias, block, torch.float64)
    layer.capture = []
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert (y[:5, 8:] == 0).all() and (y[:, :8] == 0).all()
    _, gx, gw, gb, masked = reference(weight, bias, x, torch.ones_like(y))
    (_, cgy), = layer.capture
    assert torch.equal(cgy, masked) and (cgy[y == 0] == 0).all()
    assert torch.equal(layer.bias.grad, gb) and (layer.bias.grad[:8] == 0).all()
    assert (layer.values.grad[:int(layer.crow[8])] == 0).all()
    assert torch.equal(layer.values.grad, gw[mask])


@pytest.mark.parametrize("structure", [None, "block:8x1"])
def test_rigl_reads_the_gradient_of_a_masked_linear_then_relu(structure):
    """RigL on backend='csr' with the ReLUs fused into the layers against the masked backend
    with nn.Linear and nn.ReLU: the dense gradient of an update step, and the same masks and
    losses over 60 steps (updates every 10, dead units and zero features: ties)."""
    runs = {}
    for backend in ("masked", "csr"):
        model = equivalence_mlp(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        extra = {} if structure is None else {"structure": structure,
                                              "dense_layers": ["4.weight"]}
        sp = st.RigL(model, opt, density=0.3, total_steps=60, delta_t=10,
                     distribution="uniform", backend=backend, **extra)
        if backend == "csr":
            for i in (0, 2):
                model[i].activation = "relu"
                model[i + 1] = nn.Identity()
        losses, masks, gradients = [], [], None
        for step, (x, y) in enumerate(data(torch.float64, 60), 1):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if step == 10:
                gradients = {n: torch.cat([b.gradient().clone() for b in sp.backend.blocks(n)])
                             for n in ("0.weight", "2.weight")}
            sp.step()
            losses.append(loss.item())
            masks.append({n: sp.masks[n].clone() for n in sp.names})
        runs[backend] = losses, masks, gradients
    (loss_a, masks_a, grad_a), (loss_b, masks_b, grad_b) = runs["masked"], runs["csr"]
    for n in grad_a:
        torch.testing.assert_close(grad_b[n], grad_a[n], rtol=1e-12, atol=1e-12)
        assert (grad_a[n] == 0).any()  # rows of the dead units
    assert all(torch.equal(a[n], b[n]) for a, b in zip(masks_a, masks_b) for n in a)
    assert masks_a[-1]["0.weight"].ne(masks_a[0]["0.weight"]).any()  # the masks moved
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss_a), rtol=1e-9, atol=1e-9)


def test_without_activation_the_layer_is_as_before():
    """None by default, results bit-identical to the operator without the flag, and the
    2-tuple of FLOPs; setting "relu" and back changes nothing."""
    mask, weight, b, x, gy = operands(None, True, 70)
    x, gy = torch.randn_like(x), torch.randn_like(gy)
    layer = CSRLinear(weight, mask, b)
    assert layer.activation is None and "activation" not in repr(layer)
    layer.activation = "relu"
    layer.activation = None
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(gy)
    x2, v2 = x.clone().requires_grad_(), layer.values.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y2, _ = csr_linear(x2, v2, *layer.structure(), 64, -1, b2)
    y2.backward(gy)
    assert torch.equal(y, y2) and torch.equal(xr.grad, x2.grad)
    assert torch.equal(layer.values.grad, v2.grad) and torch.equal(layer.bias.grad, b2.grad)
    assert layer.forward_flops((x,), y) == (2.0 * layer.nnz * 70, 48.0 * 70)


def test_setting_copies_state_dicts_flops_and_bad_values():
    mask, weight, b, x, _ = operands(None, True, 5)
    layer = relu_layer(weight, mask, b, None, torch.float64)
    assert "activation=relu" in repr(layer)
    assert not any("activation" in k for k in layer.state_dict())
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.activation == "relu" and torch.equal(copied(x), layer(x))
    old = CSRLinear.__new__(CSRLinear)  # a layer pickled before activations existed
    state = dict(layer.__dict__)
    del state["_activation"]
    old.__setstate__(state)
    assert old.activation is None and (old(x) < 0).any()
    y = layer(x)
    assert layer.forward_flops((x,), y) == (2.0 * layer.nnz * 5, 48.0 * 5, 48.0 * 5)
    report = st.flops(nn.Sequential(layer), x)
    assert report.other == 48.0 and report.weights == 2.0 * layer.nnz
    for bad in ("gelu", "ReLU", nn.ReLU(), 1):
        with pytest.raises(ValueError, match=r"activation must be one of \(None, 'relu'\)"):
            layer.activation = bad
    assert layer.activation == "relu"
