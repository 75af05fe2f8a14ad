"""FLOPs of a forward pass, dense or sparse, and the training FLOPs of each method.

RigL paper, Appendix H, and ``shared/spec/algorithms.md`` ("Training FLOPs accounting"). A
multiply-add counts as 2 FLOPs. ``flops(model, example_input, masks)`` runs one forward pass
with hooks and counts, per layer, three kinds apart:

- ``weights``: the multiply-adds with the weights (a sparsified layer costs its active weights
  only: each active weight is used once per output position of a convolution or linear layer
  (transformers' ``Conv1D`` and other module types declared linear with
  ``register_weight_layout`` included),
  once per time step of a recurrent layer);
- ``bias``: one addition per output element with a bias;
- ``other``: activations (1 per element), normalisation (2 per element: scale and shift),
  pooling (one per window element), attention's two products (2 FLOPs per multiply-add) and
  its softmax (1 per score), for ``nn.MultiheadAttention`` and for calls of
  ``F.scaled_dot_product_attention`` in a module's ``forward`` (as ``gpt-mini`` makes; counted
  in the module that calls it, over the whole query x key matrix even when causal, as a dense
  kernel computes it).

Totals are per example (divided by the batch size of ``example_input``). A module that stores
its weight in a form of its own (such as the CSR backend's layer) counts itself: it defines
``forward_flops(inputs, output) -> (weight FLOPs, bias FLOPs)``, or ``(weight FLOPs, bias FLOPs,
other FLOPs)`` for a layer that also applies an activation (1 FLOP per output, as a separate
activation module is counted). Embedding lookups cost nothing.
A module of another type that owns a weight of two or more dimensions is not counted: the
report lists it in ``uncounted`` (declare it with ``register_weight_layout(..., linear=True)``
or give it ``forward_flops``), so the totals say what they cover.

The training FLOPs of each method (forward and backward passes, RigL paper Appendix H) are the
plain functions at the end; every method names its own in ``training_flops``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .sparsity.targets import weight_layout

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                nn.Hardswish, nn.Hardtanh, nn.Softmax, nn.LogSoftmax, nn.Mish, nn.PReLU)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@dataclass
class LayerFlops:
    weights: float = 0.0
    bias: float = 0.0
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.bias + self.other


@dataclass
class FlopsReport:
    """Forward FLOPs of one example, per module name and in total."""

    layers: dict[str, LayerFlops] = field(default_factory=dict)
    #: modules owning a weight of 2 or more dimensions whose products are not counted
    uncounted: list[str] = field(default_factory=list)

    @property
    def weights(self) -> float:
        return sum(f.weights for f in self.layers.values())

    @property
    def bias(self) -> float:
        return sum(f.bias for f in self.layers.values())

    @property
    def other(self) -> float:
        return sum(f.other for f in self.layers.values())

    @property
    def total(self) -> float:
        return self.weights + self.bias + self.other

    def to_dict(self) -> dict:
        return {"total": self.total, "weights": self.weights, "bias": self.bias,
                "other": self.other,
                "layers": {n: {"weights": f.weights, "bias": f.bias, "other": f.other}
                           for n, f in self.layers.items()},
                "uncounted": list(self.uncounted)}


def _active(param: torch.Tensor, masks: Mapping[str, torch.Tensor | int],
            names: dict[int, str]) -> int:
    name = names.get(id(param))
    if name is not None and name in masks:
        active = masks[name]
        return int(active.sum()) if torch.is_tensor(active) else int(active)
    return param.numel()


def _first_tensor(value):
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _declared_linear(module: nn.Module):
    """``(weight, layout)`` of a module type declared linear with ``register_weight_layout``
    (one 2-D weight used once per output row), else ``None``."""
    layout = weight_layout(module)
    if layout is None or not layout.linear or len(layout.attrs) != 1:
        return None
    weight = getattr(module, layout.attrs[0], None)
    return (weight, layout) if torch.is_tensor(weight) and weight.dim() == 2 else None


def _count(module: nn.Module, inputs, output, masks, names) -> LayerFlops:
    out = _first_tensor(output)
    x = _first_tensor(inputs)
    result = LayerFlops()
    if out is None:
        return result
    if callable(getattr(module, "forward_flops", None)):  # a layer that counts itself
        result.weights, result.bias, *other = module.forward_flops(inputs, output)
        result.other = float(sum(other))
    elif _declared_linear(module) is not None:  # e.g. transformers' Conv1D (in x out)
        weight, layout = _declared_linear(module)
        positions = out.numel() // weight.shape[1 - layout.in_dim]
        result.weights = 2 * _active(weight, masks, names) * positions
        if getattr(module, "bias", None) is not None:
            result.bias = out.numel()
    elif isinstance(module, nn.Linear):
        positions = out.numel() // module.out_features
        result.weights = 2 * _active(module.weight, masks, names) * positions
        if module.bias is not None:
            result.bias = out.numel()
    elif isinstance(module, _CONVS):
        positions = out.numel() // module.out_channels
        result.weights = 2 * _active(module.weight, masks, names) * positions
        if module.bias is not None:
            result.bias = out.numel()
    elif isinstance(module, _TRANSPOSED):
        positions = x.numel() // module.in_channels
        result.weights = 2 * _active(module.weight, masks, names) * positions
        if module.bias is not None:
            result.bias = out.numel()
    elif isinstance(module, nn.RNNBase):
        steps = x.shape[0 if not module.batch_first else 1] * (
            x.shape[1 if not module.batch_first else 0] if x.dim() == 3 else 1)
        for name, p in module.named_parameters(recurse=False):
            if name.startswith("weight"):
                result.weights += 2 * _active(p, masks, names) * steps
            elif name.startswith("bias"):
                result.bias += p.numel() * steps
    elif isinstance(module, nn.MultiheadAttention):
        query, key = inputs[0], inputs[1]
        seq_dim = 1 if module.batch_first else 0
        n = query.numel() // (query.shape[seq_dim] * query.shape[-1])  # batch size
        lq, lk, e = query.shape[seq_dim], key.shape[seq_dim], module.embed_dim
        if module.in_proj_weight is not None:
            w = module.in_proj_weight
            name = names.get(id(w))
            mask = masks.get(name) if name is not None else None
            if mask is not None and not torch.is_tensor(mask):
                raise ValueError(f"the FLOPs of {name!r} need its mask, not only its count: "
                                 "the active weights of its q, k and v parts are counted apart")
            rows = [mask[i * e:(i + 1) * e] if mask is not None else w[i * e:(i + 1) * e]
                    for i in range(3)]
            counts = [int(r.sum()) if mask is not None else r.numel() for r in rows]
        else:
            counts = [_active(getattr(module, f"{k}_proj_weight"), masks, names)
                      for k in "qkv"]
        result.weights = 2 * n * (counts[0] * lq + (counts[1] + counts[2]) * lk)
        result.weights += 2 * n * _active(module.out_proj.weight, masks, names) * lq
        if module.in_proj_bias is not None:
            result.bias = n * e * (lq + 2 * lk)
        if module.out_proj.bias is not None:
            result.bias += n * e * lq
        result.other = 2 * 2 * n * lq * lk * e + n * module.num_heads * lq * lk  # products, softmax
    elif isinstance(module, _NORMS):
        result.other = 2 * out.numel()
    elif isinstance(module, _ACTIVATIONS):
        result.other = out.numel()
    elif isinstance(module, _POOLS):
        kernel = module.kernel_size
        size = math.prod(kernel) if isinstance(kernel, Sequence) else kernel ** (out.dim() - 2)
        result.other = out.numel() * size
    elif isinstance(module, _ADAPTIVE):
        result.other = x.numel()
    return result


def _counts_weights(module: nn.Module) -> bool:
    """Whether the FLOPs of ``module``'s own weights are counted (embeddings: they cost none)."""
    return (callable(getattr(module, "forward_flops", None))
            or _declared_linear(module) is not None
            or isinstance(module, (nn.Linear, *_CONVS, *_TRANSPOSED, nn.RNNBase,
                                   nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)))


def _uncounted(model: nn.Module, inside_attention: set[int]) -> list[str]:
    return [name for name, module in model.named_modules()
            if id(module) not in inside_attention and not _counts_weights(module)
            and any(p.dim() >= 2 for p in module.parameters(recurse=False))]


def _leaves(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or not any(True for _ in module.children()):
            yield name, module
        elif isinstance(module, nn.RNNBase):
            yield name, module


def _attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> float:
    """The two products (2 FLOPs per multiply-add) and the softmax (1 per score) of
    ``scaled_dot_product_attention(query, key, value)``: ``(..., L, E)``, ``(..., S, E)``,
    ``(..., S, Ev)``."""
    batch = math.prod(query.shape[:-2])
    scores = batch * query.shape[-2] * key.shape[-2]
    return 2.0 * scores * (query.shape[-1] + value.shape[-1]) + scores


class _FunctionalAttention(TorchFunctionMode):
    """Counts the calls of ``F.scaled_dot_product_attention`` in ``report``, under the innermost
    module running (its name kept by hooks in ``stack``). Calls made inside another torch
    function, such as ``nn.MultiheadAttention``'s ``F.multi_head_attention_forward``, run with
    the mode off and are not seen: that module has its own rule."""

    def __init__(self, report: "FlopsReport", stack: list[str]):
        super().__init__()
        self.report, self.stack = report, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.stack:
            q, k, v = (args[i] if i < len(args) else kwargs[n]
                       for i, n in enumerate(("query", "key", "value")))
            entry = self.report.layers.setdefault(self.stack[-1], LayerFlops())
            entry.other += _attention_flops(q, k, v)
        return func(*args, **kwargs)


@torch.no_grad()
def flops(model: nn.Module, example_input, masks: Mapping[str, torch.Tensor] | None = None
          ) -> FlopsReport:
    """Forward FLOPs of one example of ``example_input`` (a batch, or a tuple of inputs).

    ``masks`` (name -> bool mask, or name -> number of active weights, e.g.
    ``sparsifier.active_counts()``) makes a sparsified layer cost its active weights only.
    Functional operations outside modules (``torch.relu`` in ``forward``) are not seen by the
    counting, but for ``F.scaled_dot_product_attention``; the weight FLOPs, which dominate, are
    always exact.
    """
    masks = dict(masks or {})
    names = {id(p): n for n, p in model.named_parameters()}
    # the weights of layers that count themselves may have no parameter of their name
    self_counting = tuple(f"{path}." if path else "" for path, m in model.named_modules()
                          if callable(getattr(m, "forward_flops", None)))
    unknown = sorted(n for n in set(masks) - set(names.values())
                     if not n.startswith(self_counting))
    if unknown:
        raise ValueError(f"masks name weights the model does not have: {unknown}")
    report = FlopsReport()
    inside_attention: set[int] = set()
    for _, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.update(id(m) for m in module.modules() if m is not module)
    report.uncounted = _uncounted(model, inside_attention)
    handles, stack = [], []

    def leave(*_) -> None:
        stack.pop()

    for name, module in model.named_modules():  # which module runs, for functional attention
        handles.append(module.register_forward_pre_hook(
            lambda mod, inputs, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(leave))
    for name, module in _leaves(model):
        if id(module) in inside_attention:
            continue

        def hook(mod, inputs, output, name=name):
            counted = _count(mod, inputs, output, masks, names)
            entry = report.layers.setdefault(name, LayerFlops())
            entry.weights += counted.weights
            entry.bias += counted.bias
            entry.other += counted.other

        handles.append(module.register_forward_hook(hook))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = _first_tensor(inputs).shape[0]
    training = model.training
    model.eval()
    try:
        with _FunctionalAttention(report, stack):
            model(*inputs)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    for entry in report.layers.values():
        entry.weights /= batch
        entry.bias /= batch
        entry.other /= batch
    return report


def dense_training_flops(f_dense: float) -> float:
    """Per example and step, dense training: forward and backward, ``3 f_D``."""
    return 3 * f_dense


def sparse_training_flops(f_sparse: float) -> float:
    """Per example and step, a fixed sparse topology (Static, SET, pruning at initialisation):
    ``3 f_S``."""
    return 3 * f_sparse


def snfs_training_flops(f_dense: float, f_sparse: float) -> float:
    """Per example and step, SNFS (the dense gradient every step): ``2 f_S + f_D``."""
    return 2 * f_sparse + f_dense


def rigl_training_flops(f_dense: float, f_sparse: float, delta_t: int) -> float:
    """Per example and step, RigL (the dense gradient every ``delta_t`` steps):
    ``(3 f_S delta_t + 2 f_S + f_D) / (delta_t + 1)``."""
    return (3 * f_sparse * delta_t + 2 * f_sparse + f_dense) / (delta_t + 1)


def gmp_training_flops(f_dense: float, densities: Sequence[float]) -> float:
    """Training FLOPs per example of gradual magnitude pruning over steps whose weight densities
    are ``densities``: ``sum_t 3 f_D (1 - s_t)``."""
    return sum(3 * f_dense * d for d in densities)
