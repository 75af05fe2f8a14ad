"""Sparse training methods, each registered by name."""

from .dst import SET, SNFS, DynamicSparsifier, RigL, Static
from .gmp import GMP
from .registry import available_methods, get_method, make_sparsifier, register_method

__all__ = [
    "DynamicSparsifier", "GMP", "RigL", "SET", "SNFS", "Static",
    "available_methods", "get_method", "make_sparsifier", "register_method",
]
