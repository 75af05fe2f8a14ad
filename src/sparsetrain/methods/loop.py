"""The pieces of a real training loop around a sparsifier: loss scaling, clipping, and
optimizers stepped by someone else.

The documented sequence (README, "Training loops: clipping, AMP, accumulation")::

    scaler.scale(loss / accumulation).backward()         # every micro-batch
    if last_micro_batch:
        sparsifier.clip_grad_norm_(max_norm, scaler=scaler)  # unscales, clips active grads
        sparsifier.step(scaler=scaler)                       # skipped steps never update
        scaler.update(); optimizer.zero_grad()

Clipping measures the norm of the *active* gradients (inactive weights never move, so their
gradients are not part of the step), and scales every gradient by the same factor, the dense
gradient at inactive positions included: a grow score sees the gradient of the step, scaled, so
its choice is that of the unclipped gradient. A step whose scaled gradient has an inf or NaN is
skipped by the scaler, and then the sparsifier neither counts it nor changes any mask.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def _scaler_state(scaler, optimizer) -> dict | None:
    states = getattr(scaler, "_per_optimizer_states", None)
    return None if states is None else states[id(optimizer)]


def unscale(scaler, optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it was already called for this step."""
    if scaler is None or not scaler.is_enabled():
        return
    state = _scaler_state(scaler, optimizer)
    if state is not None and state.get("found_inf_per_device"):
        return  # unscaled already (the scaler records found_inf when it unscales)
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as exc:  # a scaler that keeps its state elsewhere
        if "already been called" not in str(exc):
            raise


def skipped_by_scaler(scaler, optimizer) -> bool:
    """Whether ``scaler.step(optimizer)`` will skip this step (an inf or NaN in the unscaled
    gradients); unscales them first if that has not been done."""
    if scaler is None or not scaler.is_enabled():
        return False
    unscale(scaler, optimizer)
    state = _scaler_state(scaler, optimizer)
    if state is not None and state.get("found_inf_per_device"):
        return bool(sum(float(v) for v in state["found_inf_per_device"].values()))
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not all(bool(torch.isfinite(g).all()) for g in grads)


def _norm(tensors: Iterable[torch.Tensor], norm_type: float) -> torch.Tensor:
    norms = [t.detach().float().norm(norm_type) for t in tensors if t.numel()]
    if not norms:
        return torch.zeros(())
    stacked = torch.stack([n.cpu() for n in norms])
    return stacked.max() if math.isinf(norm_type) else stacked.norm(norm_type)


def clip_grad_norm(backend, parameters: list[torch.nn.Parameter], max_norm: float,
                   norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale the gradients of ``parameters`` so that the norm of the active ones is at most
    ``max_norm``; returns that norm before clipping. A parameter holding a sparsified weight
    (``backend.gradient_parameter(name)``) counts its active gradient only."""
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    sparse = {id(backend.gradient_parameter(n)): n for n in backend.names}
    parts = []
    for p in parameters:
        if p.grad is None:
            continue
        name = sparse.get(id(p))
        parts.append(backend.active_gradient(name) if name is not None else p.grad)
    total = _norm(parts, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the norm of the active gradients is {float(total)}; lower the "
                           "learning rate, or pass error_if_nonfinite=False to clip anyway")
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1.0:
        with torch.no_grad():
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(coefficient)
    return total


def run_closure_first(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """For an optimizer step pre-hook: run the step's closure (which computes the gradients)
    now, and give the optimizer a closure that returns its result; ``None`` without one.
    ``args[0]`` is the optimizer, the closure its keyword or the argument after it."""
    if kwargs.get("closure") is not None:
        closure, keyword = kwargs["closure"], True
    elif len(args) > 1 and args[1] is not None:
        closure, keyword = args[1], False
    else:
        return None
    with torch.enable_grad():
        result = closure()

    def done():
        return result

    if keyword:
        return args, {**kwargs, "closure": done}
    return (args[0], done, *args[2:]), kwargs
