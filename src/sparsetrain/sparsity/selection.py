"""Selection: which entries of a score tensor are kept, separate from how they are scored.

Ties are broken uniformly at random with a seeded generator, exactly: the entries are visited in
a random order and sorted stably, so equal scores fall in random order and the result depends
only on the scores and the generator state (identical on every data-parallel replica).
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch


def random_order(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` drawn from ``generator`` (on the CPU)."""
    return torch.randperm(n, generator=generator).to(device)


def _comparable(scores: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype fit for sorting: float32 or float64 (half types are widened)."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def top_k_indices(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Flat indices of the ``k`` largest entries of ``scores``, ties broken at random."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    perm = random_order(flat.numel(), generator, flat.device)
    order = torch.sort(flat[perm], descending=True, stable=True).indices[:k]
    return perm[order]


def top_k_mask(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of the shape of ``scores`` with ones at its ``k`` largest entries."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[top_k_indices(scores, k, generator)] = True
    return mask.view(scores.shape)


def random_mask(
    shape: torch.Size, n_active: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Boolean mask with exactly ``n_active`` ones at uniformly random positions."""
    numel = int(torch.Size(shape).numel())
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[random_order(numel, generator, device)[:n_active]] = True
    return mask.view(shape)


def drop_and_grow(
    mask: torch.Tensor,
    drop_scores: torch.Tensor,
    grow_scores: torch.Tensor,
    n_drop: int,
    generator: torch.Generator,
    *,
    allow_regrowth: bool = True,
) -> torch.Tensor:
    """The new mask after dropping ``n_drop`` active entries and growing as many.

    RigL paper, Algorithm 1: keep the ``n_active - n_drop`` active entries with the largest
    ``drop_scores``, then grow the ``n_drop`` entries with the largest ``grow_scores`` among
    those not kept. With ``allow_regrowth`` (the reference code's behaviour) an entry dropped in
    this update may be grown back; without it, growth is among the entries inactive before the
    drop. The number of active entries is unchanged.
    """
    n_active = int(mask.sum())
    n_drop = max(0, min(int(n_drop), n_active, mask.numel() - n_active))
    if n_drop == 0:
        return mask.clone()
    inactive_last = _comparable(drop_scores).masked_fill(~mask, -float("inf"))
    kept = top_k_mask(inactive_last, n_active - n_drop, generator)
    closed = kept if allow_regrowth else mask
    candidates = _comparable(grow_scores).masked_fill(closed, -float("inf"))
    grown = top_k_mask(candidates, n_drop, generator)
    return kept | grown


def select_global(scores: Mapping[str, torch.Tensor], n_keep: int, generator: torch.Generator,
                  *, stacklevel: int = 3) -> dict[str, torch.Tensor]:
    """Masks (name -> bool) keeping the ``n_keep`` highest scores over all tensors at once.

    Every tensor keeps at least one entry: a layer left with no weight would cut the network in
    two ("layer collapse"). When the plain selection would leave a tensor empty, every tensor's
    best-scored entry is kept first (with a warning) and the rest of the budget goes to the
    highest other scores, so the total stays exactly ``n_keep`` and no tensor is empty.
    (Reserving only the empty ones could push another tensor's single entry out.) Scores of
    ``-inf`` mark entries that must not be kept unless nothing else is left.
    """
    names = list(scores)
    if n_keep < len(names):
        raise ValueError(f"cannot keep {n_keep} weights in {len(names)} layers, at least one each")
    device = scores[names[0]].device
    flat = torch.cat([scores[n].reshape(-1).to(device=device, dtype=torch.float64)
                      for n in names])
    sizes = [scores[n].numel() for n in names]

    def split(indices: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
        keep[indices] = True
        return {n: part.view(scores[n].shape).to(scores[n].device)
                for n, part in zip(names, torch.split(keep, sizes))}

    masks = split(top_k_indices(flat, n_keep, generator))
    empty = [n for n in names if not bool(masks[n].any())]
    if not empty:
        return masks
    warnings.warn(
        f"keeping the {n_keep} best-scored weights over all layers would leave no weight in "
        f"{empty}; each layer keeps its best-scored weight so the network stays connected",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    reserved = flat.clone()
    offset = 0
    for name, size in zip(names, sizes):
        best = top_k_indices(scores[name].to(device=device, dtype=torch.float64), 1, generator)
        reserved[offset + best] = math.inf
        offset += size
    return split(top_k_indices(reserved, n_keep, generator))
