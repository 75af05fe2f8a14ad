"""Registry of sparse training methods by name, so the CLI and new methods plug in by name."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)

METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: register a sparsifier class under ``name`` (lower case)."""
    key = name.lower()

    def decorator(cls: T) -> T:
        if key in METHODS and METHODS[key] is not cls:
            raise ValueError(f"a method named {key!r} is already registered ({METHODS[key]})")
        METHODS[key] = cls
        cls.method_name = key
        return cls

    return decorator


def available_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(METHODS)


def get_method(name: str) -> type:
    """The sparsifier class registered as ``name``."""
    key = name.lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; the registered methods are: "
            f"{', '.join(available_methods())}"
        )
    return METHODS[key]


def make_sparsifier(method: str, model, optimizer, **kwargs):
    """Build the sparsifier registered as ``method`` (e.g. ``"rigl"``) for ``model``."""
    return get_method(method)(model, optimizer, **kwargs)


def supported_pairs() -> list[tuple[str, str]]:
    """Every (method, backend) pair that runs: each method on the backends that provide what
    it requires."""
    return [(m, b) for m in available_methods() for b in get_method(m).supported_backends()]


def training_flops_per_example(method: str, f_dense: float, f_sparse: float, *,
                               delta_t: int = 100) -> float:
    """FLOPs of one training step per example (forward and backward) of registered ``method``
    (or ``"dense"``), given the forward FLOPs of the dense and the sparse model: the method's
    own ``training_flops`` rule (RigL paper, Appendix H)."""
    from ..flops import dense_training_flops

    if method == "dense":
        return dense_training_flops(f_dense)
    return get_method(method).training_flops(f_dense, f_sparse, delta_t=delta_t)
