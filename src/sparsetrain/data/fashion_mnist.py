"""Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 grey 28x28 images of 10 kinds of clothing.

On Debian the package ``dataset-fashion-mnist`` installs the official IDX files in
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .idx import DataFileError, read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Mean and standard deviation of the training pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataFileError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; on Debian install it with "
        "'apt-get install dataset-fashion-mnist', or pass the folder holding the IDX files"
    )


def load_fashion_mnist(
    split: str = "train", root: str | Path = FASHION_MNIST_DIR, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 and labels ``(N,)`` int64 of ``split``.

    With ``normalize`` the pixels are scaled to [0, 1] and standardised with the training
    set's mean and standard deviation.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, _FILES[split][0]))
    labels = read_idx(_find(root, _FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(
            f"Fashion-MNIST {split} files in {root} do not fit together: images "
            f"{images.shape}, labels {labels.shape}"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataFileError(f"Fashion-MNIST {split} labels in {root} go beyond 9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))
