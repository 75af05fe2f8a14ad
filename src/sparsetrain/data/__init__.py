"""Data sets for the examples and the experiment layer (it imports the library, never the reverse)."""

from .idx import read_idx
from .fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist

__all__ = ["FASHION_MNIST_DIR", "load_fashion_mnist", "read_idx"]
