"""Which Linear layers a CSR layer can replace, and converting a model between the backends.

A CSR layer takes over the ``nn.ReLU`` that directly follows its ``nn.Linear`` in an
``nn.Sequential`` (:func:`fuse_relus`): its kernels apply the ReLU as they write the output and
mask the output gradient as they read it, which saves a pass over the activations each way.
The ``nn.ReLU`` becomes an ``nn.Identity`` in the Sequential; :func:`to_masked` puts it back.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .csr import CSRLinear
from .optimizer_state import swap_param


def parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) through which it is reached (a module held
    twice by one parent, as a ReLU reused in an ``nn.Sequential``, is listed twice)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():  # named_children() lists a module once
            if child is not None:
                found.setdefault(id(child), []).append((parent, attr))
    return found


def csr_eligibility(model: nn.Module, names: Iterable[str]) -> dict[str, str | tuple]:
    """For each weight in ``names``: ``(parent, attribute)`` of its module where a CSR layer can
    hold it (the ``weight`` of a plain ``nn.Linear`` reached through one parent, not shared with
    another module, with no hooks or parametrizations), or the reason it cannot."""
    names = set(names)
    where = parents(model)
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    result: dict[str, str | tuple] = {}
    for path, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{path}.{attr}" if path else attr
            if name not in names or name in result:
                continue
            if len(owners.get(id(p), [])) != 1:
                result[name] = f"tied (also the weight of {', '.join(owners[id(p)][1:])})"
            elif type(module) is not nn.Linear or attr != "weight":
                result[name] = f"in a {type(module).__name__} module, not a plain nn.Linear"
            elif len(where.get(id(module), [])) != 1:
                result[name] = "its module is reached through several parents"
            elif (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or getattr(module, "parametrizations", None) is not None):
                result[name] = "its module has hooks or parametrizations"
            else:
                result[name] = where[id(module)][0]
    return result


def eligible_linears(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[nn.Module, str]]:
    """Weight name -> (parent, attribute) for the weights in ``names`` that a CSR layer can
    hold (see ``csr_eligibility``)."""
    return {n: w for n, w in csr_eligibility(model, names).items() if isinstance(w, tuple)}


def _next_in_sequential(parent: nn.Module, attr: str) -> tuple[str, nn.Module] | None:
    """The (attribute, module) after ``attr`` in ``parent`` when it is an ``nn.Sequential``."""
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    at = keys.index(attr)
    return (keys[at + 1], parent._modules[keys[at + 1]]) if at + 1 < len(keys) else None


def fuse_relus(model: nn.Module, layers: Iterable[CSRLinear]) -> None:
    """Give each of ``layers`` the plain ``nn.ReLU`` that directly follows it in an
    ``nn.Sequential`` (one reached through that parent only, without hooks): the layer computes
    ``relu(x W^T + b)`` and the ReLU is replaced by an ``nn.Identity``. The output of the
    Sequential is unchanged."""
    where = parents(model)
    for layer in layers:
        places = where.get(id(layer), [])
        if layer.activation is not None or len(places) != 1:
            continue
        after = _next_in_sequential(*places[0])
        if after is None:
            continue
        attr, relu = after
        if (type(relu) is nn.ReLU and len(where.get(id(relu), [])) == 1
                and not (relu._forward_hooks or relu._forward_pre_hooks or relu._backward_hooks)):
            layer.activation = "relu"
            setattr(places[0][0], attr, nn.Identity())


def _relu_slot(parent: nn.Module, attr: str) -> str:
    """The attribute of the ``nn.Identity`` that :func:`fuse_relus` left after ``parent.attr``
    in place of the ReLU it fused, or a ValueError."""
    after = _next_in_sequential(parent, attr)
    if after is None or type(after[1]) is not nn.Identity:
        raise ValueError(f"the CSR layer {attr!r} applies the ReLU that followed it in its "
                         "nn.Sequential, but the nn.Identity left in that ReLU's place is gone, "
                         "so the ReLU cannot be put back; put an nn.Identity right after the "
                         "layer before converting the model")
    return after[0]


def to_csr(model: nn.Module, masks: Mapping[str, torch.Tensor],
           optimizer: torch.optim.Optimizer | None = None) -> dict[str, CSRLinear]:
    """Convert, in place, every plain ``nn.Linear`` whose weight is in ``masks`` to a CSR
    layer holding the weights at its mask, with the ``nn.ReLU`` after it fused where
    :func:`fuse_relus` can; the optimizer (if given) gets the values parameter with its state
    gathered at the active positions. Returns name -> new layer."""
    layers = {}
    for name, (parent, attr) in eligible_linears(model, masks).items():
        linear = getattr(parent, attr)
        layer = CSRLinear.from_linear(linear, masks[name])
        rows, cols = layer.rows(), layer.col
        swap_param(optimizer, linear.weight, layer.values, lambda v: v[rows, cols].clone())
        setattr(parent, attr, layer)
        layers[name] = layer
    fuse_relus(model, layers.values())
    return layers


def to_masked(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
              ) -> dict[str, torch.Tensor]:
    """Convert, in place, every ``CSRLinear`` of ``model`` back to an ``nn.Linear`` (zeros at
    inactive positions), with the ``nn.ReLU`` it had fused put back after it; the optimizer gets
    the dense weight with its state scattered back. Returns weight name -> mask, ready for
    ``masks=`` of a sparsifier on the masked backend."""
    masks = {}
    where = parents(model)
    csr = [(path, m) for path, m in model.named_modules() if isinstance(m, CSRLinear)]
    for _, module in csr:  # checked before anything changes
        for parent, attr in where.get(id(module), []) if module.activation else []:
            _relu_slot(parent, attr)
    for path, module in csr:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.values.device, dtype=module.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dense_weight())
        if module.bias is not None:
            linear.bias = module.bias
        rows, cols = module.rows(), module.col

        def scatter(v, rows=rows, cols=cols, shape=linear.weight.shape):
            dense = torch.zeros(shape, dtype=v.dtype, device=v.device)
            dense[rows, cols] = v
            return dense

        swap_param(optimizer, module.values, linear.weight, scatter)
        for parent, attr in where.get(id(module), []):
            if module.activation == "relu":
                setattr(parent, _relu_slot(parent, attr), nn.ReLU())
            setattr(parent, attr, linear)
        masks[f"{path}.weight" if path else "weight"] = module.mask()
    return masks


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the masked backend holds it, on whichever backend ``model``
    is: each ``CSRLinear`` gives ``weight`` (dense, zeros at inactive positions) and ``bias``
    in place of its compressed entries. Detached copies; ``model`` is not changed."""
    csr = {path: m for path, m in model.named_modules() if isinstance(m, CSRLinear)}
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.rpartition(".")[0] not in csr:  # a CSR layer's entries are replaced below
            state[name] = value.detach().clone()
    for path, module in csr.items():
        prefix = f"{path}." if path else ""
        state[prefix + "weight"] = module.dense_weight().detach().clone()
        if module.bias is not None:
            state[prefix + "bias"] = module.bias.detach().clone()
    return state
