"""A method's scores as the update code reads them: of the right size, and finite.

``drop_scores(name)`` must give one score per active weight and ``grow_scores(block)`` one per
position of the block; a wrong size is the method's error (``ValueError``), a NaN or infinity
the training's (the update then skips the layer with a warning, so these return ``None``).
"""

from __future__ import annotations

import torch

from ..sparsity.selection import comparable


def finite(scores: torch.Tensor) -> bool:
    """Whether every score is finite (integer scores always are)."""
    if not scores.is_floating_point() or scores.numel() == 0:
        return True
    low, high = torch.aminmax(scores)  # NaN and infinities reach the extremes
    return bool(torch.isfinite(low) & torch.isfinite(high))


def drop_scores(sparsifier, name: str, count: int) -> torch.Tensor | None:
    """``sparsifier.drop_scores(name)`` for the ``count`` active weights, or None where one is
    not finite."""
    scores = sparsifier.drop_scores(name)
    if scores.numel() != count:
        raise ValueError(f"{type(sparsifier).__name__}.drop_scores({name!r}) must give one score "
                         f"per active weight ({count}), got {scores.numel()}")
    return scores if finite(scores) else None


def grow_scores(sparsifier, block) -> torch.Tensor | None:
    """``sparsifier.grow_scores(block)`` flattened and comparable (see
    :func:`~sparsetrain.sparsity.selection.comparable`), or None where one is not finite."""
    scores = sparsifier.grow_scores(block)
    if scores.numel() != block.hi - block.lo:
        raise ValueError(f"{type(sparsifier).__name__}.grow_scores must give a score of the "
                         f"block's shape {tuple(block.shape)}, got {tuple(scores.shape)}")
    flat = comparable(scores)
    return flat if finite(flat) else None
