"""The CSR Linear layer against a dense masked reference; its int32 indices and W^T's
structure."""

import copy

import pytest
import torch
from torch import nn

import sparsetrain.kernels as kernels_module
from sparsetrain.backends.csr import INDEX_KEYS, CSRLinear, csr_structure
from sparsetrain.backends.csr_ops import check_index_range, csr_linear, transpose


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
    _, _, csr = layer()
    crow, col, *rest = csr.structure()
    with pytest.raises(ValueError, match="crow and col must be int32"):
        csr_linear(torch.randn(2, 9, dtype=torch.double), csr.values, crow.long(), col.long(),
                   *rest, 9, -1)


def test_indices_are_int32_and_positions_int64():
    _, mask, csr = layer()
    for key in INDEX_KEYS:
        assert getattr(csr, key).dtype == torch.int32, key
    assert csr.positions().dtype == torch.int64 and csr.rows().dtype == torch.int64
    csr.set_positions(csr.positions())
    assert csr.col.dtype == torch.int32 and torch.equal(csr.mask(), mask)


def test_indices_beyond_int32_are_a_clear_error():
    check_index_range(2**31 - 1, 2**31 - 1, 2**31 - 1)
    for shape in [(2**31, 10, 5), (10, 2**31, 5), (10**5, 10**5, 2**31)]:
        with pytest.raises(ValueError, match="does not fit int32 indices"):
            check_index_range(*shape)


def reference_transpose(crow, col, cols):
    """W^T's structure as a stable argsort by column gives it."""
    perm = torch.argsort(col.long(), stable=True)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), (crow[1:] - crow[:-1]).long())
    t_crow = torch.zeros(cols + 1, dtype=torch.int64)
    t_crow[1:] = torch.cumsum(torch.bincount(col.long(), minlength=cols), 0)
    return t_crow, rows[perm], perm


@pytest.mark.parametrize("shape, density, threads", [
    ((7, 5), 0.0, None), ((1, 1), 1.0, None), ((30, 40), 0.2, None), ((3000, 70), 0.9, None),
    ((1000, 600), 0.9, None), ((1000, 600), 0.9, 3)])
def test_transpose_equals_a_stable_argsort(shape, density, threads):
    """The counting sort (one thread; several, for the 1000 x 600 layer) against the argsort,
    with empty rows and columns and with no non-zeros at all."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(shape, generator=g) < density
    mask[::3] = False  # empty rows
    mask[:, 1::4] = False  # empty columns
    s = csr_structure(mask)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        got = transpose(s["crow"], s["col"], shape[1])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, reference_transpose(s["crow"], s["col"], shape[1])):
        assert a.dtype == torch.int32 and torch.equal(a.long(), b)


def test_state_dicts_with_int64_indices_load():
    """A state dict saved when the indices were int64 loads (its indices made int32), into a
    layer of other positions, and saving again gives the int32 dict exactly."""
    _, _, csr = layer()
    other = copy.deepcopy(csr)
    other.set_positions(torch.randperm(6 * 9)[:csr.nnz].sort().values)
    old = {k: v.long() if k in ("crow", "col") else v for k, v in csr.state_dict().items()}
    for assign in (False, True):
        twin = copy.deepcopy(other)
        twin.load_state_dict(old, assign=assign)
        for key in INDEX_KEYS:
            assert getattr(twin, key).dtype == torch.int32, key
            assert torch.equal(getattr(twin, key), getattr(csr, key)), key
        saved = twin.state_dict()
        assert saved.keys() == csr.state_dict().keys()
        for key, value in csr.state_dict().items():
            assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key
        x = torch.randn(3, 9, dtype=torch.double)
        torch.testing.assert_close(twin(x), csr(x))


def test_a_layer_pickled_with_int64_indices_gets_int32_ones():
    _, _, csr = layer()
    old = copy.deepcopy(csr)
    for key in INDEX_KEYS:
        old._buffers[key] = old._buffers[key].long()
    twin = copy.deepcopy(old)  # through __setstate__, as unpickling
    for key in INDEX_KEYS:
        assert getattr(twin, key).dtype == torch.int32 and torch.equal(getattr(twin, key),
                                                                       getattr(csr, key))


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
