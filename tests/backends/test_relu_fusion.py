"""The CSR backend fuses the nn.ReLU that follows a converted Linear in an nn.Sequential
(conversion.fuse_relus), to_masked puts it back, and the model computes the same either way.
(The kernels' fused ReLU itself is tested in test_csr_relu.py; the 300-step equivalence with
the masked backend, whose MLP has ReLUs, in test_equivalence.py.)"""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.backends import CSRLinear, to_csr, to_masked
from sparsetrain.flops import flops


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(inplace=True),
                         nn.Linear(16, 4))


def masks_of(model, density=0.5):
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g) < density
            for n, p in model.named_parameters() if n.endswith("weight")}


def test_the_backend_fuses_each_relu_after_a_converted_linear():
    model = mlp()
    x = torch.randn(8, 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st.RigL(model, opt, density=0.5, total_steps=10, backend="csr")
    assert [type(m).__name__ for m in model] == ["CSRLinear", "Identity", "CSRLinear",
                                                  "Identity", "CSRLinear"]
    assert [m.activation for m in (model[0], model[2], model[4])] == ["relu", "relu", None]
    assert "relu" in repr(model[0])
    y = model(x)
    assert y.shape == (8, 4)


def test_fused_model_computes_what_the_dense_one_does_and_converts_back():
    model = mlp()
    masks = masks_of(model)
    x = torch.randn(8, 12)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    expected = model(x)
    to_csr(model, masks)
    assert isinstance(model[1], nn.Identity) and model[0].activation == "relu"
    torch.testing.assert_close(model(x), expected)
    back = to_masked(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert set(back) == set(masks)
    torch.testing.assert_close(model(x), expected)


def test_relus_that_cannot_be_fused_are_left_alone():
    torch.manual_seed(0)
    shared = nn.ReLU()  # one module reached twice
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(nn.Linear(6, 6), shared, nn.Linear(6, 6), shared, nn.Linear(6, 6),
                          hooked, nn.Linear(6, 6), nn.Dropout(0.0), nn.ReLU(), nn.Linear(6, 6),
                          nn.LeakyReLU())
    layers = to_csr(model, masks_of(model))
    assert all(layer.activation is None for layer in layers.values())
    assert model[1] is shared and model[5] is hooked and type(model[8]) is nn.ReLU


def test_a_functional_relu_is_not_fused():
    model = st.models.build_model("lenet300", num_classes=4, input_shape=(1, 4, 5))
    layers = to_csr(model, masks_of(model))
    assert layers and all(layer.activation is None for layer in layers.values())


def test_to_masked_refuses_when_the_relu_slot_is_gone_and_changes_nothing():
    model = mlp()
    to_csr(model, masks_of(model))
    model[1] = nn.Dropout(0.0)  # the Identity left for the ReLU replaced by the user
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="nn.Identity"):
        to_masked(model)
    assert [type(m) for m in model] == before


def test_flops_are_the_same_with_the_relu_fused():
    model, x = mlp(), torch.randn(3, 12)
    masks = masks_of(model)
    dense = flops(model, x, masks)
    to_csr(model, masks)
    fused = flops(model, x)
    assert isinstance(model[0], CSRLinear) and model[0].activation == "relu"
    assert fused.total == pytest.approx(dense.total)
