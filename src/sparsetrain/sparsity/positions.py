"""Active sets as sorted flat positions: the one form every backend speaks.

A layer's active set is a sorted 1-D int64 tensor of flat positions (row-major, as in
``weight.reshape(-1)``). These helpers convert between positions and dense masks and combine
sorted sets without sorting their union: on the CPU with the compiled kernels in linear time
(merges, ``set_kernels.cpp``), else by binary search with torch's operations (same results).
"""

from __future__ import annotations

import torch

from ..kernels import compiled_kernels


def _kernels(*tensors: torch.Tensor):
    """The compiled kernels where every one of ``tensors`` is an int64 CPU tensor, else None."""
    if all(t.device.type == "cpu" and t.dtype == torch.int64 for t in tensors):
        return compiled_kernels()
    return None


def contains(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Bool tensor: whether each of ``queries`` is in the sorted ``sorted_values`` (linear in
    all for sorted queries with the compiled kernels, any order allowed)."""
    if sorted_values.numel() == 0:
        return torch.zeros(queries.shape, dtype=torch.bool, device=queries.device)
    sorted_values = sorted_values.to(queries.device)
    kernels = _kernels(sorted_values, queries)
    if kernels is not None:
        return kernels.sorted_contains(sorted_values.reshape(-1).contiguous(),
                                       queries.reshape(-1).contiguous()).view(queries.shape)
    where = torch.searchsorted(sorted_values, queries).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[where] == queries


def match_sorted(values: torch.Tensor, queries: torch.Tensor):
    """``(where, missing)`` for the sorted ``values`` and sorted ``queries``: ``where[j]`` the
    index of ``queries[j]`` in ``values``, or -1; ``missing`` the queries not in ``values``."""
    values = values.to(queries.device)
    kernels = _kernels(values, queries)
    if kernels is not None:
        return tuple(kernels.sorted_match(values.contiguous(), queries.contiguous()))
    if values.numel() == 0:
        return torch.full_like(queries, -1), queries.clone()
    where = torch.searchsorted(values, queries).clamp_(max=values.numel() - 1)
    found = values[where] == queries
    return where.masked_fill_(~found, -1), queries[~found]


def merge_sorted(a: torch.Tensor, b: torch.Tensor):
    """The union of the sorted, disjoint ``a`` and ``b``, sorted, and where the entries of
    ``a`` and of ``b`` are in it (an entry of ``b`` goes before an equal one of ``a``)."""
    b = b.to(a.device)
    kernels = _kernels(a, b)
    if kernels is not None:
        return tuple(kernels.merge_sorted(a.contiguous(), b.contiguous()))
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
    kernels = _kernels(a, b)
    if kernels is not None:
        return kernels.union_sorted(a.contiguous(), b.contiguous())
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
