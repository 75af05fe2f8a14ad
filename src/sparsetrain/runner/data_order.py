"""The order of the training examples and the augmentation of each batch, from the seed alone.

Neither depends on anything saved, so a resumed run, or one on another number of processes,
visits the same examples in the same order and augments them alike.
"""

from __future__ import annotations

import torch


def _derived_seed(seed: int, *parts: int) -> int:
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch``, a function of seed and epoch only
    (``epoch=-1``: the batches that pruning at initialisation scores)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_derived_seed(seed, 1, epoch)))


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the augmentation of the batch of ``step``."""
    return torch.Generator().manual_seed(_derived_seed(seed, 2, step))
