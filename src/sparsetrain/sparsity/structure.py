"""Structured sparsity: which sets of active positions a structure allows, and the structured
top-k that keeps the best of them.

A structure is one of

- ``"unstructured"``: any positions;
- ``"N:M"`` (``"2:4"``, ``"1:4"``, ``"2:8"``): in every group of M consecutive weights along
  the input dimension, exactly N are active (density N/M);
- ``"fan-in"``: every output unit has the same number of active inputs (SRigL);
- ``"block:RxC"``: active weights come in aligned blocks of R outputs x C inputs.

Every weight is seen as a matrix of ``rows`` outputs by ``cols`` inputs: a linear weight
(out, in) as it is; a convolution's (out, in, kh, kw) as out rows of kh*kw runs of the ``in``
input channels, so that N:M groups and blocks run along the input channels at one kernel
position (as GPUs' 2:4 convolutions do), and a fan-in row is all of a filter.
``matrix_positions(shape)`` maps that matrix to the weight's own flat positions.

Selection follows :mod:`sparsetrain.sparsity.selection`'s one rule: by score, ties by the keys
of the positions (the lower key wins), so that every backend and rank selects alike. Block
scores are the sums of their entries' scores; a block's tie key is that of its first entry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .groups import conformity_error, matrix_positions, matrix_shape, top_per_group
from .selection import Keys, comparable, top_k

__all__ = ["FORMS", "STRUCTURE_EXAMPLES", "Structure", "check_conforms", "check_fits", "check_structure", "count_for", "fixed_count", "matrix_positions", "matrix_shape",
           "parse_structure", "structured_top_k"]

#: One example of every kind of structure (kind -> value for ``structure=``).
STRUCTURE_EXAMPLES = {"unstructured": "unstructured", "n:m": "2:4", "fan-in": "fan-in",
                      "block": "block:4x4"}
FORMS = '"unstructured", "N:M" (e.g. "2:4"), "fan-in", or "block:RxC" (e.g. "block:4x4")'


@dataclass(frozen=True)
class Structure:
    kind: str  # "unstructured", "n:m", "fan-in" or "block"
    n: int = 1
    m: int = 1
    rows: int = 1  # block height (outputs)
    cols: int = 1  # block width (inputs)

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "fan-in": "fan-in",
                "n:m": f"{self.n}:{self.m}", "block": f"block:{self.rows}x{self.cols}"}[self.kind]


def parse_structure(text: str | Structure | None) -> Structure:
    """The structure that ``text`` names (``None``: unstructured); ``ValueError`` otherwise."""
    if isinstance(text, Structure):
        return text
    if text is None:
        return Structure("unstructured")
    if not isinstance(text, str):
        raise ValueError(f"structure must be a string, one of {FORMS}; got {text!r}")
    s = text.strip().lower()
    if s in ("unstructured", "none", ""):
        return Structure("unstructured")
    if s in ("fan-in", "fanin", "constant-fan-in"):
        return Structure("fan-in")
    match = re.fullmatch(r"(\d+):(\d+)", s)
    if match:
        n, m = int(match[1]), int(match[2])
        if not 1 <= n < m:
            raise ValueError(f"structure {text!r}: N:M needs 1 <= N < M (N active in every M "
                             "consecutive weights), e.g. 2:4")
        return Structure("n:m", n=n, m=m)
    match = re.fullmatch(r"block:(\d+)x(\d+)", s)
    if match:
        r, c = int(match[1]), int(match[2])
        if r < 1 or c < 1 or r * c == 1:
            raise ValueError(f"structure {text!r}: a block needs R, C >= 1 and more than one "
                             "weight, e.g. block:4x1 or block:4x4 (block:1x1 is unstructured)")
        return Structure("block", rows=r, cols=c)
    raise ValueError(f"unknown structure {text!r}; use {FORMS}")


def _channels(shape: tuple[int, ...]) -> int:
    return int(shape[1])


def check_fits(structure: Structure, shape: tuple[int, ...], name: str = "weight",
               density: float | None = None) -> None:
    """``ValueError`` naming ``name`` and what would fit, when ``structure`` cannot lay out a
    weight of ``shape`` (at ``density``, for N:M)."""
    s = structure
    if s.kind == "unstructured":
        return
    rows, _ = matrix_shape(tuple(shape))
    inputs = _channels(shape)
    what = "input channels" if len(shape) > 2 else "inputs"
    if s.kind == "n:m":
        if inputs % s.m:
            fits = [m for m in (2, 4, 8, 16) if inputs % m == 0]
            raise ValueError(f"{name} {tuple(shape)}: {s} needs its {inputs} {what} to be a "
                             f"multiple of M = {s.m}; "
                             + (f"M = {', '.join(map(str, fits))} would fit" if fits else
                                "no M of 2, 4, 8 or 16 divides them: keep this layer dense "
                                "or unstructured"))
        if density is not None and not math.isclose(density, s.n / s.m, rel_tol=1e-6):
            raise ValueError(f"{name}: {s} keeps density {s.n / s.m:g}, not {density:g}; give "
                             f"density {s.n / s.m:g}, or an N:M with N/M = {density:g}")
    elif s.kind == "block":
        bad = [f"{s.rows} does not divide its {rows} outputs" if rows % s.rows else "",
               f"{s.cols} does not divide its {inputs} {what}" if inputs % s.cols else ""]
        bad = [b for b in bad if b]
        if bad:
            r = [d for d in (1, 2, 4, 8, 16) if rows % d == 0]
            c = [d for d in (1, 2, 4, 8, 16) if inputs % d == 0]
            fits = [f"{a}x{b}" for a in r for b in c if a * b > 1][:8]
            raise ValueError(f"{name} {tuple(shape)}: block:{s.rows}x{s.cols} does not tile it "
                             f"({'; '.join(bad)}); blocks that tile it: "
                             + (", ".join(f"block:{f}" for f in fits) or "none"))


def check_structure(structure: Structure, shapes: Mapping[str, tuple[int, ...]],
                    density: float | None) -> None:
    """``ValueError`` naming the first weight of ``shapes`` (name -> shape) that ``structure``
    cannot lay out (at ``density``, for N:M), with what would fit."""
    if structure.kind == "unstructured":
        return
    for name, shape in shapes.items():
        try:
            check_fits(structure, tuple(shape), name,
                       density if structure.kind == "n:m" else None)
        except ValueError as error:
            if "keeps density" in str(error):
                raise
            raise ValueError(f"{error}; or keep {name} dense (dense_layers=[{name!r}], "
                             f"--dense-layers {name})") from None


def check_conforms(structure: Structure, shapes: Mapping[str, tuple[int, ...]],
                   active: Mapping[str, torch.Tensor], what: str,
                   allow_empty: bool = False) -> None:
    """``ValueError`` when an active set of ``active`` (name -> sorted positions) breaks
    ``structure`` (empty groups aside, with ``allow_empty``)."""
    for name, positions in active.items():
        error = conformity_error(structure, tuple(shapes[name]), positions, name, allow_empty)
        if error:
            raise ValueError(f"{what}: {error}; give active sets within the structure, or "
                             "build the sparsifier without structure=")


def count_for(structure: Structure, shape: tuple[int, ...], count: int) -> int:
    """The number of active weights nearest ``count`` that ``structure`` can lay out in a
    weight of ``shape``: the same number in every group of M for N:M, from N up to M (N/M of
    the weights for a count at or below that: a sparse-from-dense schedule passes through
    denser N':M patterns on its way to N:M), a multiple of the rows (at least one per row) for
    fan-in, a whole number of blocks (at least one) for blocks."""
    rows, cols = matrix_shape(tuple(shape))
    n = rows * cols
    count = max(0, min(int(count), n))
    s = structure
    if s.kind == "n:m":
        groups = n // s.m
        return groups * min(s.m, max(s.n, round(count / groups)))
    if s.kind == "fan-in":
        return rows * min(cols, max(1, round(count / rows)))
    if s.kind == "block":
        size = s.rows * s.cols
        return size * min(n // size, max(1, round(count / size)))
    return count


def fixed_count(structure: Structure, shape: tuple[int, ...], count: int) -> int:
    """The number of active weights a layer of a fixed budget holds under ``structure``, for
    the unstructured ``count``: exactly N/M of the weights for N:M, else ``count_for``."""
    if structure.kind == "n:m":
        return math.prod(int(d) for d in shape) // structure.m * structure.n
    return count_for(structure, shape, count)


def structured_top_k(structure: Structure, scores: torch.Tensor, count: int,
                     keys: Keys) -> torch.Tensor:
    """Sorted flat positions (of the weight ``scores`` scores) of the ``count`` entries that
    ``structure`` keeps: the best by score within the structure (``count_for`` must give
    ``count``). ``keys(positions)`` gives distinct tie keys."""
    shape = tuple(scores.shape)
    s = structure
    if s.kind == "unstructured":
        return top_k(scores, count, keys)
    if count != count_for(s, shape, count):
        raise ValueError(f"{s} cannot hold {count} active weights of a {shape} weight; the "
                         f"nearest it can is {count_for(s, shape, count)}")
    check_fits(s, shape)
    where = matrix_positions(shape, scores.device)
    values = comparable(scores)[where.reshape(-1)].view(where.shape)
    rows, cols = where.shape
    if s.kind in ("n:m", "fan-in"):
        width = s.m if s.kind == "n:m" else cols
        groups = rows * cols // width
        need = torch.full((groups,), count // groups, dtype=torch.int64)
        at = where.reshape(-1, width)
        chosen = top_per_group(values.reshape(-1, width), need, lambda r, c: keys(at[r, c]))
        picked = where.reshape(-1)[chosen.reshape(-1)]
    else:  # blocks: pooled scores, unstructured top-k over blocks
        r, c = s.rows, s.cols
        pooled = values.double().reshape(rows // r, r, cols // c, c).sum((1, 3))
        corner = where.reshape(rows // r, r, cols // c, c)[:, 0, :, 0]
        blocks = top_k(pooled, count // (r * c), lambda i: keys(corner.reshape(-1)[i]))
        block_mask = torch.zeros(pooled.numel(), dtype=torch.bool, device=scores.device)
        block_mask[blocks] = True
        full = block_mask.view(rows // r, 1, cols // c, 1).expand(-1, r, -1, c)
        picked = where.reshape(rows // r, r, cols // c, c)[full]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[picked] = True
    return mask.nonzero().squeeze(1)
