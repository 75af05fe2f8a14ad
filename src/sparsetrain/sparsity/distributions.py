"""Per-layer densities for a global target density.

RigL paper, Section 3 ("Sparsity distribution") and ``shared/spec/algorithms.md``:

- ``uniform``: every sparsified layer gets the target density ``d``.
- ``er`` (Erdős-Rényi): layer l's raw density is ``(n_in + n_out) / (n_in * n_out)``.
- ``erk`` (Erdős-Rényi-Kernel): ``sum(shape) / prod(shape)``, kernel dimensions included,
  optionally raised to ``erk_power_scale`` in [0, 1] (0: uniform, 1: ERK itself).
- a ``dict`` name -> density: a custom map, used as given.

ER and ERK scale the raw densities by one ``eps`` so that
``eps * sum_l raw_l * N_l = d * sum_l N_l``. If a layer would get a density above 1, the layers
with the largest raw density become dense (their ``N_l`` counts fully against the budget) and
``eps`` is solved again, until every density is at most 1. Layers the caller keeps dense are not
part of the budget at all.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import nn

from .. import checks
from .targets import find_targets, partition

DISTRIBUTIONS = ("uniform", "er", "erk")


def check_density(density: float, name: str = "density") -> float:
    """Return ``density`` as float, or raise ``ValueError`` unless it is in (0, 1]."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"{name} must be in (0, 1] (the fraction of weights kept), got {density!r}; "
            f"for 90% sparsity pass {name}=0.1"
        )
    return value


def check_erk_power_scale(power: float, name: str = "erk_power_scale") -> float:
    """Return ``power`` as float, or raise ``ValueError`` unless it is a number in [0, 1]
    (NaN made the ERK solve loop forever, infinity divide by zero)."""
    return checks.real_in_range(power, name, 0.0, 1.0, meaning="the power of the ERK raw "
                                "densities: 0 is uniform, 1 is ERK",
                                fix=f"give {name} a number in [0, 1], e.g. 1.0 (the default)")


def _raw_density(shape: Sequence[int], distribution: str, power: float) -> float:
    if distribution == "er":
        n_out, n_in = shape[0], (shape[1] if len(shape) > 1 else 1)
        raw = (n_in + n_out) / (n_in * n_out)
    else:
        raw = sum(shape) / math.prod(shape)
    return raw**power


def _scaled_densities(
    shapes: Mapping[str, Sequence[int]], density: float, distribution: str, power: float
) -> dict[str, float]:
    numels = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: _raw_density(s, distribution, power) for n, s in shapes.items()}
    budget = density * sum(numels.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            break
        remaining = budget - sum(numels[n] for n in dense)
        eps = remaining / sum(raw[n] * numels[n] for n in free)
        largest = max(raw[n] for n in free)
        if eps * largest <= 1.0:
            break
        dense.update(n for n in free if raw[n] == largest)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def densities_for_shapes(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str | Mapping[str, float] = "erk",
    *,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-layer densities of the tensors ``shapes`` (name -> shape) for global ``density``."""
    density = check_density(density)
    power = check_erk_power_scale(erk_power_scale)
    if isinstance(distribution, Mapping):
        unknown = sorted(set(distribution) - set(shapes))
        missing = sorted(set(shapes) - set(distribution))
        if unknown or missing:
            raise ValueError(
                "a custom distribution must give a density for every sparsified weight and no "
                f"other; unknown names: {unknown}, missing names: {missing}"
            )
        return {n: check_density(distribution[n], f"distribution[{n!r}]") for n in shapes}
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))} or a dict "
            f"name -> density, got {distribution!r}"
        )
    if distribution == "uniform" or density == 1.0:
        return {n: density for n in shapes}
    return _scaled_densities(shapes, density, distribution, power)


def layer_densities(
    model: nn.Module,
    density: float,
    distribution: str | Mapping[str, float] = "erk",
    dense_layers=(),
    *,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Density of every sparsifiable weight of ``model`` (name -> float).

    Weights matched by ``dense_layers`` get 1.0 and are outside the budget; for ``er`` and
    ``erk`` the non-zeros of the other weights add up to ``density`` times their total.
    """
    density = check_density(density)
    check_erk_power_scale(erk_power_scale)
    sparse, dense = partition(model, dense_layers)
    result = densities_for_shapes(
        {t.name: tuple(t.shape) for t in sparse},
        density,
        distribution,
        erk_power_scale=erk_power_scale,
    )
    result.update({t.name: 1.0 for t in dense})
    return {t.name: result[t.name] for t in find_targets(model)}
