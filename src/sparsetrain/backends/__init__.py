"""Execution backends: how a sparse weight is stored and kept sparse through training.

Every backend implements the protocol of :mod:`.base`; the methods reach sparse weights only
through it.
"""

from . import semi_structured
from .base import Block, GradientUnavailable
from .conversion import dense_state_dict, to_csr, to_masked
from .csr import CSRLinear
from .csr_backend import CSRBackend
from .masked import MaskedBackend

BACKENDS = {"masked": MaskedBackend, "csr": CSRBackend}


def available_backends() -> list[str]:
    """Names of all backends."""
    return list(BACKENDS)


def get_backend(name: str) -> type:
    """The backend class registered as ``name``."""
    if name not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}"
        )
    return BACKENDS[name]


__all__ = ["BACKENDS", "Block", "CSRBackend", "CSRLinear", "GradientUnavailable",
           "MaskedBackend", "available_backends", "get_backend", "to_csr", "to_masked"]
