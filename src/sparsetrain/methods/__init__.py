"""Sparse training methods, each registered by name."""

from .acdc import ACDC
from .base import Sparsifier
from .cht import CHT
from .dsr import DSR
from .dst import SET, DynamicSparsifier, RigL, Static
from .gmp import GMP
from .granet import GraNet
from .mest import MEST
from .registry import (available_methods, get_method, make_sparsifier, register_method,
                       supported_pairs, training_flops_per_example)
from .snfs import SNFS
from .srigl import SRigL
from .topkast import TopKAST

__all__ = [
    "ACDC", "CHT", "DSR", "DynamicSparsifier", "GMP", "GraNet", "MEST", "RigL", "SET", "SNFS",
    "SRigL", "Sparsifier", "Static", "TopKAST", "available_methods", "get_method",
    "make_sparsifier", "register_method", "supported_pairs", "training_flops_per_example",
]
