"""The norm of each layer's gradient: how well gradients flow through a sparse network.

``gradient_norms(model, batches, masks=None)`` accumulates the gradient of the mean loss over
``batches`` (as one large batch would give it) and returns the 2-norm of each weight's
gradient, counting only its active positions when ``masks`` names it (``sparsifier.masks``:
the gradient the sparse network trains with), and the norm over all of them. The model runs in
the mode it is in (``train()`` or ``eval()``); its own gradients are left as they were.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..sparsity.targets import find_targets
from .interpolation import Batch, flatten_predictions


def gradient_norms(model: nn.Module, batches: Iterable[Batch], *,
                   masks: Mapping[str, torch.Tensor] | None = None,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                   ) -> dict[str, float]:
    """``{weight name: norm, ..., "overall": norm}`` over the sparsifiable weights of
    ``model``; ``loss_fn(outputs, targets)`` returns the loss summed over the batch
    (cross-entropy by default)."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    masks = dict(masks or {})
    weights = {t.name: t.param for t in find_targets(model)}
    unknown = sorted(set(masks) - set(weights))
    if unknown:
        raise ValueError(f"masks name weights that are not sparsifiable weights of the model: "
                         f"{unknown[:5]}")
    batches = list(batches)
    if not batches:
        raise ValueError("gradient_norms needs at least one batch of (inputs, targets)")
    params = list(model.parameters())
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    grads = {n: torch.zeros_like(p) for n, p in weights.items()}
    count = 0
    try:
        for x, y in batches:
            for p in params:
                p.grad = None
            out, target = flatten_predictions(model(x), y)
            loss_fn(out, target).backward()
            count += len(target)
            for n, p in weights.items():
                if p.grad is not None:
                    grads[n] += p.grad
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    norms = {}
    for n, g in grads.items():
        g = g / count
        if n in masks:
            g = g * masks[n].to(g.dtype)
        norms[n] = float(g.double().norm())
    norms["overall"] = sum(v * v for v in norms.values()) ** 0.5
    return norms
