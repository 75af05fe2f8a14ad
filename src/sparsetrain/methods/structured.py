"""Drop, grow and prune within a structure (N:M, fan-in, blocks), for every method.

The methods' rules (drop scores, grow scores) are unchanged; a structure only constrains which
sets the selection may return (:mod:`sparsetrain.sparsity.structure`):

- blocks: drop and grow scores are pooled over each block (the sum over its entries); the
  ``floor(n_drop / (R*C))`` active blocks with the lowest pooled drop score are dropped and as
  many inactive blocks with the highest pooled grow score are grown, whole;
- fan-in and N:M: the ``n_drop`` weakest active weights of the layer are dropped as without a
  structure, then every row (fan-in) or group of M (N:M) grows back to its fixed count from its
  own free positions, by grow score (SRigL's rule, Lasby et al. 2024: prune by magnitude over the
  layer, regrow per neuron to the constant fan-in).

Grow scores are computed on the backend's row blocks, which start and end at block rows, so that
no dense tensor of a compact layer's size is built. Ties fall by the seeded random order of the
positions (of the blocks, for blocks), as everywhere else.
"""

from __future__ import annotations

import math

import torch

from ..sparsity.groups import (group_of, group_positions, group_width, matrix_coords,
                               matrix_positions, n_groups, top_per_group)
from ..sparsity.permutation import DROP, GROW, RandomOrder
from ..sparsity.positions import merge_sorted
from ..sparsity.selection import RunningTopK, comparable, first_free, top_k
from . import scores as checked


def _block_order(sparsifier, name: str, purpose: int, t: int) -> RandomOrder:
    s, shape = sparsifier.structure, sparsifier.backend.shape(name)
    return RandomOrder(n_groups(s, shape), sparsifier.seed, purpose, t, sparsifier._index[name])


def _grow_scores(sparsifier, block) -> torch.Tensor | None:
    """The block's grow scores in its matrix view ``(rows, cols)`` (float32 or float64; integer
    scores as float64, exactly), or None where a score is not finite. A Linear weight is its
    own matrix view: no copy."""
    flat = checked.grow_scores(sparsifier, block)
    if flat is None:
        return None
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    if len(block.shape) == 2:
        return flat.view(tuple(block.shape))
    where = matrix_positions(tuple(block.shape), flat.device)
    return flat[where.reshape(-1)].view(where.shape)


def _present(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted distinct values of ``ids`` (in ``range(n)``), without a sort."""
    mark = torch.zeros(n, dtype=torch.bool, device=ids.device)
    mark[ids] = True
    return mark.nonzero().squeeze(1)


# --- blocks -----------------------------------------------------------------------------------
def keep_blocks(sparsifier, name: str, n_keep: int, t: int) -> torch.Tensor | None:
    """The active positions of the ``n_keep // (R*C)`` active blocks of ``name`` with the largest
    pooled drop score (sorted), or None if a score is not finite."""
    s, backend = sparsifier.structure, sparsifier.backend
    shape, active = backend.shape(name), backend.active_positions(name)
    gid = group_of(s, shape, active)
    best = _keep_block_ids(sparsifier, name, n_keep // (s.rows * s.cols), t, active, gid)
    return None if best is None else active[_marked(best, gid, n_groups(s, shape))]


def _keep_block_ids(sparsifier, name: str, n_keep: int, t: int, active: torch.Tensor,
                    gid: torch.Tensor) -> torch.Tensor | None:
    """The ids of the ``n_keep`` active blocks of ``name`` with the largest pooled drop score
    (sorted), given the ``active`` positions and their block ids ``gid``; None if a score is
    not finite."""
    s, backend = sparsifier.structure, sparsifier.backend
    scores = checked.drop_scores(sparsifier, name, active.numel())
    if scores is None:
        return None
    pooled = torch.zeros(n_groups(s, backend.shape(name)), dtype=torch.float64,
                         device=active.device)
    pooled.index_add_(0, gid, scores.to(device=active.device, dtype=torch.float64))
    blocks = _present(gid, pooled.numel())
    order = _block_order(sparsifier, name, DROP, t)
    return blocks[top_k(pooled[blocks], n_keep, lambda i: order.rank(blocks[i]))]


def _marked(ids: torch.Tensor, gid: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean: whether each of ``gid`` is among ``ids`` (block ids in ``range(n)``)."""
    mark = torch.zeros(n, dtype=torch.bool, device=gid.device)
    mark[ids] = True
    return mark[gid]


def _grow_blocks(sparsifier, name: str, k: int, closed: torch.Tensor, before: torch.Tensor,
                 t: int) -> tuple[torch.Tensor | None, float | None]:
    """The ``k`` blocks outside the sorted block ids ``closed`` with the largest pooled grow
    score, and the largest pooled score of a block outside ``before`` (None for a random
    order)."""
    s, backend = sparsifier.structure, sparsifier.backend
    order = _block_order(sparsifier, name, GROW, t)
    if getattr(type(sparsifier).grow_scores, "descending_order", None) is not None:
        return first_free(order, k, closed), None
    running = RunningTopK(k, order.rank)
    cols = math.prod(backend.shape(name)[1:])
    per_block_row = cols // s.cols
    best = -math.inf
    for block in backend.blocks(name):
        values = _grow_scores(sparsifier, block)
        if values is None:
            return None, None
        rows = values.shape[0]
        pooled = values.reshape(rows // s.rows, s.rows, per_block_row, s.cols).sum((1, 3))
        pooled = pooled.reshape(-1).contiguous()
        lo = block.rows.start // s.rows * per_block_row
        hi = lo + pooled.numel()
        a, b = torch.searchsorted(before, torch.tensor([lo, hi])).tolist()
        outside = torch.ones(pooled.numel(), dtype=torch.bool)
        outside[before[a:b] - lo] = False
        if bool(outside.any()):
            best = max(best, float(pooled[outside].max()))
        a, b = torch.searchsorted(closed, torch.tensor([lo, hi])).tolist()
        running.offer(pooled, lo, closed[a:b] - lo)
    return running.result(), best


def drop_and_grow_blocks(sparsifier, name: str, n_drop: int, t: int,
                         allow_regrowth: bool) -> tuple[float | None, bool]:
    """Replace the ``n_drop // (R*C)`` weakest active blocks of ``name`` by as many grown ones;
    returns ``(the largest pooled grow score outside the old active blocks, or None; whether
    a score was not finite)``."""
    s, backend = sparsifier.structure, sparsifier.backend
    shape, size = backend.shape(name), s.rows * s.cols
    active = backend.active_positions(name)
    n_blocks = active.numel() // size
    n_drop = min(n_drop // size, n_blocks, n_groups(s, shape) - n_blocks)
    if n_drop <= 0:
        return None, False
    gid = group_of(s, shape, active)
    kept_blocks = _keep_block_ids(sparsifier, name, n_blocks - n_drop, t, active, gid)
    if kept_blocks is None:
        return None, True
    kept = active[_marked(kept_blocks, gid, n_groups(s, shape))]
    before = _present(gid, n_groups(s, shape))
    grown, best = _grow_blocks(sparsifier, name, n_drop,
                               kept_blocks if allow_regrowth else before, before, t)
    if grown is None:
        return None, True
    positions = group_positions(s, shape, grown.to(kept.device))
    backend.set_active(name, merge_sorted(kept, positions)[0])
    return (best if sparsifier.update_reads_gradient else None), False


# --- fan-in and N:M ---------------------------------------------------------------------------
def refill_groups(sparsifier, name: str, kept: torch.Tensor, quota: int, closed: torch.Tensor,
                  before: torch.Tensor, t: int, ablated: torch.Tensor | None = None):
    """Positions to grow so that every group of ``name`` holds ``quota`` active weights (0 for
    the rows in ``ablated``, a bool per row): each group's best by grow score outside the sorted
    ``closed`` (positions dropped but closed come last), ties by the random order. Returns
    ``(grown, best)`` (best: the largest score outside the sorted ``before``), or ``(None,
    None)`` where a score is not finite."""
    s, backend = sparsifier.structure, sparsifier.backend
    shape = backend.shape(name)
    width = group_width(s, shape)
    need = quota - torch.bincount(group_of(s, shape, kept), minlength=n_groups(s, shape))
    if ablated is not None:
        per_row = math.prod(shape[1:]) // width
        need[ablated.repeat_interleave(per_row)] = 0
    order = sparsifier.order(name, GROW, t)
    parts, best = [], -math.inf
    for block in backend.blocks(name):
        values = _grow_scores(sparsifier, block)
        if values is None:
            return None, None
        cols = values.shape[1]
        g0 = block.lo // width
        groups = values.numel() // width
        flat = values.view(-1)  # the block's own scores: changed in place
        # kept is within closed, closed within before: each write overrides the one before
        at_before, at_closed, at_kept = (_in_view(block, _within(p, block), cols)
                                         for p in (before, closed, kept))
        if sparsifier.update_reads_gradient:  # the largest score of a position free before
            saved = flat[at_before]
            flat[at_before] = -math.inf
            best = max(best, float(flat.max()))
            flat[at_before] = saved
        flat[at_closed] = -torch.finfo(values.dtype).max  # last resort
        flat[at_kept] = -math.inf  # never
        chosen = top_per_group(values.view(-1, width), need[g0:g0 + groups],
                               lambda r, c: order.rank(_view_positions(block, r * width + c)))
        parts.append(_view_positions(block, chosen.view(-1).nonzero().squeeze(1)))
    grown = torch.sort(torch.cat(parts)).values if parts else kept.new_empty(0)
    return grown, best


def _within(positions: torch.Tensor, block) -> torch.Tensor:
    """The entries of the sorted ``positions`` in ``block``, as offsets from its start."""
    a, b = torch.searchsorted(positions, torch.tensor([block.lo, block.hi])).tolist()
    return positions[a:b] - block.lo


def _in_view(block, offsets: torch.Tensor, cols: int) -> torch.Tensor:
    """Indices into ``block``'s flattened matrix view of its flat ``offsets``."""
    if len(block.shape) == 2:
        return offsets
    row, col = matrix_coords(tuple(block.shape), offsets)
    return row * cols + col


def _view_positions(block, index: torch.Tensor) -> torch.Tensor:
    """The weight's flat positions of entries ``index`` of ``block``'s flattened matrix
    view."""
    if len(block.shape) == 2:
        return index + block.lo
    return matrix_positions(tuple(block.shape), index.device).view(-1)[index] + block.lo


def keep_within(sparsifier, name: str, n_keep: int, t: int) -> torch.Tensor | None:
    """The ``n_keep`` active positions of ``name`` with the largest drop scores that the
    structure allows (whole blocks; the same number in every row or group), sorted; None if
    a score is not finite. ``n_keep`` must be a count the structure holds."""
    s, backend = sparsifier.structure, sparsifier.backend
    if s.kind == "block":
        return keep_blocks(sparsifier, name, n_keep, t)
    shape = backend.shape(name)
    active = backend.active_positions(name)
    scores = checked.drop_scores(sparsifier, name, active.numel())
    if scores is None:
        return None
    groups = n_groups(s, shape)
    by_group = torch.sort(group_of(s, shape, active), stable=True).indices  # active set only
    at = active[by_group].view(groups, -1)
    values = comparable(scores).to(torch.float64)[by_group.to(scores.device)].view(groups, -1)
    order = sparsifier.order(name, DROP, t)
    need = torch.full((groups,), n_keep // groups, dtype=torch.int64)
    chosen = top_per_group(values, need, lambda r, c: order.rank(at[r, c]))
    return torch.sort(at[chosen]).values
