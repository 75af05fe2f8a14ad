"""Initial active sets and the checking of the masks a caller supplies."""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import torch

from .permutation import INIT, RandomOrder
from .positions import check_positions, positions_of
from .structure import Structure, count_for, fixed_count, structured_top_k
from .targets import Target


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
    the structure must hold) positions, uniformly random among the sets it allows (every group
    or block equally likely; the same random order as the unstructured draw)."""
    numel = math.prod(shape)
    order = RandomOrder(numel, seed, INIT, layer)
    scores = -order.rank(torch.arange(numel, device=device)).to(torch.float64)
    return structured_top_k(structure, scores.view(shape), count, order.rank)


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
