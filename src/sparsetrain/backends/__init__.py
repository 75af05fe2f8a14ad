"""Execution backends: how a sparse weight is stored and kept sparse through training."""

from .masked import MaskedBackend

BACKENDS = {"masked": MaskedBackend}


def make_backend(name: str, *args, **kwargs):
    """The backend registered as ``name``, built with ``args``."""
    if name not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}"
        )
    return BACKENDS[name](*args, **kwargs)


__all__ = ["BACKENDS", "MaskedBackend", "make_backend"]
