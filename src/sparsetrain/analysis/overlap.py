"""How much two sets of masks agree: the Jaccard overlap |A and B| / |A or B|.

``mask_overlap(a, b)`` takes two mappings of weight names to bool masks (``sparsifier.masks``)
over the same weights, and gives the overlap of each weight's active sets and of all of them
together; ``position_overlap(a, b)`` the same from the sorted flat positions of the active
weights (``sparsifier.state_dict()["positions"]``, as checkpoints hold them). Two independent
random masks of density d overlap by about d / (2 - d); identical masks by 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class MaskOverlap:
    layers: dict[str, float]   # Jaccard overlap of each weight's masks
    overall: float             # over all the weights' positions together
    shared: int                # positions active in both
    either: int                # positions active in one or both


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any], what: str,
             counts: Callable[[str, Any, Any], tuple[int, int]]) -> MaskOverlap:
    """Per weight, ``counts(name, a[name], b[name])`` -> (shared, either), and the totals."""
    if set(a) != set(b):
        raise ValueError(f"the two sets of {what} name different weights "
                         f"({', '.join(sorted(set(a) ^ set(b))[:5])}); compare {what} of the "
                         "same model")
    layers, shared_all, either_all = {}, 0, 0
    for name in a:
        shared, either = counts(name, a[name], b[name])
        layers[name] = shared / either if either else 1.0
        shared_all += shared
        either_all += either
    return MaskOverlap(layers, shared_all / either_all if either_all else 1.0, shared_all,
                       either_all)


def _mask_counts(name: str, a: Any, b: Any) -> tuple[int, int]:
    x, y = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    if x.shape != y.shape:
        raise ValueError(f"the masks of {name!r} have shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}; compare masks of the same model")
    return int((x & y).sum()), int((x | y).sum())


def _position_counts(name: str, a: Any, b: Any) -> tuple[int, int]:
    x, y = torch.as_tensor(a).long(), torch.as_tensor(b).long()
    shared = int(torch.isin(x, y).sum())
    return shared, x.numel() + y.numel() - shared


def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> MaskOverlap:
    """The Jaccard overlap of masks ``a`` and ``b``, per weight and overall (a weight with no
    active position in either counts as overlap 1)."""
    return _overlap(a, b, "masks", _mask_counts)


def position_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> MaskOverlap:
    """The Jaccard overlap of two sets of active positions (per weight: sorted flat indices)."""
    return _overlap(a, b, "positions", _position_counts)
