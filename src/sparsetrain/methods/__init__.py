"""Sparse training methods, each registered by name."""

from .base import Sparsifier
from .dst import SET, DynamicSparsifier, RigL, Static
from .gmp import GMP
from .registry import (available_methods, get_method, make_sparsifier, register_method,
                       supported_pairs, training_flops_per_example)
from .snfs import SNFS
from .srigl import SRigL

__all__ = [
    "DynamicSparsifier", "GMP", "RigL", "SET", "SNFS", "SRigL", "Sparsifier", "Static",
    "available_methods", "get_method", "make_sparsifier", "register_method", "supported_pairs",
    "training_flops_per_example",
]
