"""Which Linear layers a CSR layer can replace, and converting a model between the backends."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .csr import CSRLinear
from .optimizer_state import swap_param


def parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) through which it is reached."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent.named_children():
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


def to_csr(model: nn.Module, masks: Mapping[str, torch.Tensor],
           optimizer: torch.optim.Optimizer | None = None) -> dict[str, CSRLinear]:
    """Convert, in place, every plain ``nn.Linear`` whose weight is in ``masks`` to a CSR
    layer holding the weights at its mask; the optimizer (if given) gets the values parameter
    with its state gathered at the active positions. Returns name -> new layer."""
    layers = {}
    for name, (parent, attr) in eligible_linears(model, masks).items():
        linear = getattr(parent, attr)
        layer = CSRLinear.from_linear(linear, masks[name])
        rows, cols = layer.rows(), layer.col
        swap_param(optimizer, linear.weight, layer.values, lambda v: v[rows, cols].clone())
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def to_masked(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
              ) -> dict[str, torch.Tensor]:
    """Convert, in place, every ``CSRLinear`` of ``model`` back to an ``nn.Linear`` (zeros at
    inactive positions); the optimizer gets the dense weight with its state scattered back.
    Returns weight name -> mask, ready for ``masks=`` of a sparsifier on the masked backend."""
    masks = {}
    where = parents(model)
    for path, module in list(model.named_modules()):
        if not isinstance(module, CSRLinear):
            continue
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
