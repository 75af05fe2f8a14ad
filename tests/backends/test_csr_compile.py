"""CSRLinear under torch.compile: one graph with no breaks, equal to eager, no recompiles from
step to step, and RigL's capture of (x, grad_y) on update steps working inside that graph; with
and without a ReLU fused into the layers."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import sparsetrain as st
import sparsetrain.kernels as kernels_module
from sparsetrain.backends.csr import CSRLinear

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts only its own graphs and breaks."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def csr_mlp(seed=0, relu=False):
    """Two CSR layers with a GELU between them, or with ``relu`` the ReLU of both fused."""
    torch.manual_seed(seed)
    first, second = nn.Linear(16, 32), nn.Linear(32, 8)
    model = nn.Sequential(CSRLinear.from_linear(first, torch.rand(32, 16) < 0.3), nn.GELU(),
                          CSRLinear.from_linear(second, torch.rand(8, 32) < 0.3))
    if relu:
        model[0].activation = model[2].activation = "relu"
        model[1] = nn.Identity()
    return model


@pytest.mark.parametrize("relu", [False, True])
def test_explain_finds_one_graph_and_no_break(relu):
    explanation = torch._dynamo.explain(csr_mlp(relu=relu))(torch.randn(10, 3, 16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("autocast, kernels", [(None, "compiled"), (torch.bfloat16, "compiled"),
                                               (None, "torch")])
def test_compiled_steps_equal_eager_with_and_without_capture(autocast, kernels, relu,
                                                             monkeypatch):
    """Alternating plain steps and steps that capture (as RigL's update steps do): results,
    gradients and captured tensors as in eager, from one compiled graph; with the compiled
    kernels and with torch's sparse operations in their place."""
    if kernels == "torch":
        monkeypatch.setattr(kernels_module, "_KERNELS", False)
    elif kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled CSR kernels cannot be built here")
    eager, model = csr_mlp(relu=relu), csr_mlp(relu=relu)
    compiled = torch.compile(model)
    x = torch.randn(12, 16)
    tol = {} if autocast is None else {"rtol": 2e-2, "atol": 2e-2}
    for step in range(4):
        capture = step % 2 == 1
        for m in (eager, model):
            for layer in (m[0], m[2]):
                layer.capture = [] if capture else None
                layer.values.grad = None
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
            out_eager, out = eager(x), compiled(x)
        assert out.dtype == out_eager.dtype == (autocast or torch.float32)
        torch.testing.assert_close(out, out_eager, **tol)
        assert not relu or ((out == 0).any() and (out >= 0).all())
        out_eager.float().square().sum().backward()
        out.float().square().sum().backward()
        for a, b in ((eager[0], model[0]), (eager[2], model[2])):
            assert b.values.grad.dtype == torch.float32
            torch.testing.assert_close(b.values.grad, a.values.grad, **tol)
            torch.testing.assert_close(b.bias.grad, a.bias.grad, **tol)
            if capture:
                assert len(a.capture) == len(b.capture) == 1
                for ta, tb in zip(a.capture[0], b.capture[0]):
                    assert tb.dtype == torch.float32
                    torch.testing.assert_close(tb, ta, **tol)
            else:
                assert b.capture is None
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


def rigl_run(compile_model: bool, steps=8):
    """(masks after every step, model) of RigL on backend='csr' updating every 2 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                          nn.Linear(24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.RigL(model, opt, density=0.4, total_steps=steps, delta_t=2, backend="csr")
    forward = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(1)
    masks = []
    for step in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        # from the second update step on, any recompile is an error
        with torch._dynamo.config.patch(error_on_recompile=compile_model and step >= 3):
            opt.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            sp.step()
        masks.append({n: m.clone() for n, m in sp.masks.items()})
    return masks, model


def test_rigl_compiled_grows_the_same_weights_as_eager_without_recompiles():
    eager_masks, eager_model = rigl_run(False)
    masks, model = rigl_run(True)
    assert isinstance(model[2], CSRLinear)
    changes = sum(not torch.equal(a[n], b[n]) for a, b in zip(masks, masks[1:]) for n in a)
    assert changes > 0  # the updates moved weights
    for a, b in zip(eager_masks, masks):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for p, q in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


def test_a_copied_layer_captures_into_its_own_list():
    """The operators find a layer's capture list through its handle: a deep copy gets its own."""
    original = csr_mlp()[0]
    twin = copy.deepcopy(original)
    original.capture, twin.capture = [], []
    twin(torch.randn(5, 16)).sum().backward()
    assert original.capture == [] and len(twin.capture) == 1
