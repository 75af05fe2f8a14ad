"""Active sets as sorted flat positions: the one form every backend speaks.

A layer's active set is a sorted 1-D int64 tensor of flat positions (row-major, as in
``weight.reshape(-1)``). These helpers convert between positions and dense masks and combine
sorted sets by binary search, never by sorting their union.
"""

from __future__ import annotations

import torch


def contains(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Bool tensor: whether each of ``queries`` is in the sorted ``sorted_values``."""
    if sorted_values.numel() == 0:
        return torch.zeros(queries.shape, dtype=torch.bool, device=queries.device)
    sorted_values = sorted_values.to(queries.device)
    where = torch.searchsorted(sorted_values, queries).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[where] == queries


def merge_sorted(a: torch.Tensor, b: torch.Tensor):
    """The union of the sorted, disjoint ``a`` and ``b``, sorted, and where the entries of
    ``a`` and of ``b`` are in it; by binary search, without sorting the union."""
    b = b.to(a.device)
    b_at = torch.searchsorted(a, b) + torch.arange(b.numel(), device=a.device)
    from_b = torch.zeros(a.numel() + b.numel(), dtype=torch.bool, device=a.device)
    from_b[b_at] = True
    merged = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    merged[b_at] = b
    a_at = (~from_b).nonzero().squeeze(1)
    merged[a_at] = a
    return merged, a_at, b_at


def union_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The union of two sorted sets of distinct positions, sorted."""
    b = b.to(a.device)
    return merge_sorted(a, b[~contains(a, b)])[0]


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat positions of the ones of ``mask``."""
    return mask.reshape(-1).nonzero().squeeze(1)


def mask_of(positions: torch.Tensor, shape, device=None) -> torch.Tensor:
    """Bool mask of ``shape`` with ones at the flat ``positions``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    device = positions.device if device is None else device
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[positions.to(device)] = True
    return mask.view(tuple(shape))


def check_positions(positions, numel: int, what: str) -> torch.Tensor:
    """``positions`` as sorted, distinct int64 in ``[0, numel)``, or a ``ValueError`` naming
    ``what``."""
    if not torch.is_tensor(positions) or positions.dim() != 1 or positions.dtype != torch.int64:
        raise ValueError(f"{what} must be a 1-D int64 tensor of sorted flat positions")
    if positions.numel() and (bool((positions[1:] <= positions[:-1]).any())
                              or int(positions[0]) < 0 or int(positions[-1]) >= numel):
        raise ValueError(f"{what} must be increasing and inside [0, {numel})")
    return positions
