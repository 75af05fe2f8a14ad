"""Execution backends: how a sparse weight is stored and kept sparse through training."""

from .csr import CSRLinear
from .csr_backend import CSRBackend, to_csr, to_masked
from .masked import MaskedBackend

BACKENDS = {"masked": MaskedBackend, "csr": CSRBackend}


def make_backend(name: str, *args, **kwargs):
    """The backend registered as ``name``, built with ``args``."""
    if name not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}"
        )
    return BACKENDS[name](*args, **kwargs)


__all__ = ["BACKENDS", "CSRBackend", "CSRLinear", "MaskedBackend", "make_backend", "to_csr",
           "to_masked"]
