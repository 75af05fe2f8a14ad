"""Initial active sets and the checking of the masks a caller supplies."""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import torch

from .groups import (group_positions, group_width, matrix_positions, matrix_shape, n_groups,
                     top_per_group)
from .permutation import INIT, RandomOrder
from .positions import check_positions, positions_of
from .structure import Structure, count_for, fixed_count
from .targets import Target

#: Entries of a layer whose random ranks are computed at once for a structured initial set.
CHUNK = 1 << 20


def active_count(numel: int, density: float) -> int:
    """Number of active weights for a layer of ``numel`` weights at ``density``.

    ``round(density * numel)``, but at least one: a layer with no weight at all would cut the
    network in two.
    """
    return min(numel, max(1, round(density * numel)))


def initial_positions(numel: int, count: int, seed: int, layer: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The random initial active set of layer number ``layer``: the first ``count`` positions of
    the random order fixed by (``seed``, layer), sorted; the same on every backend and rank."""
    if count >= numel:
        return torch.arange(numel, device=device)
    return RandomOrder(numel, seed, INIT, layer).first(count, device=device)


def structured_initial_positions(structure: Structure, shape: tuple[int, ...], count: int,
                                 seed: int, layer: int, device=None) -> torch.Tensor:
    """The random initial active set of layer ``layer`` within ``structure``: ``count`` (which
    the structure must hold) positions, uniformly random among the sets it allows. Blocks: the
    first blocks of a random order of the blocks. Rows and groups: in each, the positions
    first in the layer's random order, computed a chunk of rows at a time (memory of the
    active set and one chunk, never of the whole layer)."""
    groups = n_groups(structure, shape)
    if count % (groups if structure.kind != "block" else structure.rows * structure.cols):
        raise ValueError(f"{structure} cannot hold {count} active weights of a {shape} weight")
    if structure.kind == "block":
        order = RandomOrder(groups, seed, INIT, layer)
        return group_positions(structure, shape, order.first(count // (structure.rows
                                                                       * structure.cols),
                                                             device=device))
    order = RandomOrder(math.prod(shape), seed, INIT, layer)
    rows, cols = matrix_shape(shape)
    width = group_width(structure, shape)
    per_group = count // groups
    if structure.kind == "fan-in":
        return _first_per_row(order, rows, cols, per_group, device)
    step = max(1, CHUNK // cols)
    parts = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        sub = (r1 - r0, *shape[1:])
        at = (matrix_positions(sub, device) + r0 * cols).reshape(-1, width)
        ranks = order.rank(at.reshape(-1)).view(at.shape)
        need = torch.full((at.shape[0],), per_group, dtype=torch.int64)
        chosen = top_per_group(-ranks.to(torch.float64), need, lambda r, c: ranks[r, c])
        parts.append(torch.sort(at[chosen]).values)
    return torch.cat(parts)


def _first_per_row(order: RandomOrder, rows: int, cols: int, k: int, device) -> torch.Tensor:
    """In every row of a ``rows x cols`` layer the ``k`` positions first in ``order``, sorted:
    the first ``m`` positions of the order, with ``m`` doubled until every row has ``k`` of
    them (within a row they come in the order's order, so its first ``k`` among them are its
    first ``k`` of all). About 1.3 x ``rows * k`` positions are drawn, not the layer."""
    m = min(rows * cols, math.ceil(1.3 * rows * k) + 1024)
    while True:
        drawn = order.position(torch.arange(m, device=device))  # in the order's order
        row = torch.div(drawn, cols, rounding_mode="floor")
        if m == rows * cols or int(torch.bincount(row, minlength=rows).min()) >= k:
            break
        m = min(rows * cols, 2 * m)
    by_row = torch.sort(row, stable=True).indices  # the drawn positions only
    row = row[by_row]
    first = torch.searchsorted(row, torch.arange(rows, device=row.device))
    rank_in_row = torch.arange(m, device=row.device) - first[row]
    return torch.sort(drawn[by_row][rank_in_row < k]).values


def initial_active(targets: Sequence[Target], densities: Mapping[str, float], seed: int,
                   structure: Structure | None = None,
                   fixed: bool = True) -> dict[str, torch.Tensor]:
    """Per layer exactly ``active_count(N_l, d_l)`` positions drawn uniformly at random; within
    ``structure``, the count it holds nearest that (``fixed_count`` for a fixed budget, else
    ``count_for``), at random within the structure."""
    result = {}
    for i, t in enumerate(targets):
        count = active_count(t.numel, densities[t.name])
        device = t.param.device if not t.param.is_meta else None
        if structure is None or structure.kind == "unstructured":
            result[t.name] = initial_positions(t.numel, count, seed, i, device=device)
        else:
            count = (fixed_count if fixed else count_for)(structure, tuple(t.shape), count)
            result[t.name] = structured_initial_positions(structure, tuple(t.shape), count,
                                                          seed, i, device)
    return result


#: The dtypes a mask may have (bool, or numbers that are 0 or 1).
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_masks(masks: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]],
                   density: float | None, what: str = "masks") -> dict[str, torch.Tensor]:
    """Check that ``masks`` has an active set for every weight of ``shapes`` (name -> shape) and
    no other; return each as sorted flat positions (int64). Errors name the entries
    ``what[name]``.

    An active set is a 0/1 (or bool) mask of the weight's shape, or a 1-D int64 tensor of sorted
    flat positions (as ``state_dict()["positions"]`` holds). With ``density`` given, warns when
    the overall density differs from it by more than one weight per layer.
    """
    if not isinstance(masks, Mapping):
        raise ValueError(f"{what} must be a dict name -> bool tensor, got {type(masks).__name__}")
    names = list(shapes)
    known = set(names)
    unknown = sorted((n for n in masks if n not in known), key=repr)
    missing = [n for n in names if n not in masks]
    if unknown or missing:
        raise ValueError(
            f"{what} must have exactly one entry per sparsified weight; "
            f"unknown names: {unknown}, missing names: {missing} "
            f"(the sparsified weights are: {names})"
        )
    result = {}
    for name in names:
        shape, mask, entry = tuple(int(s) for s in shapes[name]), masks[name], f"{what}[{name!r}]"
        numel = math.prod(shape)
        if not torch.is_tensor(mask):
            raise ValueError(f"{entry} must be a tensor, got {type(mask).__name__}")
        if mask.layout != torch.strided or mask.is_meta or mask.dtype not in MASK_DTYPES:
            raise ValueError(f"{entry} must be a dense bool (or 0/1) tensor with data, or int64 "
                             f"positions, got a {mask.layout} {mask.dtype} tensor on "
                             f"{mask.device}")
        if mask.dtype == torch.int64 and mask.dim() == 1 and len(shape) != 1:
            positions = check_positions(mask, numel, entry)
        else:
            if tuple(mask.shape) != shape:
                raise ValueError(f"{entry} has shape {tuple(mask.shape)}, but the weight has "
                                 f"shape {shape}")
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(f"{entry} must hold only 0 and 1 (or be bool)")
                mask = mask != 0
            positions = positions_of(mask)
        if positions.numel() == 0:
            raise ValueError(f"{entry} has no active weight; keep at least one")
        result[name] = positions
    mismatch = None if density is None else density_mismatch(result, shapes, density)
    if mismatch is not None:
        active, total = mismatch
        warnings.warn(
            f"the given masks keep {active / total:.4f} of the sparsified weights, not the "
            f"density {density}; the masks are used as given",
            stacklevel=3,
        )
    return result


def density_mismatch(positions: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]],
                     density: float) -> tuple[int, int] | None:
    """``(active, total)`` weights when the active sets ``positions`` do not keep ``density`` of
    the weights of ``shapes`` (to one weight per layer, the rounding of per-layer counts), else
    ``None``."""
    total = sum(math.prod(s) for s in shapes.values())
    active = sum(p.numel() for p in positions.values())
    return None if abs(active - density * total) <= len(shapes) else (active, total)
