"""Data sets for the examples, the runner and the benchmarks."""

from .datasets import (
    Dataset,
    available_datasets,
    load_dataset,
    make_synthetic,
    random_crop_flip,
)
from .fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist
from .idx import DataFileError, read_idx
from .text import TextDataset, load_text

__all__ = [
    "DataFileError", "Dataset", "FASHION_MNIST_DIR", "available_datasets", "load_dataset",
    "load_fashion_mnist", "load_text", "make_synthetic", "random_crop_flip", "read_idx",
    "TextDataset",
]
