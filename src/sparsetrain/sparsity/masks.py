"""Initial masks and the checking of masks a caller supplies."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch

from .selection import random_mask
from .targets import Target


def active_count(numel: int, density: float) -> int:
    """Number of active weights for a layer of ``numel`` weights at ``density``.

    ``round(density * numel)``, but at least one: a layer with no weight at all would cut the
    network in two.
    """
    return min(numel, max(1, round(density * numel)))


def initial_masks(
    targets: Sequence[Target], densities: Mapping[str, float], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per layer exactly ``active_count(N_l, d_l)`` ones at uniformly random positions."""
    return {
        t.name: random_mask(
            t.shape, active_count(t.numel, densities[t.name]), generator, t.param.device
        )
        for t in targets
    }


def validate_masks(
    masks: Mapping[str, torch.Tensor], targets: Sequence[Target], density: float | None
) -> dict[str, torch.Tensor]:
    """Check that ``masks`` has a 0/1 mask of the right shape for every target and no other.

    Returns bool masks on the targets' devices. With ``density`` given, warns when the masks'
    overall density differs from it by more than one weight per layer.
    """
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    names = [t.name for t in targets]
    unknown = sorted(set(masks) - set(names))
    missing = [n for n in names if n not in masks]
    if unknown or missing:
        raise ValueError(
            "masks must have exactly one entry per sparsified weight; "
            f"unknown names: {unknown}, missing names: {missing} "
            f"(the sparsified weights are: {names})"
        )
    result = {}
    for t in targets:
        mask = masks[t.name]
        if not torch.is_tensor(mask):
            raise ValueError(f"masks[{t.name!r}] must be a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(t.shape):
            raise ValueError(
                f"masks[{t.name!r}] has shape {tuple(mask.shape)}, but the weight has shape "
                f"{tuple(t.shape)}"
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"masks[{t.name!r}] must hold only 0 and 1 (or be bool)")
            mask = mask != 0
        if not bool(mask.any()):
            raise ValueError(f"masks[{t.name!r}] has no active weight; keep at least one")
        result[t.name] = mask.to(device=t.param.device)
    if density is not None:
        total = sum(t.param.numel() for t in targets)
        active = sum(int(m.sum()) for m in result.values())
        if abs(active - density * total) > len(targets):
            warnings.warn(
                f"the given masks keep {active / total:.4f} of the sparsified weights, not the "
                f"density {density}; the masks are used as given",
                stacklevel=3,
            )
    return result
