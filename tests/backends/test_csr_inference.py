"""CSRLinear's inference path (no autograd: csr_spmv at small batches, the tile kernels above,
torch's sparse product without the kernels) against a dense ``x @ W.T + b`` (then relu), in
every dtype, with and without bias and ReLU, unstructured and in 4x4 blocks, with empty rows
and no weights at all; that it keeps and records nothing, that the training path is
unchanged, and csr_spmv's argument checks."""

import pytest
import torch
import torch._dynamo

import sparsetrain.backends.csr_infer as csr_infer_module
import sparsetrain.backends.csr_ops as csr_ops
from sparsetrain.backends.csr import CSRLinear
from sparsetrain.backends.csr_infer import SPMV_MAX_BATCH, csr_infer
from sparsetrain.kernels import compiled_kernels
from tests.backends.conftest import quiet

T = SPMV_MAX_BATCH
BATCHES = [1, 2, T, T + 1, 64]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: {}, torch.float32: {},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}

pytestmark = quiet


@pytest.fixture
def compiled():
    if compiled_kernels() is None:
        pytest.skip("the compiled CSR kernels cannot be built here")


@pytest.fixture
def no_kernels(monkeypatch):
    """torch's operations in place of the kernels, where csr_ops and csr_infer look them up."""
    monkeypatch.setattr(csr_ops, "compiled_kernels", lambda: None)
    monkeypatch.setattr(csr_infer_module, "compiled_kernels", lambda: None)


def make_mask(out_f, in_f, kind, g, density=0.3):
    if kind == "blocks":  # aligned 4x4 blocks
        blocks = torch.rand(out_f // 4, in_f // 4, generator=g) < density
        return blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)
    mask = torch.rand(out_f, in_f, generator=g) < density
    if kind == "empty_rows":
        mask[::3] = False
    elif kind == "nnz0":
        mask[:] = False
    return mask


def make(dtype, bias=True, relu=False, kind="random", out_f=40, in_f=72, seed=0,
         requires_grad=False):
    """(layer, dense weight in float64, bias in float64 or None): every number representable
    in ``dtype``, so that the reference differs only by the order and precision of sums."""
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(out_f, in_f, kind, g)
    weight = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * mask).to(dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype) if bias else None
    layer = CSRLinear(weight, mask, b)
    if kind == "blocks":
        layer.set_block_shape((4, 4))
    if relu:
        layer.activation = "relu"
    layer.requires_grad_(requires_grad)
    return layer, weight.double(), None if b is None else b.double()


def reference(x, weight, bias, relu):
    y = x.double() @ weight.t() + (0 if bias is None else bias)
    return torch.relu(y) if relu else y


def inputs(batch, in_f, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_f, generator=g, dtype=torch.float64).to(dtype)


class Spy:
    """The kernels module, recording which of its functions are called."""

    def __init__(self, kernels):
        self.kernels, self.called = kernels, []

    def __getattr__(self, name):
        self.called.append(name)
        return getattr(self.kernels, name)


def check(layer, weight, bias, relu, x, mode="no_grad", tol=None):
    with MODES[mode]():
        y = layer(x)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], layer.out_features)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, reference(x, weight, bias, relu).to(x.dtype),
                               **(tol or TOL[x.dtype]))


@pytest.mark.parametrize("bias, relu, mode", [(True, False, "no_grad"),
                                              (True, True, "inference_mode"),
                                              (False, False, "inference_mode"),
                                              (False, True, "no_grad")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_equals_the_dense_product(compiled, monkeypatch, batch, dtype, bias, relu, mode):
    layer, weight, b = make(dtype, bias, relu)
    spy = Spy(compiled_kernels())
    monkeypatch.setattr(csr_infer_module, "compiled_kernels", lambda: spy)
    check(layer, weight, b, relu, inputs(batch, 72, dtype), mode)
    assert spy.called[0] == ("csr_spmv" if batch <= T else "pack_rows")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, T, T + 1, 64])
def test_blocks(compiled, monkeypatch, batch, dtype, relu):
    layer, weight, b = make(dtype, True, relu, kind="blocks", out_f=48, in_f=64)
    spy = Spy(compiled_kernels())
    monkeypatch.setattr(csr_infer_module, "compiled_kernels", lambda: spy)
    check(layer, weight, b, relu, inputs(batch, 64, dtype), "inference_mode")
    assert ("csr_spmv" if batch <= T else "block_forward") in spy.called


@pytest.mark.parametrize("kind", ["empty_rows", "nnz0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, T, T + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_empty_rows_and_no_weights(compiled, kind, dtype, batch, bias):
    layer, weight, b = make(dtype, bias, True, kind=kind)
    assert layer.empty_rows() > 0 and (layer.nnz == 0) == (kind == "nnz0")
    check(layer, weight, b, True, inputs(batch, 72, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, T + 5])
def test_a_layer_large_enough_for_every_thread(compiled, dtype, batch):
    """More work than one thread takes (the rows cut into runs of about equal non-zeros), rows
    of any length (gathers of 16 and the masked rest)."""
    layer, weight, b = make(dtype, True, True, out_f=384, in_f=1000, seed=3)
    check(layer, weight, b, True, inputs(batch, 1000, dtype), tol={"rtol": 1e-4, "atol": 1e-4})


def test_nan_stays_nan_through_the_relu(compiled):
    """A NaN input makes NaN the outputs whose rows hold its column (only those: the others
    never read it), and the ReLU keeps them NaN."""
    layer, weight, b = make(torch.float32, True, True)
    x = inputs(2, 72, torch.float32)
    c = int(layer.col[0])
    expected = reference(x, weight, b, True).float()
    expected[0, weight[:, c] != 0] = float("nan")
    x[0, c] = float("nan")
    with torch.no_grad():
        y = layer(x)
    assert y[0].isnan().any() and torch.equal(y.isnan(), expected.isnan())
    torch.testing.assert_close(y, expected, equal_nan=True)


@pytest.mark.parametrize("kind", ["random", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, T + 1])
def test_torch_fallback(no_kernels, kind, dtype, batch):
    layer, weight, b = make(dtype, True, True, kind=kind, out_f=48, in_f=64)
    check(layer, weight, b, True, inputs(batch, 64, dtype))


@pytest.mark.parametrize("kind", ["random", "blocks"])
@pytest.mark.parametrize("batch", [1, T + 1])
def test_keeps_and_records_nothing(monkeypatch, kind, batch):
    """Under no_grad, and with grad enabled but nothing requiring it (a deployed model): no
    training operator runs (they pack x for a backward pass), no graph, no capture."""
    def refuse(*args, **kwargs):
        raise AssertionError("the training operator ran for inference")

    monkeypatch.setattr("sparsetrain.backends.csr.csr_linear", refuse)
    monkeypatch.setattr("sparsetrain.backends.csr.block_linear", refuse)
    layer, weight, b = make(torch.float32, True, True, kind=kind, out_f=48, in_f=64)
    layer.capture = []
    x = inputs(batch, 64, torch.float32)
    with torch.no_grad():
        layer.requires_grad_(True)
        y1 = layer(x)
    layer.requires_grad_(False)
    y2 = layer(x)  # grad enabled, nothing requires it
    for y in (y1, y2):
        assert y.grad_fn is None and not y.requires_grad
        torch.testing.assert_close(y, reference(x, weight, b, True).float())
    assert layer.capture == []


@pytest.mark.parametrize("kind", ["random", "blocks"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("batch", [1, T + 1])
def test_training_path_unchanged(kind, relu, batch):
    """With grad enabled the training operators run: gradients as a dense layer's (at the
    non-zeros), and the capture recorded."""
    layer, weight, b = make(torch.float64, True, relu, kind=kind, out_f=48, in_f=64,
                            requires_grad=True)
    layer.capture = []
    x = inputs(batch, 64, torch.float64).requires_grad_()
    y = layer(x)
    assert y.grad_fn is not None
    gy = inputs(batch, 48, torch.float64, seed=2)
    y.backward(gy)
    w = weight.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = reference(xr, w, bb, relu)
    ref.backward(gy)
    torch.testing.assert_close(y.detach(), ref.detach())
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.values.grad, w.grad[layer.mask()])
    torch.testing.assert_close(layer.bias.grad, bb.grad)
    assert len(layer.capture) == 1


def test_autocast_as_the_training_path(compiled):
    """Under CPU autocast to bfloat16 a float32 layer returns bfloat16, as with grad enabled."""
    layer, weight, b = make(torch.float32, True, True)
    x = inputs(T - 1, 72, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            y = layer(x)
        layer.requires_grad_(True)
        y_train = layer(x)
    assert y.dtype == y_train.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_train.detach(), **TOL[torch.bfloat16])


def test_compiles_to_one_graph(compiled):
    """Under torch.compile the inference path is the custom operator: no graph break."""
    layer, weight, b = make(torch.float32, True, True)
    x = inputs(2, 72, torch.float32)
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        y = compiled_layer(x)
    torch.testing.assert_close(y, reference(x, weight, b, True).float())
    torch._dynamo.reset()


def test_csr_spmv_checks_its_arguments(compiled):
    kernels = compiled_kernels()
    layer, _, _ = make(torch.float32)
    crow, col, values = layer.crow, layer.col, layer.values.detach()
    x = inputs(2, 72, torch.float32)
    for args, message in [
        ((crow.long(), col, values, x), "int32"),
        ((crow, col, values, x.double()), "one dtype"),
        ((crow, col, values, x[0]), "batch, features"),
        ((crow, col, values[1:], x), "values"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            kernels.csr_spmv(*args)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.csr_spmv(crow, col, values, x, torch.zeros(3))
    with pytest.raises(ValueError, match="inputs of shape"):
        csr_infer(x[:, :5], values, crow, col, 72)
