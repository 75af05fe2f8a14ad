"""Sanity checks of pruning at initialisation (Frankle et al., ICLR 2021, "Pruning Neural
Networks at Initialization: Why Are We Missing the Mark?").

If a method's masks carry information beyond how many weights each layer keeps, moving its
active weights to random places within each layer (``shuffle_masks``), or drawing the
initial weights afresh under the same masks, should cost accuracy. The paper found that for
SNIP, GraSP and SynFlow neither does: what matters is the per-layer density.

``shuffle_masks(masks, seed)`` keeps each mask's number of active weights exactly and places
them at a uniformly random subset of the layer's positions (the seeded random orders of
``sparsity.permutation``, purpose ``SHUFFLE``, so the same seed gives the same masks on every
machine). Re-initialisation needs the model's own initialiser; ``sparsetrain train
--prune-ablation reinit`` builds the model again from another seed and trains that under the
pruned masks.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..sparsity.permutation import SHUFFLE, RandomOrder
from ..sparsity.positions import mask_of

ABLATIONS = ("shuffle", "reinit")


def shuffle_masks(masks: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each mask's active count at random positions of its layer (layers in sorted name order
    get independent orders)."""
    shuffled = {}
    for index, name in enumerate(sorted(masks)):
        mask = torch.as_tensor(masks[name]).bool()
        count = int(mask.sum())
        positions = RandomOrder(mask.numel(), int(seed), SHUFFLE, index).first(
            count, device=mask.device)
        shuffled[name] = mask_of(positions, mask.shape, device=mask.device)
    return shuffled
