"""Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 grey 28x28 images of 10 kinds of clothing.

On Debian the package ``dataset-fashion-mnist`` installs the official IDX files in
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .datasets import DEBIAN_FASHION_MNIST as FASHION_MNIST_DIR
from .datasets import read_idx_split

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and standard deviation of the training pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530


def load_fashion_mnist(
    split: str = "train", root: str | Path = FASHION_MNIST_DIR, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 and labels ``(N,)`` int64 of ``split``.

    With ``normalize`` the pixels are scaled to [0, 1] and standardised with the training
    set's mean and standard deviation.
    """
    root = Path(root)
    images, labels = read_idx_split(
        root, split, "; on Debian install it with 'apt-get install dataset-fashion-mnist', or "
        "pass the folder holding the IDX files", num_classes=len(CLASSES))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))
