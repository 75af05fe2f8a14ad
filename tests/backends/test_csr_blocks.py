"""CSRLinear with a block shape: the block kernels against dense products, in every dtype, with
and without the compiled kernels, under torch.compile, with RigL's capture, refusing positions
that do not tile, and training like a masked nn.Linear."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import sparsetrain.kernels as kernels_module
from sparsetrain.backends.block_ops import BLOCK_KEYS, block_linear, block_structure
from sparsetrain.backends.csr import CSRLinear
from tests.backends.conftest import quiet

SHAPES = [(4, 1), (8, 1), (16, 1), (4, 4), (1, 4), (2, 8), (3, 2), (32, 1)]




def block_mask(out_f, in_f, block, density=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, c = block
    blocks = torch.rand(out_f // r, in_f // c, generator=g) < density
    blocks[0, 0] = True  # never empty
    return blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)


def block_layer(block, out_f=96, in_f=64, dtype=torch.float32, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    mask = block_mask(out_f, in_f, block, seed=seed)
    with torch.no_grad():
        lin.weight.mul_(mask)
    layer = CSRLinear.from_linear(copy.deepcopy(lin), mask)  # a bias of its own
    layer.set_block_shape(block)
    return layer, lin, mask


@quiet
@pytest.mark.parametrize("block", SHAPES)
@pytest.mark.parametrize("batch", [1, 70, 130])
def test_products_equal_the_dense_ones(block, batch, kernels):
    layer, lin, mask = block_layer(block, dtype=torch.float64)
    x = torch.randn(batch, 64, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = lin.weight.detach()
    torch.testing.assert_close(y, x.detach() @ w.t() + lin.bias.detach())
    torch.testing.assert_close(x.grad, gy @ w)
    torch.testing.assert_close(layer.values.grad, (gy.t() @ x.detach())[mask])
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))


@pytest.mark.parametrize("block", [(2, 1), (1, 2), (2, 2)])
def test_gradcheck_in_float64(block):
    if kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled CSR kernels cannot be built here")
    layer, _, _ = block_layer(block, out_f=4, in_f=6, dtype=torch.float64)
    args = [layer.crow, layer.col, *(getattr(layer, k) for k in BLOCK_KEYS), *block, 6, -1]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: block_linear(a, v, *args)[0], (x, values))
    assert torch.autograd.gradcheck(lambda a, v, b: block_linear(a, v, *args, b)[0],
                                    (x, values, bias))


@quiet
@pytest.mark.parametrize("block", SHAPES)
def test_fallback_equals_kernels(block, monkeypatch):
    if kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled CSR kernels cannot be built here")
    layer, _, _ = block_layer(block)
    x = torch.randn(37, 64)
    results = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(kernels_module, "_KERNELS", False)
        layer.values.grad = None
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.square().sum().backward()
        results.append((y, xr.grad, layer.values.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@quiet
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(4, 1), (4, 4), (1, 4)])
def test_16_bit_values_are_summed_in_float32_and_rounded_once(dtype, block, kernels):
    layer, lin, mask = block_layer(block, dtype=dtype, bias=False)
    x = torch.randn(70, 64).to(dtype).requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    w, xd, gd = lin.weight.detach().double(), x.detach().double(), gy.double()
    eps = torch.finfo(dtype).eps
    for result, exact in ((y, xd @ w.t()), (x.grad, gd @ w),
                          (layer.values.grad, (gd.t() @ xd)[mask])):
        assert result.dtype == dtype
        torch.testing.assert_close(result.double(), exact, rtol=eps, atol=1e-5)


@quiet
def test_autocast_and_mixed_input_dtype(kernels):
    """float32 values with a float64 input (cast to the values' dtype, as for CSR), and bfloat16
    autocast (computed in bfloat16, the values' gradient in float32)."""
    layer, lin, _ = block_layer((4, 4))
    x = torch.randn(20, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x.float()), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x.float()), lin(x.float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32


def test_positions_that_do_not_tile_are_refused():
    layer, _, mask = block_layer((4, 4))
    crow, col = layer.crow.clone(), layer.col.clone()
    positions = layer.positions()
    with pytest.raises(ValueError, match="do not tile into aligned 8x4 blocks"):
        layer.set_block_shape((8, 4))
    assert layer.block_shape == (4, 4)
    with pytest.raises(ValueError, match="does not tile a 96x64 weight"):
        layer.set_block_shape((5, 4))
    free = (~mask).flatten().nonzero().squeeze(1)
    broken = torch.cat([positions[:-1], free[:1]]).sort().values  # one weight out of its block
    with pytest.raises(ValueError, match="do not tile into aligned 4x4 blocks"):
        layer.set_positions(broken)
    rows, cols = positions // 64, positions % 64
    shifted = (rows * 64 + (cols + 1) % 64).sort().values  # every block one column right
    with pytest.raises(ValueError, match="out of place"):
        layer.set_positions(shifted)
    assert torch.equal(layer.crow, crow) and torch.equal(layer.col, col)  # left as it was
    bad = layer.state_dict()
    bad["col"] = (bad["col"] + 1) % 64
    twin = copy.deepcopy(layer)
    with pytest.raises(ValueError, match="do not tile"):
        twin.load_state_dict(bad)
    assert torch.equal(twin.col, col)
    with pytest.raises(RuntimeError, match="block shape"):
        layer.structure()
    layer.set_block_shape(None)  # without a shape, any positions
    layer.set_positions(shifted)
    assert layer.block_shape is None and layer.t_perm.numel() == layer.nnz
    assert layer.b_col.numel() == 0 and len(layer.structure()) == 5


def test_set_positions_and_state_dicts_keep_the_block_products():
    layer, _, _ = block_layer((4, 2))
    g = torch.Generator().manual_seed(5)
    n_blocks = layer.nnz // 8
    chosen = torch.randperm(24 * 32, generator=g)[:n_blocks]  # a new set of 4x2 blocks
    blocks = torch.zeros(24 * 32, dtype=torch.bool)
    blocks[chosen] = True
    mask = blocks.view(24, 32).repeat_interleave(4, 0).repeat_interleave(2, 1)
    twin, old = copy.deepcopy(layer), copy.deepcopy(layer)  # the old positions
    layer.set_positions(mask.flatten().nonzero().squeeze(1))
    twin.load_state_dict(layer.state_dict())
    # as saved when the indices were int64
    old.load_state_dict({k: v.long() if k in ("crow", "col") else v
                         for k, v in layer.state_dict().items()})
    x = torch.randn(9, 64)
    dense = nn.functional.linear(x, layer.dense_weight(), layer.bias)
    for m in (layer, twin, old):
        assert m.block_shape == (4, 2) and torch.equal(m.mask(), mask)
        assert all(getattr(m, k).dtype == torch.int32 for k in ("crow", "col", *BLOCK_KEYS))
        torch.testing.assert_close(m(x), dense)


def test_block_structure_of_a_known_layout():
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0:2, 2:4] = mask[0:2, 4:6] = mask[2:4, 0:2] = True
    layer = CSRLinear(torch.randn(4, 6), mask)
    s = block_structure(layer.crow, layer.col, (4, 6), (2, 2))
    assert s["b_ptr"].tolist() == [0, 2, 3] and s["b_col"].tolist() == [1, 2, 0]
    assert s["t_ptr"].tolist() == [0, 1, 2, 3]
    assert s["t_brow"].tolist() == [1, 0, 0] and s["t_blk"].tolist() == [2, 0, 1]


@quiet
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_forward_backward_and_capture_equal_eager(kernels):
    torch._dynamo.reset()
    counters.clear()
    eager = nn.Sequential(block_layer((4, 4))[0], nn.GELU(), block_layer((8, 1), 16, 96)[0])
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    x = torch.randn(12, 64)
    for step in range(3):
        capture = step == 1
        for m in (eager, model):
            for layer in (m[0], m[2]):
                layer.capture = [] if capture else None
                layer.values.grad = None
        out_eager, out = eager(x), compiled(x)
        torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
        out_eager.square().sum().backward()
        out.square().sum().backward()
        for a, b in ((eager[0], model[0]), (eager[2], model[2])):
            torch.testing.assert_close(b.values.grad, a.values.grad, rtol=1e-5, atol=1e-5)
            if capture:
                assert len(a.capture) == len(b.capture) == 1
                for ta, tb in zip(a.capture[0], b.capture[0]):
                    torch.testing.assert_close(tb, ta)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_capture_records_input_and_output_gradient():
    layer, _, _ = block_layer((4, 4))
    layer.capture = []
    x = torch.randn(5, 64)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    (cx, cgy), = layer.capture
    torch.testing.assert_close(cx, x)
    torch.testing.assert_close(cgy, gy)


@quiet
@pytest.mark.parametrize("block", [(4, 4), (8, 1), (1, 4)])
def test_trains_like_a_masked_linear(block, kernels):
    """150 SGD steps with momentum: the block layer and nn.Linear with its weight masked after
    every step give the same losses."""
    layer, lin, mask = block_layer(block, out_f=32, in_f=32)
    opt_a = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(lin.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(32, 32, generator=g) * mask
    first = None
    for _ in range(150):
        x = torch.randn(16, 32, generator=g)
        losses = []
        for module, opt in ((layer, opt_a), (lin, opt_b)):
            opt.zero_grad()
            loss = (module(x) - x @ target.t()).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            lin.weight.mul_(mask)
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)
        first = first or losses[0]
    assert losses[0] < 0.1 * first  # it learned


@quiet
@pytest.mark.parametrize("block", [(4, 1), (1, 4)])
def test_empty_layers_and_empty_batches(block, kernels):
    empty = CSRLinear(torch.randn(8, 8), torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8))
    empty.set_block_shape(block)
    x = torch.randn(3, 8, requires_grad=True)
    empty(x).sum().backward()
    assert empty(x).abs().sum() == 0 and x.grad.abs().sum() == 0
    layer, _, _ = block_layer(block, out_f=8, in_f=8)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert torch.equal(layer.values.grad, torch.zeros_like(layer.values))
