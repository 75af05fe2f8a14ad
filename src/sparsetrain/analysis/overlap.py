"""How much two sets of masks agree: the Jaccard overlap |A and B| / |A or B|.

``mask_overlap(a, b)`` takes two mappings of weight names to bool masks (``sparsifier.masks``)
over the same weights, and gives the overlap of each weight's active sets and of all of them
together; ``position_overlap(a, b)`` the same from the sorted flat positions of the active
weights (``sparsifier.state_dict()["positions"]``, as checkpoints hold them). Two independent random masks of density d
overlap by about d / (2 - d); identical masks by 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class MaskOverlap:
    layers: dict[str, float]   # Jaccard overlap of each weight's masks
    overall: float             # over all the weights' positions together
    shared: int                # positions active in both
    either: int                # positions active in one or both


def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> MaskOverlap:
    """The Jaccard overlap of masks ``a`` and ``b``, per weight and overall (a weight with no
    active position in either counts as overlap 1)."""
    if set(a) != set(b):
        raise ValueError(f"the two sets of masks name different weights "
                         f"({', '.join(sorted(set(a) ^ set(b))[:5])}); compare masks of the "
                         "same model")
    layers, shared_all, either_all = {}, 0, 0
    for name in a:
        x, y = torch.as_tensor(a[name]).bool(), torch.as_tensor(b[name]).bool()
        if x.shape != y.shape:
            raise ValueError(f"the masks of {name!r} have shapes {tuple(x.shape)} and "
                             f"{tuple(y.shape)}; compare masks of the same model")
        shared, either = int((x & y).sum()), int((x | y).sum())
        layers[name] = shared / either if either else 1.0
        shared_all += shared
        either_all += either
    return MaskOverlap(layers, shared_all / either_all if either_all else 1.0, shared_all,
                       either_all)


def position_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> MaskOverlap:
    """The Jaccard overlap of two sets of active positions (per weight: sorted flat indices)."""
    if set(a) != set(b):
        raise ValueError(f"the two sets of positions name different weights "
                         f"({', '.join(sorted(set(a) ^ set(b))[:5])}); compare runs of the "
                         "same model")
    layers, shared_all, either_all = {}, 0, 0
    for name in a:
        x, y = torch.as_tensor(a[name]).long(), torch.as_tensor(b[name]).long()
        shared = int(torch.isin(x, y).sum())
        either = x.numel() + y.numel() - shared
        layers[name] = shared / either if either else 1.0
        shared_all += shared
        either_all += either
    return MaskOverlap(layers, shared_all / either_all if either_all else 1.0, shared_all,
                       either_all)
