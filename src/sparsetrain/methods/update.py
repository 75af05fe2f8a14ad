"""Drop and grow on one layer, written once for every backend (RigL paper, Algorithm 1).

Keep the ``n_active - n_drop`` active weights with the largest drop score, then grow the
``n_drop`` positions with the largest grow score among those not kept (with ``allow_regrowth``;
else among those inactive before the drop). Ties go by the tie keys of
:mod:`sparsetrain.sparsity.selection`. The drop score is read at the active positions; the grow
score is computed on the backend's row blocks and reduced by a running top-k, so a compact layer
never has a dense tensor of its size. A grow score marked with :func:`descending_order` (a
random order) is not computed at all: the first free positions of its order are taken, which
is the same selection at O(n_drop) cost.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..sparsity.groups import n_groups
from ..sparsity.permutation import DROP, GROW
from ..sparsity.positions import contains, merge_sorted
from ..sparsity.selection import RunningTopK, first_free, order_keys, top_k
from . import scores as checked
from .structured import drop_and_grow_blocks, refill_groups


def descending_order(order_method: str) -> Callable:
    """Mark a grow score as ``-rank`` in the random order that ``sparsifier.<order_method>(name)``
    returns, so that its top-k can be listed from the order instead of computed."""

    def mark(score):
        score.descending_order = order_method
        return score

    return mark


def warn_not_finite(sparsifier, name: str, t: int) -> None:
    warnings.warn(
        f"{type(sparsifier).__name__}: weight {name!r} has NaN or infinite weights or scores "
        f"at step {t}; its topology update is skipped. Lower the learning rate or clip "
        "gradients.", RuntimeWarning, stacklevel=4)


def keep_largest(sparsifier, name: str, n_keep: int, t: int,
                 active: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ``n_keep`` active positions of ``name`` with the largest drop score (sorted), or
    ``None`` if the scores are not finite; ``active``: the active set, where the caller has
    it already."""
    if active is None:
        active = sparsifier.backend.active_positions(name)
    scores = checked.drop_scores(sparsifier, name, active.numel())
    if scores is None:
        return None
    keys = order_keys(sparsifier.order(name, DROP, t), active)
    return active[top_k(scores, n_keep, keys)]


def grow_largest(sparsifier, name: str, k: int, closed: torch.Tensor, t: int,
                 inactive_of: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, float | None]:
    """The ``k`` positions of ``name`` outside the sorted ``closed`` with the largest grow
    score (sorted), or ``None`` if a score is not finite; and, given the sorted active set
    ``inactive_of`` of before the update, the largest score of a grown position outside it,
    which is the largest score outside it whenever one was grown (``None`` where none was, for
    a random order, which has no scores, or without ``inactive_of``)."""
    order_method = getattr(type(sparsifier).grow_scores, "descending_order", None)
    if order_method is not None:
        return first_free(getattr(sparsifier, order_method)(name), k, closed), None
    backend = sparsifier.backend
    numel = backend.numel(name)
    running = RunningTopK(k, sparsifier.order(name, GROW, t).rank, total=numel - closed.numel())
    for _ in range(2):  # a second pass only where the first's guessed bound was too high
        bounds = torch.tensor([0, 0], device=closed.device)
        for block in backend.blocks(name):
            flat = checked.grow_scores(sparsifier, block)
            if flat is None:
                return None, None
            bounds[0], bounds[1] = block.lo, block.hi
            a, b = torch.searchsorted(closed, bounds).tolist()
            running.offer(flat.contiguous(), block.lo, (closed[a:b] - block.lo).to(flat.device))
        if running.complete():
            break
        running = RunningTopK(k, sparsifier.order(name, GROW, t).rank)  # no guessing
    grown, scores = running.result_with_scores()
    grown = grown.to(closed.device)
    best = None
    if inactive_of is not None and grown.numel():
        new = ~contains(inactive_of, grown)
        if bool(new.any()):
            best = float(scores.to(new.device)[new].max())
    return grown, best


def drop_and_grow(sparsifier, name: str, n_drop: int, t: int, *,
                  allow_regrowth: bool = True) -> float | None:
    """Replace the ``n_drop`` weakest active weights of ``name`` by as many grown ones. Returns,
    for a method whose scores read the gradient, the largest grow score of the positions
    inactive before the update (``None`` where no score was computed: nothing to replace, a
    random order, or non-finite scores, for which the update is skipped with a warning)."""
    backend = sparsifier.backend
    n_active, numel = backend.n_active(name), backend.numel(name)
    n_drop = max(0, min(int(n_drop), n_active, numel - n_active))
    if n_drop == 0:
        return None
    structure = sparsifier.structure
    if structure.kind == "block":  # whole blocks dropped and grown on pooled scores
        best, not_finite = drop_and_grow_blocks(sparsifier, name, n_drop, t, allow_regrowth)
        if not_finite:
            warn_not_finite(sparsifier, name, t)
        return best
    active = backend.active_positions(name)
    kept = keep_largest(sparsifier, name, n_active - n_drop, t, active)
    grown = best = None
    if kept is not None:
        closed = kept if allow_regrowth else active
        if structure.kind == "unstructured":
            before = active if sparsifier.update_reads_gradient else None
            grown, best = grow_largest(sparsifier, name, n_drop, closed, t, before)
        else:  # fan-in, N:M: every row or group grows back to its fixed count
            quota = n_active // n_groups(structure, backend.shape(name))
            grown, best = refill_groups(sparsifier, name, kept, quota, closed, active, t)
            best = best if sparsifier.update_reads_gradient else None
    if grown is None:
        warn_not_finite(sparsifier, name, t)
        return None
    backend.set_active(name, merge_sorted(kept, grown.to(kept.device))[0])
    return best


def warn_if_blind(sparsifier, best_scores: list[float | None], t: int) -> None:
    """Warn when an update that reads the dense gradient found it zero at every candidate
    position of every layer: it grew by the tie order alone, as SET would."""
    scores = [b for b in best_scores if b is not None]
    if sparsifier.update_reads_gradient and scores and max(scores) == 0.0:
        warnings.warn(
            f"{type(sparsifier).__name__}: at update step {t} the dense gradient is zero at "
            "every inactive position of every layer, so the weights grown were picked by the "
            "tie order alone. Were the gradients masked or zeroed before step() (by "
            "mask_gradients(), a hook, or clipping after masking)? Clip with "
            "sparsifier.clip_grad_norm_() and let step() mask them.", RuntimeWarning,
            stacklevel=4)
