"""Small-Dense: a dense network narrowed to the parameter count of a sparse one.

``shared/spec/algorithms.md``, "Dense-to-sparse baselines" (the RigL paper's "Small-Dense"
baseline): the fair dense comparison for a sparse network is a thinner dense network with the
same number of parameters. ``sparse_param_count`` counts the parameters a sparse network really
has; ``small_dense_width`` finds the width multiplier at which a model family has that many::

    target = st.sparse_param_count(model, sparsifier)           # non-zeros of the sparse net
    found = st.small_dense_width(lambda w: WideResNet(22, 2 * w), target)
    small = WideResNet(22, 2 * found.width)                      # found.params parameters

Both count the sparsifiable weights only (``count="sparsifiable"``, the default: the weights
sparsetrain sparsifies, see ``find_targets``) or every parameter (``count="all"``: biases and
normalisation parameters too). Use the same ``count`` for both.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..sparsity.targets import find_targets

COUNTS = ("sparsifiable", "all")


@dataclass(frozen=True)
class SmallDenseWidth:
    """The width multiplier found, the parameter count of the model it builds, the target."""

    width: float
    params: int
    target: int


def _check_count(count: Any) -> str:
    if count not in COUNTS:
        raise ValueError(f"count must be 'sparsifiable' or 'all', got {count!r}")
    return count


def dense_param_count(model: nn.Module, *, count: str = "sparsifiable") -> int:
    """Parameters of ``model`` as a dense network: its sparsifiable weights, or all parameters.

    A parameter shared by several modules counts once.
    """
    count = _check_count(count)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if count == "all":
        return sum(p.numel() for p in model.parameters())
    return sum(t.numel for t in find_targets(model))


def sparse_param_count(model: nn.Module, masks: Any = None, *,
                       count: str = "sparsifiable") -> int:
    """Parameters ``model`` has with the pruned weights left out.

    ``masks``: a dict name -> mask (bool or 0/1) of sparsifiable weights, or anything with a
    ``masks`` attribute holding one (a sparsifier, a ``LotteryTicket``); ``None`` counts the
    model as dense. A masked weight counts its active entries; every other weight counted
    (sparsifiable weights without a mask, e.g. kept dense, and with ``count="all"`` the biases
    and normalisation parameters) counts in full.
    """
    total = dense_param_count(model, count=count)
    if masks is None:
        return total
    if not isinstance(masks, Mapping):
        masks = getattr(masks, "masks", masks)
    if not isinstance(masks, Mapping):
        raise ValueError(
            "masks must be a dict name -> mask, or a sparsifier or LotteryTicket (anything with "
            f"a masks attribute), got {type(masks).__name__}"
        )
    targets = {t.name: t for t in find_targets(model)}
    for name, mask in masks.items():
        if name not in targets:
            raise ValueError(
                f"masks has an entry {name!r} that is not a sparsifiable weight of the model; "
                f"they are: {', '.join(targets)}"
            )
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(targets[name].shape):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(
                f"masks[{name!r}] must be a tensor of the weight's shape "
                f"{tuple(targets[name].shape)}, got {shape}"
            )
        total -= targets[name].numel - int((mask != 0).sum())
    return total


def _width_bound(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(float(value)) and float(value) > 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def small_dense_width(
    model_factory: Callable[[float], nn.Module],
    target_params: int,
    *,
    count: str = "sparsifiable",
    low: float = 0.01,
    high: float = 1.0,
    tolerance: float = 1e-6,
    max_evaluations: int = 64,
) -> SmallDenseWidth:
    """The width multiplier in ``[low, high]`` whose model's parameter count is closest to target.

    ``model_factory(width)`` builds a dense model whose parameter count (see
    ``dense_param_count`` for ``count``) does not decrease as ``width`` grows; channel counts
    rounded to integers make it a step function, which is fine. Bisection on ``width`` narrows
    the bracket between a count at most ``target_params`` and one at least ``target_params``
    until it is ``tolerance`` wide, the count equals the target, or ``max_evaluations`` models
    have been built. Returns the width evaluated whose count is nearest to ``target_params``
    (the smaller count on a tie, so the small dense model does not exceed the sparse one's
    budget), with that count.

    Raises ``ValueError`` when ``target_params`` is below the count at ``low`` or above the one
    at ``high`` (not reachable: widen the range), or when two evaluated widths show the count
    decreasing with width (a non-monotone factory).
    """
    if not callable(model_factory):
        raise ValueError("model_factory must be a callable width -> torch.nn.Module")
    if isinstance(target_params, bool) or not isinstance(target_params, numbers.Integral) or (
        target_params <= 0
    ):
        raise ValueError(f"target_params must be a positive integer, got {target_params!r}")
    target = int(target_params)
    count = _check_count(count)
    low, high = _width_bound(low, "low"), _width_bound(high, "high")
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if not (isinstance(tolerance, numbers.Real) and float(tolerance) > 0):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, numbers.Integral) or (
        max_evaluations < 2
    ):
        raise ValueError(
            f"max_evaluations must be an integer of at least 2, got {max_evaluations!r}"
        )

    widths: list[float] = []  # evaluated widths, sorted, with their counts
    counts: list[int] = []

    def evaluate(width: float) -> int:
        model = model_factory(width)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model_factory({width}) returned {type(model).__name__}, not a torch.nn.Module"
            )
        n = dense_param_count(model, count=count)
        i = bisect.bisect_left(widths, width)
        below = counts[i - 1] if i > 0 else None
        above = counts[i] if i < len(counts) else None
        if below is not None and below > n:
            pair = ((widths[i - 1], below), (width, n))
        elif above is not None and above < n:
            pair = ((width, n), (widths[i], above))
        else:
            pair = None
        if pair is not None:
            (w_small, n_small), (w_large, n_large) = pair
            raise ValueError(
                "model_factory's parameter count must not decrease as the width grows, but "
                f"width {w_small} gives {n_small} and width {w_large} gives {n_large}"
            )
        widths.insert(i, width)
        counts.insert(i, n)
        return n

    n_low, n_high = evaluate(low), evaluate(high)
    if not n_low <= target <= n_high:
        raise ValueError(
            f"target_params={target} is not reachable with widths in [{low}, {high}]: the "
            f"{count} parameter count goes from {n_low} (width {low}) to {n_high} "
            f"(width {high}); pass a smaller low or a larger high"
        )
    lo, hi = low, high  # count(lo) <= target <= count(hi)
    evaluations = 2
    n_lo, n_hi = n_low, n_high
    while n_lo != target and n_hi != target and hi - lo > tolerance and (
        evaluations < max_evaluations
    ):
        mid = (lo + hi) / 2
        n_mid = evaluate(mid)
        evaluations += 1
        if n_mid <= target:
            lo, n_lo = mid, n_mid
        else:
            hi, n_hi = mid, n_mid
    # Ties go to the smaller count: the small dense model stays within the sparse one's budget.
    if n_lo == target or target - n_lo <= n_hi - target:
        return SmallDenseWidth(width=lo, params=n_lo, target=target)
    return SmallDenseWidth(width=hi, params=n_hi, target=target)
