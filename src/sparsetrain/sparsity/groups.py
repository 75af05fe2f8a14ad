"""The groups of a structure, and selection within them.

A structure (:mod:`.structure`) cuts a weight's matrix view into groups, each holding a fixed
number of active weights:

- ``"fan-in"``: a group is a row (an output unit), ``cols`` wide;
- ``"N:M"``: a group is a run of M entries of a row along the input channels;
- ``"block:RxC"``: a group is an aligned R x C block, active whole or not at all.

Group ids run in row-major order of the groups in the matrix view. ``top_per_group`` keeps a
given number of entries in each group, by score, ties by key: in O(n) with the compiled kernels
(a selection in every row), else in O(n log k) (one ``topk`` of the largest need); then a sort
of the tied entries only.
"""

from __future__ import annotations

import math

import torch

from typing import Callable, Protocol

from ..kernels import compiled_kernels


class Structure(Protocol):
    """What this module reads of a :class:`.structure.Structure`."""

    kind: str
    n: int
    m: int
    rows: int
    cols: int


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the matrix view of a weight of ``shape``."""
    if len(shape) < 2:
        raise ValueError(f"a structure needs a weight of 2 or more dimensions, not {shape}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def matrix_positions(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``(rows, cols)`` int64: the weight's flat position of every entry of its matrix view
    (for a convolution, column ``p * in + c`` is input channel ``c`` at kernel position
    ``p``)."""
    flat = torch.arange(math.prod(shape), device=device).view(shape)
    if len(shape) > 2:
        flat = flat.flatten(2).transpose(1, 2)  # (out, kh*kw, in)
    return flat.reshape(matrix_shape(tuple(shape)))


def matrix_coords(shape: tuple[int, ...], positions: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """``(row, col)`` in the matrix view of the weight's flat ``positions`` (for a convolution,
    column ``p * in + c`` is input channel ``c`` at kernel position ``p``)."""
    rows, per_row = matrix_shape(tuple(shape))
    row = torch.div(positions, per_row, rounding_mode="floor")
    rest = positions - row * per_row
    if len(shape) > 2:
        channels = int(shape[1])
        kernel = per_row // channels
        channel = torch.div(rest, kernel, rounding_mode="floor")
        rest = (rest - channel * kernel) * channels + channel
    return row, rest


def group_width(s: Structure, shape: tuple[int, ...]) -> int:
    """Entries of one group: the row length (fan-in), M (N:M) or R*C (blocks)."""
    if s.kind == "fan-in":
        return matrix_shape(tuple(shape))[1]
    if s.kind == "n:m":
        return s.m
    return s.rows * s.cols


def n_groups(s: Structure, shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in shape) // group_width(s, shape)


def group_of(s: Structure, shape: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    """The group id of each of the flat ``positions``."""
    row, col = matrix_coords(shape, positions)
    cols = matrix_shape(tuple(shape))[1]
    if s.kind == "fan-in":
        return row
    if s.kind == "n:m":
        return row * (cols // s.m) + torch.div(col, s.m, rounding_mode="floor")
    return (torch.div(row, s.rows, rounding_mode="floor") * (cols // s.cols)
            + torch.div(col, s.cols, rounding_mode="floor"))


def block_matrix(s: Structure, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``(groups, width)``: the flat positions of every group's entries, groups in id order."""
    where = matrix_positions(tuple(shape), device)
    rows, cols = where.shape
    if s.kind == "block":
        r, c = s.rows, s.cols
        return where.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)
    return where.reshape(-1, group_width(s, shape))


def group_positions(s: Structure, shape: tuple[int, ...], groups: torch.Tensor) -> torch.Tensor:
    """Sorted flat positions of every entry of the given ``groups`` (blocks)."""
    if groups.numel() == 0:
        return groups.new_empty(0)
    rows, cols = matrix_shape(tuple(shape))
    if s.kind == "block":
        per = cols // s.cols
        br, bc = torch.div(groups, per, rounding_mode="floor"), groups % per
        r = (br * s.rows).unsqueeze(1) + torch.arange(s.rows, device=groups.device)
        c = (bc * s.cols).unsqueeze(1) + torch.arange(s.cols, device=groups.device)
        row = r.unsqueeze(2).expand(-1, -1, s.cols).reshape(-1)
        col = c.unsqueeze(1).expand(-1, s.rows, -1).reshape(-1)
    else:
        width = group_width(s, shape)
        per = cols // width
        row = torch.div(groups, per, rounding_mode="floor").repeat_interleave(width)
        col = ((groups % per) * width).unsqueeze(1) + torch.arange(width, device=groups.device)
        col = col.reshape(-1)
    if len(shape) > 2:  # matrix column p * in + c -> flat (c * kernel + p)
        channels = int(shape[1])
        kernel = cols // channels
        p, ch = torch.div(col, channels, rounding_mode="floor"), col % channels
        col = ch * kernel + p
    return torch.sort(row * cols + col).values  # the selected groups' entries only


def group_counts(s: Structure, shape: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    """Active entries in every group (int64, one per group id)."""
    return torch.bincount(group_of(s, shape, positions), minlength=n_groups(s, shape))


def conformity_error(s: Structure, shape: tuple[int, ...], positions: torch.Tensor,
                     name: str, allow_empty: bool = False) -> str | None:
    """Why the active set ``positions`` of weight ``name`` breaks structure ``s`` (every group
    the same count, or none with ``allow_empty``; whole blocks), or ``None`` if it keeps
    it."""
    if s.kind == "unstructured":
        return None
    counts = group_counts(s, tuple(shape), positions.to(torch.int64))
    if allow_empty and s.kind != "block" and bool((counts > 0).any()):
        counts = counts[counts > 0]
    if s.kind == "block":
        bad = ((counts != 0) & (counts != s.rows * s.cols)).nonzero()
        if bad.numel():
            return (f"{name}: {bad.numel()} of its {s} blocks are partly active (block "
                    f"{int(bad[0])} has {int(counts[bad[0]])} of {s.rows * s.cols})")
        return None
    low, high = int(counts.min()), int(counts.max())
    if low != high:
        unit = "row" if s.kind == "fan-in" else f"group of {s.m}"
        return (f"{name}: its active weights per {unit} range from {low} to {high}; {s} needs "
                "the same number in every one")
    if s.kind == "n:m" and low < s.n:
        return f"{name}: {low} active weights per group of {s.m}, fewer than {s}'s {s.n}"
    return None


def top_per_group(scores: torch.Tensor, need: torch.Tensor,
                  keys: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Boolean ``(groups, width)``: in every row ``g`` of ``scores`` its ``need[g]`` largest
    entries, ties by the lower key, ``keys(rows, cols)`` giving the (within a row distinct)
    keys of tied entries. Entries scored ``-inf`` are never taken (``need`` must not exceed a
    row's other entries). Scores must not be NaN."""
    groups, width = scores.shape
    need = need.to(device=scores.device, dtype=torch.int64).clamp(0, width)
    if not need.numel() or int(need.max()) == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kernels = compiled_kernels() if scores.device.type == "cpu" else None
    if kernels is not None and scores.dtype in (torch.float32, torch.float64):
        # each row's selection in O(width); only rows whose ties overflow come back short
        chosen, kth, short = kernels.top_per_row(scores.contiguous(), need.contiguous())
    else:
        top = torch.topk(scores, int(need.max()), dim=1).values  # O(n log k)
        kth = top.gather(1, (need - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        kth[need == 0] = math.inf
        chosen = scores > kth.unsqueeze(1)
        short = need - chosen.sum(1)
    rows = (short > 0).nonzero().squeeze(1)
    if rows.numel():  # the tied entries of those rows, by key
        tied = (scores[rows] == kth[rows].unsqueeze(1)).nonzero()
        r, c = rows[tied[:, 0]], tied[:, 1]
        tie_keys = keys(r, c)
        order = torch.argsort(r * (int(tie_keys.max()) + 1) + tie_keys)  # tied entries only
        r, c = r[order], c[order]
        first = torch.searchsorted(r, torch.arange(groups, device=r.device))
        take = torch.arange(r.numel(), device=r.device) - first[r] < short[r]
        chosen[r[take], c[take]] = True
    return chosen
