"""sparsetrain: training sparse neural networks in PyTorch.

Two lines in any training loop::

    sparsifier = sparsetrain.RigL(model, optimizer, density=0.1, total_steps=steps)
    ...
    sparsifier.step()   # in place of optimizer.step()
"""

from .methods import (
    SET,
    SNFS,
    DynamicSparsifier,
    RigL,
    Static,
    available_methods,
    get_method,
    make_sparsifier,
    register_method,
)
from .sparsity.distributions import DISTRIBUTIONS, densities_for_shapes, layer_densities
from .sparsity.schedules import drop_fraction
from .sparsity.targets import find_targets

__version__ = "0.1.0"

__all__ = [
    "DISTRIBUTIONS",
    "DynamicSparsifier",
    "RigL",
    "SET",
    "SNFS",
    "Static",
    "available_methods",
    "densities_for_shapes",
    "drop_fraction",
    "find_targets",
    "get_method",
    "layer_densities",
    "make_sparsifier",
    "register_method",
    "__version__",
]
