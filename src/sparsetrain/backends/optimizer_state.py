"""Optimizer-state surgery for backends that replace or reorder a weight's storage."""

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


def state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-entry state of ``param`` (its tensors of ``param``'s shape)."""
    return [v for v in optimizer.state.get(param, {}).values()
            if torch.is_tensor(v) and v.shape == param.shape]


@torch.no_grad()
def remap_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, source: torch.Tensor,
                target: torch.Tensor) -> None:
    """In place: ``param`` and its state become zero except ``[target] = old[source]``."""
    for t in [param.data, *state_tensors(optimizer, param)]:
        moved = t[source].clone()
        t.zero_()
        t[target] = moved


@torch.no_grad()
def take_state(optimizer: torch.optim.Optimizer, param: torch.Tensor,
               where: torch.Tensor) -> None:
    """In place, for the 1-D ``param`` and its state: ``new[j] = old[where[j]]``, or 0 where
    ``where[j] < 0`` (``where``: int64, as long as ``param``); one pass a tensor with the
    compiled kernels, else ``remap_state``."""
    tensors = [param.data, *state_tensors(optimizer, param)]
    kernels = compiled_kernels() if where.device.type == "cpu" else None
    if kernels is not None and all(t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
                                   and not t.is_complex() for t in tensors):
        for t in tensors:
            t.copy_(kernels.gather_or_zero(t, where.contiguous()))
        return
    target = (where >= 0).nonzero().squeeze(1)
    remap_state(optimizer, param, where[target], target)
