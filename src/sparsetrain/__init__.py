"""sparsetrain: training sparse neural networks in PyTorch.

Two lines in any training loop::

    sparsifier = sparsetrain.RigL(model, optimizer, density=0.1, total_steps=steps)
    ...
    sparsifier.step()   # in place of optimizer.step()
"""

from . import analysis, data, models
from .flops import FlopsReport, flops
from .methods import (
    ACDC,
    CHT,
    DSR,
    GMP,
    MEST,
    SET,
    SNFS,
    GraNet,
    SRigL,
    TopKAST,
    DynamicSparsifier,
    RigL,
    Sparsifier,
    Static,
    available_methods,
    get_method,
    make_sparsifier,
    register_method,
    supported_pairs,
    training_flops_per_example,
)
from .backends import available_backends
from .deploy import SparseFileError, export_onnx, export_sparse, load_sparse, read_sparse
from .pruning import (
    PRUNING_METHODS,
    LotteryRound,
    LotteryTicket,
    SmallDenseWidth,
    dense_param_count,
    prune_at_init,
    pruning_scores,
    run_lottery_ticket,
    small_dense_width,
    sparse_param_count,
)
from .sparsity.distributions import DISTRIBUTIONS, densities_for_shapes, layer_densities
from .sparsity.schedules import drop_fraction
from .sparsity.structure import STRUCTURE_EXAMPLES
from .sparsity.targets import find_targets, register_weight_layout

__version__ = "0.1.0"

__all__ = [
    "DISTRIBUTIONS",
    "FlopsReport",
    "flops",
    "training_flops_per_example",
    "analysis",
    "data",
    "models",
    "ACDC",
    "CHT",
    "DSR",
    "DynamicSparsifier",
    "GMP",
    "GraNet",
    "MEST",
    "LotteryRound",
    "LotteryTicket",
    "SmallDenseWidth",
    "PRUNING_METHODS",
    "RigL",
    "SET",
    "SNFS",
    "SRigL",
    "STRUCTURE_EXAMPLES",
    "Sparsifier",
    "Static",
    "TopKAST",
    "available_backends",
    "SparseFileError",
    "export_onnx",
    "export_sparse",
    "load_sparse",
    "read_sparse",
    "supported_pairs",
    "available_methods",
    "dense_param_count",
    "densities_for_shapes",
    "drop_fraction",
    "find_targets",
    "get_method",
    "layer_densities",
    "make_sparsifier",
    "prune_at_init",
    "pruning_scores",
    "register_method",
    "register_weight_layout",
    "run_lottery_ticket",
    "small_dense_width",
    "sparse_param_count",
    "__version__",
]
