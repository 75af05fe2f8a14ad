"""Schedules of dynamic sparse training, as plain functions of the training step.

RigL paper, Section 3 and Algorithm 1: the topology is updated every ``delta_t`` steps between
``t_start`` and ``t_end``; the fraction of active weights dropped at step ``t`` decays from
``alpha`` to zero at ``t_end``. The paper's default is the cosine decay
``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))``.
"""

from __future__ import annotations

import math

from .. import checks
from .distributions import check_density

DROP_FRACTION_DECAYS = ("cosine", "linear", "constant")


def drop_fraction(t: int, *, alpha: float, t_end: int, decay: str = "cosine") -> float:
    """Fraction of the active weights of each layer dropped by an update at step ``t``."""
    if decay not in DROP_FRACTION_DECAYS:
        raise ValueError(
            f"drop_fraction_decay must be one of {', '.join(map(repr, DROP_FRACTION_DECAYS))}, "
            f"got {decay!r}"
        )
    if decay == "constant":
        return alpha
    progress = min(max(t / t_end, 0.0), 1.0) if t_end > 0 else 1.0
    if decay == "linear":
        return alpha * (1.0 - progress)
    return alpha / 2.0 * (1.0 + math.cos(math.pi * progress))


def is_update_step(t: int, *, delta_t: int, t_start: int = 0, t_end: int) -> bool:
    """Whether step ``t`` (1-based count of ``step()`` calls) updates the topology.

    Updates happen at ``t_start + delta_t, t_start + 2 * delta_t, ...`` up to ``t_end``; none
    after ``t_end``.
    """
    return t_start < t <= t_end and (t - t_start) % delta_t == 0


def gradual_density(t: int, *, initial: float, final: float, start_step: int,
                    end_step: int) -> float:
    """The cubic density schedule of gradual magnitude pruning (Zhu & Gupta 2017) at step ``t``:

        d(t) = final + (initial - final) * (1 - (t - start_step) / (end_step - start_step))^3

    ``initial`` up to ``start_step``, ``final`` from ``end_step`` on.
    """
    progress = min(max((t - start_step) / (end_step - start_step), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(t: int, *, start_step: int, end_step: int, frequency: int) -> bool:
    """Whether step ``t`` of gradual pruning prunes: ``start_step + frequency``,
    ``start_step + 2 * frequency``, ... up to ``end_step``, and ``end_step`` itself."""
    if not start_step < t <= end_step:
        return False
    return t == end_step or (t - start_step) % frequency == 0


def last_pruning_step(t: int, *, start_step: int, end_step: int, frequency: int) -> int:
    """The last step up to ``t`` at which gradual pruning prunes (see ``is_pruning_step``), or
    ``start_step`` before the first: the step whose schedule the masks hold after step ``t``."""
    if t >= end_step:
        return end_step
    return max(start_step, t - (t - start_step) % frequency)


def gradual_steps(density: float, initial_density: float, total_steps: int,
                  start_step: int | None, end_step: int | None, frequency: int | None,
                  delta_t: int | None, *, default_start: int, default_end: int,
                  default_end_text: str) -> tuple[float, int, int, int]:
    """The checked settings of a gradual pruning schedule, ``(initial_density, frequency,
    start_step, end_step)``: ``density`` (the final one) at most ``initial_density``, one
    period given as ``frequency`` or ``delta_t`` (100 by default), ``start_step`` before
    ``end_step`` at most ``total_steps`` (``default_start``, ``default_end`` where not given;
    ``default_end_text`` names the latter in an error)."""
    initial = check_density(initial_density, "initial_density")
    if check_density(density) > initial:
        raise ValueError(
            f"density (the final density, {density!r}) must not be above initial_density "
            f"({initial_density!r}): pruning only removes weights")
    steps = checks.positive_int(total_steps, "total_steps")
    if frequency is not None and delta_t is not None and frequency != delta_t:
        raise ValueError(f"frequency ({frequency!r}) and delta_t ({delta_t!r}) name the "
                         "same period; give one of them")
    period = frequency if frequency is not None else delta_t
    period = 100 if period is None else checks.positive_int(period, "frequency")
    start = (default_start if start_step is None
             else checks.non_negative_int(start_step, "start_step"))
    end = default_end if end_step is None else checks.positive_int(end_step, "end_step")
    if end > steps:
        raise ValueError(f"end_step must be at most total_steps ({steps}), got {end}")
    if start >= end:
        default = f", the default {default_end_text}" if end_step is None else ""
        raise ValueError(f"start_step ({start}) must be before end_step ({end}{default})")
    return initial, period, start, end
