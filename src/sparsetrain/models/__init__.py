"""The model zoo: a registry of networks by name, each with a ``width`` multiplier.

``build_model(name, num_classes=10, input_shape=(3, 32, 32), width=1.0)`` builds one. ``width``
scales the channels or units of every hidden layer (rounded, at least 1); 1.0 is the standard
network, as the RigL paper's Big-Sparse and small-dense models need.

| name | network | first layer | classifier |
| --- | --- | --- | --- |
| `lenet300` | LeNet-300-100 (MLP) | `fc1` | `fc3` |
| `lenet5` | LeNet-5, Caffe variant (conv20-conv50-fc500) | `conv1` | `fc2` |
| `vgg11`, `vgg16`, `vgg19` | CIFAR VGG with BatchNorm, global average pool, one linear layer | `features.0` | `classifier` |
| `resnet20/32/56` | CIFAR ResNet (16/32/64 channels; 1x1-conv shortcuts when the shape changes) | `conv1` | `fc` |
| `wrn-22-2` | Wide ResNet 22-2, pre-activation blocks | `conv1` | `fc` |
| `mobilenet-v1`, `mobilenet-v2` | MobileNets with CIFAR stems (stride-1 first conv) | `conv1` | `fc` |
| `resnet18`, `resnet50` | ImageNet ResNets (7x7 stride-2 stem, max-pool) | `conv1` | `fc` |
| `gpt-mini` | 4-block GPT of `nn.Linear` layers for byte-level text (`num_classes` = vocabulary, `input_shape` = `(context,)`) | `wte` | `head` |
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..sparsity.targets import find_targets
from . import zoo

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INPUTS: dict[str, str] = {}
#: What a model reads: ``"features"`` (float tensors of ``input_shape``, e.g. images) or
#: ``"tokens"`` (int64 indices below ``num_classes``, ``input_shape = (context,)``, one output
#: per position).
INPUT_KINDS = ("features", "tokens")


def register_model(name: str, inputs: str = "features"):
    """Decorator: register ``factory(num_classes, input_shape, width) -> nn.Module`` reading
    ``inputs`` (one of ``INPUT_KINDS``)."""
    if inputs not in INPUT_KINDS:
        raise ValueError(f"inputs must be one of {INPUT_KINDS}, got {inputs!r}")

    def decorator(factory):
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = factory
        _INPUTS[name] = inputs
        return factory
    return decorator


def model_inputs(name: str) -> str:
    """What the model registered as ``name`` reads: ``"features"`` or ``"tokens"``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; the models are: {', '.join(available_models())}")
    return _INPUTS[name]


def example_input(name: str, input_shape: Sequence[int], num_classes: int = 10,
                  batch: int = 2) -> torch.Tensor:
    """A random batch the model registered as ``name`` accepts (for tests and FLOPs)."""
    shape = (batch, *(int(s) for s in input_shape))
    if model_inputs(name) == "tokens":
        return torch.randint(0, num_classes, shape)
    return torch.randn(shape)


def available_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, *, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32),
                width: float = 1.0) -> nn.Module:
    """The model registered as ``name`` for ``num_classes`` classes and inputs of ``input_shape``
    (one example, channels first). The module carries these arguments as its
    ``sparsetrain_recipe`` (a dict), which :func:`sparsetrain.deploy.export_sparse` records so
    that the exported file can be loaded without the code that built it."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; the models are: {', '.join(available_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        width = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be a positive number, got {width!r}") from None
    if not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must hold positive sizes, got {input_shape!r}")
    model = _MODELS[name](num_classes=num_classes, input_shape=shape, width=width)
    # how to build it again: what an exported sparse model file records (sparsetrain.deploy)
    model.sparsetrain_recipe = {"model": name, "num_classes": num_classes,
                                "input_shape": list(shape), "width": width}
    return model


def count_parameters(model: nn.Module, *, sparsifiable_only: bool = False) -> int:
    """Number of parameters (shared ones once), or of the weights sparsetrain sparsifies."""
    if sparsifiable_only:
        return sum(t.numel for t in find_targets(model))
    return sum(p.numel() for p in model.parameters())


for _name, _factory in zoo.FACTORIES.items():
    register_model(_name, "tokens" if _name in zoo.TOKEN_MODELS else "features")(_factory)

__all__ = ["INPUT_KINDS", "available_models", "build_model", "count_parameters",
           "example_input", "model_inputs", "register_model"]
