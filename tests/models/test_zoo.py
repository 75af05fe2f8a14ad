"""Every model of the zoo: forward and backward, parameter counts, width, sparsifiability."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.models import (available_models, build_model, count_parameters, example_input,
                                model_inputs)

SMALL = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "gpt-mini": (16,)}

# Published parameter counts of the standard configurations (tolerance: relative).
PUBLISHED = [
    ("lenet300", (1, 28, 28), 10, 266_610, 0.0),
    ("lenet5", (1, 28, 28), 10, 431_080, 0.0),
    ("resnet20", (3, 32, 32), 10, 270_000, 0.02),
    ("resnet56", (3, 32, 32), 10, 850_000, 0.02),
    ("wrn-22-2", (3, 32, 32), 10, 1_100_000, 0.03),
    ("vgg16", (3, 32, 32), 10, 14_700_000, 0.01),
    ("mobilenet-v2", (3, 32, 32), 10, 2_240_000, 0.01),
    ("resnet18", (3, 224, 224), 1000, 11_689_512, 0.0),
    ("resnet50", (3, 224, 224), 1000, 25_557_032, 0.0),
]


def shape_of(name):
    return SMALL.get(name, (3, 32, 32))


@pytest.mark.parametrize("name", available_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape_of(name))
    out = model(example_input(name, shape_of(name), num_classes=7))
    per_position = shape_of(name) if model_inputs(name) == "tokens" else ()
    assert out.shape == (2, *per_position, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", available_models())
def test_width_and_targets(name):
    full = build_model(name, input_shape=shape_of(name))
    half = build_model(name, input_shape=shape_of(name), width=0.5)
    assert count_parameters(half) < count_parameters(full)
    targets = st.find_targets(full)
    kinds = {type(m) for m in full.modules() if any(m.weight is t.param for t in targets
                                                    if hasattr(m, "weight"))}
    assert kinds <= {nn.Conv2d, nn.Linear, nn.Embedding} and kinds
    assert not any(isinstance(m, nn.BatchNorm2d) and any(m.weight is t.param for t in targets)
                   for m in full.modules())
    assert count_parameters(full, sparsifiable_only=True) == sum(t.numel for t in targets)


@pytest.mark.parametrize("name, shape, classes, expected, tolerance", PUBLISHED)
def test_published_parameter_counts(name, shape, classes, expected, tolerance):
    count = count_parameters(build_model(name, num_classes=classes, input_shape=shape))
    assert abs(count - expected) <= tolerance * expected, count


@pytest.mark.parametrize("name", ["resnet20", "mobilenet-v1", "lenet5"])
def test_sparse_training_step(name):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape_of(name))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.RigL(model, opt, density=0.1, total_steps=10, delta_t=1)
    x, y = torch.randn(4, *shape_of(name)), torch.randint(0, 10, (4,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()
    assert abs(sp.overall_density() - 0.1) < 0.01


def test_resnets_run_on_small_images():
    model = build_model("resnet50", num_classes=5, input_shape=(3, 32, 32), width=0.25)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "lenet301"}, "unknown model 'lenet301'"),
    ({"name": "lenet5", "width": 0}, "width"),
    ({"name": "lenet5", "num_classes": 0}, "num_classes"),
    ({"name": "lenet5", "input_shape": (1, 15, 15)}, "at least 16x16"),
    ({"name": "vgg11", "input_shape": (784,)}, "needs images"),
])
def test_bad_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_lenet5_smallest_input_runs():
    model = build_model("lenet5", input_shape=(1, 16, 16))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_gpt_mini_is_causal_and_checks_its_input():
    torch.manual_seed(0)
    model = build_model("gpt-mini", num_classes=256, input_shape=(12,), width=0.25).eval()
    x = torch.randint(0, 256, (3, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 256  # change only the later tokens
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :7], model(y)[:, :7], atol=1e-6)
        assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])
        assert model(x[:, :5]).shape == (3, 5, 256)  # shorter sequences too
    with pytest.raises(ValueError, match="at most 12 tokens"):
        model(torch.randint(0, 256, (1, 13)))
    with pytest.raises(ValueError, match="token indices"):
        model(torch.randn(1, 12))
    with pytest.raises(ValueError, match=r"input_shape must be \(context,\)"):
        build_model("gpt-mini", input_shape=(3, 32, 32))
