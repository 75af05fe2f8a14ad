"""Optimizer-state surgery for backends that replace, reorder or resize a weight's storage."""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels import compiled_kernels


def swap_param(optimizer: torch.optim.Optimizer | None, old: torch.Tensor, new: torch.Tensor,
               convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Put ``new`` where ``old`` was in the optimizer, its state tensors of ``old``'s shape
    passed through ``convert`` (other state, e.g. Adam's step, is kept as it is)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: convert(v) if torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.items()
        }


def state_keys(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list:
    """The keys of the optimizer's per-entry state of ``param`` (its tensors of ``param``'s
    shape: momentum, Adam's moments, ...; not Adam's step)."""
    return [k for k, v in optimizer.state.get(param, {}).items()
            if torch.is_tensor(v) and v.shape == param.shape]


def state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-entry state of ``param`` (its tensors of ``param``'s shape)."""
    state = optimizer.state.get(param, {})
    return [state[k] for k in state_keys(optimizer, param)]


@torch.no_grad()
def remap_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor,
                source: torch.Tensor, target: torch.Tensor) -> None:
    """In place: ``param`` and its state become zero except ``[target] = old[source]``."""
    state = [] if optimizer is None else state_tensors(optimizer, param)
    for t in [param.data, *state]:
        moved = t[source].clone()
        t.zero_()
        t[target] = moved


@torch.no_grad()
def set_data(param: torch.Tensor, data: torch.Tensor) -> None:
    """``param.data = data``, where ``data`` may be of another size than ``param``.

    Autograd keeps ``param``'s gradient accumulator (the graph node that adds into ``.grad``,
    which records ``param``'s size) for as long as any graph through ``param`` is referenced,
    e.g. by the last step's loss, and reuses it in the next forward pass: after a change of size
    that node would reject the gradient. Setting ``.data`` drops it where the dtype changes, so
    on a change of size ``data`` passes through an empty tensor of another dtype first. (Not
    enough under DistributedDataParallel, which keeps the old node with its hooks.)"""
    if data.shape != param.shape:
        other = torch.float32 if data.dtype != torch.float32 else torch.float64
        param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data


def _fast(tensor: torch.Tensor, where: torch.Tensor):
    """The compiled kernels where they can gather ``tensor`` by ``where``, else None."""
    if where.device.type != "cpu" or tensor.device.type != "cpu":
        return None
    if tensor.dim() != 1 or not tensor.is_contiguous() or tensor.is_complex():
        return None
    return compiled_kernels()


@torch.no_grad()
def gather_or_zero(tensor: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A new 1-D tensor ``out`` as long as ``where`` (int64): ``out[j] = tensor[where[j]]``, or
    0 where ``where[j] < 0``; ``tensor``'s dtype and device. One pass with the compiled kernels
    on the CPU, else torch's indexing."""
    where = where.to(tensor.device)
    kernels = _fast(tensor, where)
    if kernels is not None:
        return kernels.gather_or_zero(tensor, where.contiguous())
    out = torch.zeros(where.numel(), dtype=tensor.dtype, device=tensor.device)
    kept = (where >= 0).nonzero().squeeze(1)
    out[kept] = tensor.reshape(-1)[where[kept]]
    return out


@torch.no_grad()
def take_state(optimizer: torch.optim.Optimizer | None, param: torch.nn.Parameter,
               where: torch.Tensor) -> None:
    """For the 1-D ``param`` and its state: ``new[j] = old[where[j]]``, or 0 where
    ``where[j] < 0`` (``where``: int64).

    With ``where`` as long as ``param``, in place (one pass a tensor with the compiled kernels,
    else ``remap_state``); ``param.grad`` is left as it is. With another length the number of
    entries changes: ``param`` stays the same object (so the optimizer's ``param_groups`` and
    every reference to it stay valid) with new ``.data`` of ``where``'s length, its ``.grad``
    (if any) follows the same rule, and each per-entry state tensor is replaced in the
    optimizer's state by its gathered copy (other state, e.g. Adam's step, is kept). A module
    that holds ``param`` must change its own structure to match."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    keys = state_keys(optimizer, param) if optimizer is not None else []
    if where.numel() != param.numel():
        for key in keys:  # found by the old shape, before it changes
            state[key] = gather_or_zero(state[key], where)
        grad = param.grad
        set_data(param, gather_or_zero(param.data, where))
        if grad is not None:
            param.grad = gather_or_zero(grad, where)  # after .data: the shapes must agree
        return
    tensors = [param.data, *(state[k] for k in keys)]
    if all(_fast(t, where) is not None for t in tensors):
        for t in tensors:
            t.copy_(gather_or_zero(t, where))
        return
    target = (where >= 0).nonzero().squeeze(1)
    remap_state(optimizer, param, where[target], target)
